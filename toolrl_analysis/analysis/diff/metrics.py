"""The per-parameter metrics of an update dW = W_trained - W_base, from running sums over chunks.

relative_frobenius_change = ||dW||_F / ||W_base||_F, mean and max |dW|, the cosine similarity of base and
trained, update sparsity (fraction of entries with |dW| <= tol) at a few tolerances; with `precision`, the
sparsity at half a bf16 ULP of W and the share of the update that bf16 rounding erases (PRECISION_COLUMNS);
`spectral_metrics` adds dW's spectral norm, stable and effective rank, the change in W's singular values, the
principal angles between W's and W + dW's top-k singular subspaces and dW's energy inside W's.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import pandas as pd
import torch

from toolrl_analysis.analysis.diff.buffers import ScratchBuffers

SPARSITY_TOLERANCES = (0.0, 1e-6, 1e-5)  # increasing: UpdateStats.add relies on it
EXACT_SVD_MAX_ELEMENTS = 1 << 22  # 32 MiB a float64 copy


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
# Computed only with `precision` (compare --spectral): they take the per-chunk arithmetic from 1x to 2.1x
# (bench_compare's compute-only, bf16 and fp32), too much for the always-on columns.
HALF_ULP_SPARSITY = "update_sparsity_bf16_half_ulp"
PRECISION_COLUMNS = (HALF_ULP_SPARSITY, "bf16_vanishing_share")
SPECTRAL_COLUMNS = (
    "update_spectral_norm",
    "update_stable_rank",
    "update_effective_rank",
    "sigma1_relative_change",
    "topk_singular_values_relative_change",
    "spectral_drift",
    "principal_angle_max",
    "principal_energy_share",
    "principal_energy_chance",
    "k",
    "spectral_method",
)


@dataclass
class UpdateStats:
    """Running float64 sums over the chunks of one parameter part; `metrics()` turns them into a row.

    With `precision` also PRECISION_COLUMNS: update_sparsity_bf16_half_ulp, the fraction of entries with
    |dW| <= ulp_bf16(|W|) / 2 (`bf16_half_ulp`), and bf16_vanishing_share, the share of ||dW||_F^2 carried by
    entries whose change vanishes when the weights are rounded to bf16, bf16(W + dW) == bf16(W) (NaN when
    dW = 0). A share of the squared norm rather than of entries, so it says how much of the update a bf16
    copy of the trained model loses; unchanged entries count for nothing.
    """

    numel: int = 0
    base_sq: float = 0.0
    trained_sq: float = 0.0
    update_sq: float = 0.0
    update_abs_sum: float = 0.0
    update_abs_max: float = 0.0
    changed: list[int] = field(default_factory=lambda: [0] * len(SPARSITY_TOLERANCES))
    precision: bool = False
    half_ulp_changed: int = 0
    vanishing_sq: float = 0.0

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
        if self.precision:  # rounded before trained is overwritten with the update
            base16 = scratch.view("base16", base.shape, torch.bfloat16).copy_(base)
            trained16 = scratch.view("trained16", base.shape, torch.bfloat16).copy_(trained)
        if update is None:
            update = trained.sub_(base)
        self.update_sq += _squared_norm(update)
        magnitude = torch.abs(update, out=scratch.float32_view("magnitude", update.shape))
        # float32 sums of ones are exact below 2**24; past that sum in float64.
        sum_dtype = torch.float64 if numel >= 1 << 24 else None
        self.update_abs_sum += float(magnitude.sum(dtype=sum_dtype))
        self.update_abs_max = max(self.update_abs_max, float(magnitude.max()))
        if self.precision:  # before the loop below thresholds `magnitude`
            self._add_precision(base, update, magnitude, base16, trained16, scratch, sum_dtype)
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

    def _add_precision(self, base, update, magnitude, base16, trained16, scratch, sum_dtype) -> None:
        # Float passes only: comparisons into bool tensors cost about 4x a float pass here.
        half_ulp = bf16_half_ulp(base, scratch.view("half_ulp", base.shape, torch.int32))
        excess = torch.sub(magnitude, half_ulp, out=half_ulp)  # > 0 exactly where |dW| > half a ULP
        torch.nn.functional.threshold_(excess, 0.0, 0.0)
        self.half_ulp_changed += int(torch.sign(excess, out=excess).sum(dtype=sum_dtype))
        # bf16(W + dW) - bf16(W) is 0 exactly where the change vanishes (values, so -0 == +0).
        survives = torch.sub(trained16, base16, out=excess).sign_().square_()  # 1 survives, 0 vanishes
        vanished = torch.addcmul(update, update, survives, value=-1.0, out=survives)  # dW where it vanishes
        self.vanishing_sq += _squared_norm(vanished)

    def merge(self, other: UpdateStats) -> UpdateStats:
        """Combine the sums of two disjoint sets of entries (chunks computed separately)."""
        self.numel += other.numel
        self.base_sq += other.base_sq
        self.trained_sq += other.trained_sq
        self.update_sq += other.update_sq
        self.update_abs_sum += other.update_abs_sum
        self.update_abs_max = max(self.update_abs_max, other.update_abs_max)
        self.changed = [a + b for a, b in zip(self.changed, other.changed, strict=True)]
        self.half_ulp_changed += other.half_ulp_changed
        self.vanishing_sq += other.vanishing_sq
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
        if self.precision:
            row[HALF_ULP_SPARSITY] = 1.0 - self.half_ulp_changed / self.numel if self.numel else 1.0
            row["bf16_vanishing_share"] = self.vanishing_sq / self.update_sq if self.update_sq else math.nan
        return row


def bf16_half_ulp(weight: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """ulp_bf16(|w|) / 2 per entry of a float32 tensor, as float32 (in `out`, int32 scratch, if given).

    bf16 keeps 8 significant bits, so for |w| in [2**e, 2**(e+1)) its ULP is 2**(e-7) and half of it
    2**(e-8): w's exponent bits, scaled. Below 2**-126 (zero, subnormals) the spacing is 2**-133."""
    bits = torch.bitwise_and(weight.view(torch.int32), 0x7F800000, out=out)
    return bits.clamp_(min=0x00800000).view(torch.float32).mul_(2.0**-8)


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


