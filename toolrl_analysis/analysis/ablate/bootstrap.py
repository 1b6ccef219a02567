"""Uncertainty by a paired, stratified bootstrap over environments, and the fraction of the gain retained.

Every variant is evaluated on the same environments, so each bootstrap replicate draws one multiset of
environments (with replacement, within each scenario, so every scenario keeps its size and the macro
average over scenarios stays defined) and scores every variant on it. Differences between variants (the
training gain, what a variant keeps of it) are then measured on paired samples, which is what makes them
tighter than the spread of either variant alone.

Fraction of the gain retained = (variant - base) / (trained - base), with Fieller's interval from the
replicates' variances and covariance (never their percentiles: a ratio over a denominator near 0 would be
any number). When the gain is within its noise Fieller's set is unbounded, and the fraction is NaN with
that reason.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from toolrl_analysis.analysis.ablate.contrasts import fieller_bounds

DEFAULT_REPLICATES = 1000
LEVEL = 0.95


@dataclass
class Resamples:
    """B replicates as environment counts: `weights[b, i]` = times environment i is drawn in replicate b."""

    weights: np.ndarray  # [B, n] float64
    groups: dict[str, np.ndarray]  # scenario -> indices of its environments

    @property
    def replicates(self) -> int:
        return self.weights.shape[0]


def stratified_resamples(
    groups: Sequence[str], replicates: int = DEFAULT_REPLICATES, seed: int = 0
) -> Resamples:
    """Resample environments within their group (scenario), `replicates` times, reproducibly."""
    generator = np.random.default_rng(seed)
    labels = list(groups)
    index = {g: np.flatnonzero(np.array(labels, dtype=object) == g) for g in dict.fromkeys(labels)}
    weights = np.zeros((replicates, len(labels)))
    rows = np.arange(replicates)[:, None]
    for members in index.values():
        drawn = members[generator.integers(0, len(members), size=(replicates, len(members)))]
        np.add.at(weights, (np.broadcast_to(rows, drawn.shape), drawn), 1.0)
    return Resamples(weights, index)


@dataclass
class Estimate:
    """A point value and its bootstrap replicates."""

    value: float
    replicates: np.ndarray

    @property
    def se(self) -> float:
        finite = self.replicates[np.isfinite(self.replicates)]
        return float(finite.std(ddof=1)) if finite.size > 1 else float("nan")

    @property
    def interval(self) -> tuple[float, float]:
        finite = self.replicates[np.isfinite(self.replicates)]
        if not finite.size:
            return float("nan"), float("nan")
        tail = 100 * (1 - LEVEL) / 2
        return float(np.percentile(finite, tail)), float(np.percentile(finite, 100 - tail))

    def __sub__(self, other: Estimate) -> Estimate:
        return Estimate(self.value - other.value, self.replicates - other.replicates)

    def summary(self) -> dict[str, float]:
        low, high = self.interval
        return {"value": self.value, "se": self.se, "low": low, "high": high}


def group_means(values: np.ndarray, resamples: Resamples) -> dict[str, Estimate]:
    """Mean of a per-environment value within each group."""
    out = {}
    for group, members in resamples.groups.items():
        point = float(values[members].mean())
        replicates = resamples.weights[:, members] @ values[members] / len(members)
        out[group] = Estimate(point, replicates)
    return out


def macro_mean(estimates: Sequence[Estimate]) -> Estimate:
    """The unweighted mean of group estimates (the `overall` of evaluate's Solve metrics)."""
    return Estimate(
        float(np.mean([e.value for e in estimates])), np.mean([e.replicates for e in estimates], axis=0)
    )


def ratio_of_sums(numerator: np.ndarray, denominator: np.ndarray, resamples: Resamples) -> Estimate:
    """sum(numerator) / sum(denominator) over environments (a token-weighted mean such as an NLL)."""
    total = float(denominator.sum())
    point = float(numerator.sum()) / total if total else float("nan")
    with np.errstate(invalid="ignore", divide="ignore"):
        replicates = (resamples.weights @ numerator) / (resamples.weights @ denominator)
    return Estimate(point, replicates)


def binomial(rate: float, count: int) -> dict[str, float]:
    """An accuracy over `count` independent items: its standard error and Wilson 95% interval."""
    if not count or not math.isfinite(rate):
        return {"value": rate, "se": float("nan"), "low": float("nan"), "high": float("nan")}
    z = 1.959963984540054
    centre = (rate + z * z / (2 * count)) / (1 + z * z / count)
    half = z * math.sqrt(rate * (1 - rate) / count + z * z / (4 * count * count)) / (1 + z * z / count)
    return {
        "value": rate,
        "se": math.sqrt(rate * (1 - rate) / count),
        "low": centre - half,
        "high": centre + half,
    }


@dataclass
class Retained:
    """The fraction of the training gain a variant keeps, or NaN and why."""

    value: float
    low: float
    high: float
    se: float
    reason: str = ""


def gain_retained(variant: Estimate, base: Estimate, trained: Estimate, metric: str, n: int) -> Retained:
    """(variant - base) / (trained - base) with a paired bootstrap interval; NaN when the gain is noise."""
    gain, kept = trained - base, variant - base
    low, high = gain.interval
    both = np.isfinite(gain.replicates) & np.isfinite(kept.replicates)
    nan = float("nan")
    if not math.isfinite(gain.value) or gain.value == 0 or both.sum() < 2:
        return Retained(
            nan,
            nan,
            nan,
            nan,
            f"the training gain in {metric} is {gain.value:+.4g}, within its noise: nothing to divide by",
        )
    covariance = np.cov(kept.replicates[both], gain.replicates[both], ddof=1)
    value = kept.value / gain.value
    z = 1.959963984540054
    bounds = fieller_bounds(kept.value, gain.value, covariance[0, 0], covariance[1, 1], covariance[0, 1], z)
    if bounds is None:
        reason = (
            f"the training gain in {metric} ({gain.value:+.4g}, 95% interval [{low:+.4g}, {high:+.4g}]) "
            f"is within its noise (paired bootstrap over {n} environments): the fraction is unbounded"
        )
        return Retained(nan, nan, nan, nan, reason)
    spread = covariance[0, 0] - 2 * value * covariance[0, 1] + value * value * covariance[1, 1]
    se = math.sqrt(max(spread, 0.0)) / abs(gain.value)
    return Retained(value, *bounds, se)
