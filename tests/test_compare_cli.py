"""`toolrl-analyze compare` through the CLI entry: outputs, and one-line errors with exit status 2."""

from __future__ import annotations

import json
import os
import pickle
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from test_compare_support import planted_qwen2_pair, random_state_dict, tiny_model, write_checkpoint

from toolrl_analysis.cli import main

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli")
    _, trained, base_path, trained_path = planted_qwen2_pair(root, "pt", "safetensors")
    paths = {"base": base_path, "trained": trained_path, "root": root}
    gpt2 = tiny_model("gpt2")
    paths["gpt2"] = write_checkpoint(random_state_dict(gpt2), "safetensors", root / "gpt2.safetensors")
    reshaped = dict(trained)
    reshaped["model.layers.1.mlp.up_proj.weight"] = torch.zeros(60, 32)
    paths["reshaped"] = write_checkpoint(reshaped, "safetensors", root / "reshaped.safetensors")
    fewer = {
        k: v
        for k, v in trained.items()
        if k not in ("model.norm.weight", "model.layers.2.mlp.up_proj.weight")
    }
    paths["fewer"] = write_checkpoint(fewer, "safetensors", root / "fewer.safetensors")
    return paths


def run(capsys, *argv) -> tuple[int, str, str]:
    status = main(["compare", *map(str, argv)])
    captured = capsys.readouterr()
    return status, captured.out, captured.err


def assert_user_error(status: int, err: str, *fragments: str) -> None:
    assert status == 2
    assert "Traceback" not in err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    for fragment in fragments:
        assert fragment in lines[0], (fragment, lines[0])


def test_human_summary(checkpoints, capsys):
    status, out, err = run(capsys, checkpoints["base"], checkpoints["trained"], "--top", "3")
    assert status == 0, err
    assert "most-changed components" in out and "mlp.down" in out and "attn.q" in out
    assert "update share by depth third" in out


def test_json_document_and_files(checkpoints, capsys, tmp_path):
    status, out, err = run(
        capsys, checkpoints["base"], checkpoints["trained"], "--json", "--out", tmp_path / "out"
    )
    assert status == 0, err
    document = json.loads(out)  # one document, strict JSON
    assert set(document) == {"rows", "summary"}
    row = next(r for r in document["rows"] if r["name"] == "model.layers.1.mlp.down_proj.weight")
    assert row["layer"] == 1 and row["component"] == "mlp.down"
    assert row["relative_frobenius_change"] == pytest.approx(0.1, rel=1e-5)
    assert {"name", "layer", "component", "numel", "dtype", "shape", "cosine_similarity"} <= set(row)
    assert document["summary"]["n_changed_rows"] == 2
    assert {b["family"] for b in document["summary"]["bands"]} == {"attn", "mlp", "norm", "all"}
    for name in ("parameters.csv", "parameters.parquet", "components.csv", "heatmap.png", "layers.png"):
        assert (tmp_path / "out" / name).is_file()


def test_select_and_spectral(checkpoints, capsys):
    status, out, err = run(
        capsys, checkpoints["base"], checkpoints["trained"], "--json", "--select", "mlp.down@1", "--spectral"
    )
    assert status == 0, err
    [row] = json.loads(out)["rows"]
    assert row["update_stable_rank"] > 1 and row["spectral_method"] == "exact"


def test_missing_path(checkpoints, capsys):
    assert_user_error(
        *run(capsys, checkpoints["base"], checkpoints["root"] / "nope.pt")[::2],
        "no such checkpoint",
        "nope.pt",
    )


def test_not_a_checkpoint(checkpoints, capsys, tmp_path):
    text = tmp_path / "notes.pt"
    text.write_text("hello, this is not a checkpoint\n")
    assert_user_error(*run(capsys, checkpoints["base"], text)[::2], "notes.pt", "is not a checkpoint")
    empty_dir = tmp_path / "empty"
    empty_dir.mkdir()
    assert_user_error(*run(capsys, empty_dir, checkpoints["base"])[::2], "not a checkpoint directory")
    not_a_dict = tmp_path / "list.pt"
    torch.save([torch.zeros(2)], not_a_dict)
    assert_user_error(*run(capsys, checkpoints["base"], not_a_dict)[::2], "does not hold a state dict")


