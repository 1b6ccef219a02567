"""Golden-call oracle check: replay every environment's golden calls in the sandbox.

Each golden turn (meta.golden_turns) calls its sub-questions' tools with their golden arguments;
the reward module's `apply_results` marks what the outputs solve, and `episode_metrics` turns the
counts into Solve-P/R/F1. A correct environment scores 1.0 everywhere. Records without golden calls
(imported FTRL files) are reported as such, not as failures.
"""

from __future__ import annotations

import statistics
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from toolrl_analysis.envs.schema import SCENARIOS, EnvRecord
from toolrl_analysis.errors import EnvFormatError

NO_GOLDEN = "no golden calls"


@dataclass
class EnvCheck:
    env_id: str
    scenario: str
    status: str  # ok | failed | no golden calls
    n_calls: int = 0
    n_solved: int = 0
    n_subquestions: int = 0
    metrics: dict[str, float] = field(default_factory=dict)
    problems: list[str] = field(default_factory=list)


def golden_calls(record: EnvRecord) -> list[list[tuple[int, str, dict]]]:
    """[(sub-question id, tool, arguments) per call] per turn, from meta."""
    by_id = {sq.get("id"): sq for sq in record.meta.get("subquestions", []) if isinstance(sq, dict)}
    turns = record.meta.get("golden_turns", [])
    try:
        return [[(i, str(by_id[i]["tool"]), dict(by_id[i]["arguments"])) for i in turn] for turn in turns]
    except (KeyError, TypeError, ValueError):
        raise EnvFormatError(
            f"environment {record.env_id or '?'}: meta.golden_turns names sub-questions that meta lacks"
        ) from None


def _env_id(record: EnvRecord, index: int) -> str:
    return record.env_id or f"#{index}"


def check_records(
    records: list[EnvRecord],
    sandbox: Any,
    progress: Callable[[int], None] | None = None,
    chunk: int = 256,
) -> list[EnvCheck]:
    """Run all golden calls (batched across environments: they do not depend on each other's output)."""
    from toolrl_analysis.envs.reward import apply_results, episode_metrics
    from toolrl_analysis.envs.toolcalls import ToolCall

    plans = [golden_calls(r) if r.meta.get("golden_turns") else None for r in records]
    flat = [
        (r.codes.get(name, ""), name, args)
        for r, plan in zip(records, plans, strict=True)
        if plan
        for turn in plan
        for _, name, args in turn
    ]
    results = []
    for start in range(0, len(flat), chunk):
        results.extend(sandbox.call_many(flat[start : start + chunk]))
        if progress:
            progress(min(chunk, len(flat) - start))
    cursor = 0
    out: list[EnvCheck] = []
    for index, (record, plan) in enumerate(zip(records, plans, strict=True)):
        check = EnvCheck(
            _env_id(record, index), record.scenario, NO_GOLDEN, n_subquestions=record.n_subquestions
        )
        if plan:
            unsolved = {k: list(v) for k, v in record.unsolved_set.items()}
            for turn in plan:
                calls = [ToolCall(name=name, arguments=args) for _, name, args in turn]
                turn_results = results[cursor : cursor + len(turn)]
                cursor += len(turn)
                unsolved, flags = apply_results(unsolved, calls, [r.content for r in turn_results])
                for (sq_id, name, _), result, solved in zip(turn, turn_results, flags, strict=True):
                    if result.error is not None:
                        check.problems.append(
                            f"sub-question {sq_id} ({name}) failed to run: {result.content[:160]}"
                        )
                    elif not solved:
                        check.problems.append(
                            f"sub-question {sq_id} ({name}) not solved: {result.content[:160]}"
                        )
                check.n_calls += len(calls)
                check.n_solved += sum(bool(f) for f in flags)
            left = {k: v for k, v in unsolved.items() if v}
            if left:
                check.problems.append(f"still unsolved after the golden calls: {left}")
            check.metrics = episode_metrics(check.n_calls, check.n_solved, check.n_subquestions)
            check.status = "ok" if not check.problems and check.metrics["solve_f1"] == 1.0 else "failed"
        out.append(check)
    return out


def summarize(checks: list[EnvCheck]) -> dict[str, Any]:
    """Per-scenario and overall oracle Solve-P/R/F1 (means over checked environments) and failures."""
    scenarios = [s for s in SCENARIOS if any(c.scenario == s for c in checks)]
    scenarios += sorted({c.scenario for c in checks} - set(scenarios))
    rows = {}
    for name, group in [(s, [c for c in checks if c.scenario == s]) for s in scenarios] + [
        ("overall", checks)
    ]:
        checked = [c for c in group if c.status != NO_GOLDEN]
        row: dict[str, Any] = {
            "environments": len(group),
            "checked": len(checked),
            "no_golden_calls": len(group) - len(checked),
            "failed": sum(c.status == "failed" for c in checked),
        }
        for metric in ("solve_p", "solve_r", "solve_f1"):
            row[metric] = round(statistics.fmean(c.metrics[metric] for c in checked), 4) if checked else None
        rows[name] = row
    failures = [
        {"env_id": c.env_id, "scenario": c.scenario, "problems": c.problems}
        for c in checks
        if c.status == "failed"
    ]
    return {"scenarios": rows, "failures": failures, "ok": not failures}


def render_check(summary: dict[str, Any], source: str, console: Any, max_failures: int = 20) -> None:
    """The human summary of `envs check`."""
    from rich import box
    from rich.table import Table

    table = Table(
        title=f"oracle Solve-P/R/F1 of {source}", box=box.SIMPLE_HEAD, pad_edge=False, show_edge=False
    )
    table.add_column("scenario", no_wrap=True)
    for column in ("envs", "checked", "no gold", "failed", "P", "R", "F1"):
        table.add_column(column, justify="right", no_wrap=True)
    for name, row in summary["scenarios"].items():
        metrics = ["-" if row[m] is None else f"{row[m]:.3f}" for m in ("solve_p", "solve_r", "solve_f1")]
        table.add_row(
            name, *(str(row[k]) for k in ("environments", "checked", "no_golden_calls", "failed")), *metrics
        )
    console.print(table)
    for failure in summary["failures"][:max_failures]:
        console.print(
            f"[red]FAILED[/red] {failure['env_id']} ({failure['scenario']}): {'; '.join(failure['problems'])}"
        )
    if len(summary["failures"]) > max_failures:
        console.print(f"... and {len(summary['failures']) - max_failures} more failures (use --json for all)")
