"""The one rule that says where the training's change lives, stated before any result.

It judges the *fraction of the change* in the teacher-forced metric (`likelihood`): per environment, the
trained model's log-likelihood of its own greedy trajectory moves from the base's LL_base to LL_trained; a
variant v keeps F_v = mean(LL_v - LL_base) / mean(LL_trained - LL_base). The fraction is sign-agnostic: a
training that lowered the metric is judged as one that raised it.

For a subset S with matched controls C_1..C_K (`control.draw_controls`):

    dependence   E = mean_k F(revert C_k) - F(revert S)      (S's revert removes more than its controls')
    sufficiency  E = F(transplant S) - mean_k F(transplant C_k)

each a ratio of paired per-environment contrasts with Fieller's interval; the spread of the controls over
their draws adds to its variance (`contrasts.contrast`). Across the grid, Holm's correction applies to the
one-sided p of "E > 0" and, separately, to that of "E < margin". The verdict of S is its dependence:

    reproduced      Holm-adjusted p(E <= 0) < alpha: the change depends on S beyond its controls;
    not reproduced  Holm-adjusted p(E >= margin) < alpha: S contributes no more than its controls, within
                    the margin (an equivalence test);
    inconclusive    otherwise, with the minimum detectable effect; also when S has no valid control, or the
                    change itself is within its noise.

The rank-k block is judged the same way by its sufficiency: the rank-k truncation against random rank-k
directions of the same norm.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from toolrl_analysis.analysis.ablate.contrasts import Contrast, contrast, holm, ratio

REPRODUCED, NOT_REPRODUCED, INCONCLUSIVE = "reproduced", "not reproduced", "inconclusive"
ALPHA = 0.05
MARGIN = 0.10  # a subset "contributes no more than its controls" within a tenth of the change
RULE = (
    "F(v) = fraction of the training's change that variant v keeps, in the log-likelihood of the trained "
    "model's greedy trajectories (paired over environments). For subset S with K matched random controls "
    "(same family, shape and parameter count, other layers): E = mean_k F(revert control_k) - F(revert S), "
    "with a Fieller interval over environments plus the controls' spread over draws. Holm across the grid. "
    f"Reproduced if p(E <= 0) < {ALPHA} (the change depends on S beyond its controls); not reproduced if "
    f"p(E >= {MARGIN}) < {ALPHA} (S contributes no more than its controls, within {MARGIN} of the change); "
    "inconclusive otherwise, with the minimum detectable effect, or when S has no valid control. The rank-k "
    "block: E = F(transplant rank-k) - mean F(transplant random rank-k)."
)


@dataclass
class GridEntry:
    """The variants of one subset: its revert and transplant, and its controls' (names)."""

    subset: str
    revert: str | None
    transplant: str | None
    revert_controls: list[str]
    transplant_controls: list[str]
    reason: str = ""  # why there are no controls
    decided_by: str = "revert"  # revert (dependence) or transplant (sufficiency: the rank-k block)


def _fraction_summary(found) -> dict[str, float]:
    return {"value": found.value, "low": found.low, "high": found.high}


def _side(
    values: Mapping[str, np.ndarray],
    change: np.ndarray,
    subject: str,
    subject_fraction,
    controls: Sequence[str],
    sign: float,
) -> tuple[Contrast, dict[str, Any]]:
    """E = sign * (mean control fraction - subject fraction), as a contrast over environments."""
    subject_delta = values[subject]
    control_deltas = np.stack([values[c] for c in controls])
    numerator = sign * (control_deltas.mean(axis=0) - subject_delta)
    with np.errstate(
        invalid="ignore", divide="ignore"
    ):  # no change at all: NaN fractions, said in the reason
        fractions = control_deltas.mean(axis=1) / change.mean()
    extra = float(np.var(control_deltas.mean(axis=1), ddof=1)) / len(controls) if len(controls) > 1 else 0.0
    found = contrast(numerator, change, margin=MARGIN, extra_variance=extra, extra_df=len(controls) - 1)
    below = float(np.mean(fractions < subject_fraction.value))
    details = {
        "fraction": _fraction_summary(subject_fraction),
        "controls": {
            "draws": len(controls),
            "mean": float(fractions.mean()),
            "sd": float(fractions.std(ddof=1)) if len(controls) > 1 else math.nan,
            "values": fractions.tolist(),
            "share_below_subset": below,  # where the subset lies in the controls' null distribution
        },
        "effect": _fraction_summary(found.effect),
        "environments": found.n,
        "environments_differ": found.differ,
    }
    return found, details