def test_truncated_safetensors(checkpoints, capsys, tmp_path):
    data = Path(checkpoints["trained"]).read_bytes()
    for cut in (len(data) - 100, 4, 200):
        truncated = tmp_path / f"cut{cut}.safetensors"
        truncated.write_bytes(data[:cut])
        status, _, err = run(capsys, checkpoints["base"], truncated)
        assert_user_error(status, err, truncated.name)
        assert "truncated" in err or "not a safetensors file" in err


class _WritesMarker:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@pytest.mark.parametrize("zip_format", [True, False])
def test_pickle_that_runs_code_is_refused(checkpoints, capsys, tmp_path, zip_format):
    marker = tmp_path / "PWNED"
    evil = tmp_path / "evil.pt"
    payload = {"model.embed_tokens.weight": torch.zeros(2), "x": _WritesMarker(marker)}
    torch.save(payload, evil, _use_new_zipfile_serialization=zip_format)
    status, _, err = run(capsys, checkpoints["base"], evil)
    assert_user_error(status, err, "refusing to load", "evil.pt")
    assert not marker.exists()
    # The same refusal for a raw pickle file.
    raw = tmp_path / "raw.pt"
    raw.write_bytes(pickle.dumps(_WritesMarker(marker), protocol=2))
    assert_user_error(*run(capsys, raw, checkpoints["base"])[::2], "refusing to load")
    assert not marker.exists()


def test_mismatched_shapes_name_the_tensor(checkpoints, capsys):
    assert_user_error(
        *run(capsys, checkpoints["base"], checkpoints["reshaped"])[::2],
        "shape mismatch",
        "model.layers.1.mlp.up_proj.weight",
        "[64, 32]",
        "[60, 32]",
    )


def test_missing_keys_are_listed_and_allow_missing_compares_the_rest(checkpoints, capsys):
    status, _, err = run(capsys, checkpoints["base"], checkpoints["fewer"])
    assert_user_error(
        status, err, "trained lacks 2 tensors", "model.norm.weight", "model.layers.2.mlp.up_proj.weight"
    )
    assert "--allow-missing" in err
    status, out, err = run(capsys, checkpoints["base"], checkpoints["fewer"], "--allow-missing", "--json")
    assert status == 0, err
    summary = json.loads(out)["summary"]
    assert sorted(summary["only_in_base"]) == ["model.layers.2.mlp.up_proj.weight", "model.norm.weight"]
    assert summary["n_tensors"] == len(json.loads(out)["rows"])


def test_different_architectures(checkpoints, capsys):
    assert_user_error(
        *run(capsys, checkpoints["base"], checkpoints["gpt2"])[::2],
        "different architectures",
        "GPT-2",
        "llama-like",
    )


def test_bad_selector(checkpoints, capsys):
    assert_user_error(
        *run(capsys, checkpoints["base"], checkpoints["trained"], "--select", "mpl@0")[::2],
        "unknown component",
    )
    assert_user_error(
        *run(capsys, checkpoints["base"], checkpoints["trained"], "--select", "norm.q")[::2],
        "selects no parameters",
    )


def test_bad_numbers(checkpoints, capsys):
    for option in (["--top", "0"], ["--top-k", "-1"], ["--threads", "-2"]):
        assert_user_error(*run(capsys, checkpoints["base"], checkpoints["trained"], *option)[::2], "must be")


def test_console_script_end_to_end(checkpoints, tmp_path):
    """Through the installed entry point, in a fresh process: errors still come without a traceback."""
    script = Path(sys.executable).with_name("toolrl-analyze")
    command = [str(script)] if script.exists() else [sys.executable, "-m", "toolrl_analysis.cli"]
    done = subprocess.run(
        [*command, "compare", str(checkpoints["base"]), str(checkpoints["trained"]), "--json"],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    assert len(json.loads(done.stdout)["rows"]) > 0
    bad = tmp_path / "bad.safetensors"
    save_file({"a": torch.zeros(4)}, str(bad))
    bad.write_bytes(bad.read_bytes()[:-3])
    done = subprocess.run(
        [*command, "compare", str(checkpoints["base"]), str(bad)],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=120,
    )
    assert done.returncode == 2
    assert "Traceback" not in done.stderr and "truncated" in done.stderr
    assert len(done.stderr.strip().splitlines()) == 1
