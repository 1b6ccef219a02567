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
        numel = math.prod(shape)
        return self.get(key, numel * 4)[: numel * 4].view(torch.float32).view(tuple(shape))

    def float32(self, key: str, raw: torch.Tensor) -> torch.Tensor:
        """raw as float32: itself when already float32 (we own it), else a converted copy in scratch."""
        if raw.dtype == torch.float32:
            return raw
        return self.float32_view(key, raw.shape).copy_(raw)
