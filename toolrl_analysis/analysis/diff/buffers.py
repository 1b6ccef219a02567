"""Scratch memory the diff reuses from chunk to chunk, so the arithmetic allocates nothing per chunk."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch


class ScratchBuffers:
    """Reusable scratch tensors, grown on demand: raw bytes and float32 views, one set per worker."""

    def __init__(self):
        self._store: dict[str, torch.Tensor] = {}

    def get(self, key: str, nbytes: int) -> torch.Tensor:
        buffer = self._store.get(key)
        if buffer is None or buffer.numel() < nbytes:
            buffer = torch.empty(max(nbytes, 8), dtype=torch.uint8)
            self._store[key] = buffer
        return buffer

    def float32_view(self, key: str, shape: Sequence[int]) -> torch.Tensor:
        return self.view(key, shape, torch.float32)

    def view(self, key: str, shape: Sequence[int], dtype: torch.dtype) -> torch.Tensor:
        """Scratch of `shape` and `dtype` (contents undefined), reusing the buffer stored under `key`."""
        nbytes = math.prod(shape) * dtype.itemsize
        return self.get(key, nbytes)[:nbytes].view(dtype).view(tuple(shape))

    def float32(self, key: str, raw: torch.Tensor) -> torch.Tensor:
        """raw as float32: itself when already float32 (we own it), else a converted copy in scratch."""
        if raw.dtype == torch.float32:
            return raw
        return self.float32_view(key, raw.shape).copy_(raw)
