"""Paired contrasts over environments, and intervals for ratios that cannot degenerate.

Every variant is measured on the same environments, so a comparison is a per-environment contrast: a_i (what
a variant, or a subset against its controls, changed in environment i) over b_i (the training's whole change
in environment i). The fraction a/b is a ratio of two means, and its interval is Fieller's: the set of
values rho for which the mean of a_i - rho * b_i is not significantly different from 0. It is bounded only
when the denominator is significantly different from 0; otherwise it is reported as unbounded (NaN, with
the reason), never as a percentile of a bootstrap of the ratio, which a small denominator makes any number.

The same pivot gives the tests: "the fraction is above e0" is a test of mean(a - e0 * b) > 0. Extra variance
from outside the environments (the spread of a subset's random controls over their draws) adds to the
numerator's variance, with Satterthwaite's degrees of freedom.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from scipy import stats

LEVEL = 0.95
POWER = 0.80
# Below this many nats (or Solve-F1 points) two environments' values count as the same.
SAME = 1e-6


@dataclass
class Ratio:
    """mean(a) / mean(b) with Fieller's interval; NaN bounds, and `reason`, when the interval is unbounded."""

    value: float
    low: float
    high: float
    se: float  # delta method, for tables
    n: int
    reason: str = ""

    @property
    def bounded(self) -> bool:
        return math.isfinite(self.low) and math.isfinite(self.high)


@dataclass
class Moments:
    n: int
    mean_a: float
    mean_b: float
    var_a: float  # variances and covariance of the *means*
    var_b: float
    cov: float
    extra: float  # added variance of mean(a) from outside the environments
    extra_df: float

    @classmethod
    def of(cls, a: np.ndarray, b: np.ndarray, extra: float = 0.0, extra_df: float = math.inf) -> Moments:
        a, b = np.asarray(a, float), np.asarray(b, float)
        n = len(a)
        if n < 2:
            return cls(n, float(a.mean()) if n else math.nan, float(b.mean()) if n else math.nan,
                       math.nan, math.nan, math.nan, extra, extra_df)  # fmt: skip
        covariance = np.cov(a, b, ddof=1) / n
        return cls(n, float(a.mean()), float(b.mean()), float(covariance[0, 0]) + extra,
                   float(covariance[1, 1]), float(covariance[0, 1]), extra, extra_df)  # fmt: skip

    def pivot_variance(self, rho: float) -> float:
        """Variance of mean(a) - rho * mean(b)."""
        return max(self.var_a - 2 * rho * self.cov + rho * rho * self.var_b, 0.0)

    def df(self, rho: float) -> float:
        """Satterthwaite's degrees of freedom of the pivot: n - 1 from the environments, `extra_df` from the
        extra variance."""
        within = self.pivot_variance(rho) - self.extra
        if self.extra <= 0 or not math.isfinite(self.extra_df):
            return self.n - 1
        total = within + self.extra
        denominator = within**2 / (self.n - 1) + self.extra**2 / self.extra_df
        return total**2 / denominator if denominator > 0 else self.n - 1

    def quantile(self, tail: float, rho: float) -> float:
        return float(stats.t.ppf(1 - tail, max(self.df(rho), 1.0)))

    def statistic(self, rho: float) -> float:
        """t of "the ratio is above rho" (positive when it is), whatever the denominator's sign."""
        variance = self.pivot_variance(rho)
        difference = (self.mean_a - rho * self.mean_b) * np.sign(self.mean_b)
        if variance <= 0:
            return math.inf if difference > 0 else (-math.inf if difference < 0 else 0.0)
        return float(difference / math.sqrt(variance))

    def p_above(self, rho: float) -> float:
        """One-sided p of H0: ratio <= rho."""
        return float(stats.t.sf(self.statistic(rho), max(self.df(rho), 1.0)))

    def p_below(self, rho: float) -> float:
        """One-sided p of H0: ratio >= rho."""
        return float(stats.t.cdf(self.statistic(rho), max(self.df(rho), 1.0)))


def fieller_bounds(
    mean_a: float, mean_b: float, var_a: float, var_b: float, cov: float, q: float
) -> tuple[float, float] | None:
    """The values rho with (mean_a - rho * mean_b)^2 <= q^2 * var(mean_a - rho * mean_b), given the
    variances and covariance of the two means; None when that set is unbounded (mean_b within q standard
    errors of 0)."""
    a2 = mean_b**2 - q * q * var_b
    if a2 <= 0:
        return None
    a1 = mean_a * mean_b - q * q * cov
    a0 = mean_a**2 - q * q * var_a
    root = math.sqrt(max(a1 * a1 - a2 * a0, 0.0))
    return (a1 - root) / a2, (a1 + root) / a2


