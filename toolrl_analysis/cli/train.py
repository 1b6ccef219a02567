"""`toolrl-analyze train-base` (the supervised warm-up), `train-grpo` (GRPO / Reinforce++) and `sample-states`
(the per-step states of a verl iteration)."""

from __future__ import annotations

import argparse
import sys
from typing import Any

from toolrl_analysis.cli.args import (
    add_config_flags,
    add_limit_flag,
    add_placement_flags,
    add_play_flags,
    episode_options,
    placement,
    print_config,
    require_flags,
)
from toolrl_analysis.cli.output import console, emit, progress_bar, progress_line


def add_parsers(sub, common: argparse.ArgumentParser) -> None:
    p = sub.add_parser("train-base", parents=[common], help="supervised warm-up of the embedded base")
    p.add_argument("--envs", default=None, help="an environment set (envs build); required")
    p.add_argument("--out", default=None, help="the run directory; required")
    p.add_argument("--resume", action="store_true", help="continue an interrupted run in --out")
    add_config_flags(p, "recipe of the shipped base (SFTConfig)")
    p.set_defaults(func=_cmd_train_base)

    p = sub.add_parser("train-grpo", parents=[common], help="RL on the environments (GRPO or Reinforce++)")
    p.add_argument("--envs", default=None, help="an environment set (envs build); required")
    p.add_argument(
        "--init", default=None, help="the initial policy: embedded, a .pt, an HF directory; required"
    )
    p.add_argument("--out", default=None, help="the run directory; required")
    p.add_argument("--algo", choices=["grpo", "reinforce++"], default=None, help="sets the config key algo")
    p.add_argument("--resume", action="store_true", help="continue from the newest checkpoint in --out")
    add_config_flags(p, "shipped GRPO recipe (GRPOConfig)")
    add_placement_flags(p)
    p.set_defaults(func=_cmd_train_grpo)

    p = sub.add_parser(
        "sample-states", parents=[common],
        help="FTRL's step 1 for verl: the policy's per-step states as the next iteration's parquet",
    )  # fmt: skip
    p.add_argument("policy", help="the current policy: embedded, a .pt, an HF directory")
    p.add_argument("--envs", required=True, help="an environment set (its train.jsonl) or a .jsonl file")
    p.add_argument("--out", required=True, help="the verl parquet file to write")
    p.add_argument("--samples", type=int, default=4, help="episodes sampled per environment")
    p.add_argument("--temperature", type=float, default=1.0, help="sampling temperature of the episodes")
    p.add_argument("--seed", type=int, default=0, help="seed of the sampled episodes")
    add_limit_flag(p)
    add_play_flags(p)
    add_placement_flags(p)
    p.set_defaults(func=_cmd_sample_states, out_is_file=True)


def _base_progress_line(progress) -> str:
    """One plain line for logs: step, loss, the latest validation (Solve-F1 and the key role NLLs), speed, ETA."""
    line = f"step {progress.step}/{progress.total} loss {progress.loss:.3f}"
    row = progress.validation or {}
    if "val_f1_overall" in row:
        line += f" | val F1 {row['val_f1_overall']:.3f}"
    roles = [("kind", "tool_kind"), ("rel", "tool_relation"), ("q-value", "value_from_question"),
             ("r-value", "value_from_response")]  # fmt: skip
    shown = [f"{label} {row[f'nll_{role}']:.2f}" for label, role in roles if f"nll_{role}" in row]
    if shown:
        line += f" | NLL {' '.join(shown)} (@{row['step']})"
    return line + f" | {progress.tokens_per_s:,.0f} tok/s | ETA {progress.eta_s / 60:.0f} min"


