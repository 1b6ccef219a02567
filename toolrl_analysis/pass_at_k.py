"""pass@k and coverage: how often a policy solves an environment when it may try k times, and what a
trained policy solves that its base never does (or the reverse).

With N sampled episodes of an environment, c of them successes, the unbiased estimate of the chance that
at least one of k draws succeeds is pass@k = 1 - C(N-c, k) / C(N, k) (Chen et al. 2021, "Evaluating Large
Language Models Trained on Code"). pass@1 is then exactly c / N. A success is an episode whose Solve-F1
reaches a stated threshold (1.0 by default: every sub-question solved, with no call wasted).

A scenario's pass@k is the mean over its environments, with a normal interval over environments; `overall`
is the mean of the scenario means (as `evaluate` averages Solve-F1), its standard error combined from
theirs. Comparing two policies follows Yue et al. 2025 ("Does Reinforcement Learning Really Incentivize
Reasoning Capacity in LLMs Beyond the Base Model?", arXiv 2504.13837): RL can win at pass@1 by sharpening
what the base already samples, while the base wins at large k. The paired difference per environment gives
the interval of each k's gain; the crossover k* is the first k at which the base is not behind.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import pandas as pd

from toolrl_analysis.envs.schema import SCENARIOS

OVERALL = "overall"
Z95 = 1.959963984540054


def pass_at_k(n: int, c: int, k: int) -> float:
    """Chen et al.'s unbiased estimator, as a stable product: 1 - prod_{i=n-c+1}^{n} (1 - k/i)."""
    if not 0 <= c <= n or not 1 <= k <= n:
        raise ValueError(f"pass@k needs 0 <= c <= n and 1 <= k <= n (n={n}, c={c}, k={k})")
    if n - c < k:
        return 1.0
    return 1.0 - float(np.prod(1.0 - k / np.arange(n - c + 1, n + 1)))


def success_counts(samples: pd.DataFrame, threshold: float = 1.0) -> pd.DataFrame:
    """Per environment of a sampled-episode table (`env_id`, `scenario`, `solve_f1`, one row per sample):
    `env_id, scenario, n, c` with c the samples whose Solve-F1 >= threshold. Environment order is kept."""
    success = samples.assign(success=(samples["solve_f1"] >= threshold - 1e-12).astype(int))
    grouped = success.groupby(["env_id", "scenario"], sort=False)["success"].agg(["size", "sum"])
    return grouped.rename(columns={"size": "n", "sum": "c"}).reset_index()


def _per_env(counts: pd.DataFrame, k: int) -> np.ndarray:
    return np.array([pass_at_k(int(n), int(c), k) for n, c in zip(counts["n"], counts["c"], strict=True)])


def _scenarios(frame: pd.DataFrame) -> list[str]:
    present = set(frame["scenario"])
    return [s for s in SCENARIOS if s in present] + sorted(present - set(SCENARIOS))


def _mean_rows(values_by_scenario: dict[str, np.ndarray]) -> list[tuple[str, float, float, int]]:
    """(scenario, mean, standard error, environments) per scenario, then `overall` (mean of means)."""
    rows = []
    for scenario, values in values_by_scenario.items():
        se = float(values.std(ddof=1) / math.sqrt(len(values))) if len(values) > 1 else float("nan")
        rows.append((scenario, float(values.mean()), se, len(values)))
    if rows:
        means = [r[1] for r in rows]
        se = math.sqrt(sum(r[2] ** 2 for r in rows)) / len(rows)
        rows.append((OVERALL, float(np.mean(means)), se, sum(r[3] for r in rows)))
    return rows


def pass_at_k_table(counts: pd.DataFrame, ks: Sequence[int] | None = None) -> pd.DataFrame:
    """`scenario, k, pass_at_k, low, high, environments` for k = 1..N (N: the fewest samples of any
    environment), with a 95% normal interval over environments (NaN with a single environment)."""
    columns = ["scenario", "k", "pass_at_k", "low", "high", "environments"]
    if counts.empty:
        return pd.DataFrame(columns=columns)
    ks = list(ks) if ks is not None else list(range(1, int(counts["n"].min()) + 1))
    rows = []
    for k in ks:
        by_scenario = {s: _per_env(counts[counts["scenario"] == s], k) for s in _scenarios(counts)}
        for scenario, mean, se, envs in _mean_rows(by_scenario):
            rows.append((scenario, k, mean, mean - Z95 * se, mean + Z95 * se, envs))
    return pd.DataFrame(rows, columns=columns)


