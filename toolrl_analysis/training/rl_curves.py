"""What a train-grpo run shows while and after it trains: the learning-curve figure and the validation
lines of the log.

`plot_rl_curves` draws, per iteration, the mean step reward (and its spread), the KL that is optimised, the
entropy, the clip fractions (low, high, and the clip-higher region, which shows whether clip-higher acts),
the share of groups without reward spread, and, at each validation, greedy Solve-F1 per scenario and the
role-NLL curves of the context-reading meter (the panels train-base draws, from training/validation.py).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from toolrl_analysis.context_meter import ROLES
from toolrl_analysis.envs.schema import SCENARIOS
from toolrl_analysis.training.validation import draw_role_nll, draw_solve_f1

# More than this share of groups without reward spread in one iteration is worth a warning: their
# advantages are all 0, so the iteration teaches (almost) nothing.
ZERO_SPREAD_WARNING = 0.9


# name in the metrics row -> label; the panels of the per-iteration curves
_PANELS = (
    ("step reward", {"reward_mean": "mean", "rollout_solve_f1": "rollout Solve-F1"}),
    ("KL to the initial policy (optimised)", {"kl": "kl"}),
    ("entropy (nats/token)", {"entropy": "entropy"}),
    (
        "clip fractions (of tokens)",
        {"clip_low": "low", "clip_high": "high", "clip_higher_region": "clip-higher region"},
    ),
    ("groups without reward spread", {"zero_spread_groups": "share"}),
)


def plot_rl_curves(rows: list[dict[str, Any]], validation: list[dict[str, Any]], path: Path) -> Path | None:
    """The learning curve of one run (metrics rows, one per iteration; validation rows with an `iteration`)."""
    if not rows and not validation:
        return None
    from matplotlib.figure import Figure  # no pyplot: no global state, no GUI backend

    figure = Figure(figsize=(18, 7.5))
    figure.subplots_adjust(left=0.04, right=0.99, bottom=0.07, top=0.95, wspace=0.25, hspace=0.35)
    axes = figure.subplots(2, 4).flatten()
    iterations = [row["iteration"] for row in rows]
    for axis, (title, columns) in zip(axes, _PANELS, strict=False):
        for column, label in columns.items():
            values = [row.get(column, math.nan) for row in rows]
            axis.plot(iterations, values, label=label)
            if column == "reward_mean":
                spread = [row.get("reward_std", math.nan) for row in rows]
                low = [v - s for v, s in zip(values, spread, strict=True)]
                high = [v + s for v, s in zip(values, spread, strict=True)]
                axis.fill_between(iterations, low, high, alpha=0.2)
        axis.set(xlabel="iteration", title=title)
        if len(columns) > 1:
            axis.legend(fontsize=7)
    axes[4].set_ylim(0, 1)
    axes[4].axhline(ZERO_SPREAD_WARNING, color="grey", linestyle=":", linewidth=1)
    if validation:
        draw_solve_f1(axes[5], validation, x="iteration")
        draw_role_nll(axes[6], validation, x="iteration")
    else:
        for axis in axes[5:7]:
            axis.set_visible(False)
    axes[7].plot(iterations, [row.get("grad_norm", math.nan) for row in rows], label="grad norm")
    axes[7].set(xlabel="iteration", title="gradient norm (before clipping)")
    figure.savefig(path, dpi=90)
    return path


def zero_spread_warning(row: dict[str, Any]) -> str | None:
    """The log line for an iteration whose groups mostly had no reward spread, else None."""
    share = row.get("zero_spread_groups", 0.0)
    if share <= ZERO_SPREAD_WARNING:
        return None
    return (
        f"warning: iteration {row['iteration']}: {share:.0%} of groups have no reward spread (every completion "
        "scored the same), so their advantages are 0 and they teach nothing; if this persists the policy is "
        "too weak or too strong for these environments"
    )


def validation_lines(row: dict[str, Any]) -> list[str]:
    """The log lines of one validation: Solve-F1 per scenario, and the role-NLL table (own context, the gap
    to another environment's context, and greedy top-1 accuracy)."""
    scenarios = [s for s in SCENARIOS if f"val_f1_{s}" in row]
    lines = [
        f"validation at iteration {row['iteration']}: Solve-F1 {row.get('val_f1_overall', math.nan):.3f} ("
        + ", ".join(f"{s} {row[f'val_f1_{s}']:.3f}" for s in scenarios)
        + ")"
    ]
    roles = [r for r in (*ROLES, "all") if f"nll_{r}" in row]
    if roles:
        width = max(len(r) for r in roles)
        lines.append(f"  {'role':<{width}}  nll    gap    top1")
        lines += [
            f"  {r:<{width}}  {row[f'nll_{r}']:.3f}  {row[f'gap_{r}']:+.3f}  {row[f'top1_{r}']:.3f}"
            for r in roles
        ]
    return lines
