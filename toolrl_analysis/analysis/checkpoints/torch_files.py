"""Torch pickles (`.pt`, `pytorch_model.bin`, sharded or not), loaded with `weights_only=True` and
memory-mapped, one shard at a time: never unpickle code."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from toolrl_analysis.analysis.checkpoints.base import Checkpoint, TensorInfo, as_view, strip_wrapper_prefixes
from toolrl_analysis.errors import CheckpointError
from toolrl_analysis.io import torch_load_safely
from toolrl_analysis.models.checkpoint import POLICY_FORMAT


def extract_state_dict(obj: Any, path: Path) -> tuple[dict[str, torch.Tensor], dict | None]:
    """The tensors of a loaded `.pt`: a plain state dict or one wrapped under `state_dict` / `model`."""
    config = None
    if isinstance(obj, Mapping):
        if obj.get("format") == POLICY_FORMAT or not _is_state_dict(obj):
            for key in ("state_dict", "model"):
                inner = obj.get(key)
                if isinstance(inner, Mapping) and _is_state_dict(inner):
                    config = obj.get("config") if isinstance(obj.get("config"), dict) else None
                    obj = inner
                    break
        tensors = {str(k): v for k, v in obj.items() if isinstance(v, torch.Tensor)}
        if tensors:  # a state dict, perhaps with a few bookkeeping entries beside the tensors
            return tensors, config
        keys = ", ".join(sorted(map(str, obj))[:8])
        raise CheckpointError(f"{path} holds a dict but no state dict (keys: {keys})")
    raise CheckpointError(f"{path} does not hold a state dict (found {type(obj).__name__})")


def _is_state_dict(obj: Mapping) -> bool:
    return bool(obj) and all(isinstance(v, torch.Tensor) for k, v in obj.items() if k != "_metadata")


class TorchCheckpoint(Checkpoint):
    """`.pt` / `pytorch_model.bin` files, one shard loaded (memory-mapped) at a time."""

    format = "pt"

    def __init__(self, path: Path, files: list[Path], config: dict | None = None, format: str | None = None):
        self._files = list(files)
        self._shard_of: dict[str, int] = {}
        self._original_name: dict[str, str] = {}
        infos: dict[str, TensorInfo] = {}
        shared: dict[str, str] = {}
        first_with_storage: dict[tuple, str] = {}
        self._loaded: tuple[int, dict[str, torch.Tensor]] | None = None
        for index, file in enumerate(self._files):
            tensors, file_config = extract_state_dict(torch_load_safely(file), file)
            config = config or file_config
            for name, renamed in strip_wrapper_prefixes({n: n for n in tensors}).items():
                if name in infos:
                    raise CheckpointError(f"{path}: tensor {name} appears in two shards")
                tensor = tensors[renamed]
                infos[name] = TensorInfo(name, tuple(tensor.shape), tensor.dtype)
                storage_key = (
                    index,
                    tensor.untyped_storage().data_ptr(),
                    tensor.storage_offset(),
                    tuple(tensor.shape),
                    tuple(tensor.stride()),
                    tensor.dtype,
                )
                if tensor.numel() and storage_key in first_with_storage:
                    shared[name] = first_with_storage[storage_key]
                first_with_storage.setdefault(storage_key, name)
                self._shard_of[name] = index
                self._original_name[name] = renamed
            if len(self._files) == 1:
                self._loaded = (0, tensors)  # keep the single mmap'd file instead of loading it twice
        super().__init__(path, infos, config)
        self.tied = shared
        if format:
            self.format = format

    def _tensors(self, index: int) -> dict[str, torch.Tensor]:
        if self._loaded is None or self._loaded[0] != index:
            self._loaded = None  # drop the previous shard before mapping the next one
            tensors, _ = extract_state_dict(torch_load_safely(self._files[index]), self._files[index])
            self._loaded = (index, tensors)
        return self._loaded[1]

    def _read(self, info, start, stop, out):
        tensor = self._tensors(self._shard_of[info.name])[self._original_name[info.name]]
        rows = tensor[start:stop] if tensor.dim() else tensor
        if out is None:
            return rows.clone()  # never hand out views of the memory map: writes would reach the file
        result = as_view(out, rows.numel() * rows.element_size(), rows.dtype, tuple(rows.shape))
        result.copy_(rows)
        return result

    def close(self) -> None:
        self._loaded = None
