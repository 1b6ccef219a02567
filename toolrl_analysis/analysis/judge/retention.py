"""Is general ability kept? Paired per-item outcomes of the base and the trained model on the same items.

Two measurements, both teacher-forced, so that thousands of items cost seconds and carry no sampling noise:

- **Exact match on held-out general tasks** (`models.general`, the test split: never in any training mixture).
  A task counts as solved when every token of the reference answer turn, its end-of-turn token included, is
  the model's greedy choice given the prompt and the answer so far: exactly what greedy decoding writes, so
  this is greedy exact match without the lenience for trailing spaces or a full stop, computed without
  decoding.
- **The loss on in-distribution text**: the NLL of the assistant tokens of (a) those held-out general tasks
  and (b) oracle tool-use conversations of held-out environments, the two kinds of text the base was
  trained to write. Unlike the docstring text of `evaluate`'s suite, the base models this text well, so a rise
  in its loss is forgetting.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd

from toolrl_analysis.context_meter import LabelledExample, label_roles, token_nlls

TASKS = 4096  # held-out general tasks: the embedded base solves 6.7% (275), enough for R within +-0.04
ITEM_COLUMNS = [
    "kind",
    "item",
    "task_kind",
    "tokens",
    "nll_base",
    "nll_trained",
    "exact_base",
    "exact_trained",
]


@dataclass
class Items:
    """Labelled conversations of one kind, and the general-task kind of each (None for tool use: `judge`
    passes the context meter's oracle conversations, already built, rather than building them again)."""

    kind: str
    examples: list[LabelledExample]
    task_kinds: list[str | None]


def general_items(tokenizer, n: int = TASKS, seed: int = 0) -> Items:
    """The first `n` held-out general tasks as complete chats, labelled."""
    from toolrl_analysis.models.general import general_tasks, task_chat

    tasks = general_tasks(n, seed=seed, split="test")
    examples = [label_roles(tokenizer, task_chat(task), None, task["answer"]) for task in tasks]
    return Items("general_tasks", examples, [task["kind"] for task in tasks])


def score_items(base, trained, items: Sequence[Items], batch_tokens: int = 8192) -> pd.DataFrame:
    """One row per item: its tokens, both models' NLL sums, and whether each model's greedy choice is every
    token of it (`exact_*`)."""
    rows = []
    for group in items:
        scored = {name: token_nlls(model, group.examples, batch_tokens) for name, model in
                  (("base", base), ("trained", trained))}  # fmt: skip
        for index in range(len(group.examples)):
            if not scored["base"][index]:  # no assistant token after the first position: nothing scored
                continue
            row = {"kind": group.kind, "item": index, "task_kind": group.task_kinds[index],
                   "tokens": len(scored["base"][index])}  # fmt: skip
            for name, values in scored.items():
                row[f"nll_{name}"] = sum(v[0] for v in values[index])
                row[f"exact_{name}"] = float(all(v[1] for v in values[index]))
            rows.append(row)
    return pd.DataFrame(rows, columns=ITEM_COLUMNS)


def _clopper_pearson(count: int, n: int, level: float) -> tuple[float, float]:
    from scipy import stats

    tail = (1 - level) / 2
    low = float(stats.beta.ppf(tail, count, n - count + 1)) if count > 0 else 0.0
    high = float(stats.beta.ppf(1 - tail, count + 1, n - count)) if count < n else 1.0
    return low, high


def exact_match_kept(base: Sequence[float], trained: Sequence[float], level: float = 0.95) -> dict[str, Any]:
    """R = trained's exact match / base's, paired per task, with an interval built from counts that cannot
    collapse: R = 1 - (lost - gained) / (base solved), where `lost` and `gained` are the tasks only the base
    or only the trained model solves. Clopper-Pearson bounds for the shares lost, gained and solved by the
    base, each at level 1 - (1 - `level`) / 3 (Bonferroni), combined at their worst: no flip in 4,096 tasks
    still leaves the share lost up to ~1/1000, so the interval has width even then."""
    base, trained = np.asarray(base, float), np.asarray(trained, float)
    n = len(base)
    lost, gained, solved = (
        int(((base == 1) & (trained == 0)).sum()),
        int(((base == 0) & (trained == 1)).sum()),
        int(base.sum()),
    )
    out = {"value": math.nan, "low": math.nan, "high": math.nan, "lost": lost, "gained": gained, "solved": solved,
           "tasks": n, "reason": ""}  # fmt: skip
    if solved == 0:
        return out | {"reason": f"the base solves none of the {n} tasks: no share of it can be kept"}
    each = 1 - (1 - level) / 3
    (lost_low, lost_high), (gained_low, gained_high) = (
        _clopper_pearson(lost, n, each),
        _clopper_pearson(gained, n, each),
    )
    solved_low, solved_high = _clopper_pearson(solved, n, each)

    def worst(net: float, lowest: bool) -> float:
        # a net loss weighs most against the fewest solved; a net gain most with the fewest too
        return 1 - net / solved_low if (net > 0) == lowest else 1 - net / solved_high

    low, high = worst(lost_high - gained_low, True), worst(lost_low - gained_high, False)
    return out | {"value": float(trained.sum() / solved), "low": min(low, high), "high": max(low, high)}
