"""What did the training gain depend on? Revert or transplant parts of the update and measure again
(docs/architecture.md, "Analysis"; `toolrl-analyze ablate`).

The parts, in the order data flows through them:
  splice     operations (`revert`, `transplant`, `scale`) resolved with the shared selectors into a `Splice`:
             a coefficient per entry, value = base + c * (trained - base), 0 and 1 copied bit for bit;
  control    matched random controls, many draws per subset (how they are drawn: its docstring);
  low_rank   the rank-k operation: a subset's update truncated to rank k, its residual, random rank-k;
  save       `--save`: the hybrid streamed to an HF directory, a .safetensors file or a .pt, chunk by chunk
             (`writers`: the streaming safetensors and .pt writers, and write-then-rename placement);
  grid       the paper's grid of variants (every third of the blocks, embedding, norms, the rank-k block);
  bootstrap  Solve-F1's uncertainty by a paired bootstrap over environments;
  likelihood the teacher-forced metric: each variant's log-likelihood of the models' greedy trajectories;
  variants   main variants through `evaluate` (tool use, general suite, context roles), every variant
             through the teacher-forced metric, one model object and one sandbox;
  contrasts  paired contrasts over environments, Fieller intervals, Holm, minimum detectable effects;
  verdict    the one rule: reproduced / not reproduced / inconclusive per subset;
  run        `ablate(...)` and the `Ablation` it returns, with its files; render: its terminal tables.
"""

from toolrl_analysis.analysis.ablate.bootstrap import Estimate, Resamples, gain_retained, stratified_resamples
from toolrl_analysis.analysis.ablate.contrasts import Contrast, Ratio, contrast, holm, ratio
from toolrl_analysis.analysis.ablate.control import (
    Control,
    ControlSet,
    PartEnergy,
    draw_controls,
    update_energies,
)
from toolrl_analysis.analysis.ablate.grid import PAPER_SUBSETS, Grid, Variant, custom_variants, paper_grid
from toolrl_analysis.analysis.ablate.low_rank import LowRank, low_rank_in_memory
from toolrl_analysis.analysis.ablate.render import render_ablation
from toolrl_analysis.analysis.ablate.run import Ablation, ablate, heldout_records, verdicts_of
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
from toolrl_analysis.analysis.ablate.verdict import RULE, GridEntry, grid_verdicts

__all__ = [
    "DEFAULT_SHARD_BYTES",
    "PAPER_SUBSETS",
    "Ablation",
    "Contrast",
    "Control",
    "ControlSet",
    "Grid",
    "GridEntry",
    "LowRank",
    "RULE",
    "Ratio",
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
    "contrast",
    "draw_controls",
    "grid_verdicts",
    "holm",
    "low_rank_in_memory",
    "ratio",
    "verdicts_of",
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
