"""`envs` commands on bad input: one line on stderr, exit status 2, never a traceback."""

import subprocess
import sys
from pathlib import Path

import pytest

from toolrl_analysis import cli

REPO = Path(__file__).resolve().parents[1]


def run(argv, capsys):
    code = cli.main(argv)
    captured = capsys.readouterr()
    return code, captured.out, captured.err


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["envs", "check", "{tmp}/missing.jsonl"], "no such file"),
        (["envs", "check", "{tmp}/notes.jsonl"], "not valid JSON"),
        (["envs", "import", "{tmp}/missing.jsonl", "--out", "{tmp}/o"], "no such file"),
        (["envs", "import", "{tmp}/notes.jsonl", "--out", "{tmp}/o"], "not valid JSON"),
        (["envs", "export", "{tmp}/missing", "--format", "ftrl", "--out", "{tmp}/o.jsonl"], "no such file"),
        (
            ["envs", "export", "{tmp}/notes.jsonl", "--format", "xml", "--out", "{tmp}/o"],
            "unknown export format",
        ),
        (["envs", "build", "--out", "{tmp}/o", "--set", "bogus_key=1"], "unknown config key 'bogus_key'"),
        (["envs", "build", "--out", "{tmp}/o", "--set", "train_size=many"], "config key 'train_size'"),
        (["envs", "build", "--out", "{tmp}/o", "--set", "merge_prob=2"], "config key 'merge_prob'"),
        (["envs", "build", "--out", "{tmp}/o", "--set", "multi_hop_min=1"], "config key 'multi_hop_min'"),
        (["envs", "build", "--out", "{tmp}/o", "--set", "train_mix=1,1"], "config key 'train_mix'"),
        (["envs", "build", "--config", "{tmp}/none.toml", "--out", "{tmp}/o"], "config file not found"),
        (["envs", "build", "--out", "{tmp}/notes.jsonl", "--set", "train_size=1"], "is not a directory"),
        (
            [
                "envs",
                "build",
                "--out",
                "{tmp}/o",
                "--set",
                "train_size=400",
                "--set",
                "train_mix=1,0,0,0",
                "--set",
                "train_worlds=1",
            ]
            + [f"--set=world_{kind}=20" for kind in ("people", "places", "organisations", "artefacts")],
            "the world is too small",
        ),
    ],
)
def test_bad_input_exits_2_with_one_line(tmp_path, capsys, argv, message):
    (tmp_path / "notes.jsonl").write_text("this is not json\n")
    code, out, err = run([a.format(tmp=tmp_path) for a in argv], capsys)
    assert code == 2
    assert message in err and "Traceback" not in err
    assert len(err.strip().splitlines()) == 1


def test_subprocess_reports_bad_config_without_traceback(tmp_path):
    (tmp_path / "bad.toml").write_text("train_size = [\n")
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "toolrl_analysis.cli",
            "envs",
            "build",
            "--config",
            str(tmp_path / "bad.toml"),
            "--out",
            str(tmp_path / "o"),
        ],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=120,
    )
    assert result.returncode == 2
    assert "not valid TOML" in result.stderr and "Traceback" not in result.stderr


def test_build_import_and_export_print_human_summaries(tmp_path, capsys):
    # The printed configuration is a config file: building from it is building from the defaults.
    code, printed, _ = run(["envs", "build", "--print-config"], capsys)
    assert code == 0 and "[worlds]" in printed
    (tmp_path / "printed.toml").write_text(printed)
    code, out, _ = run(
        [
            "envs",
            "build",
            "--config",
            str(tmp_path / "printed.toml"),
            "--out",
            str(tmp_path / "set"),
            "--set",
            "train_size=4",
            "--set",
            "test_per_scenario=1",
        ],
        capsys,
    )
    assert code == 0 and "function integration" in out and "toolset_extension" in out
    code, out, _ = run(
        ["envs", "import", str(tmp_path / "set" / "test.jsonl"), "--out", str(tmp_path / "imp")], capsys
    )
    assert code == 0 and "imported 4 environments" in out
    code, out, _ = run(
        ["envs", "export", str(tmp_path / "set"), "--format", "verl", "--out", str(tmp_path / "set.parquet")],
        capsys,
    )
    assert code == 0 and "exported 8 environments" in out and (tmp_path / "set.parquet").is_file()
