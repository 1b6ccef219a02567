"""The paper's four claims, each judged by a rule stated before any result was seen.

A verdict is computed from the saved numbers and their intervals, never written by hand: *reproduced*,
*not reproduced* or *inconclusive*. Each rule is printed in report.md beside its verdict. The thresholds are
fixed here, for every run; none of them may be tuned to make a run agree with the paper.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from toolrl_analysis.analysis.ablate.bootstrap import Estimate
from toolrl_analysis.analysis.ablate.verdict import RULE as ABLATION_RULE
from toolrl_analysis.report.tables import (
    POLICIES,
    TRAINED,
    ablation_estimates,
    ablation_verdicts,
    bounds_text,
    exact_match_change,
    general_values,
    interval,
    read_csv,
    read_json,
    seed_gains,
    tool_use_estimates_by_policy,
)

REPRODUCED, NOT_REPRODUCED, INCONCLUSIVE = "reproduced", "not reproduced", "inconclusive"
SMALLEST_GAIN = 0.02  # Solve-F1 points (the paper's GRPO gain on Qwen2.5-7B was about 0.21)
LOSS_MARGIN = 0.02  # relative rise of the held-out text loss that still counts as kept
EXACT_MATCH_MARGIN = 0.10  # absolute drop in exact match that still counts as kept
LOWER_MLP = "mlp@lower"

RULES = {
    "tool_use": (
        "D = overall Solve-F1 (mean over scenarios) of the trained policy minus the base on the same test "
        "environments of held-out worlds (no entity of the training worlds: the gain must transfer), with a 95% "
        "paired bootstrap interval (environments resampled within scenario). "
        f"Reproduced if the interval's lower bound is above 0; not reproduced if its lower bound is at or below 0 "
        f"and its upper bound is below {SMALLEST_GAIN} (the data exclude a gain of {SMALLEST_GAIN:.2f}); "
        "inconclusive otherwise. GRPO (its first training seed) decides; Reinforce++ is judged by the same rule "
        "beside it. The gain on the training worlds' own test split and the other seeds' gains are reported "
        "with it, never used for it."
    ),
    "general": (
        "The held-out text loss (a fixed text, so no sampling noise) may rise by at most "
        f"{LOSS_MARGIN:.0%} (relative), and the change in exact match on the general tasks, with a 95% normal "
        "interval for a difference of two independent proportions, must have a lower bound of at least "
        f"-{EXACT_MATCH_MARGIN:.2f}. Reproduced if both hold; not reproduced if the loss rises by more than "
        f"{LOSS_MARGIN:.0%} or the whole exact-match interval is below 0; inconclusive otherwise. GRPO decides; "
        "Reinforce++ is judged by the same rule beside it."
    ),
    "lower_mlp": (
        f"`ablate --grid paper`'s rule (analysis/ablate/verdict.py) for {LOWER_MLP}, the MLPs of the lower third "
        f"of the blocks, on the GRPO pair: {ABLATION_RULE}"
    ),
    "context": (
        "G = context gap: the NLL of the tokens that must come from the context (argument values, the answer) "
        "with another environment's question and tool responses minus with the real ones, token-weighted, "
        "from the ablation's base and trained variants on the same environments; dG = G(trained) - G(base) "
        "with a 95% paired bootstrap interval. Probes: trained - base selectivity per task and layer, paired "
        "over seeds, Holm-corrected. Inconclusive if the tool-use claim is not reproduced for GRPO (no gain to "
        "explain). Reproduced if dG's interval lies above 0 and no probe loses selectivity significantly; not "
        "reproduced if dG's upper bound is at most 0; inconclusive otherwise."
    ),
}
CLAIMS = {
    "tool_use": "Tool use improves: RL on the built environments raises held-out Solve-F1.",
    "general": "General ability is kept.",
    "lower_mlp": "The gain comes from lower-layer MLP updates.",
    "context": "The gain reflects better context understanding.",
}


@dataclass
class Verdict:
    key: str
    verdict: str
    evidence: str  # the numbers that decided it

    @property
    def claim(self) -> str:
        return CLAIMS[self.key]

    @property
    def rule(self) -> str:
        return RULES[self.key]


def _bounds(estimate: Estimate) -> tuple[float, float]:
    return estimate.interval


# -- 1. tool use ---------------------------------------------------------------------------------------
def tool_use_rule(gain: Estimate) -> str:
    low, high = _bounds(gain)
    if not (math.isfinite(low) and math.isfinite(high)):
        return INCONCLUSIVE
    if low > 0:
        return REPRODUCED
    return NOT_REPRODUCED if high < SMALLEST_GAIN else INCONCLUSIVE


def judge_tool_use(run: Path) -> tuple[Verdict, dict[str, str]]:
    estimates = tool_use_estimates_by_policy(run)
    if "base" not in estimates or "grpo" not in estimates:
        return Verdict("tool_use", INCONCLUSIVE, "the base and the GRPO policy were not both evaluated"), {}
    verdicts, parts = {}, []
    for policy in TRAINED:
        if policy not in estimates:
            continue
        gain = estimates[policy][("overall", "solve_f1")] - estimates["base"][("overall", "solve_f1")]
        verdicts[policy] = tool_use_rule(gain)
        base, trained = estimates["base"][("overall", "solve_f1")], estimates[policy][("overall", "solve_f1")]
        parts.append(
            f"{POLICIES[policy]}: Solve-F1 {base.value:.3f} -> {trained.value:.3f}, D = {interval(gain)} "
            f"({verdicts[policy]})"
        )
    return Verdict("tool_use", verdicts["grpo"], "; ".join(parts + _beside_tool_use(run)) + "."), verdicts


def _beside_tool_use(run: Path) -> list[str]:
    """The same-world gain and the spread over training seeds, reported with the verdict."""
    import numpy as np

    parts = []
    gains = seed_gains(run)
    same = gains.get("grpo", {}).get("test_same_world")
    if same is not None:
        parts.append(
            f"on the training worlds' own test split (recall plus skill) GRPO's D = {interval(same)}"
        )
    held_out = [by["test"].value for by in gains.values() if "test" in by]
    if len(held_out) > 1:
        parts.append(
            f"over {len(held_out)} GRPO training seeds D = {np.mean(held_out):+.3f} ± "
            f"{np.std(held_out, ddof=1):.3f} (mean ± sd; {min(held_out):+.3f} to {max(held_out):+.3f})"
        )
    return parts


# -- 2. general ability --------------------------------------------------------------------------------
def general_rule(loss_change: float, exact_match: dict[str, float]) -> str:
    if loss_change > LOSS_MARGIN or exact_match["high"] < 0:
        return NOT_REPRODUCED
    if exact_match["low"] >= -EXACT_MATCH_MARGIN:
        return REPRODUCED
    return INCONCLUSIVE


def judge_general(run: Path) -> Verdict:
    base = general_values(run, "base")
    if base is None or general_values(run, "grpo") is None:
        return Verdict("general", INCONCLUSIVE, "the general suite was not run on the base and GRPO policies")
    verdicts, parts = {}, []
    for policy in TRAINED:
        trained = general_values(run, policy)
        if trained is None:
            continue
        loss_change = (trained["heldout_text.loss"] - base["heldout_text.loss"]) / base["heldout_text.loss"]
        change = exact_match_change(base, trained)
        verdicts[policy] = general_rule(loss_change, change)
        parts.append(
            f"{POLICIES[policy]}: text loss {base['heldout_text.loss']:.4f} -> {trained['heldout_text.loss']:.4f} "
            f"({loss_change:+.2%}), exact match {base['tasks.exact_match']:.3f} -> {trained['tasks.exact_match']:.3f}, "
            f"change {change['value']:+.3f} [{change['low']:+.3f}, {change['high']:+.3f}] over "
            f"{int(base.get('tasks.tasks', 0))} tasks ({verdicts[policy]})"
        )
    return Verdict("general", verdicts["grpo"], "; ".join(parts) + ".")


# -- 3. lower-layer MLPs ---------------------------------------------------------------------------------
def lower_mlp_verdict(run: Path) -> dict | None:
    """The grid's verdict object for the lower MLPs, recomputed from the saved files by `ablate`'s own rule
    (`analysis.ablate.verdict`), or None when the grid did not run with the teacher-forced metric."""
    return next((v for v in ablation_verdicts(run) if v["subset"] == LOWER_MLP), None)


def judge_lower_mlp(run: Path) -> Verdict:
    found = lower_mlp_verdict(run)
    if found is None:
        return Verdict(
            "lower_mlp", INCONCLUSIVE, "the ablation grid was not run with the teacher-forced metric"
        )
    summary = (read_json(run / "ablate" / "ablation.json") or {}).get("summary", {})
    fraction = found.get("revert_fraction") or {}
    evidence = (
        f"on {summary.get('analysis_environments')} held-out analysis environments, reverting {LOWER_MLP} "
        f"({lower_blocks(summary)}) keeps F = {_fraction(fraction)} of the change in the trained "
        "model's log-likelihood of its own greedy trajectories"
    )
    side = found.get("revert")
    if side:
        controls = side["controls"]
        evidence += (
            f"; its {controls['draws']} matched controls keep {controls['mean']:.3f} ± {controls['sd']:.3f} "
            f"(controls keeping more than the subset: "
            f"{round((1 - controls['share_below_subset']) * controls['draws'])} of {controls['draws']})"
        )
    transplant = found.get("transplant_fraction")
    if transplant:
        evidence += f"; transplanting only {LOWER_MLP} into the base keeps {_fraction(transplant)}"
    return Verdict("lower_mlp", found["verdict"], f"{evidence}. {found['reason']}.")


def _fraction(found: dict) -> str:
    return bounds_text(found.get("value"), found.get("low"), found.get("high"), digits=3)


def lower_blocks(summary: dict) -> str:
    from toolrl_analysis.analysis.components import band_layers

    blocks = int((summary.get("model") or {}).get("blocks") or 0)
    layers = band_layers(blocks)["lower"] if blocks else range(0)
    if not layers:
        return "no block"
    return f"block {layers[0]}" if len(layers) == 1 else f"blocks {layers[0]}-{layers[-1]}"


# -- 4. context understanding ---------------------------------------------------------------------------
def context_rule(tool_use: str, gap_change: Estimate | None, probe_losses: int) -> str:
    if tool_use != REPRODUCED or gap_change is None:
        return INCONCLUSIVE
    low, high = _bounds(gap_change)
    if high <= 0:
        return NOT_REPRODUCED
    if low > 0 and probe_losses == 0:
        return REPRODUCED
    return INCONCLUSIVE


def probe_changes(run: Path) -> tuple[int, int, str]:
    """(gains, losses, text): Holm-significant trained - base selectivity changes in the residual stream."""
    comparison = read_csv(run / "probe" / "probe_comparison.csv")
    if comparison is None or comparison.empty:
        return 0, 0, "no probes were run"
    chosen = comparison[(comparison["metric"] == "selectivity") & comparison["significant"].astype(bool)]
    gains, losses = chosen[chosen["diff_mean"] > 0], chosen[chosen["diff_mean"] < 0]

    def where(frame: pd.DataFrame) -> str:
        return ", ".join(f"{r.task}@{int(r.layer)} ({r.site}) {r.diff_mean:+.2f}" for r in frame.itertuples())

    text = f"probes: {len(gains)} significant selectivity gains" + (
        f" ({where(gains)})" if len(gains) else ""
    )
    text += f" and {len(losses)} losses" + (f" ({where(losses)})" if len(losses) else "")
    return len(gains), len(losses), f"{text} of {int((comparison['metric'] == 'selectivity').sum())} tested"


def judge_context(run: Path, tool_use: str) -> Verdict:
    found = ablation_estimates(run)
    gaps = found["context_gap"] if found else {}
    change = gaps["trained"] - gaps["base"] if {"base", "trained"} <= set(gaps) else None
    _, losses, probes = probe_changes(run)
    if change is None:
        evidence = "the context gap was not measured (the ablation ran without the role table)"
    else:
        evidence = (
            f"context gap G: base {gaps['base'].value:.3f}, trained {gaps['trained'].value:.3f} nats; "
            f"dG = {interval(change)}"
        )
    if tool_use != REPRODUCED:
        evidence += (
            f" (the tool-use claim is {tool_use} for GRPO, so there is no established gain to explain)"
        )
    return Verdict("context", context_rule(tool_use, change, losses), f"{evidence}; {probes}.")


def judge_all(run: str | Path) -> tuple[list[Verdict], dict[str, str]]:
    """The four verdicts (GRPO decides) and Reinforce++'s tool-use verdict by the same rule."""
    run = Path(run)
    tool_use, by_policy = judge_tool_use(run)
    verdicts = [tool_use, judge_general(run), judge_lower_mlp(run), judge_context(run, tool_use.verdict)]
    return verdicts, by_policy
