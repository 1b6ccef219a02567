"""The rank-k operation: a subset's update truncated to rank k, its residual, and random rank-k controls.

AlphaRL (arXiv 2510.00553) found that the rank-1 approximation of each matrix's RL update recovers most of
the gain. For every weight matrix W of the subset, with update dW = trained - base and its SVD:

    rank k      dW_k = U_k S_k V_k^T, rescaled to ||dW||_F
    residual    dW - dW_k, rescaled to ||dW||_F
    random      a random rank-k matrix (Gaussian factors), rescaled to ||dW||_F: the control

and then `transplant` puts base + that into the model, `revert` takes trained - that. Equal Frobenius norms
make the three comparable: what differs is the direction, not the size. Only whole 2-D tensors take part
(vectors have no rank); every other entry is the starting model's (the base for a transplant, the trained
model for a revert).
"""

from __future__ import annotations

import zlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

from toolrl_analysis.analysis.ablate.splice import SpliceAccount
from toolrl_analysis.analysis.components import ParameterPart
from toolrl_analysis.analysis.diff import MatchedTensor
from toolrl_analysis.errors import UserError

WHICH = ("rank", "residual", "random")


@dataclass
class LowRank:
    """One rank-k variant: `kind` (revert / transplant), `which` direction, the matrices, the rank."""

    kind: str
    which: str
    rank: int
    names: list[str]  # whole 2-D tensors
    seed: int = 0
    _cache: dict = field(default_factory=dict, repr=False, compare=False)

    def __post_init__(self):
        if self.kind not in ("revert", "transplant") or self.which not in WHICH:
            raise UserError(f"unknown rank-k operation {self.kind} {self.which}")
        if self.rank < 1:
            raise UserError(f"--rank must be at least 1, got {self.rank}")

    @property
    def start(self) -> str:
        return "trained" if self.kind == "revert" else "base"


def matrices(parts: Sequence[ParameterPart], pairs: Mapping[str, tuple]) -> list[str]:
    """The whole 2-D floating-point tensors among `parts` (the ones a rank-k operation acts on)."""
    names = []
    for part in parts:
        entry = pairs.get(part.name)
        if entry is None or part.dim is not None:
            continue
        base = entry[1]
        if base.dim() == 2 and base.dtype.is_floating_point and min(base.shape) > 1:
            names.append(part.name)
    return list(dict.fromkeys(names))


def _direction(spec: LowRank, name: str, update: torch.Tensor, svd_cache: dict) -> torch.Tensor:
    norm = torch.linalg.matrix_norm(update)
    if norm == 0:
        return update
    k = min(spec.rank, min(update.shape))
    if spec.which == "random":
        generator = torch.Generator().manual_seed(zlib.crc32(f"{spec.seed}/{name}".encode()))
        left = torch.randn(update.shape[0], k, generator=generator, dtype=update.dtype)
        right = torch.randn(k, update.shape[1], generator=generator, dtype=update.dtype)
        direction = left @ right
    else:
        if name not in svd_cache:
            svd_cache[name] = torch.linalg.svd(update, full_matrices=False)
        u, s, vh = svd_cache[name]
        truncated = (u[:, :k] * s[:k]) @ vh[:k]
        direction = truncated if spec.which == "rank" else update - truncated
    size = torch.linalg.matrix_norm(direction)
    return direction * (norm / size) if size > 0 else direction


def low_rank_in_memory(
    spec: LowRank,
    pairs: Mapping[str, tuple[MatchedTensor, torch.Tensor, torch.Tensor]],
    svd_cache: dict | None = None,
) -> tuple[dict[str, torch.Tensor], SpliceAccount]:
    """Every matched tensor of the variant (see the module docstring), and its account (the parameters it
    sets; its share of the update is that of the matrices it acts on). `svd_cache` (name -> SVD of dW) may
    be shared by the variants of one pair."""
    svd_cache = {} if svd_cache is None else svd_cache
    out, account = {}, SpliceAccount()
    chosen = set(spec.names)
    for name, (_, base, trained) in pairs.items():
        start = trained if spec.start == "trained" else base
        if base.dtype.is_floating_point:
            squared = float(((trained.double() - base.double()) ** 2).sum())
            account.total_energy += squared
        if name not in chosen:
            out[name] = start
            continue
        update = trained.float() - base.float()
        direction = _direction(spec, name, update, svd_cache)
        value = base.float() + direction if spec.kind == "transplant" else trained.float() - direction
        out[name] = value.to(start.dtype)
        account.parameters += base.numel()
        account.update_energy += squared
    return out, account


def spectrum_share(pairs: Mapping[str, tuple], names: Sequence[str], rank: int) -> float:
    """The share of the update's squared norm that the rank-k truncations hold, over the matrices `names`."""
    kept = total = 0.0
    for name in names:
        _, base, trained = pairs[name]
        values = torch.linalg.svdvals(trained.float() - base.float()).double().numpy()
        kept += float(np.sum(values[:rank] ** 2))
        total += float(np.sum(values**2))
    return kept / total if total > 0 else float("nan")