def paired_gain(base: pd.DataFrame, trained: pd.DataFrame) -> pd.DataFrame:
    """pass@k of both policies on the environments they share, and the paired gain per k:
    `scenario, k, base, trained, gain, low, high, environments, differ` (differ: environments whose pass@k
    is not the same for both; an interval over a handful of them is not to be trusted)."""
    joined = base.merge(trained, on=["env_id", "scenario"], suffixes=("_base", "_trained"))
    if joined.empty:
        raise ValueError("the two sampled evaluations share no environment")
    n = int(min(joined["n_base"].min(), joined["n_trained"].min()))
    rows = []
    for k in range(1, n + 1):
        per_env = {}
        for scenario in _scenarios(joined):
            part = joined[joined["scenario"] == scenario]
            b = _per_env(part.rename(columns={"n_base": "n", "c_base": "c"}), k)
            t = _per_env(part.rename(columns={"n_trained": "n", "c_trained": "c"}), k)
            per_env[scenario] = (b, t)
        gains = _mean_rows({s: t - b for s, (b, t) in per_env.items()})
        levels_b = _mean_rows({s: b for s, (b, _) in per_env.items()})
        levels_t = _mean_rows({s: t for s, (_, t) in per_env.items()})
        # environments whose pass@k differs: with none (or a handful) the normal interval says nothing
        differ = {s: int((np.abs(t - b) > 1e-12).sum()) for s, (b, t) in per_env.items()}
        differ[OVERALL] = sum(differ.values())
        for (scenario, gain, se, envs), lb, lt in zip(gains, levels_b, levels_t, strict=True):
            row = (scenario, k, lb[1], lt[1], gain, gain - Z95 * se, gain + Z95 * se, envs, differ[scenario])
            rows.append(row)
    columns = ["scenario", "k", "base", "trained", "gain", "low", "high", "environments", "differ"]
    return pd.DataFrame(rows, columns=columns)


def coverage(base: pd.DataFrame, trained: pd.DataFrame, gains: pd.DataFrame | None = None) -> dict[str, Any]:
    """Which environments each policy solves at least once in its samples, and the crossover k*.

    `only_base` / `only_trained` / `both` / `neither` list environment ids; `crossover_k` is the smallest k
    at which the base's overall pass@k is at least the trained policy's (None if the trained policy leads at
    every k it was sampled at, 1 if it never leads)."""
    joined = base.merge(trained, on=["env_id", "scenario"], suffixes=("_base", "_trained"))
    solved_b, solved_t = joined["c_base"] > 0, joined["c_trained"] > 0
    gains = paired_gain(base, trained) if gains is None else gains
    overall = gains[gains["scenario"] == OVERALL].sort_values("k")
    behind = overall[overall["base"] >= overall["trained"]]
    return {
        "environments": len(joined),
        "only_base": joined.loc[solved_b & ~solved_t, "env_id"].tolist(),
        "only_trained": joined.loc[solved_t & ~solved_b, "env_id"].tolist(),
        "both": int((solved_b & solved_t).sum()),
        "neither": int((~solved_b & ~solved_t).sum()),
        "crossover_k": int(behind["k"].iloc[0]) if not behind.empty else None,
    }


def gain_kind(gains: pd.DataFrame) -> dict[str, Any]:
    """Is the overall gain sharpening (pass@1 up, pass@N not up) or new capability (pass@N up)? Read
    from the 95% intervals of the paired gains at k = 1 and at the largest k."""
    overall = gains[gains["scenario"] == OVERALL].sort_values("k")
    first, last = overall.iloc[0], overall.iloc[-1]

    def sign(row) -> int:
        return 1 if row["low"] > 0 else -1 if row["high"] < 0 else 0

    at_1, at_n = sign(first), sign(last)
    if at_n > 0:
        kind = "new capability"  # more environments solved at all within N samples
    elif at_1 > 0:
        kind = "sharpening"  # more often right, on what the base could already reach
    elif at_1 < 0 or at_n < 0:
        kind = "loss"
    else:
        kind = "no detectable change"
    return {
        "kind": kind,
        "k_max": int(last["k"]),
        "gain_at_1": [float(first["gain"]), float(first["low"]), float(first["high"])],
        "gain_at_max": [float(last["gain"]), float(last["low"]), float(last["high"])],
        "rule": (
            "new capability if the paired pass@N gain's 95% interval is above 0; else sharpening if the "
            "pass@1 gain's is; loss if either is below 0; else no detectable change"
        ),
    }


def counts_from_records(records: list[dict[str, Any]]) -> pd.DataFrame:
    """The `success_counts` frame back from its JSON records (evaluation.json's `success_counts`)."""
    return pd.DataFrame(records, columns=["env_id", "scenario", "n", "c"])
