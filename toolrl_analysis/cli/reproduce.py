"""`toolrl-analyze reproduce`: the whole chain on the embedded default, then the report."""

from __future__ import annotations

import argparse
import sys

from toolrl_analysis.cli.args import add_placement_flags, placement, require_flags
from toolrl_analysis.cli.output import console, emit, progress_bar


def add_parsers(sub, common: argparse.ArgumentParser) -> None:
    p = sub.add_parser("reproduce", parents=[common], help="the whole chain on the embedded default")
    p.add_argument("--out", default=None, help="the run directory (required)")
    p.add_argument(
        "--quick",
        action="store_true",
        help="small sizes: a smoke run of about a minute and a half on 2 cores, not a result",
    )
    p.add_argument("--force", action="store_true", help="redo every stage, up to date or not")
    p.add_argument(
        "--base",
        default="embedded",
        help="embedded (the shipped base), train (run train-base), or a policy .pt",
    )
    p.add_argument(
        "--set", action="append", default=[], metavar="STAGE.KEY=VALUE",
        help="override a stage's config key (stages: envs, base, grpo, eval, ablate, probe, judge, patch)",
    )  # fmt: skip
    p.add_argument(
        "--print-config", action="store_true",
        help="print every stage's resolved configuration as TOML and exit (needs no other argument)",
    )  # fmt: skip
    add_placement_flags(p)
    p.set_defaults(func=_cmd_reproduce)


def _cmd_reproduce(args: argparse.Namespace) -> None:
    from rich.progress import BarColumn, TextColumn

    from toolrl_analysis.report import report_document
    from toolrl_analysis.reproduce import reproduce
    from toolrl_analysis.reproduce.progress import clock
    from toolrl_analysis.reproduce.settings import load_settings

    if args.print_config:
        sys.stdout.write(load_settings(args.quick, args.base, args.set, placement(args)).toml())
        return
    require_flags(args, "out")
    where = placement(args)
    columns = (
        TextColumn("{task.description}", markup=False),  # "[3/11] train grpo" is text, not markup
        BarColumn(),
        TextColumn("{task.percentage:>3.0f}% | elapsed {task.fields[elapsed]}, ETA {task.fields[eta]}"),
    )
    # On a terminal a bar across stages under the log lines; in a log file only the plain lines.
    with progress_bar(*columns) as progress:
        task = progress.add_task("reproduce", total=1.0, elapsed="0m00s", eta="?")

        def on_snapshot(snap) -> None:
            stage = f"[{snap.index}/{snap.total}] {snap.stage}"
            progress.update(
                task, completed=snap.done_fraction, description=stage, elapsed=clock(snap.elapsed_s),
                eta=clock(snap.eta_s),
            )  # fmt: skip

        summary = reproduce(
            args.out, quick=args.quick, force=args.force, base=args.base, overrides=args.set,
            on_snapshot=on_snapshot, placement=where,
            log=lambda line: progress.console.print(line, markup=False, highlight=False),
        )  # fmt: skip
    document = summary | report_document(args.out)

    def render() -> None:
        out = console()
        for verdict in document["verdicts"]:
            out.print(f"{verdict['claim']} {verdict['verdict']}", markup=False)
        out.print(f"report: {summary['report']}", markup=False)

    emit(args, document, render)
