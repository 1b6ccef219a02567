"""The paper's four claims, each judged by a rule stated before any result was seen.

A verdict is computed from measured numbers and their intervals, never written by hand: *reproduced*, *not
reproduced* or *inconclusive*. The thresholds are fixed here, for every pair; none of them may be tuned to
make a pair agree with the paper. `judge` and `reproduce`'s report both decide with these functions.
"""

from __future__ import annotations

import math
from typing import Any

from toolrl_analysis.analysis.ablate.verdict import RULE as ABLATION_RULE

REPRODUCED, NOT_REPRODUCED, INCONCLUSIVE = "reproduced", "not reproduced", "inconclusive"
VERDICTS = (REPRODUCED, NOT_REPRODUCED, INCONCLUSIVE)
CLAIM_NAMES = ("tool_use", "general", "context", "lower_mlp")
ALPHA = 0.05
SMALLEST_GAIN = 0.02  # Solve-F1 points (the paper's GRPO gain on Qwen2.5-7B was about 0.21)
EXACT_MATCH_KEPT = 0.90  # the share of the base's exact match the trained model must keep
LOSS_MARGIN = 0.02  # relative rise of the in-distribution loss that still counts as kept
# The smallest improvement in understanding worth the name, per token of the roles that must come from the
# context: 0.05 nats (~5% of the base's NLL there) or 2 points of top-1 accuracy.
NLL_MARGIN = 0.05
TOP1_MARGIN = 0.02
LOWER_MLP = "mlp@lower"
UNDERSTANDING_ROLES = ("value_from_question", "value_from_response", "answer_from_response")

CLAIMS = {
    "tool_use": "Tool use improves: RL on the built environments raises held-out Solve-F1.",
    "general": "General ability is kept.",
    "lower_mlp": "The gain comes from lower-layer MLP updates.",
    "context": "The gain reflects better context understanding.",
}
RULES = {
    "tool_use": (
        "D = overall Solve-F1 (mean over scenarios) of the trained policy minus the base on the same test "
        "environments of held-out worlds (no entity of the training worlds: the gain must transfer), with a 95% "
        "paired bootstrap interval (environments resampled within scenario). "
        f"Reproduced if the interval's lower bound is above 0; not reproduced if its lower bound is at or below 0 "
        f"and its upper bound is below {SMALLEST_GAIN} (the data exclude a gain of {SMALLEST_GAIN:.2f}); "
        "inconclusive otherwise."
    ),
    "general": (
        "Paired per item, base and trained on the same held-out items, teacher-forced. R = the trained model's "
        "exact match on the held-out general tasks over the base's (greedy exact match, computed without "
        "decoding), with a 95% interval; L = the relative rise of the NLL of the assistant tokens of "
        "in-distribution text (held-out general tasks; oracle tool-use conversations of held-out environments), "
        f"per kind, with Fieller's 95% interval. Reproduced (kept) if R's lower bound is at least "
        f"{EXACT_MATCH_KEPT:.2f} and every L's upper bound is at most {LOSS_MARGIN:.0%}; not reproduced if R's "
        f"upper bound is below {EXACT_MATCH_KEPT:.2f} or some L's lower bound is above {LOSS_MARGIN:.0%}; "
        "inconclusive otherwise (R is unbounded when the base solves no task), and inconclusive when ability is "
        "kept but the tool-use claim is not reproduced (the claim is a gain without a general cost). R's "
        "interval comes from counts: Clopper-Pearson bounds of the shares of tasks lost, gained and solved by "
        "the base, combined at their worst, so it keeps its width when no task changes."
    ),
    "lower_mlp": (
        f"`ablate --grid paper`'s rule (analysis/ablate/verdict.py) for {LOWER_MLP}, the MLPs of the lower third "
        f"of the blocks: {ABLATION_RULE}"
    ),
    "context": (
        "On the oracle trajectories of held-out environments, on the tokens that must come from the context "
        f"({', '.join(UNDERSTANDING_ROLES)}), in their real context: the trained model's improvement per token "
        "in NLL and in top-1 accuracy over the base and over the sharpened base (the base's logits times the "
        "one factor that gives it the trained model's mean entropy on those conversations' tokens; its top-1 "
        "is the base's), paired over environments. Reproduced if, for NLL or for top-1 (Bonferroni over the "
        f"two, so each at {ALPHA / 2}), the trained model beats both comparators (one-sided p < {ALPHA / 2} "
        f"each); not reproduced if, for both metrics, the data exclude an improvement of {NLL_MARGIN} nats "
        f"(NLL) or {TOP1_MARGIN} (top-1) over at least one comparator (equivalence p < {ALPHA / 2}); "
        "inconclusive otherwise, with the minimum detectable improvement. The context gap (swapped minus real "
        "context) is reported beside it and never decides: a sharper model widens it without reading more."
    ),
}


