"""What every checkpoint reader shares: the tensor index (`TensorInfo`), the `Checkpoint` interface, and
helpers for reading rows into buffers the caller owns."""

from __future__ import annotations

import functools
import math
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

import torch

from toolrl_analysis.errors import CheckpointError

# Prefixes that wrappers add to every key (DDP, torch.compile); stripped so checkpoints line up.
WRAPPER_PREFIXES = ("module.", "_orig_mod.")


@dataclass(frozen=True)
class TensorInfo:
    """What the index knows about a tensor without reading it."""

    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def nbytes(self) -> int:
        return self.numel * _itemsize(self.dtype)

    @property
    def rows(self) -> int:
        """Length of the first dimension: reads are ranges of rows (1 for a scalar)."""
        return self.shape[0] if self.shape else 1


@functools.cache
def _itemsize(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


def as_view(
    out: torch.Tensor | None, nbytes: int, dtype: torch.dtype, shape: tuple[int, ...]
) -> torch.Tensor:
    """A tensor of `shape`/`dtype` backed by the byte buffer `out` (or a fresh one)."""
    if out is None:
        buffer = torch.empty(nbytes, dtype=torch.uint8)
    else:
        if out.dtype != torch.uint8 or out.numel() < nbytes:
            raise ValueError(f"out buffer too small: {out.numel()} bytes for {nbytes}")
        buffer = out[:nbytes]
    return buffer.view(dtype).view(shape)


def rows_shape(info: TensorInfo, start: int, stop: int) -> tuple[int, ...]:
    return (stop - start, *info.shape[1:]) if info.shape else ()


def row_range(info: TensorInfo, start: int, stop: int | None) -> tuple[int, int]:
    stop = info.rows if stop is None else min(stop, info.rows)
    if not 0 <= start <= stop:
        raise ValueError(f"bad row range {start}:{stop} for {info.name} with {info.rows} rows")
    return start, stop


class Checkpoint:
    """A named set of tensors read lazily. Subclasses implement `_read`.

    `read(name, start, stop, out=...)` returns rows `start:stop` of a tensor in its stored dtype; with a
    uint8 `out` buffer the result is a view into it (the caller owns it and may modify it), otherwise a
    fresh tensor. Use as a context manager, or call `close()`, to release open shards.
    """

    format: str = "checkpoint"

    def __init__(self, path: Path, infos: Mapping[str, TensorInfo], config: dict | None = None):
        self.path = Path(path)
        self._infos = dict(infos)
        self.config = config
        # name -> the earlier name whose storage it shares (tied embeddings in a torch state dict).
        self.tied: dict[str, str] = {}

    # -- index ----------------------------------------------------------------------------------
    def names(self) -> list[str]:
        """Tensor names in storage order (shard by shard), the cheapest order to stream them."""
        return list(self._infos)

    def info(self, name: str) -> TensorInfo:
        try:
            return self._infos[name]
        except KeyError:
            raise CheckpointError(f"{self.path}: no tensor named {name}") from None

    def infos(self) -> dict[str, TensorInfo]:
        return dict(self._infos)

    def __contains__(self, name: object) -> bool:
        return name in self._infos

    def __len__(self) -> int:
        return len(self._infos)

    @property
    def model_type(self) -> str | None:
        return (self.config or {}).get("model_type")

    @property
    def nbytes(self) -> int:
        return sum(info.nbytes for info in self._infos.values())

    # -- data -----------------------------------------------------------------------------------
    def read(self, name: str, start: int = 0, stop: int | None = None, out: torch.Tensor | None = None):
        info = self.info(name)
        start, stop = row_range(info, start, stop)
        return self._read(info, start, stop, out)

    def byte_range(self, name: str, start: int = 0, stop: int | None = None) -> tuple[Path, int, int] | None:
        """Where rows start:stop lie, as stored, in a file: (path, byte offset, byte count), for a copy that
        never passes through memory (`os.copy_file_range`); None when the format has no such plain layout."""
        return None

    def get(self, name: str) -> torch.Tensor:
        """The whole tensor, freshly allocated, in its stored dtype."""
        return self.read(name)

    def iter_tensors(self, names: Iterable[str] | None = None) -> Iterator[tuple[str, torch.Tensor]]:
        """Yield (name, tensor) one at a time in storage order; memory holds one tensor at a time."""
        wanted = None if names is None else set(names)
        for name in self.names():
            if wanted is None or name in wanted:
                yield name, self.get(name)

    def state_dict(self, names: Iterable[str] | None = None, dtype: torch.dtype | None = None) -> dict:
        """Everything in memory at once: for small models only (the tiny policy, tests)."""
        return {n: (t if dtype is None else t.to(dtype)) for n, t in self.iter_tensors(names)}

    def _read(self, info: TensorInfo, start: int, stop: int, out: torch.Tensor | None) -> torch.Tensor:
        raise NotImplementedError

    def close(self) -> None:
        """Release open shards; reading again reopens them."""

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"{type(self).__name__}({str(self.path)!r}, {len(self)} tensors)"


def strip_wrapper_prefixes(mapping: dict) -> dict:
    for prefix in WRAPPER_PREFIXES:
        if mapping and all(str(k).startswith(prefix) for k in mapping):
            mapping = {str(k)[len(prefix) :]: v for k, v in mapping.items()}
    return mapping