def tensor_metrics(base: torch.Tensor, trained: torch.Tensor, *, precision: bool = False) -> dict[str, float]:
    """The per-parameter metrics of one pair of in-memory tensors (any dtype; computed in float32)."""
    if base.shape != trained.shape:
        raise ValueError(f"shape mismatch: {list(base.shape)} vs {list(trained.shape)}")
    stats = UpdateStats(precision=precision)
    stats.add(base.detach().float().reshape(-1), trained.detach().float().reshape(-1).clone())
    return stats.metrics()


def spectral_metrics(
    base: torch.Tensor, update: torch.Tensor, top_k: int = 8, *, niter: int = 6, seed: int = 0
) -> tuple[dict[str, Any], pd.DataFrame]:
    """Spectral summary of an update dW of the matrix W (both float32, same shape, >= 2-D), relative to W.

    Exact SVDs (float64) for small matrices; for large ones a randomised range finder (torch.svd_lowrank,
    q = top_k + 10 columns, `niter` power iterations) so the cost stays O(m n q). W and W + dW are
    sketched with the same random matrix, so their estimation errors largely cancel in the difference.
    The `spectral_method` column records which; "the computed values" below are all min(m, n) singular
    values (exact) or the top q (randomised). With k = min(top_k, m, n) (column `k`):

    - effective rank (Roy & Vetterli: exp of the entropy of the normalised singular values of dW), over
      the computed values;
    - spectral_drift = ||s(W + dW) - s(W)|| / ||s(W)|| over the computed singular values (|c - 1| for
      W + dW = c W, c > 0); topk_singular_values_relative_change is the same over the top k;
    - principal_angle_max: the largest principal angle, in degrees, between W's and (W + dW)'s top-k
      singular subspaces, the larger of the left (column space) and right (row space) angle; meaningful
      only where sigma_k > sigma_{k+1} on both sides (otherwise the top-k subspace is not unique);
    - principal_energy_share rho_k = ||U_k^T dW V_k||_F^2 / ||dW||_F^2 with U_k, V_k W's top-k singular
      vectors: the share of the update inside W's principal block (NaN when dW = 0), beside its chance
      level principal_energy_chance = k^2 / (m n), its expectation for an update of i.i.d. entries.

    Memory: see `spectral_memory_bytes`.
    """
    base = base.reshape(base.shape[0], -1) if base.dim() != 2 else base
    update = update.reshape(update.shape[0], -1) if update.dim() != 2 else update
    rows, cols = base.shape
    full = min(rows, cols)
    k = min(top_k, full)
    if spectral_is_exact(rows, cols, top_k):
        method = "exact"
        update, base = update.double(), base.double()
        update_values = torch.linalg.svdvals(update)
        base_u, base_values, base_vh = torch.linalg.svd(base, full_matrices=False)
        base_u, base_v = base_u[:, :k], base_vh[:k].mT
        # W's float64 copy is not needed again: W + dW takes its place.
        trained_u, trained_values, trained_vh = torch.linalg.svd(base.add_(update), full_matrices=False)
        trained_u, trained_v = trained_u[:, :k], trained_vh[:k].mT
    else:
        q = min(full, top_k + 10)
        method = f"lowrank(q={q},niter={niter})"
        _, update_values, _ = _lowrank_svd(update, q, niter, seed)
        base_u, base_values, base_v = _lowrank_svd(base, q, niter, seed)
        trained_u, trained_values, trained_v = _lowrank_svd(base + update, q, niter, seed)
        base_u, base_v, trained_u, trained_v = (m[:, :k] for m in (base_u, base_v, trained_u, trained_v))
    update_values, base_values, trained_values = (
        v.double() for v in (update_values, base_values, trained_values)
    )
    update_sq = _squared_norm(update)  # float64 when exact; a float64 cast would copy dW whole
    spectral_norm = float(update_values[0]) if update_values.numel() else 0.0
    base_top, trained_top = base_values[:k], trained_values[:k]
    inside = base_u.mT.to(update.dtype) @ (update @ base_v.to(update.dtype))  # U_k^T dW V_k, k x k
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
        "spectral_drift": ratio(
            float(torch.linalg.vector_norm(trained_values - base_values)),
            float(torch.linalg.vector_norm(base_values)),
        ),
        "principal_angle_max": max(
            principal_angle_max(base_u, trained_u), principal_angle_max(base_v, trained_v)
        ),
        "principal_energy_share": float(torch.linalg.vector_norm(inside, dtype=torch.float64)) ** 2
        / update_sq
        if update_sq > 0
        else math.nan,
        "principal_energy_chance": k * k / (rows * cols),
        "k": k,
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


