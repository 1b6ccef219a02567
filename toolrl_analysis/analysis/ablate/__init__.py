"""What did the training gain depend on? Revert or transplant parts of the update and measure again
(docs/architecture.md, "Analysis"; `toolrl-analyze ablate`).

The parts, in the order data flows through them:
  splice     operations (`revert`, `transplant`, `scale`) resolved with the shared selectors into a `Splice`:
             a coefficient per entry, value = base + c * (trained - base), 0 and 1 copied bit for bit;
  control    size-matched random controls (how they are drawn: its docstring);
  save       `--save`: the hybrid streamed to an HF directory, a .safetensors file or a .pt, chunk by chunk
             (`writers`: the streaming safetensors and .pt writers, and write-then-rename placement);
  grid       the paper's grid of variants;
  bootstrap  uncertainty by a paired bootstrap over environments, and the fraction of the gain retained;
  evaluate   every variant through `evaluate` (tool use, general suite, context-reading roles), one sandbox;
  run        `ablate(...)`, the `Ablation` it returns, its files and terminal tables.
"""

from toolrl_analysis.analysis.ablate.bootstrap import Estimate, Resamples, gain_retained, stratified_resamples
from toolrl_analysis.analysis.ablate.control import Control, PartEnergy, draw_control, update_energies
from toolrl_analysis.analysis.ablate.grid import PAPER_SUBSETS, Variant, custom_variants, paper_grid
from toolrl_analysis.analysis.ablate.run import Ablation, ablate, heldout_records, render_ablation
from toolrl_analysis.analysis.ablate.save import DEFAULT_SHARD_BYTES, save_spliced
from toolrl_analysis.analysis.ablate.splice import (
    Operation,
    Region,
    Splice,
    SpliceAccount,
    Step,
    compile_operations,
    reference,
    splice_in_memory,
    splice_rows,
)
from toolrl_analysis.analysis.ablate.variants import EvaluationOptions, VariantResult, evaluate_variants

__all__ = [
    "DEFAULT_SHARD_BYTES",
    "PAPER_SUBSETS",
    "Ablation",
    "Control",
    "Estimate",
    "EvaluationOptions",
    "Operation",
    "PartEnergy",
    "Region",
    "Resamples",
    "Splice",
    "SpliceAccount",
    "Step",
    "Variant",
    "VariantResult",
    "ablate",
    "compile_operations",
    "custom_variants",
    "draw_control",
    "evaluate_variants",
    "gain_retained",
    "heldout_records",
    "paper_grid",
    "reference",
    "render_ablation",
    "save_spliced",
    "splice_in_memory",
    "splice_rows",
    "stratified_resamples",
    "update_energies",
]
