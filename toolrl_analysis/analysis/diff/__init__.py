"""What training changed, parameter by parameter: a streaming checkpoint diff (docs/architecture.md, "Analysis").

For each parameter (or part of a fused one) the update dW = W_trained - W_base is summarised by
relative_frobenius_change = ||dW||_F / ||W_base||_F, mean and max |dW|, the cosine similarity of base and
trained, and update sparsity (fraction of entries with |dW| <= tol) at a few tolerances; with
`spectral=True` also dW's spectral norm, stable rank and effective rank and the change in W's top-k
singular values. Rows aggregate to (layer, component) and to thirds of the depth ("bands").

Tensors stream through in row chunks small enough to stay in cache, read into buffers we own and
converted to float32 (bf16 updates vanish in bf16 arithmetic), so memory stays near one chunk whatever
the model size; only `spectral=True` holds one whole matrix at a time.

The parts, in the order data flows through them:
  plan     `plan_pairs`: line two checkpoints up, report mismatches by name (reused by ablation);
  stream   `iter_pairs` (matched tensors, whole or in row chunks), `stream_tensor`, `ChunkPipeline`;
  metrics  `UpdateStats` (running sums per chunk), `tensor_metrics`, `spectral_metrics`;
  tables   per-parameter rows -> (layer, component) table, depth bands, summary, JSON cleaning;
  compare  `compare_checkpoints` and the `Comparison` it returns;
  render   the terminal tables.
"""

from toolrl_analysis.analysis.diff.buffers import ScratchBuffers
from toolrl_analysis.analysis.diff.compare import Comparison, compare_checkpoints
from toolrl_analysis.analysis.diff.metrics import (
    METRIC_COLUMNS,
    SPARSITY_COLUMNS,
    SPARSITY_TOLERANCES,
    SPECTRAL_COLUMNS,
    UpdateStats,
    cosine_from_norms,
    effective_rank,
    spectral_metrics,
    tensor_metrics,
)
from toolrl_analysis.analysis.diff.plan import MatchedTensor, PairPlan, plan_pairs
from toolrl_analysis.analysis.diff.render import render_comparison
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
    "METRIC_COLUMNS",
    "SPARSITY_COLUMNS",
    "SPARSITY_TOLERANCES",
    "SPECTRAL_COLUMNS",
    "Comparison",
    "MatchedTensor",
    "PairPlan",
    "ScratchBuffers",
    "TensorPair",
    "UpdateStats",
    "band_summary",
    "compare_checkpoints",
    "component_table",
    "cosine_from_norms",
    "default_workers",
    "effective_rank",
    "iter_pairs",
    "plan_pairs",
    "render_comparison",
    "spectral_metrics",
    "stream_tensor",
    "tensor_metrics",
    "torch_threads",
]
