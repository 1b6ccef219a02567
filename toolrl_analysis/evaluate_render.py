"""Terminal rendering of an `EvaluationReport` (used by the CLI): rich tables of tool use, the per-hop
breakdown, the general suite, pass@k, the same-world split and the context-reading role table. Kept apart
from evaluate.py, which computes and never prints."""

from __future__ import annotations

from typing import Any

import pandas as pd

from toolrl_analysis.evaluate import OVERALL, EvaluationReport

_SUMMARY_COLUMNS = (
    ("solve_p", "P"),
    ("solve_r", "R"),
    ("solve_f1", "F1"),
    ("calls_per_episode", "calls"),
    ("format_error_rate", "fmt err"),
    ("prompt_too_long_rate", "long"),
)


def render_report(report: EvaluationReport, console) -> None:
    """Rich tables: tool use per scenario, the per-hop breakdown, and the general suite. Kept under 80
    columns (calls = per episode, fmt err = share of turns, long = share of episodes stopped as too long)."""
    from rich import box
    from rich.table import Table

    table = Table(title="Tool use: Solve-P / R / F1 (greedy)", box=box.SIMPLE_HEAD)
    table.add_column("scenario", no_wrap=True)
    table.add_column("n", justify="right", no_wrap=True)
    for _, label in _SUMMARY_COLUMNS:
        table.add_column(label, justify="right", no_wrap=True)
    wide = report.tool_use.pivot_table(index="scenario", columns="metric", values="value", sort=False)
    episodes = report.tool_use.groupby("scenario", sort=False)["episodes"].first()
    for scenario in wide.index:
        cells = [f"{wide.loc[scenario, metric]:.3f}" for metric, _ in _SUMMARY_COLUMNS[:3]]
        cells += [f"{wide.loc[scenario, metric]:.2f}" for metric, _ in _SUMMARY_COLUMNS[3:]]
        table.add_row(
            scenario, str(episodes[scenario]), *cells, style="bold" if scenario == OVERALL else None
        )
    console.print(table)

    if not report.hops.empty:
        hops = Table(title="Multi-hop: sub-questions solved per hop", box=box.SIMPLE_HEAD)
        for column in ("scenario", "hop", "solved", "subquestions", "fraction"):
            hops.add_column(column, justify="left" if column == "scenario" else "right")
        for row in report.hops.itertuples():
            hops.add_row(
                row.scenario,
                str(row.hop),
                str(row.solved),
                str(row.subquestions),
                f"{row.solved_fraction:.3f}",
            )
        console.print(hops)

    if report.general is not None:
        general = Table(title="General capability", box=box.SIMPLE_HEAD)
        for column in ("suite", "metric", "value"):
            general.add_column(column, justify="right" if column == "value" else "left")
        for row in report.general.itertuples():
            general.add_row(row.suite, row.metric, f"{row.value:.4g}")
        console.print(general)

    if report.pass_at_k is not None:
        render_pass_at_k(report.pass_at_k, report.info, console)

    if report.same_world is not None:
        f1 = report.same_world.tool_use.query("metric == 'solve_f1'")
        console.print(
            "Same world (test_same_world.jsonl: new questions about the training worlds), greedy Solve-F1: "
            + ", ".join(f"{r.scenario} {r.value:.3f}" for r in f1.itertuples())
        )

    if report.roles is not None:
        render_role_table(report.roles, console)


def render_pass_at_k(frame: pd.DataFrame, info: dict[str, Any], console) -> None:
    """pass@k per scenario (columns k = 1, 2, 4, ..., N), each with its 95% interval half-width."""
    from rich import box
    from rich.table import Table

    n = int(frame["k"].max())
    ks = sorted({k for k in (1, 2, 4, 8, 16, 32, 64, n) if k <= n})
    title = f"pass@k: {info.get('samples')} samples at T={info.get('temperature')}"
    caption = f"success: Solve-F1 >= {info.get('success_threshold')}; ± half a 95% interval over environments"
    table = Table(title=title, caption=caption, box=box.SIMPLE_HEAD)
    table.add_column("scenario", no_wrap=True)
    for k in ks:
        table.add_column(f"@{k}", justify="right", no_wrap=True)
    for scenario in frame["scenario"].unique():
        rows = frame[frame["scenario"] == scenario].set_index("k")
        cells = [
            f"{rows.loc[k, 'pass_at_k']:.2f}±{(rows.loc[k, 'high'] - rows.loc[k, 'low']) / 2:.2f}" for k in ks
        ]
        table.add_row(scenario, *cells, style="bold" if scenario == OVERALL else None)
    console.print(table)


def render_role_table(
    frame: pd.DataFrame, console, title: str = "Context reading: NLL per token role"
) -> None:
    """The meter's table: real-context NLL, NLL with another environment's context, their gap, top-1."""
    from rich import box
    from rich.table import Table

    from toolrl_analysis.context_meter import role_table

    table = Table(title=title, box=box.SIMPLE_HEAD)
    for column in ("role", "tokens", "NLL", "NLL swapped", "gap", "top-1"):
        table.add_column(column, justify="left" if column == "role" else "right", no_wrap=True)
    for row in role_table(frame).itertuples():
        if row.tokens:
            table.add_row(
                row.role,
                str(row.tokens),
                f"{row.nll_real:.3f}",
                f"{row.nll_replaced:.3f}",
                f"{row.gap:+.3f}",
                f"{row.top1_real:.2f}",
                style="bold" if row.role == "all" else None,
            )
    console.print(table)
