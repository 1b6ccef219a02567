"""The lazy checkpoint readers: every format gives the same tensors, row ranges read lazily, bad files
get one-line CheckpointErrors."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import save_file
from test_compare_support import FORMATS, random_state_dict, suffix, tiny_model, write_checkpoint

from toolrl_analysis.analysis.checkpoints import (
    SafetensorsCheckpoint,
    TorchCheckpoint,
    detect_format,
    open_checkpoint,
    read_safetensors_header,
)
from toolrl_analysis.errors import CheckpointError


@pytest.fixture(scope="module")
def qwen2(tmp_path_factory):
    root = tmp_path_factory.mktemp("readers")
    model = tiny_model("qwen2")
    state = random_state_dict(model)
    paths = {fmt: write_checkpoint(state, fmt, root / f"m-{fmt}{suffix(fmt)}", model) for fmt in FORMATS}
    return state, paths


@pytest.mark.parametrize("fmt", FORMATS)
def test_every_format_reads_the_same_tensors(qwen2, fmt):
    state, paths = qwen2
    expected_kind = {
        "pt": "pt",
        "pt-wrapped": "pt",
        "pt-policy": "pt",
        "safetensors": "safetensors",
        "hf-single": "hf-safetensors",
        "hf-sharded": "hf-sharded",
        "hf-bin": "hf-bin",
    }[fmt]
    assert detect_format(paths[fmt]) == expected_kind
    with open_checkpoint(paths[fmt]) as checkpoint:
        assert set(checkpoint.names()) == set(state)
        for name, tensor in state.items():
            info = checkpoint.info(name)
            assert info.shape == tuple(tensor.shape) and info.dtype == tensor.dtype
            assert torch.equal(checkpoint.get(name), tensor)
        if fmt.startswith("hf") or fmt == "pt-policy":
            assert checkpoint.model_type == "qwen2"


@pytest.mark.parametrize("fmt", ["safetensors", "hf-sharded", "pt"])
def test_row_ranges_and_buffers(qwen2, fmt):
    state, paths = qwen2
    name = "model.layers.2.mlp.down_proj.weight"
    buffer = torch.empty(10_000, dtype=torch.uint8)
    with open_checkpoint(paths[fmt]) as checkpoint:
        rows = checkpoint.read(name, 5, 9, out=buffer)
        assert torch.equal(rows, state[name][5:9])
        assert rows.untyped_storage().data_ptr() == buffer.untyped_storage().data_ptr()
        rows.zero_()  # the caller owns what it reads: the file and later reads are unaffected
        assert torch.equal(checkpoint.read(name, 5, 9), state[name][5:9])
        assert torch.equal(checkpoint.read(name, 30), state[name][30:])
        with pytest.raises(ValueError):
            checkpoint.read(name, 9, 5)


def test_sharded_reader_keeps_one_shard_open(qwen2):
    _, paths = qwen2
    checkpoint = open_checkpoint(paths["hf-sharded"])
    assert isinstance(checkpoint, SafetensorsCheckpoint)
    files = {entry.file for entry in checkpoint._entries.values()}
    assert len(files) > 3
    for name in checkpoint.names():
        checkpoint.get(name)
        assert checkpoint._open_file == checkpoint._entries[name].file
    checkpoint.close()
    assert checkpoint._fd is None


def test_iter_tensors_and_state_dict(qwen2):
    state, paths = qwen2
    with open_checkpoint(paths["hf-sharded"]) as checkpoint:
        names = [name for name, _ in checkpoint.iter_tensors()]
        assert sorted(names) == sorted(state)
        half = checkpoint.state_dict(names=names[:3], dtype=torch.float64)
        assert list(half) == names[:3] and all(t.dtype == torch.float64 for t in half.values())


def test_wrapper_prefixes_are_stripped(tmp_path):
    weight = torch.randn(3, 3)
    torch.save({"module.model.layers.0.mlp.up_proj.weight": weight}, tmp_path / "ddp.pt")
    save_file({"_orig_mod.model.layers.0.mlp.up_proj.weight": weight}, str(tmp_path / "compiled.safetensors"))
    for file in ("ddp.pt", "compiled.safetensors"):
        with open_checkpoint(tmp_path / file) as checkpoint:
            assert checkpoint.names() == ["model.layers.0.mlp.up_proj.weight"]
            assert torch.equal(checkpoint.get("model.layers.0.mlp.up_proj.weight"), weight)


def test_legacy_pt_without_mmap(tmp_path):
    weight = torch.randn(4, 2)
    torch.save({"w": weight}, tmp_path / "legacy.pt", _use_new_zipfile_serialization=False)
    with open_checkpoint(tmp_path / "legacy.pt") as checkpoint:
        assert isinstance(checkpoint, TorchCheckpoint)
        assert torch.equal(checkpoint.get("w"), weight)


def test_sharded_bin_directory(tmp_path):
    first, second = {"a.weight": torch.randn(2, 2)}, {"b.weight": torch.randn(3)}
    torch.save(first, tmp_path / "pytorch_model-00001-of-00002.bin")
    torch.save(second, tmp_path / "pytorch_model-00002-of-00002.bin")
    weight_map = {
        "a.weight": "pytorch_model-00001-of-00002.bin",
        "b.weight": "pytorch_model-00002-of-00002.bin",
    }
    (tmp_path / "pytorch_model.bin.index.json").write_text(json.dumps({"weight_map": weight_map}))
    with open_checkpoint(tmp_path) as checkpoint:
        assert checkpoint.format == "hf-bin-sharded"
        assert torch.equal(checkpoint.get("b.weight"), second["b.weight"])
        assert torch.equal(checkpoint.get("a.weight"), first["a.weight"])


def test_safetensors_header_validation(tmp_path):
    path = tmp_path / "x.safetensors"
    save_file({"a": torch.zeros(10, 10), "b": torch.ones(3)}, str(path))
    entries, metadata = read_safetensors_header(path)
    assert list(entries) == ["a", "b"] and entries["a"].info.shape == (10, 10)
    data = path.read_bytes()
    (tmp_path / "cut.safetensors").write_bytes(data[:-8])
    with pytest.raises(CheckpointError, match="truncated"):
        read_safetensors_header(tmp_path / "cut.safetensors")
    header_len = int.from_bytes(data[:8], "little")
    broken = data[:8] + data[8 : 8 + header_len].replace(b'"F32"', b'"F99"') + data[8 + header_len :]
    (tmp_path / "dtype.safetensors").write_bytes(broken)
    with pytest.raises(CheckpointError, match="malformed"):
        read_safetensors_header(tmp_path / "dtype.safetensors")


def test_missing_shard_is_named(qwen2, tmp_path):
    import shutil

    _, paths = qwen2
    copy = tmp_path / "sharded"
    shutil.copytree(paths["hf-sharded"], copy)
    victim = sorted(copy.glob("model-*.safetensors"))[1]
    victim.unlink()
    with pytest.raises(CheckpointError, match=victim.name):
        open_checkpoint(copy)


def test_shared_storage_in_pt_is_read_per_name(tmp_path):
    weight = torch.randn(5, 4)
    torch.save({"model.embed_tokens.weight": weight, "lm_head.weight": weight}, tmp_path / "tied.pt")
    with open_checkpoint(tmp_path / "tied.pt") as checkpoint:
        assert torch.equal(checkpoint.get("lm_head.weight"), checkpoint.get("model.embed_tokens.weight"))
