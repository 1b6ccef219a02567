"""Recovery per direction x position set x site x block, aggregated over environments without dividing by
any one environment's change.

Recovery is a ratio of sums, sum_i a_i / sum_i b_i over environments i (a_i the patch's change,
`measure.DIRECTIONS`; b_i = lp_trained - lp_base), with Fieller's interval (`ablate.contrasts.ratio`): an
environment the training barely moved weighs little instead of blowing the ratio up, and a change within
its noise gives an unbounded interval (NaN bounds, and `reason`). The base against itself has b = 0
everywhere: every recovery is undefined (NaN, with its reason), never a crash.

Random controls: per environment the mean change over the K draws gives the control's recovery; the set
against its control is the paired contrast sum_i (a_i - mean_k a_ik) / sum_i b_i, whose variance adds the
spread of the draws (K - 1 degrees of freedom) to that over environments, as `ablate`'s matched controls do;
`p_value` is one-sided (the set moves the targets further towards the trained model than random positions
do; a test on the numerators, so it stands where the ratio's interval is unbounded), `p_holm` Holm's over
the table.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import pandas as pd

from toolrl_analysis.analysis.ablate.contrasts import Moments, contrast, holm, ratio
from toolrl_analysis.analysis.stats import mean_ci

KEYS = ["direction", "positions", "site", "layer"]
RECOVERY_COLUMNS = [
    *KEYS, "environments", "count", "recovery", "low", "high", "reason", "control_count", "control_recovery",
    "control_low", "control_high", "control_sd", "difference", "difference_low", "difference_high", "p_value",
    "p_holm",
]  # fmt: skip
MARGIN = 0.10  # the project's equivalence margin (a tenth of the change); only `contrast` needs one


def recovery_table(environments: pd.DataFrame, patches: pd.DataFrame) -> pd.DataFrame:
    """One row per direction x position set x site x block (columns `RECOVERY_COLUMNS`)."""
    change = environments.set_index("environment")["change"]
    b = change.to_numpy(float)
    rows = []
    for keys, group in patches.groupby(KEYS, sort=False):
        table = group.pivot(index="environment", columns="draw", values="change").reindex(change.index)
        counts = group.pivot(index="environment", columns="draw", values="count")
        a = table[0].to_numpy(float)
        found = ratio(a, b)
        row: dict[str, Any] = dict(zip(KEYS, keys, strict=True))
        row |= {"environments": len(b), "count": float(counts[0].mean()), "recovery": found.value,
                "low": found.low, "high": found.high, "reason": found.reason}  # fmt: skip
        draws = [d for d in table.columns if d > 0]
        if draws:
            drawn = table[draws].to_numpy(float).T  # [K, environments]
            mean_drawn = drawn.mean(0)
            control = ratio(mean_drawn, b)
            per_draw = [ratio(values, b).value for values in drawn]
            k = len(draws)
            extra = float(np.var(drawn.mean(1), ddof=1)) / k if k > 1 else 0.0
            paired = contrast(a - mean_drawn, b, margin=MARGIN, extra_variance=extra, extra_df=max(k - 1, 1))
            # the test needs no bounded ratio: the numerators' difference, signed by the training's change
            moments = Moments.of(a - mean_drawn, b, extra, max(k - 1, 1))
            row |= {
                "control_count": float(counts[draws].to_numpy(float).mean()),
                "control_recovery": control.value, "control_low": control.low, "control_high": control.high,
                "control_sd": float(np.std(per_draw, ddof=1)) if k > 1 and np.isfinite(per_draw).all() else math.nan,
                "difference": paired.effect.value, "difference_low": paired.effect.low,
                "difference_high": paired.effect.high, "p_value": moments.p_above(0.0) if len(b) > 1 else math.nan,
            }  # fmt: skip
        rows.append(row)
    frame = pd.DataFrame(rows, columns=RECOVERY_COLUMNS)
    frame["p_holm"] = holm(frame["p_value"].to_numpy(float)) if len(frame) else []
    return frame


def change_summary(environments: pd.DataFrame) -> dict[str, Any]:
    """The training's change on the targets: mean lp_trained - lp_base per environment with its t-interval,
    and how many environments it raised."""
    values = environments["change"].to_numpy(float)
    mean, low, high = mean_ci(values.tolist())
    return {"mean": mean, "low": low, "high": high, "environments": len(values),
            "raised": int((values > 0).sum()), "targets": int(environments["targets"].sum())}  # fmt: skip


def headline(recovery: pd.DataFrame) -> list[dict[str, Any]]:
    """Per direction x position set, the site and block that recover most, beside its random control."""
    out = []
    for (direction, positions), rows in recovery.groupby(["direction", "positions"], sort=False):
        defined = rows[np.isfinite(rows["recovery"].to_numpy(float))]
        if defined.empty:
            out.append({"direction": direction, "positions": positions, "site": None, "layer": None,
                        "recovery": math.nan, "reason": rows["reason"].iloc[0]})  # fmt: skip
            continue
        best = defined.loc[defined["recovery"].idxmax()]
        out.append({key: best[key] for key in RECOVERY_COLUMNS if key in best.index})
    return out
