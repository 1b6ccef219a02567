"""Validation during training: role curves and Solve-F1 on held-out environments, and the choice of the
checkpoint that becomes the base (train-base).

train-base validates on the end of the build's train.jsonl, held out of its data; train-grpo on the build's
validation.jsonl (held-out worlds), or on the end of train.jsonl for an older build (`shared.validation_source`).
Never the test split. Each evaluation gives one flat row: `step`, `val_f1_<scenario>`, `val_f1_overall` and
its standard error `val_f1_overall_se`, and per role `nll_<role>`, `gap_<role>` (NLL with another
environment's context minus NLL with its own), `top1_<role>`.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from toolrl_analysis.context_meter import ROLES, build_meter_set, meter_frame, role_table
from toolrl_analysis.envs.oracle import oracle_conversations
from toolrl_analysis.envs.schema import SCENARIOS, EnvRecord
from toolrl_analysis.training.base_data import validation_slice

MULTI_HOP = ("multi_hop", "parallel_multi_hop")
SINGLE_HOP = ("single_hop", "parallel_single_hop")


@dataclass
class Validation:
    """The fixed validation material of one run: the meter's labelled set and the Solve-F1 environments."""

    meter_set: Any
    meter_records: list[EnvRecord]
    solve_records: list[EnvRecord]
    max_new_tokens: int
    max_turns: int = 8  # assistant turns per greedy validation episode
    batch_size: int = 20  # episodes generated together

    @property
    def records(self) -> list[EnvRecord]:
        """Every environment the validation uses (kept out of training when the data are the build's)."""
        return self.meter_records + self.solve_records

    @classmethod
    def build(
        cls, tokenizer, records, sandbox, meter_envs: int, solve_envs: int, max_new_tokens: int,
        max_turns: int = 8, batch_size: int = 20,
    ):  # fmt: skip
        meter_records = validation_slice(records, meter_envs) if meter_envs else []
        meter_set = None
        if meter_records:
            conversations = oracle_conversations(meter_records, sandbox, random.Random("validation"))
            meter_set = build_meter_set(tokenizer, meter_records, conversations)
        # Solve-F1 environments come before the meter's, so the two slices do not overlap.
        solve = validation_slice(records, meter_envs + solve_envs) if solve_envs else []
        meter_ids = {id(r) for r in meter_records}
        solve_records = [r for r in solve if id(r) not in meter_ids]
        return cls(meter_set, meter_records, solve_records, max_new_tokens, max_turns, batch_size)

    def run(self, model, tokenizer, sandbox, step: int) -> dict[str, Any]:
        from toolrl_analysis.evaluate import episode_table, evaluate_tool_use, summarize_tool_use

        row: dict[str, Any] = {"step": step}
        if self.solve_records:
            episodes = evaluate_tool_use(
                model, tokenizer, self.solve_records, sandbox=sandbox, max_turns=self.max_turns,
                max_new_tokens=self.max_new_tokens, batch_size=self.batch_size,
            )  # fmt: skip
            table = episode_table(episodes)
            summary = summarize_tool_use(table)
            for item in summary[summary["metric"] == "solve_f1"].itertuples():
                row[f"val_f1_{item.scenario}"] = float(item.value)
            row["val_f1_overall_se"] = mean_of_means_se(table)
        if self.meter_set is not None:
            table = role_table(meter_frame(model, self.meter_set)).set_index("role")
            for role in (*ROLES, "all"):
                if role in table.index and table.loc[role, "tokens"] > 0:
                    row[f"nll_{role}"] = float(table.loc[role, "nll_real"])
                    row[f"gap_{role}"] = float(table.loc[role, "gap"])
                    row[f"top1_{role}"] = float(table.loc[role, "top1_real"])
        return row


def mean_of_means_se(episodes) -> float:
    """Standard error of the overall Solve-F1 (the mean of the scenario means) over the validation episodes,
    for the error bars of the learning curves."""
    per_scenario = episodes.groupby("scenario")["solve_f1"]
    variances = (per_scenario.var(ddof=1) / per_scenario.count()).fillna(0.0)
    return float(math.sqrt(variances.sum()) / max(1, len(variances)))


