"""Opening any accepted path: recognise its format by content, then pick the reader."""

from __future__ import annotations

import os
from pathlib import Path

from toolrl_analysis.analysis.checkpoints.base import Checkpoint
from toolrl_analysis.analysis.checkpoints.lora import LoraCheckpoint
from toolrl_analysis.analysis.checkpoints.safetensors_files import SafetensorsCheckpoint
from toolrl_analysis.analysis.checkpoints.torch_files import TorchCheckpoint
from toolrl_analysis.errors import CheckpointError, first_names
from toolrl_analysis.io import read_json_object
from toolrl_analysis.models.embedded import resolve_model


def is_lora_adapter(path: str | os.PathLike) -> bool:
    return (Path(path) / "adapter_config.json").is_file()


def detect_format(path: str | os.PathLike) -> str:
    """One of: pt, safetensors, hf-safetensors, hf-sharded, hf-bin, hf-bin-sharded, peft-lora.

    Files are recognised by content, not by extension, so a mislabelled file still gets a clear error.
    """
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"no such checkpoint: {path}")
    if path.is_dir():
        if is_lora_adapter(path):
            return "peft-lora"
        for marker, kind in (
            ("model.safetensors.index.json", "hf-sharded"),
            ("model.safetensors", "hf-safetensors"),
            ("pytorch_model.bin.index.json", "hf-bin-sharded"),
            ("pytorch_model.bin", "hf-bin"),
        ):
            if (path / marker).is_file():
                return kind
        raise CheckpointError(
            f"{path} is not a checkpoint directory (no model.safetensors, model.safetensors.index.json, "
            "pytorch_model.bin or adapter_config.json)"
        )
    try:
        with open(path, "rb") as handle:
            head = handle.read(16)
    except OSError as exc:
        raise CheckpointError(f"cannot read {path}: {exc.strerror or exc}") from None
    if head[:4] == b"PK\x03\x04" or head[:1] == b"\x80":  # zip (torch.save) or a raw pickle
        return "pt"
    if len(head) >= 9 and head[8:9] == b"{":
        return "safetensors"
    raise CheckpointError(
        f"{path} is not a checkpoint (expected a .pt state dict, a .safetensors file or a model directory)"
    )


def open_checkpoint(
    path: str | os.PathLike, *, lora_base: str | os.PathLike | Checkpoint | None = None
) -> Checkpoint:
    """Open any accepted checkpoint lazily (`embedded` is the shipped base). A PEFT adapter directory needs
    `lora_base` (path or checkpoint)."""
    path = resolve_model(path)
    kind = detect_format(path)
    if kind == "pt":
        return TorchCheckpoint(path, [path])
    if kind == "safetensors":
        return SafetensorsCheckpoint(path, [path])
    if kind == "peft-lora":
        if lora_base is None:
            raise CheckpointError(f"{path} is a PEFT LoRA adapter: name its base weights (--lora-base PATH)")
        base = lora_base if isinstance(lora_base, Checkpoint) else open_checkpoint(lora_base)
        if isinstance(base, LoraCheckpoint):
            raise CheckpointError(f"the base of adapter {path} is itself an adapter ({base.path})")
        return LoraCheckpoint(path, base)
    config = read_json_object(path / "config.json") if (path / "config.json").is_file() else None
    if kind == "hf-safetensors":
        return SafetensorsCheckpoint(path, [path / "model.safetensors"], config, format=kind)
    if kind == "hf-sharded":
        files = _shard_files(path, "model.safetensors.index.json")
        return SafetensorsCheckpoint(path, files, config, format=kind)
    if kind == "hf-bin-sharded":
        return TorchCheckpoint(path, _shard_files(path, "pytorch_model.bin.index.json"), config, format=kind)
    return TorchCheckpoint(path, [path / "pytorch_model.bin"], config, format=kind)


def open_pair(
    base: str | os.PathLike, trained: str | os.PathLike, *, lora_base: str | os.PathLike | None = None
) -> tuple[Checkpoint, Checkpoint]:
    """Open the two sides of a comparison. An adapter directory on either side is applied to `lora_base`
    when given, otherwise to the other side (the usual `compare BASE ADAPTER_DIR`)."""
    base, trained = resolve_model(base), resolve_model(trained)
    base_is_adapter, trained_is_adapter = is_lora_adapter(base), is_lora_adapter(trained)
    if base_is_adapter and trained_is_adapter and lora_base is None:
        raise CheckpointError(
            "both checkpoints are LoRA adapters: name their base weights with --lora-base PATH"
        )
    if base_is_adapter and lora_base is None:
        raise CheckpointError(f"{base} is a LoRA adapter: name its base weights with --lora-base PATH")
    base_ckpt = open_checkpoint(base, lora_base=lora_base)
    if trained_is_adapter:
        adapter_base = base_ckpt if lora_base is None else open_checkpoint(lora_base)
        return base_ckpt, open_checkpoint(trained, lora_base=adapter_base)
    return base_ckpt, open_checkpoint(trained)


def _shard_files(path: Path, index_name: str) -> list[Path]:
    index = read_json_object(path / index_name)
    weight_map = index.get("weight_map")
    if not isinstance(weight_map, dict) or not weight_map:
        raise CheckpointError(f"{path / index_name} has no weight_map")
    files = [path / name for name in dict.fromkeys(weight_map.values())]
    missing = [f.name for f in files if not f.is_file()]
    if missing:
        raise CheckpointError(f"{path}: shards named in {index_name} are missing: {first_names(missing)}")
    return files
