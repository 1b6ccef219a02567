"""The terminal tables of `toolrl-analyze ablate`: the main variants, general ability and context reading,
and the grid's verdicts."""

from __future__ import annotations

import math

import pandas as pd

from toolrl_analysis.analysis.ablate.run import Ablation


def _fixed(value: float, digits: int) -> str:
    text = f"{value:.{digits}f}"
    return text.lstrip("-") if float(text) == 0 else text  # no "-0.00"


def _cell(value: float | None, se: float | None = None, digits: int = 3) -> str:
    if value is None or pd.isna(value):
        return "n/a"
    text = _fixed(value, digits)
    return text if se is None or pd.isna(se) else f"{text}±{_fixed(se, digits)}"


def _interval(value, low, high, digits: int = 2) -> str:
    if value is None or pd.isna(value):
        return "n/a"
    if low is None or pd.isna(low) or pd.isna(high):
        return f"{_fixed(value, digits)} [unbounded]"
    return f"{_fixed(value, digits)} [{_fixed(low, digits)},{_fixed(high, digits)}]"


def _count(value: int) -> str:
    for size, suffix in ((10**9, "G"), (10**6, "M"), (10**3, "k")):
        if value >= size:
            return f"{value / size:.1f}{suffix}"
    return str(value)


def render_ablation(ablation: Ablation, console) -> None:
    """The saved hybrid, then the main variants (Solve-F1 and the teacher-forced fraction), general ability
    and context reading, the verdicts of a grid, and notes."""
    from rich import box
    from rich.markup import escape  # selectors and paths may hold brackets; they are text, not markup
    from rich.table import Table

    summary = ablation.summary
    saved = summary.get("saved")
    if saved:
        console.print(
            escape(
                f"saved {saved['splice']} ({saved['parameters_changed']:,} parameters from the "
                f"{'base' if saved['start'] == 'trained' else 'trained model'}) to {saved['path']} "
                f"[{saved['format']}, {saved['bytes'] / 1e6:.1f} MB in {saved['seconds']:.1f} s]"
            )
        )
    frame = ablation.variants
    if frame is None:
        return
    metric = summary.get("metric", "solve_f1")
    title = (
        f"Fraction of the change kept: {metric} on {summary.get('environments')} environments, teacher-forced "
        f"log-likelihood (LL) on {summary.get('analysis_environments')} (95% Fieller)"
    )
    # Narrow enough for an 80-column log: no outer padding, controls shown as ctrl(...).
    layout = {"box": box.SIMPLE_HEAD, "pad_edge": False, "show_edge": False, "collapse_padding": True}
    table = Table(title=title, **layout)
    for column in ("variant", "params", "share", metric, "kept", "LL kept"):
        table.add_column(column, justify="left" if column == "variant" else "right", no_wrap=True)
    general = Table(title="General ability and context reading", **layout)
    for column in ("variant", "exact match", "text loss", "oracle NLL", "context gap"):
        general.add_column(column, justify="left" if column == "variant" else "right", no_wrap=True)
    main = frame[~frame["control"]]
    for row in main.to_dict(orient="records"):
        style = "bold" if row["kind"] == "reference" else None
        name = escape(row["variant"].replace("control(", "ctrl("))
        table.add_row(
            name, _count(int(row["parameters"])), _cell(row["update_share"], digits=2),
            _cell(row.get(metric), row.get(f"{metric}_se")),
            _interval(row["gain_retained"], row["gain_retained_low"], row["gain_retained_high"]),
            _interval(row.get("ll_retained"), row.get("ll_retained_low"), row.get("ll_retained_high")),
            style=style,
        )  # fmt: skip
        if row.get("played"):
            general.add_row(
                name, _cell(row.get("tasks.exact_match"), row.get("tasks.exact_match_se"), 2),
                _cell(row.get("heldout_text.loss")), _cell(row.get("nll_real"), row.get("nll_real_se")),
                _cell(row.get("context_gap"), row.get("context_gap_se")), style=style,
            )  # fmt: skip
    console.print(table)
    console.print(general)
    if ablation.verdicts:
        console.print(_verdict_table(ablation, layout, Table, escape))
    tracking = summary.get("tracking") or {}
    if tracking and not math.isnan(tracking.get("r", math.nan)):
        console.print(
            f"LL tracks {metric} over {tracking['n']} played variants (change from the base): r = {tracking['r']:.2f} "
            f"[{tracking['low']:.2f}, {tracking['high']:.2f}]"
        )
    reasons = dict.fromkeys(
        r for r in main["gain_retained_reason"] if isinstance(r, str) and r and "control" not in r
    )
    for reason in reasons:
        console.print(escape(f"n/a: {reason}"))


def _verdict_table(ablation: Ablation, layout: dict, Table, escape):
    table = Table(title="Where the change lives (one rule: ablation.json has it)", **layout)
    for column in ("subset", "F(subset)", "controls", "E [95%]", "Holm p", "MDE", "verdict"):
        table.add_column(column, justify="left" if column in ("subset", "verdict") else "right", no_wrap=True)
    for found in ablation.verdicts:
        side = found.get(found["decided_by"]) or {}
        fraction = found.get(f"{found['decided_by']}_fraction") or {}
        controls = side.get("controls") or {}
        effect = side.get("effect") or {}
        table.add_row(
            escape(found["subset"]),
            _interval(fraction.get("value"), fraction.get("low"), fraction.get("high")),
            f"{_cell(controls.get('mean'), controls.get('sd'), 2)} ({controls.get('draws', 0)})" if controls else "none",
            _interval(effect.get("value"), effect.get("low"), effect.get("high")) if effect else "n/a",
            _cell(side.get("p_holm")), _cell(side.get("mde"), digits=2), found["verdict"],
        )  # fmt: skip
    return table
