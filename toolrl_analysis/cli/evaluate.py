"""`toolrl-analyze evaluate`: Solve-P/R/F1 per scenario, pass@k, the general suite and the role table."""

from __future__ import annotations

import argparse
from dataclasses import asdict

from toolrl_analysis.cli.args import add_placement_flags, episode_flags, episode_options, placement
from toolrl_analysis.cli.output import console, emit, progress_bar, progress_line
from toolrl_analysis.errors import UserError


def add_parsers(sub, common: argparse.ArgumentParser) -> None:
    p = sub.add_parser(
        "evaluate", parents=[common, episode_flags()], help="Solve-P/R/F1 per scenario and general metrics"
    )
    p.add_argument("model", help="embedded, a policy .pt, a run directory or a Hugging Face model directory")
    p.add_argument(
        "--envs", required=True,
        help="a .jsonl/.parquet file, or an environment set (its test.jsonl, and its test_same_world.jsonl)",
    )  # fmt: skip
    p.add_argument("--out", default=None, help="write the tables (CSV) and evaluation.json here")
    p.add_argument(
        "--samples", type=int, default=None,
        help="also sample N episodes per environment and report pass@1..N (default: greedy only)",
    )  # fmt: skip
    p.add_argument("--temperature", type=float, default=1.0, help="sampling temperature with --samples")
    p.add_argument(
        "--success-threshold", type=float, default=1.0,
        help="an episode succeeds for pass@k when its Solve-F1 reaches this (1.0: solved, no wasted call)",
    )  # fmt: skip
    p.add_argument("--seed", type=int, default=0, help="seed of the sampled episodes")
    add_placement_flags(p)
    p.set_defaults(func=_cmd_evaluate)


def _cmd_evaluate(args: argparse.Namespace) -> None:
    from rich.progress import BarColumn, MofNCompleteColumn, TextColumn

    from toolrl_analysis.evaluate import evaluate_checkpoint
    from toolrl_analysis.evaluate_render import render_report

    episodes = episode_options(args)
    where = placement(args)
    if args.samples is not None and args.samples < 1:
        raise UserError(f"--samples must be at least 1 (leave it out for greedy only), got {args.samples}")
    # Episodes end at different turns, so progress is counted in turns (at most --max-turns), with the
    # finished episodes beside it; without a terminal, a plain line per turn.
    with progress_bar(
        TextColumn("turn"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.description}")
    ) as bar:
        task = bar.add_task("", total=episodes.max_turns)

        def on_turn(turn_index, played):
            finished = f"{sum(e.done for e in played)}/{len(played)} episodes finished"
            bar.update(task, completed=turn_index + 1, description=finished)
            progress_line(f"evaluate: turn {turn_index + 1}/{episodes.max_turns}, {finished}")

        report = evaluate_checkpoint(
            args.model,
            args.envs,
            limit=args.limit,
            general=not args.no_general,
            roles=not args.no_roles,
            n_general_tasks=args.general_tasks,
            **asdict(episodes),
            samples=args.samples or 0,
            temperature=args.temperature,
            success_threshold=args.success_threshold,
            seed=args.seed,
            on_turn=on_turn,
            placement=where,
        )
    if args.out:
        report.info["written"] = [str(p) for p in report.save(args.out)]
    emit(args, report.to_dict(), lambda: render_report(report, console()))
