"""What training changed, parameter by parameter: a streaming checkpoint diff (docs/architecture.md, "Analysis").

For each parameter (or part of a fused one) the update dW = W_trained - W_base is summarised by
relative_frobenius_change = ||dW||_F / ||W_base||_F, mean and max |dW|, the cosine similarity of base and
trained, and update sparsity (fraction of entries with |dW| <= tol) at a few tolerances; with
`spectral=True` also dW's spectral norm, stable rank and effective rank, the change in W's singular values,
the geometry of dW relative to W's top-k singular subspaces (principal angles, principal-energy share),
and the sparsity at half a bf16 ULP with the share of dW that bf16 rounding erases. Rows aggregate to
(layer, component) and to thirds of the depth ("bands"). `overlap` compares several runs of one base:
where their updates fall, and whether they agree in sign.

Tensors stream through in row chunks small enough to stay in cache, read into buffers we own and
converted to float32 (bf16 updates vanish in bf16 arithmetic), so memory stays near one chunk whatever
the model size; only `spectral=True` holds one whole matrix at a time.

The parts, in the order data flows through them:
  plan     `plan_pairs`: line two checkpoints up, report mismatches by name (reused by ablation);
  stream   `iter_pairs` (matched tensors, whole or in row chunks), `stream_tensor`, `ChunkPipeline`;
  metrics  `UpdateStats` (running sums per chunk), `tensor_metrics`, `spectral_metrics`;
  tables   per-parameter rows -> (layer, component) table, depth bands, summary, JSON cleaning;
  compare  `compare_checkpoints` and the `Comparison` it returns;
  overlap  `overlap_runs`: update masks of several runs of one base, their overlaps against chance;
  render   the terminal tables.
"""

from toolrl_analysis.analysis.diff.buffers import ScratchBuffers
from toolrl_analysis.analysis.diff.compare import Comparison, compare_checkpoints
from toolrl_analysis.analysis.diff.metrics import (
    HALF_ULP_SPARSITY,
    METRIC_COLUMNS,
    PRECISION_COLUMNS,
    SPARSITY_COLUMNS,
    SPARSITY_TOLERANCES,
    SPECTRAL_COLUMNS,
    UpdateStats,
    bf16_half_ulp,
    cosine_from_norms,
    effective_rank,
    principal_angle_max,
    spectral_memory_bytes,
    spectral_metrics,
    tensor_metrics,
)
from toolrl_analysis.analysis.diff.overlap import Overlap, overlap_runs
from toolrl_analysis.analysis.diff.plan import MatchedTensor, PairPlan, plan_pairs
from toolrl_analysis.analysis.diff.render import render_comparison, render_overlap
from toolrl_analysis.analysis.diff.stream import (
    DEFAULT_CHUNK_ELEMENTS,
    TensorPair,
    default_workers,
    iter_pairs,
    stream_tensor,
    torch_threads,
)
from toolrl_analysis.analysis.diff.tables import BANDS, band_summary, component_table

__all__ = [
    "BANDS",
    "DEFAULT_CHUNK_ELEMENTS",
    "HALF_ULP_SPARSITY",
    "METRIC_COLUMNS",
    "PRECISION_COLUMNS",
    "SPARSITY_COLUMNS",
    "SPARSITY_TOLERANCES",
    "SPECTRAL_COLUMNS",
    "Comparison",
    "MatchedTensor",
    "Overlap",
    "PairPlan",
    "ScratchBuffers",
    "TensorPair",
    "UpdateStats",
    "band_summary",
    "bf16_half_ulp",
    "compare_checkpoints",
    "component_table",
    "cosine_from_norms",
    "default_workers",
    "effective_rank",
    "iter_pairs",
    "overlap_runs",
    "plan_pairs",
    "principal_angle_max",
    "render_comparison",
    "render_overlap",
    "spectral_memory_bytes",
    "spectral_metrics",
    "stream_tensor",
    "tensor_metrics",
    "torch_threads",
]
