"""Context understanding, measured as the paper means it: does the trained model predict the tokens that
must come from the context better than the base, *and* better than a base that is merely as confident?

The material is the context meter's (`context_meter`): oracle trajectories of held-out environments, each
scored in its real context and with another environment's question and tool responses. Every token is
compared between the two models (`outputs.compare_tokens`); the sharpened base is fitted on the real-context
tokens and applied, with the same factor, to the swapped ones.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd

from toolrl_analysis.analysis.ablate.contrasts import contrast
from toolrl_analysis.analysis.judge.outputs import TokenComparison
from toolrl_analysis.analysis.judge.rules import (
    ALPHA,
    NLL_MARGIN,
    TOP1_MARGIN,
    UNDERSTANDING_ROLES,
    as_sentence,
    context_rule,
)
from toolrl_analysis.context_meter import ROLES

MODELS = ("base", "sharp", "trained")


@dataclass
class ContextMeasurement:
    scale: float  # the sharpening factor, fitted on the real-context tokens
    tests: dict[str, dict[str, dict[str, Any]]]  # metric -> comparator -> contrast summary
    roles: pd.DataFrame  # per role: tokens, NLL and top-1 of each model, real and swapped, and the gaps
    verdict: str
    reason: str
    environments: int

    def evidence(self) -> str:
        nll, top1 = self.tests["nll"], self.tests["top1"]
        return (
            f"on {self.environments} held-out environments' oracle trajectories, tokens of "
            f"{', '.join(UNDERSTANDING_ROLES)}: NLL improvement per token [97.5% interval] over the base "
            f"{_text(nll['base'])}, over the base sharpened x{self.scale:.2f} {_text(nll['sharpened'])}; top-1 "
            f"improvement {_text(top1['base'])} (sharpening keeps the base's top-1). {as_sentence(self.reason)}"
        )

    def to_dict(self) -> dict[str, Any]:
        return {"scale": self.scale, "tests": self.tests, "environments": self.environments,
                "verdict": self.verdict, "reason": self.reason, "roles": self.roles.to_dict("records")}  # fmt: skip


def _text(found: dict[str, Any]) -> str:
    if not math.isfinite(found.get("value", math.nan)):
        return "n/a"
    return f"{found['value']:+.4f} [{found['low']:+.4f}, {found['high']:+.4f}] (p {found['p_more']:.2g})"


def _summary(a: np.ndarray, tokens: np.ndarray, margin: float) -> dict[str, Any]:
    """The per-token improvement mean(a)/mean(tokens) over environments, tested against 0 and `margin`."""
    if len(a) < 2:
        return {"value": math.nan, "low": math.nan, "high": math.nan, "p_more": math.nan,
                "p_equivalent": math.nan, "margin": margin, "mde": math.nan, "differ": 0, "environments": len(a)}  # fmt: skip
    found = contrast(a, tokens, margin=margin, level=1 - ALPHA / 2)
    return {
        "value": found.effect.value, "low": found.effect.low, "high": found.effect.high,
        "p_more": found.p_more, "p_equivalent": found.p_equivalent, "margin": margin,
        "mde": found.mde(ALPHA / 2), "differ": found.differ, "environments": found.n,
    }  # fmt: skip


def context_tests(real: pd.DataFrame) -> tuple[dict[str, dict[str, dict[str, Any]]], int]:
    """The four paired contrasts of the rule, from real-context tokens with `nll_sharp` (`at_scale`)."""
    chosen = real[real["role"].isin(UNDERSTANDING_ROLES)]
    sums = chosen.groupby("example")[
        ["nll_base", "nll_sharp", "nll_trained", "top1_base", "top1_trained"]
    ].sum()
    tokens = chosen.groupby("example").size().reindex(sums.index).to_numpy(float)
    gain_top1 = (sums["top1_trained"] - sums["top1_base"]).to_numpy(float)
    tests = {
        "nll": {
            "base": _summary((sums["nll_base"] - sums["nll_trained"]).to_numpy(float), tokens, NLL_MARGIN),
            "sharpened": _summary(
                (sums["nll_sharp"] - sums["nll_trained"]).to_numpy(float), tokens, NLL_MARGIN
            ),
        },
        # the sharpened base's arg-max is the base's: the same contrast serves both comparators
        "top1": {
            "base": _summary(gain_top1, tokens, TOP1_MARGIN),
            "sharpened": _summary(gain_top1, tokens, TOP1_MARGIN),
        },
    }
    return tests, len(sums)


def role_table(real: pd.DataFrame, swapped: pd.DataFrame | None) -> pd.DataFrame:
    """Per role (and `understanding`, the rule's roles together): tokens; NLL of base, sharpened base and
    trained in the real context; top-1 of base and trained; and, with the swapped context, each model's gap."""
    rows = []
    groups = [(role, [role]) for role in ROLES] + [("understanding", list(UNDERSTANDING_ROLES))]
    for name, roles in groups:
        mine = real[real["role"].isin(roles)]
        if mine.empty:
            continue
        row: dict[str, Any] = {"role": name, "tokens": len(mine)}
        row |= {f"nll_{m}": float(mine[f"nll_{m}"].mean()) for m in MODELS}
        row |= {
            "top1_base": float(mine["top1_base"].mean()),
            "top1_trained": float(mine["top1_trained"].mean()),
        }
        if swapped is not None:
            other = swapped[swapped["role"].isin(roles)]
            row |= {f"gap_{m}": float(other[f"nll_{m}"].mean()) - row[f"nll_{m}"] for m in MODELS}
        rows.append(row)
    return pd.DataFrame(rows)


def measure_context(real: TokenComparison, swapped: TokenComparison | None) -> ContextMeasurement:
    """The rule's contrasts, the role table and the verdict."""
    scale = real.fit_scale()
    real_at = real.at_scale(scale) if math.isfinite(scale) else real.tokens.assign(nll_sharp=math.nan)
    swapped_at = swapped.at_scale(scale) if swapped is not None and math.isfinite(scale) else None
    tests, environments = context_tests(real_at)
    verdict, reason = context_rule(tests)
    return ContextMeasurement(scale, tests, role_table(real_at, swapped_at), verdict, reason, environments)
