"""verl custom reward function: FTRL's step reward of one assistant turn, computed by toolrl_analysis.

verl loads this file by path (`custom_reward_function.path`), takes the function named by
`custom_reward_function.name` (default `compute_score`) and calls it once per response as
`fn(data_source=..., solution_str=..., ground_truth=..., extra_info=...)`, with `extra_info` being the
row's `extra_info` column from `toolrl-analyze envs export --format verl` (tool code, unsolved set, solve
rate). The turn's tool calls run in our sandbox (worker processes, never in verl's process).

The reward variant (f1 = 2q/(p+1), precision = q/p, rate = q, pr = q²/p; docs/architecture.md, "Reward and
metrics") is chosen by name, which every verl version supports, as FTRL's own scripts do (`compute_solve_f1`, ...):
`compute_score` / `compute_score_f1`, `compute_score_precision`, `compute_score_rate`, `compute_score_pr`.
`compute_score` also takes `variant=...`, so verl's `custom_reward_function.reward_kwargs` can pick one.
"""

from __future__ import annotations

from toolrl_analysis.envs import ftrl_io
from toolrl_analysis.envs.reward import REWARD_VARIANTS


def compute_score(
    data_source: str,
    solution_str: str,
    ground_truth: str,
    extra_info: dict | None = None,
    variant: str = "f1",
) -> float:
    """The step reward of `solution_str` as one assistant turn in the row's environment state."""
    if variant not in REWARD_VARIANTS:
        raise ValueError(f"unknown reward variant '{variant}'; choose one of {', '.join(REWARD_VARIANTS)}")
    if variant == "f1":  # the package's own entry point, unchanged
        return ftrl_io.compute_score(data_source, solution_str, ground_truth, extra_info)
    breakdown = ftrl_io.score_breakdown(data_source, solution_str, ground_truth, extra_info, variant=variant)
    return float(breakdown["score"])


def compute_score_f1(
    data_source: str, solution_str: str, ground_truth: str, extra_info: dict | None = None
) -> float:
    """2q/(p+1): the paper's default."""
    return compute_score(data_source, solution_str, ground_truth, extra_info, variant="f1")


def compute_score_precision(
    data_source: str, solution_str: str, ground_truth: str, extra_info: dict | None = None
) -> float:
    """q/p."""
    return compute_score(data_source, solution_str, ground_truth, extra_info, variant="precision")


def compute_score_rate(
    data_source: str, solution_str: str, ground_truth: str, extra_info: dict | None = None
) -> float:
    """q."""
    return compute_score(data_source, solution_str, ground_truth, extra_info, variant="rate")


def compute_score_pr(
    data_source: str, solution_str: str, ground_truth: str, extra_info: dict | None = None
) -> float:
    """q²/p."""
    return compute_score(data_source, solution_str, ground_truth, extra_info, variant="pr")