def as_sentence(text: str) -> str:
    """`text` with a capital first letter and a full stop (reasons are written to follow evidence)."""
    text = text.strip()
    return f"{text[:1].upper()}{text[1:]}" + ("" if text.endswith(".") else ".") if text else ""


def _finite(*values: float | None) -> bool:
    return all(v is not None and math.isfinite(v) for v in values)


def tool_use_rule(low: float, high: float) -> str:
    if not _finite(low, high):
        return INCONCLUSIVE
    if low > 0:
        return REPRODUCED
    return NOT_REPRODUCED if high < SMALLEST_GAIN else INCONCLUSIVE


def general_rule(
    retained: dict[str, Any], rises: dict[str, dict[str, Any]], tool_use: str | None = None
) -> tuple[str, str]:
    """(verdict, reason) from the exact-match ratio and the loss rise per kind ({value, low, high}). The claim
    is that the tool-use gain came without a general cost: kept ability with no gain (`tool_use` judged and
    not reproduced) is inconclusive; `tool_use` None means it was not judged alongside."""
    over = [k for k, r in rises.items() if _finite(r.get("low")) and r["low"] > LOSS_MARGIN]
    if _finite(retained.get("high")) and retained["high"] < EXACT_MATCH_KEPT:
        return NOT_REPRODUCED, f"the data exclude keeping {EXACT_MATCH_KEPT:.0%} of the base's exact match"
    if over:
        return NOT_REPRODUCED, f"the loss rises by more than {LOSS_MARGIN:.0%} on {', '.join(over)}"
    if not _finite(retained.get("low"), retained.get("high")):
        return INCONCLUSIVE, retained.get("reason") or "the exact-match ratio has no bounded interval"
    bounded = bool(rises) and all(_finite(r.get("high")) for r in rises.values())
    if not (
        retained["low"] >= EXACT_MATCH_KEPT
        and bounded
        and all(r["high"] <= LOSS_MARGIN for r in rises.values())
    ):
        return INCONCLUSIVE, "the intervals include both kept and lost"
    kept = f"keeps at least {EXACT_MATCH_KEPT:.0%} of exact match, loss within {LOSS_MARGIN:.0%}"
    if tool_use is not None and tool_use != REPRODUCED:
        return (
            INCONCLUSIVE,
            f"{kept}, but the tool-use claim is {tool_use}: there is no gain whose cost it would be",
        )
    return REPRODUCED, kept + ("" if tool_use else " (the tool-use gain was not judged with it)")


def context_rule(tests: dict[str, dict[str, dict[str, Any]]]) -> tuple[str, str]:
    """(verdict, reason) from `tests[metric][comparator]` = {p_more, p_equivalent, mde, ...} (metric: nll,
    top1; comparator: base, sharpened)."""
    level = ALPHA / len(tests)

    def p(found: dict[str, Any], key: str) -> float:
        value = found.get(key)
        return value if _finite(value) else 1.0

    for metric, by in tests.items():
        if by and max(p(found, "p_more") for found in by.values()) < level:
            name = {"nll": "NLL", "top1": "top-1"}.get(metric, metric)
            return (
                REPRODUCED,
                f"the trained model beats the base and the sharpened base on {name} (p < {level} each)",
            )
    if tests and all(by and min(p(found, "p_equivalent") for found in by.values()) < level
                     for by in tests.values()):  # fmt: skip
        return NOT_REPRODUCED, (
            f"the data exclude an improvement of {NLL_MARGIN} nats and {TOP1_MARGIN} top-1 over at least one "
            "comparator"
        )
    mdes = [
        f"{metric} vs {name} {found['mde']:.3g}"
        for metric, by in tests.items()
        for name, found in by.items()
        if _finite(found.get("mde"))
    ]
    return INCONCLUSIVE, "neither shown nor excluded; minimum detectable improvement: " + (
        ", ".join(mdes) or "none (no tokens of these roles)"
    )
