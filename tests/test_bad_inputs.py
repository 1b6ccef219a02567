"""Every bad input a newcomer met: each gives one line on stderr, exit status 2, no traceback, and no work
done first. (More bad inputs per command live beside each command's tests.)"""

from __future__ import annotations

import json

import pytest
import torch
from conftest import tiny_random_qwen2

from toolrl_analysis.cli import main
from toolrl_analysis.envs.pipeline import EnvBuildConfig, build_envsets, write_envset
from toolrl_analysis.models.checkpoint import save_policy
from toolrl_analysis.models.tokenizer import build_policy_tokenizer


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("bad")
    build = build_envsets(EnvBuildConfig(seed=2, train_size=8, test_per_scenario=1))
    write_envset(build, root / "envs")
    tokenizer = build_policy_tokenizer(build.train, vocab_size=600)
    save_policy(tiny_random_qwen2(tokenizer), tokenizer, root / "base.pt")
    save_policy(tiny_random_qwen2(tokenizer, seed=1), tokenizer, root / "trained.pt")
    (root / "latin1.jsonl").write_bytes('{"caf\xe9": 1}\n'.encode("latin-1"))
    (root / "five.pt").write_bytes(b"hello")
    whole = (root / "base.pt").read_bytes()
    (root / "truncated.pt").write_bytes(whole[: len(whole) // 2])
    (root / "a-file").write_text("not a directory\n")
    (root / "full").mkdir()
    (root / "full" / "train.jsonl").write_text("{}\n")
    return root


def cases(root):
    envs, base, trained = root / "envs", root / "base.pt", root / "trained.pt"
    latin1 = root / "latin1.jsonl"
    return {
        "evaluate: non-UTF-8 environments": (
            ["evaluate", str(base), "--envs", str(latin1)],
            "not UTF-8 text",
        ),
        "probe: non-UTF-8 environments": (
            ["probe", str(base), str(trained), "--envs", str(latin1)],
            "not UTF-8 text",
        ),
        "envs check: non-UTF-8 file": (["envs", "check", str(latin1)], "not UTF-8 text"),
        "envs import: non-UTF-8 file": (
            ["envs", "import", str(latin1), "--out", str(root / "imp")],
            "not UTF-8 text",
        ),
        "evaluate: --out is a file": (
            ["evaluate", str(base), "--envs", str(envs), "--out", str(root / "a-file")],
            "exists and is not a directory",
        ),
        "ablate: --envs is a JSON document": (
            ["ablate", str(base), str(trained), "--grid", "paper", "--envs", str(envs / "manifest.json")],
            "one JSON document, not JSON Lines",
        ),
        "evaluate: a 5-byte .pt": (
            ["evaluate", str(root / "five.pt"), "--envs", str(envs)],
            "5 bytes, neither",
        ),
        "compare: a truncated .pt": (
            ["compare", str(root / "truncated.pt"), str(trained)],
            "damaged or truncated",
        ),
        "envs build: a list of the wrong length": (
            ["envs", "build", "--out", str(root / "o"), "--set", "train_mix=[1,1]"],
            "'train_mix' must list 4 weights",
        ),
        "envs build: a list that does not parse": (
            ["envs", "build", "--out", str(root / "o"), "--set", "train_mix=[1,1"],
            "write a,b,c or [a, b, c]",
        ),
        "envs build: an existing output": (["envs", "build", "--out", str(root / "full")], "pass --force"),
        "train-grpo: missing environments": (
            ["train-grpo", "--envs", str(root / "nowhere"), "--init", str(base), "--out", str(root / "g")],
            "no training environments",
        ),
        "probe: --limit 0": (
            ["probe", str(base), str(trained), "--envs", str(envs), "--limit", "0"],
            "--limit must be",
        ),
        "envs build: a non-UTF-8 --config": (
            ["envs", "build", "--out", str(root / "o"), "--config", str(latin1)],
            "is not UTF-8 text (TOML files are UTF-8)",
        ),
        "ablate: --save with an unknown suffix": (
            ["ablate", str(base), str(trained), "--revert", "mlp@0", "--save", str(root / "hyb.xyz")],
            "not .xyz",
        ),
    }


CASES = sorted(cases(__import__("pathlib").Path("/x")))


@pytest.mark.parametrize("name", CASES)
def test_each_bad_input_is_one_line_and_exit_2(name, files, capsys):
    argv, message = cases(files)[name]
    assert main(argv) == 2
    captured = capsys.readouterr()
    lines = captured.err.splitlines()
    assert len(lines) == 1, captured.err  # no blank line before it, no traceback after it
    assert lines[0].startswith("toolrl-analyze: error: ") and message in lines[0], lines[0]
    assert captured.out == ""


def test_outputs_are_checked_before_any_work(files, capsys, monkeypatch):
    import toolrl_analysis.evaluate as evaluate_module

    monkeypatch.setattr(
        evaluate_module, "evaluate_checkpoint", lambda *a, **k: pytest.fail("evaluated first")
    )
    assert (
        main(
            [
                "evaluate",
                str(files / "base.pt"),
                "--envs",
                str(files / "envs"),
                "--out",
                str(files / "a-file"),
            ]
        )
        == 2
    )
    assert not (files / "hyb.xyz").exists()  # the refused --save wrote nothing
    assert json.loads((files / "envs" / "manifest.json").read_text())  # the refused file is valid JSON
    assert torch.load(files / "base.pt", weights_only=True)  # and the models were never touched


def test_a_model_name_with_a_dot_is_a_directory_to_save_into():
    from pathlib import Path

    from toolrl_analysis.analysis.ablate.save import output_format

    assert output_format(Path("runs/Qwen2.5-7B-lower-mlp")) == "hf-directory"
    assert output_format(Path("hybrid.safetensors")) == "safetensors" and output_format(Path("h.pt")) == "pt"


def test_print_config_ignores_an_output_it_will_not_write(files, capsys):
    assert main(["envs", "build", "--out", str(files / "a-file"), "--print-config"]) == 0
    assert "[sizes]" in capsys.readouterr().out


def test_help_shows_zero_defaults_and_leaves_out_unset_ones(capsys):
    with pytest.raises(SystemExit):
        main(["evaluate", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "seed of the sampled episodes (default: 0)" in text
    assert "(default: None)" not in text and "(default: False)" not in text


def test_a_grpo_checkpoint_of_the_older_format_still_resumes(tmp_path):
    from toolrl_analysis.training.resume import load_train_state

    weights = {"w": torch.ones(2)}
    torch.save({"iteration": 3, "model": weights, "optimizer": {"state": {}, "param_groups": []},
                "scheduler": {"last_epoch": 3}, "config": "{}"}, tmp_path / "iter-000003.pt")  # fmt: skip
    loaded, state = load_train_state(tmp_path / "iter-000003.pt")
    assert torch.equal(loaded["w"], weights["w"]) and state["iteration"] == 3 and "model" not in state


def test_no_flag_is_stored_under_a_name_nnsight_gives_every_object():
    """nnsight adds a `.save` method to every object once imported (probe's nnsight backend does), so a flag
    stored as `save` would never get its default in a process that has imported it."""
    import argparse

    import nnsight  # noqa: F401

    from toolrl_analysis.cli import build_parser

    injected = {name for name in dir(argparse.Namespace()) if not name.startswith("_")}
    dests = set()

    def walk(parser):
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                for sub in action.choices.values():
                    walk(sub)
            else:
                dests.add(action.dest)

    walk(build_parser())
    assert not dests & injected
    args = build_parser().parse_args(["ablate", "b.pt", "t.pt", "--grid", "paper", "--envs", "e.jsonl"])
    assert args.save_path is None