def _fieller(m: Moments, level: float) -> tuple[float, float, str]:
    if m.n < 2:
        return math.nan, math.nan, f"{m.n} environment(s): no interval"
    q = m.quantile((1 - level) / 2, m.mean_a / m.mean_b if m.mean_b else 0.0)
    bounds = fieller_bounds(m.mean_a, m.mean_b, m.var_a, m.var_b, m.cov, q)
    if bounds is None:  # the denominator is not significantly different from 0
        return (
            math.nan,
            math.nan,
            (
                f"the training's change ({m.mean_b:+.4g} per environment, s.e. {math.sqrt(m.var_b):.2g}) is within "
                f"its noise over {m.n} environments: the fraction of it is unbounded"
            ),
        )
    return (*bounds, "")


def ratio(a: Sequence[float], b: Sequence[float], *, level: float = LEVEL) -> Ratio:
    """mean(a) / mean(b) over paired environments, with Fieller's interval."""
    m = Moments.of(np.asarray(a, float), np.asarray(b, float))
    value = m.mean_a / m.mean_b if m.mean_b else math.nan
    low, high, reason = _fieller(m, level)
    se = math.sqrt(m.pivot_variance(value)) / abs(m.mean_b) if m.mean_b and math.isfinite(value) else math.nan
    return Ratio(value, low, high, se, m.n, reason)


@dataclass
class Contrast:
    """E = mean(a) / mean(b), a fraction of the training's change, tested against 0 and against a margin.

    `p_more`: one-sided p of H0 E <= 0; `p_equivalent`: one-sided p of H0 E >= margin (small when the data
    exclude an effect as large as the margin); `differ`: environments whose two sides differ at all."""

    effect: Ratio
    margin: float
    p_more: float
    p_equivalent: float
    se: float
    differ: int
    n: int
    df: float

    def mde(self, alpha: float) -> float:
        """Minimum detectable effect of a one-sided test at `alpha` with 80% power."""
        if not math.isfinite(self.se):
            return math.nan
        return float((stats.norm.isf(alpha) + stats.norm.ppf(POWER)) * self.se)


def contrast(
    a: Sequence[float],
    b: Sequence[float],
    *,
    margin: float,
    extra_variance: float = 0.0,
    extra_df: float = math.inf,
    level: float = LEVEL,
) -> Contrast:
    """The contrast a/b over paired environments (see the module docstring); `extra_variance` is added to
    the variance of mean(a) (in a's units), with `extra_df` degrees of freedom."""
    a, b = np.asarray(a, float), np.asarray(b, float)
    m = Moments.of(a, b, extra_variance, extra_df)
    value = m.mean_a / m.mean_b if m.mean_b else math.nan
    low, high, reason = _fieller(m, level)
    se = math.sqrt(m.pivot_variance(value)) / abs(m.mean_b) if m.mean_b and math.isfinite(value) else math.nan
    effect = Ratio(value, low, high, se, m.n, reason)
    scale = max(float(np.abs(b).max(initial=0.0)), 1.0)
    differ = int((np.abs(a) > SAME * scale).sum())
    if reason or not math.isfinite(value):
        return Contrast(effect, margin, math.nan, math.nan, se, differ, m.n, math.nan)
    return Contrast(effect, margin, m.p_above(0.0), m.p_below(margin), se, differ, m.n, m.df(value))


def holm(pvalues: Sequence[float]) -> list[float]:
    """Holm's step-down adjusted p-values (NaN stays NaN and does not count towards the family)."""
    values = np.asarray(pvalues, float)
    finite = np.flatnonzero(np.isfinite(values))
    adjusted = np.full(len(values), math.nan)
    order = finite[np.argsort(values[finite], kind="stable")]
    m, running = len(order), 0.0
    for rank, index in enumerate(order):
        running = max(running, min(1.0, (m - rank) * values[index]))
        adjusted[index] = running
    return adjusted.tolist()


def correlation(x: Sequence[float], y: Sequence[float], level: float = LEVEL) -> dict[str, float]:
    """Pearson's r over paired values with a Fisher-z interval (NaN with fewer than 4 pairs)."""
    x, y = np.asarray(x, float), np.asarray(y, float)
    keep = np.isfinite(x) & np.isfinite(y)
    x, y = x[keep], y[keep]
    n = len(x)
    if n < 4 or x.std() == 0 or y.std() == 0:
        return {"r": math.nan, "low": math.nan, "high": math.nan, "n": n}
    r = float(np.corrcoef(x, y)[0, 1])
    z, half = math.atanh(max(min(r, 0.999999), -0.999999)), stats.norm.isf((1 - level) / 2) / math.sqrt(n - 3)
    return {"r": r, "low": math.tanh(z - half), "high": math.tanh(z + half), "n": n}