def grid_verdicts(
    entries: Sequence[GridEntry], values: Mapping[str, np.ndarray], *, alpha: float = ALPHA
) -> list[dict[str, Any]]:
    """One verdict object per subset (see the module docstring). `values[v]` is LL_v - LL_base per
    environment for every variant v, with `values['trained']` the training's change."""
    change = values["trained"]
    whole = ratio(change, np.ones_like(change))  # is there a change at all?
    tested: list[tuple[int, str, Contrast]] = []
    objects: list[dict[str, Any]] = []
    for index, entry in enumerate(entries):
        found: dict[str, Any] = {
            "subset": entry.subset,
            "rule": RULE,
            "margin": MARGIN,
            "decided_by": entry.decided_by,
        }
        for side, subject, controls, sign in (
            ("revert", entry.revert, entry.revert_controls, 1.0),
            ("transplant", entry.transplant, entry.transplant_controls, -1.0),
        ):
            if subject is None or subject not in values:
                continue
            fraction = ratio(values[subject], change)
            found[f"{side}_fraction"] = _fraction_summary(fraction)
            usable = [c for c in controls if c in values]
            if len(usable) < 2:
                continue
            result, details = _side(values, change, subject, fraction, usable, sign)
            found[side] = details
            tested.append((index, side, result))
        objects.append(found)
    more = holm([t[2].p_more for t in tested])
    equivalent = holm([t[2].p_equivalent for t in tested])
    family = sum(math.isfinite(t[2].p_more) for t in tested)
    for (index, side, result), p_more, p_equivalent in zip(tested, more, equivalent, strict=True):
        objects[index][side].update(
            {
                "p": result.p_more, "p_holm": p_more, "p_equivalent": result.p_equivalent,
                "p_equivalent_holm": p_equivalent,
                "mde": result.mde(alpha / max(family, 1)),  # Bonferroni's level: the strictest Holm step
            }
        )  # fmt: skip
    for entry, found in zip(entries, objects, strict=True):
        found["verdict"], found["reason"] = _decide(entry, found, whole, alpha)
    return objects


def _decide(entry: GridEntry, found: dict[str, Any], whole, alpha: float) -> tuple[str, str]:
    if not (whole.low > 0 or whole.high < 0):  # NaN bounds (too few environments) land here too
        return INCONCLUSIVE, (
            f"the training's change ({whole.value:+.3g} nats per environment, 95% [{whole.low:+.3g}, "
            f"{whole.high:+.3g}]) is within its noise: nothing to attribute"
        )
    side = found.get(entry.decided_by)
    if side is None:
        return INCONCLUSIVE, entry.reason or f"{entry.subset} has no valid matched control"
    effect = side["effect"]
    if not math.isfinite(side.get("p_holm", math.nan)):
        return INCONCLUSIVE, "the effect's interval is unbounded"
    numbers = f"E = {effect['value']:+.3f} [{effect['low']:+.3f}, {effect['high']:+.3f}], Holm p = {side['p_holm']:.3g}"
    if side["p_holm"] < alpha:
        return REPRODUCED, f"{numbers}: the change depends on {entry.subset} beyond its controls"
    if side["p_equivalent_holm"] < alpha:
        return NOT_REPRODUCED, (
            f"{numbers}; equivalence p = {side['p_equivalent_holm']:.3g}: no more than its controls "
            f"within {MARGIN}"
        )
    return INCONCLUSIVE, f"{numbers}; minimum detectable effect {side['mde']:.3f} (80% power)"
