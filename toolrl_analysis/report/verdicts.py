"""The paper's four claims as the report states them, each decided by `judge`'s rules
(`analysis/judge/rules.py`): tool use from the evaluation stages' episodes, the lower MLPs from the ablation
grid's files, general ability and context understanding from the judge stage's `judge.json`.

A verdict is computed from the saved numbers and their intervals, never written by hand.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from toolrl_analysis.analysis.judge.rules import (
    CLAIMS,
    INCONCLUSIVE,
    LOWER_MLP,
    NOT_REPRODUCED,
    REPRODUCED,
    RULES,
    as_sentence,
    general_rule,
    tool_use_rule,
)
from toolrl_analysis.report.tables import (
    POLICIES,
    TRAINED,
    ablation_verdicts,
    bounds_text,
    interval,
    read_json,
    seed_gains,
    tool_use_estimates_by_policy,
)

__all__ = ["CLAIMS", "INCONCLUSIVE", "NOT_REPRODUCED", "REPRODUCED", "RULES", "Verdict", "judge_all"]


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


# -- 1. tool use ---------------------------------------------------------------------------------------
def judge_tool_use(run: Path) -> tuple[Verdict, dict[str, str]]:
    estimates = tool_use_estimates_by_policy(run)
    if "base" not in estimates or "grpo" not in estimates:
        return Verdict("tool_use", INCONCLUSIVE, "the base and the GRPO policy were not both evaluated"), {}
    verdicts, parts = {}, []
    for policy in TRAINED:
        if policy not in estimates:
            continue
        gain = estimates[policy][("overall", "solve_f1")] - estimates["base"][("overall", "solve_f1")]
        verdicts[policy] = tool_use_rule(*gain.interval)
        base, trained = estimates["base"][("overall", "solve_f1")], estimates[policy][("overall", "solve_f1")]
        parts.append(
            f"{POLICIES[policy]}: Solve-F1 {base.value:.3f} -> {trained.value:.3f}, D = {interval(gain)} "
            f"({verdicts[policy]})"
        )
    parts.append("GRPO (its first training seed) decides; Reinforce++ is judged by the same rule beside it")
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


# -- 2. general ability, 4. context understanding: judge.json -----------------------------------------
def judged(run: Path, claim: str, tool_use: str) -> Verdict:
    """The judge stage's verdict of `claim` on the GRPO pair; general ability's is decided again with the
    report's tool-use verdict, which the stage did not judge (`rules.general_rule`)."""
    found = ((read_json(run / "judge" / "judge.json") or {}).get("verdicts") or {}).get(claim)
    if not found:
        return Verdict(claim, INCONCLUSIVE, "the judge stage has not measured this claim")
    numbers = found.get("numbers") or {}
    if claim == "general" and "retained" in numbers:
        verdict, reason = general_rule(numbers["retained"], numbers.get("rises") or {}, tool_use)
        return Verdict(claim, verdict, f"{numbers['measured']}. {as_sentence(reason)}")
    return Verdict(claim, found["verdict"], found["evidence"])


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


def judge_all(run: str | Path) -> tuple[list[Verdict], dict[str, str]]:
    """The four verdicts on the GRPO pair, and Reinforce++'s tool-use verdict by the same rule."""
    run = Path(run)
    tool_use, by_policy = judge_tool_use(run)
    verdicts = [
        tool_use,
        judged(run, "general", tool_use.verdict),
        judge_lower_mlp(run),
        judged(run, "context", tool_use.verdict),
    ]
    return verdicts, by_policy