def _cmd_train_base(args: argparse.Namespace) -> None:
    from rich.progress import BarColumn, MofNCompleteColumn, TextColumn, TimeElapsedColumn

    from toolrl_analysis.config import load_config
    from toolrl_analysis.training.sft import SFTConfig, train_base

    config = load_config(SFTConfig, args.config, args.set)
    if print_config(args, config):
        return
    require_flags(args, "envs", "out")
    columns = (
        TextColumn("warm-up {task.fields[status]}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
    )
    # In a terminal a live bar; in a log file (not a TTY) a plain line every log_every steps.
    with progress_bar(*columns) as progress:
        stderr = progress.console
        task = progress.add_task("sft", total=config.steps, status="")

        def on_step(state) -> None:
            if stderr.is_terminal:
                progress.update(task, completed=state.step, status=f"loss {state.loss:.3f}")
            elif state.step % config.log_every == 0 or state.step == state.total:
                print(_base_progress_line(state), file=sys.stderr, flush=True)

        summary = train_base(
            args.envs,
            args.out,
            config,
            resume=args.resume,
            on_step=on_step,
            log=lambda line: stderr.print(line),
        )
    emit(
        args,
        summary,
        lambda: console().print(
            f"base written to {summary['out']}/base.pt and {summary['out']}/hf "
            f"({summary['parameters']:,} parameters, {summary['steps']} steps, loss "
            f"{_number(summary['first_loss'])} -> {_number(summary['final_loss'])}, {summary['train_seconds']:.0f}s of training "
            f"over all sessions, {summary['seconds']:.0f}s this one); "
            f"chose step {summary['chosen_step']}: {summary['chosen_because']}"
        ),
    )


def _cmd_train_grpo(args: argparse.Namespace) -> None:
    from rich.progress import BarColumn, MofNCompleteColumn, TextColumn, TimeElapsedColumn

    from toolrl_analysis.config import load_config
    from toolrl_analysis.training.grpo import GRPOConfig, train_grpo

    overrides = list(args.set) + ([f"algo={args.algo}"] if args.algo else [])
    config = load_config(GRPOConfig, args.config, overrides)
    if print_config(args, config):
        return
    require_flags(args, "envs", "init", "out")
    where = placement(args)
    columns = (
        TextColumn(f"{config.algo} {{task.fields[status]}}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
    )
    with progress_bar(*columns) as progress:
        task = progress.add_task("rl", total=config.iterations, status="")

        def on_iteration(row: dict[str, Any]) -> None:
            status = f"reward {row['reward_mean']:.3f}"
            if "val_f1_overall" in row:
                status += f" validation F1 {row['val_f1_overall']:.3f}"
            progress.update(task, completed=row["iteration"], status=status)
            progress_line(f"{config.algo} iteration {row['iteration']}/{config.iterations}: {status}")

        summary = train_grpo(
            args.envs,
            args.init,
            args.out,
            config,
            resume=args.resume,
            on_iteration=on_iteration,
            log=lambda line: progress.console.print(line),
            placement=where,
        )
    document = {k: v for k, v in summary.items() if k != "history"} | {"metrics": summary["history"]}
    emit(
        args,
        document,
        lambda: console().print(
            f"{config.algo}: {summary['iterations']} iterations; trained policy in {summary['out']}/trained.pt "
            f"and {summary['out']}/hf; metrics in {summary['out']}/metrics.csv, curves in {summary['out']}/curves.png"
            + (
                f"; test Solve-F1 {summary['test_solve_f1']:.3f}"
                if summary["test_solve_f1"] is not None
                else ""
            )
            + (" (interrupted; resume with --resume)" if summary["interrupted"] else "")
        ),
    )


def _cmd_sample_states(args: argparse.Namespace) -> None:
    from rich.progress import BarColumn, MofNCompleteColumn, TextColumn

    from toolrl_analysis.training.state_sampler import sample_states

    options = episode_options(args)
    where = placement(args)
    with progress_bar(TextColumn("sampling states, turn"), BarColumn(), MofNCompleteColumn()) as progress:
        task = progress.add_task("states", total=options.max_turns)

        def on_turn(turn_index, episodes) -> None:
            progress.update(task, completed=turn_index + 1)
            progress_line(f"sample-states: turn {turn_index + 1}/{options.max_turns}")

        summary = sample_states(
            args.policy, args.envs, args.out, samples=args.samples, temperature=args.temperature,
            limit=args.limit, seed=args.seed, options=options, placement=where, on_turn=on_turn,
        )  # fmt: skip
    emit(
        args,
        summary,
        lambda: console().print(
            f"{summary['states']} distinct states from {summary['episodes']} episodes on "
            f"{summary['environments']} environments -> {summary['out']}"
        ),
    )


def _number(value: float | None) -> str:
    """A loss for the summary line; a run stopped before its first logged step has none."""
    return "n/a" if value is None else f"{value:.3f}"
