"""The per-parameter metrics of an update dW = W_trained - W_base, from running sums over chunks.

relative_frobenius_change = ||dW||_F / ||W_base||_F, mean and max |dW|, the cosine similarity of base and
trained, update sparsity (fraction of entries with |dW| <= tol) at a few tolerances; `spectral_metrics` adds
dW's spectral norm, stable and effective rank and the change in W's top-k singular values.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import pandas as pd
import torch

from toolrl_analysis.analysis.diff.buffers import ScratchBuffers

SPARSITY_TOLERANCES = (0.0, 1e-6, 1e-5)  # increasing: UpdateStats.add relies on it
EXACT_SVD_MAX_ELEMENTS = 1 << 22


def sparsity_column(tolerance: float) -> str:
    """update_sparsity_0, update_sparsity_1e-6, update_sparsity_1e-5."""
    if tolerance == 0:
        return "update_sparsity_0"
    mantissa, exponent = f"{tolerance:.0e}".split("e")
    return f"update_sparsity_{mantissa}e{int(exponent)}"


SPARSITY_COLUMNS = tuple(sparsity_column(t) for t in SPARSITY_TOLERANCES)
# A power of two no larger than the smallest positive tolerance (see UpdateStats.add).
COUNT_UNIT = 2.0 ** math.floor(math.log2(min(t for t in SPARSITY_TOLERANCES if t > 0)))
METRIC_COLUMNS = (
    "base_norm",
    "trained_norm",
    "update_norm",
    "relative_frobenius_change",
    "mean_abs_update",
    "max_abs_update",
    "cosine_similarity",
    *SPARSITY_COLUMNS,
)
SPECTRAL_COLUMNS = (
    "update_spectral_norm",
    "update_stable_rank",
    "update_effective_rank",
    "sigma1_relative_change",
    "topk_singular_values_relative_change",
    "spectral_method",
)


@dataclass
class UpdateStats:
    """Running float64 sums over the chunks of one parameter part; `metrics()` turns them into a row."""

    numel: int = 0
    base_sq: float = 0.0
    trained_sq: float = 0.0
    update_sq: float = 0.0
    update_abs_sum: float = 0.0
    update_abs_max: float = 0.0
    changed: list[int] = field(default_factory=lambda: [0] * len(SPARSITY_TOLERANCES))

    def add(
        self,
        base: torch.Tensor,
        trained: torch.Tensor,
        update: torch.Tensor | None = None,
        scratch: ScratchBuffers | None = None,
    ) -> None:
        """Accumulate one chunk (float32). Without `update`, trained is overwritten with trained - base.

        Counting |dW| > tol with comparisons and integer sums costs several times a float pass on CPU,
        so the counts are taken as sums of sign(threshold(|dW|)), thresholds applied in increasing order
        to one |dW| buffer.
        """
        numel = base.numel()
        self.numel += numel
        if numel == 0:
            return
        scratch = scratch or ScratchBuffers()
        self.base_sq += _squared_norm(base)
        self.trained_sq += _squared_norm(trained)
        if update is None:
            update = trained.sub_(base)
        self.update_sq += _squared_norm(update)
        magnitude = torch.abs(update, out=scratch.float32_view("magnitude", update.shape))
        # float32 sums of ones are exact below 2**24; past that sum in float64.
        sum_dtype = torch.float64 if numel >= 1 << 24 else None
        self.update_abs_sum += float(magnitude.sum(dtype=sum_dtype))
        self.update_abs_max = max(self.update_abs_max, float(magnitude.max()))
        indicator = scratch.float32_view("indicator", update.shape)
        for i, tolerance in enumerate(SPARSITY_TOLERANCES):
            if tolerance == 0:  # survivors may be denormal: count them with sign()
                self.changed[i] += int(torch.sign(magnitude, out=indicator).sum(dtype=sum_dtype))
                continue
            torch.nn.functional.threshold_(magnitude, tolerance, 0.0)  # keeps entries > tolerance
            # Every survivor exceeds COUNT_UNIT, a power of two: clamped to it they sum exactly to
            # count * COUNT_UNIT (cheaper than sign(), and exact below 2**24 entries per chunk).
            total = torch.clamp(magnitude, max=COUNT_UNIT, out=indicator).sum(dtype=sum_dtype)
            self.changed[i] += round(float(total) / COUNT_UNIT)

    def merge(self, other: UpdateStats) -> UpdateStats:
        """Combine the sums of two disjoint sets of entries (chunks computed separately)."""
        self.numel += other.numel
        self.base_sq += other.base_sq
        self.trained_sq += other.trained_sq
        self.update_sq += other.update_sq
        self.update_abs_sum += other.update_abs_sum
        self.update_abs_max = max(self.update_abs_max, other.update_abs_max)
        self.changed = [a + b for a, b in zip(self.changed, other.changed, strict=True)]
        return self

    def metrics(self) -> dict[str, float]:
        base_norm, trained_norm = math.sqrt(self.base_sq), math.sqrt(self.trained_sq)
        update_norm = math.sqrt(self.update_sq)
        row = {
            "base_norm": base_norm,
            "trained_norm": trained_norm,
            "update_norm": update_norm,
            "relative_frobenius_change": ratio(update_norm, base_norm),
            "mean_abs_update": self.update_abs_sum / self.numel if self.numel else 0.0,
            "max_abs_update": self.update_abs_max,
            "cosine_similarity": cosine_from_norms(base_norm, trained_norm, update_norm),
        }
        for column, changed in zip(SPARSITY_COLUMNS, self.changed, strict=True):
            row[column] = 1.0 - changed / self.numel if self.numel else 1.0
        return row


def _squared_norm(tensor: torch.Tensor) -> float:
    return float(torch.linalg.vector_norm(tensor)) ** 2


def ratio(numerator: float, denominator: float) -> float:
    if denominator > 0:
        return numerator / denominator
    return 0.0 if numerator == 0 else math.inf


def cosine_from_norms(base_norm: float, trained_norm: float, update_norm: float) -> float:
    """cos(W, W') from ||W||, ||W'|| and ||W' - W||.

    Written as 1 - (||dW||^2 - (||W|| - ||W'||)^2) / (2 ||W|| ||W'||) so that a small update is not lost to
    cancellation in a float32 dot product; identical tensors give exactly 1.
    """
    if base_norm == 0 or trained_norm == 0:
        return math.nan
    cosine = 1.0 - (update_norm**2 - (base_norm - trained_norm) ** 2) / (2.0 * base_norm * trained_norm)
    return min(1.0, max(-1.0, cosine))


def tensor_metrics(base: torch.Tensor, trained: torch.Tensor) -> dict[str, float]:
    """The per-parameter metrics of one pair of in-memory tensors (any dtype; computed in float32)."""
    if base.shape != trained.shape:
        raise ValueError(f"shape mismatch: {list(base.shape)} vs {list(trained.shape)}")
    stats = UpdateStats()
    stats.add(base.detach().float().reshape(-1), trained.detach().float().reshape(-1).clone())
    return stats.metrics()


def spectral_metrics(
    base: torch.Tensor, update: torch.Tensor, top_k: int = 8, *, niter: int = 6, seed: int = 0
) -> tuple[dict[str, Any], pd.DataFrame]:
    """Spectral summary of an update dW of the matrix W (both float32, same shape, >= 2-D).

    Exact singular values for small matrices; for large ones a randomised range finder (torch.svd_lowrank,
    q = top_k + 10 columns, `niter` power iterations) so the cost stays O(m n q). W and W + dW are
    sketched with the same random matrix, so their estimation errors largely cancel in the difference.
    Effective rank (Roy & Vetterli: exp of the entropy of the normalised singular values) is then taken
    over the q computed values, which the `spectral_method` column records.
    """
    base = base.reshape(base.shape[0], -1) if base.dim() != 2 else base
    update = update.reshape(update.shape[0], -1) if update.dim() != 2 else update
    trained = base + update
    rows, cols = base.shape
    full = min(rows, cols)
    exact = base.numel() <= EXACT_SVD_MAX_ELEMENTS or full <= top_k + 10
    if exact:
        method = "exact"
        values = [torch.linalg.svdvals(m.double()) for m in (update, base, trained)]
    else:
        q = min(full, top_k + 10)
        method = f"lowrank(q={q},niter={niter})"
        values = [_lowrank_singular_values(m, q, niter, seed) for m in (update, base, trained)]
    update_values, base_values, trained_values = (v.double() for v in values)
    update_sq = float(torch.linalg.vector_norm(update.double())) ** 2
    spectral_norm = float(update_values[0]) if update_values.numel() else 0.0
    k = min(top_k, base_values.numel())
    base_top, trained_top = base_values[:k], trained_values[:k]
    row = {
        "update_spectral_norm": spectral_norm,
        "update_stable_rank": update_sq / spectral_norm**2 if spectral_norm > 0 else 0.0,
        "update_effective_rank": effective_rank(update_values),
        "sigma1_relative_change": ratio(float(trained_top[0] - base_top[0]), float(base_top[0]))
        if k
        else 0.0,
        "topk_singular_values_relative_change": ratio(
            float(torch.linalg.vector_norm(trained_top - base_top)), float(torch.linalg.vector_norm(base_top))
        ),
        "spectral_method": method,
    }
    singular_values = pd.DataFrame(
        {
            "index": range(1, k + 1),
            "base": base_top.tolist(),
            "trained": trained_top.tolist(),
            "change": (trained_top - base_top).tolist(),
        }
    )
    return row, singular_values


def _lowrank_singular_values(matrix: torch.Tensor, q: int, niter: int, seed: int) -> torch.Tensor:
    # A fixed seed gives every matrix the same sketch: runs are reproducible and W, W + dW share errors.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        _, values, _ = torch.svd_lowrank(matrix, q=q, niter=niter, M=None)
    return values


def effective_rank(singular_values: torch.Tensor) -> float:
    """exp(H(p)) with p = s / sum(s) (Roy & Vetterli 2007); 0 for a zero matrix."""
    values = singular_values.double()
    values = values[values > 0]
    if values.numel() == 0:
        return 0.0
    p = values / values.sum()
    return float(torch.exp(-(p * torch.log(p)).sum()))
