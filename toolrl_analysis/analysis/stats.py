"""Small statistics shared by the probe and attention analyses: t-intervals, paired tests, Holm's correction."""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np


def mean_ci(values: Sequence[float], level: float = 0.95) -> tuple[float, float, float]:
    """(mean, low, high): a t-interval over the values (NaNs ignored); a single value has no width."""
    from scipy import stats

    data = np.asarray([v for v in values if not math.isnan(v)], dtype=float)
    if data.size == 0:
        return math.nan, math.nan, math.nan
    mean = float(data.mean())
    if data.size == 1 or float(data.std()) == 0.0:
        return mean, mean, mean
    half = float(stats.t.ppf(0.5 + level / 2, data.size - 1) * data.std(ddof=1) / math.sqrt(data.size))
    return mean, mean - half, mean + half


def paired_difference(
    base: Sequence[float], trained: Sequence[float], level: float = 0.95
) -> dict[str, float]:
    """trained - base over paired samples: mean, t-interval, the paired t-test's two-sided p-value, the
    effect size d_z (mean / sd of the differences) and the minimum detectable difference (two-sided 5%, 80%
    power) at this n and spread."""
    from scipy import stats

    pairs = [(b, t) for b, t in zip(base, trained, strict=True) if not (math.isnan(b) or math.isnan(t))]
    diff = np.asarray([t - b for b, t in pairs], dtype=float)
    mean, low, high = mean_ci(diff.tolist(), level)
    if diff.size < 2 or float(diff.std()) == 0.0:
        p_value = math.nan if diff.size < 2 else (1.0 if mean == 0 else 0.0)
    else:
        p_value = float(stats.ttest_1samp(diff, 0.0).pvalue)
    sd = float(diff.std(ddof=1)) if diff.size > 1 else math.nan
    mde = (
        float(
            (stats.t.ppf(0.975, diff.size - 1) + stats.t.ppf(0.8, diff.size - 1)) * sd / math.sqrt(diff.size)
        )
        if diff.size > 1
        else math.nan
    )
    effect = mean / sd if sd and math.isfinite(sd) else math.nan
    return {"diff_mean": mean, "diff_ci_low": low, "diff_ci_high": high, "p_value": p_value, "n": len(pairs),
            "effect_size": effect, "mde": mde}  # fmt: skip


def holm_reject(p_values: Sequence[float], alpha: float = 0.05) -> list[bool]:
    """Holm-Bonferroni over a family of tests (NaN p-values are never rejected and do not count)."""
    indexed = sorted((p, i) for i, p in enumerate(p_values) if not math.isnan(p))
    reject = [False] * len(p_values)
    for rank, (p, i) in enumerate(indexed):
        if p > alpha / (len(indexed) - rank):
            break
        reject[i] = True
    return reject


def bounds_text(value, low, high, digits: int = 2) -> str:
    """value [low, high]; "n/a" without a value, "[unbounded]" without bounds (Fieller's open interval)."""

    def absent(v) -> bool:
        try:
            return v is None or math.isnan(float(v))
        except TypeError:  # pandas' NA
            return True

    missing = [absent(v) for v in (value, low, high)]
    if missing[0]:
        return "n/a"
    if missing[1] or missing[2]:
        return f"{value:.{digits}f} [unbounded]"
    return f"{value:.{digits}f} [{low:.{digits}f}, {high:.{digits}f}]"