def spectral_is_exact(rows: int, cols: int, top_k: int) -> bool:
    """Exact SVDs up to EXACT_SVD_MAX_ELEMENTS entries, or where the sketch would be (nearly) the matrix."""
    return rows * cols <= EXACT_SVD_MAX_ELEMENTS or min(rows, cols) <= top_k + 10


def spectral_memory_bytes(rows: int, cols: int, itemsize: int, top_k: int = 8) -> int:
    """About how much memory `compare --spectral` adds, over the streaming diff's chunk, for one rows x cols
    matrix stored with `itemsize` bytes an entry (m n entries, r = min(m, n), q = top_k + 10).

    The matrix is read whole and held as float32 W and dW, 8 mn bytes, throughout. Before them, while they
    are converted, both sides' stored bytes (2 itemsize mn, none for float32, read straight into W, W').
    After them the SVDs: exact ones add float64 dW and W (W + dW once W's SVD is done), LAPACK's working
    copy and one SVD's vectors, 24 mn + 16 (m + n) r + 32 r^2 bytes; the randomised path adds W + dW in
    float32, 4 mn, and sketches of (m + n) q floats plus torch's workspace (16 MiB allowed).
    Measured peaks were 0-25% below this: 2048 x 2048 (exact), 4096 x 4096 and 8192 x 2048 (randomised) in
    float32, and a 152064 x 1024 bf16 embedding, 2.02 GB measured of 2.06 GB estimated.
    """
    mn, r = rows * cols, min(rows, cols)
    converting = 2 * itemsize * mn if itemsize != 4 else 0
    if spectral_is_exact(rows, cols, top_k):
        svd = 24 * mn + 16 * (rows + cols) * r + 32 * r * r
    else:
        svd = 4 * mn + 64 * (rows + cols) * min(r, top_k + 10) + (16 << 20)
    return 8 * mn + max(converting, svd)


def principal_angle_max(a: torch.Tensor, b: torch.Tensor) -> float:
    """The largest principal angle, in degrees, between span(a) and span(b) (orthonormal columns, as many
    in each). From the sines, ||(I - a a^T) b||_2, while it is below 45 degrees: arccos of the cosines
    loses small angles (1e-8 rad is cos = 1 in float64)."""
    if a.shape[1] == 0:
        return 0.0
    a, b = a.double(), b.double()
    cross = a.mT @ b
    sine = float(torch.linalg.svdvals(b - a @ cross)[0])
    if sine < math.sqrt(0.5):
        return math.degrees(math.asin(sine))
    cosine = float(torch.linalg.svdvals(cross)[-1])
    return math.degrees(math.acos(min(1.0, max(0.0, cosine))))


def _lowrank_svd(matrix: torch.Tensor, q: int, niter: int, seed: int):
    # A fixed seed gives every matrix the same sketch: runs are reproducible and W, W + dW share errors.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return torch.svd_lowrank(matrix, q=q, niter=niter, M=None)


def effective_rank(singular_values: torch.Tensor) -> float:
    """exp(H(p)) with p = s / sum(s) (Roy & Vetterli 2007); 0 for a zero matrix."""
    values = singular_values.double()
    values = values[values > 0]
    if values.numel() == 0:
        return 0.0
    p = values / values.sum()
    return float(torch.exp(-(p * torch.log(p)).sum()))