def _mean(values: list[float]) -> float:
    values = [v for v in values if not math.isnan(v)]
    return sum(values) / len(values) if values else math.nan


def in_band(row: dict[str, Any], band: list[float]) -> bool:
    """Overall validation Solve-F1 inside `band`, and multi-hop (where measured) below single-hop."""
    overall = row.get("val_f1_overall", math.nan)
    if math.isnan(overall) or not band[0] <= overall <= band[1]:
        return False
    single = _mean([row.get(f"val_f1_{s}", math.nan) for s in SINGLE_HOP])
    multi = _mean([row.get(f"val_f1_{s}", math.nan) for s in MULTI_HOP])
    return math.isnan(multi) or math.isnan(single) or multi < single


def choose_checkpoint(rows: list[dict[str, Any]], band: list[float], select: str) -> tuple[dict, str]:
    """The evaluation row whose checkpoint becomes the base, and why."""
    if not rows:
        raise ValueError("no evaluated checkpoint to choose from")
    if select == "last":
        return rows[-1], "the last checkpoint (select = last)"
    inside = [r for r in rows if in_band(r, band)]
    if inside:
        return inside[-1], f"the last checkpoint with validation Solve-F1 in {band} and multi-hop weaker"
    scored = [r for r in rows if not math.isnan(r.get("val_f1_overall", math.nan))]
    if not scored:
        return rows[-1], "no Solve-F1 was measured: the last checkpoint"

    def distance(row):
        value = row["val_f1_overall"]
        return max(band[0] - value, value - band[1], 0.0)

    best = min(scored, key=lambda r: (distance(r), -r["step"]))
    return best, (
        f"no checkpoint reached the band {band} with multi-hop weaker: the closest one "
        f"(validation Solve-F1 {best['val_f1_overall']:.3f}); the role curves show where the run stopped"
    )


def plot_validation(rows: list[dict[str, Any]], path: Path) -> Path | None:
    """Role NLL (solid: own context, dashed: another environment's) and validation Solve-F1 per step."""
    if not rows:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    draw_role_nll(left, rows)
    draw_solve_f1(right, rows)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return path


def draw_role_nll(axis, rows: list[dict[str, Any]], x: str = "step") -> None:
    """Per role, NLL with its own context (solid) and with another environment's (dashed), against `x`."""
    steps = [r[x] for r in rows]
    for index, role in enumerate(r for r in ROLES if any(f"nll_{r}" in row for row in rows)):
        color = f"C{index}"
        real = [row.get(f"nll_{role}", math.nan) for row in rows]
        swapped = [row.get(f"nll_{role}", math.nan) + row.get(f"gap_{role}", math.nan) for row in rows]
        axis.plot(steps, real, color=color, label=role)
        axis.plot(steps, swapped, color=color, linestyle="--", alpha=0.5)
    axis.set(xlabel=x, ylabel="NLL (nats/token)", title="Role NLL: own context (—), swapped (--)")
    if axis.lines:
        axis.legend(fontsize=7)


def draw_solve_f1(axis, rows: list[dict[str, Any]], x: str = "step") -> None:
    """Greedy validation Solve-F1 per scenario and overall, against `x`."""
    steps = [r[x] for r in rows]
    for index, scenario in enumerate((*SCENARIOS, "overall")):
        values = [row.get(f"val_f1_{scenario}", math.nan) for row in rows]
        if not all(math.isnan(v) for v in values):
            axis.plot(
                steps,
                values,
                label=scenario,
                color=f"C{index}",
                linewidth=2.5 if scenario == "overall" else 1,
                marker="o",
                markersize=3,
            )
    axis.set(xlabel=x, ylabel="Solve-F1", ylim=(0, 1), title="Validation Solve-F1 (greedy)")
    if axis.lines:
        axis.legend(fontsize=7)
