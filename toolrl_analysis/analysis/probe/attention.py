"""Attention to context: how much of each head's attention from the decision token lands on each region of
the context (question, tool documents, earlier tool calls, tool responses, the rest), base vs trained.

Input: per model an array [decision points, blocks, heads, regions] of attention mass (each point's masses
over regions sum to 1 per head), and the environment of each point. The decision points of one environment
are not independent (they share a question, tools and responses), so every statistic is taken over
environments: each environment's mean over its points, then paired over environments.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import pandas as pd

from toolrl_analysis.analysis.stats import holm_reject, mean_ci, paired_difference


def per_environment(values: np.ndarray, groups: Sequence[str] | None) -> np.ndarray:
    """The mean over each environment's decision points (first axis), in order of first appearance; the
    points themselves when `groups` is None."""
    if groups is None:
        return values
    labels = np.asarray(list(groups), dtype=object)
    order = list(dict.fromkeys(labels.tolist()))
    return np.stack([values[labels == g].mean(axis=0) for g in order])


def attention_by_block(
    mass: Mapping[str, np.ndarray], regions: Sequence[str], groups: Sequence[str] | None = None
) -> pd.DataFrame:
    """model, block, region, mean (over environments of the head-averaged mass), ci_low, ci_high, points
    (decision points), environments."""
    rows = []
    for model, values in mass.items():
        averaged = per_environment(values.mean(axis=2), groups)  # [environments, blocks, regions]
        for block in range(averaged.shape[1]):
            for r, region in enumerate(regions):
                mean, low, high = mean_ci(averaged[:, block, r].tolist())
                rows.append({"model": model, "block": block, "region": region, "mean": mean,
                             "ci_low": low, "ci_high": high, "points": values.shape[0],
                             "environments": averaged.shape[0]})  # fmt: skip
    return pd.DataFrame(rows)


def compare_attention(
    mass: Mapping[str, np.ndarray],
    regions: Sequence[str],
    base: str = "base",
    trained: str = "trained",
    alpha: float = 0.05,
    per_head: bool = True,
    groups: Sequence[str] | None = None,
) -> pd.DataFrame:
    """Trained minus base per (block, head, region), or per (block, region) of the head-averaged mass with
    `per_head=False`: paired over environments (`groups`: each point's environment; over decision points when
    None), mean difference, t-interval, paired t-test, effect size and minimum detectable difference, and
    Holm's correction over every row of the frame."""
    first, second = per_environment(mass[base], groups), per_environment(mass[trained], groups)
    if first.shape != second.shape:
        raise ValueError(f"attention mass shapes differ: {first.shape} vs {second.shape}")
    if not per_head:
        first, second = first.mean(axis=2, keepdims=True), second.mean(axis=2, keepdims=True)
    rows = []
    for block in range(first.shape[1]):
        for head in range(first.shape[2]):
            for r, region in enumerate(regions):
                a, b = first[:, block, head, r], second[:, block, head, r]
                where = {"block": block, "head": head} if per_head else {"block": block}
                rows.append({**where, "region": region, "base_mean": float(a.mean()),
                             "trained_mean": float(b.mean()), **paired_difference(a.tolist(), b.tolist())})  # fmt: skip
    frame = pd.DataFrame(rows)
    if not frame.empty:
        frame["significant"] = holm_reject(frame["p_value"].tolist(), alpha)
    return frame
