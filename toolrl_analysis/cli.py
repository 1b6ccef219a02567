"""`toolrl-analyze`: parse, call the library, print. User errors: one line on stderr, exit status 2."""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
from collections.abc import Callable, Iterator
from typing import Any

from toolrl_analysis.cli_args import SpliceOperation, at_least_one, byte_size, scale_factor
from toolrl_analysis.errors import UserError

# Nothing in this tool may reach for a model hub.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")


def emit(args: argparse.Namespace, document: Any, render: Callable[[], None]) -> None:
    """With --json print one JSON document on stdout; otherwise the human summary."""
    if getattr(args, "json", False):
        json.dump(document, sys.stdout, indent=None, default=str)
        sys.stdout.write("\n")
    else:
        render()


def console():
    from rich.console import Console

    return Console(stderr=False, highlight=False)


def progress_console():
    """Progress bars go to stderr so that --json keeps stdout to one document."""
    from rich.console import Console

    return Console(stderr=True)


@contextlib.contextmanager
def step_progress(label: str) -> Iterator[Callable[[str, int, int], None]]:
    """A progress bar on stderr (drawn only on a terminal) and its callback `(name, done, total)`."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    stderr = progress_console()
    columns = (
        TextColumn(label),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TextColumn("{task.description}"),
    )
    with Progress(*columns, console=stderr, transient=True, disable=not stderr.is_terminal) as progress:
        task = progress.add_task("", total=None)

        def update(name: str, done: int, total: int) -> None:
            progress.update(task, completed=done, total=total, description=name)

        yield update


# ---------------------------------------------------------------------------------------------
# envs
# ---------------------------------------------------------------------------------------------
def _cmd_envs_build(args: argparse.Namespace) -> None:
    from pathlib import Path

    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn

    from toolrl_analysis.config import load_config
    from toolrl_analysis.envs.pipeline import (
        EnvBuildConfig,
        build_envsets,
        build_size,
        render_build,
        write_envset,
    )

    # The default path is relative to the repository; elsewhere its values are the dataclass defaults.
    config_path = args.config if args.config != "envs/default.toml" or Path(args.config).is_file() else None
    overrides = list(args.set) + ([f"seed={args.seed}"] if args.seed is not None else [])
    config = load_config(EnvBuildConfig, config_path, overrides)
    total = build_size(config)
    columns = (TextColumn("building environments"), BarColumn(), MofNCompleteColumn())
    with Progress(*columns, console=progress_console(), transient=True) as progress:
        task = progress.add_task("build", total=total)
        build = build_envsets(config, progress=lambda n: progress.advance(task, n))
        paths = write_envset(build, args.out)
    files = {k: str(v) for k, v in paths.items()}
    document = {"out": str(args.out), "files": files, "manifest": build.manifest}
    emit(args, document, lambda: render_build(build.manifest, str(args.out), console()))


def _cmd_envs_check(args: argparse.Namespace) -> None:
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn

    from toolrl_analysis.envs.check import check_records, golden_calls, render_check, summarize
    from toolrl_analysis.envs.sandbox import Sandbox
    from toolrl_analysis.envs.schema import read_envs

    records = read_envs(args.file)
    total = sum(len(turn) for r in records if r.meta.get("golden_turns") for turn in golden_calls(r))
    columns = (TextColumn("golden calls"), BarColumn(), MofNCompleteColumn())
    progress = Progress(*columns, console=progress_console(), transient=True)
    with progress, Sandbox(workers=args.workers) as sandbox:
        task = progress.add_task("check", total=total)
        checks = check_records(records, sandbox, progress=lambda n: progress.advance(task, n))
    summary = summarize(checks)
    emit(args, {"file": str(args.file), **summary}, lambda: render_check(summary, str(args.file), console()))
    if not summary["ok"]:
        raise SystemExit(1)


def _cmd_envs_import(args: argparse.Namespace) -> None:
    from toolrl_analysis.envs.ftrl_io import import_ftrl

    result = import_ftrl(args.file, args.out)

    def render() -> None:
        out = console()
        out.print(f"imported {result['records']} environments from {result['source']}")
        for split, info in result["files"].items():
            out.print(f"  {split}: {info['records']} -> {info['path']}")
        for source, count in result["data_sources"].items():
            out.print(f"  {source}: {count}")

    emit(args, result, render)


def _cmd_envs_export(args: argparse.Namespace) -> None:
    from toolrl_analysis.envs.ftrl_io import export

    result = export(args.source, args.format, args.out, keep_meta=args.keep_meta)
    splits = ", ".join(f"{k}: {v}" for k, v in result["splits"].items())
    line = f"exported {result['records']} environments ({splits}) to {result['out']}"
    emit(args, result, lambda: console().print(line))


# ---------------------------------------------------------------------------------------------
# models, training, evaluation
# ---------------------------------------------------------------------------------------------
def _config_path(given: str | None, default: str) -> str | None:
    """The repository's default config if present; elsewhere the dataclass defaults (same values)."""
    from pathlib import Path

    if given is not None:
        return given
    return default if Path(default).is_file() else None


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
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from toolrl_analysis.config import load_config
    from toolrl_analysis.training.sft import SFTConfig, train_base

    config = load_config(SFTConfig, _config_path(args.config, "training/base.toml"), args.set)
    stderr = progress_console()
    columns = (
        TextColumn("warm-up {task.fields[status]}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
    )
    # In a terminal a live bar; in a log file (not a TTY) a plain line every log_every steps.
    with Progress(*columns, console=stderr, transient=True, disable=not stderr.is_terminal) as progress:
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
            f"{summary['first_loss']:.3f} -> {summary['final_loss']:.3f}, {summary['train_seconds']:.0f}s of training "
            f"over all sessions, {summary['seconds']:.0f}s this one); "
            f"chose step {summary['chosen_step']}: {summary['chosen_because']}"
        ),
    )


def _cmd_train_grpo(args: argparse.Namespace) -> None:
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from toolrl_analysis.config import load_config
    from toolrl_analysis.training.commands import train_grpo
    from toolrl_analysis.training.grpo import GRPOConfig

    overrides = list(args.set) + ([f"algo={args.algo}"] if args.algo else [])
    config = load_config(GRPOConfig, _config_path(args.config, "training/grpo.toml"), overrides)
    columns = (
        TextColumn(f"{config.algo} {{task.fields[status]}}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
    )
    with Progress(*columns, console=progress_console(), transient=True) as progress:
        task = progress.add_task("rl", total=config.iterations, status="")

        def on_iteration(row: dict[str, Any]) -> None:
            status = f"reward {row['reward_mean']:.3f}"
            if "val_f1_overall" in row:
                status += f" validation F1 {row['val_f1_overall']:.3f}"
            progress.update(task, completed=row["iteration"], status=status)

        summary = train_grpo(
            args.envs,
            args.init,
            args.out,
            config,
            resume=args.resume,
            on_iteration=on_iteration,
            log=lambda line: progress.console.print(line),
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


def _cmd_evaluate(args: argparse.Namespace) -> None:
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn

    from toolrl_analysis.evaluate import evaluate_checkpoint
    from toolrl_analysis.evaluate_render import render_report

    if args.samples is not None and args.samples < 1:
        raise UserError(f"--samples must be at least 1 (leave it out for greedy only), got {args.samples}")
    stderr = progress_console()
    with Progress(
        TextColumn("episodes"),
        BarColumn(),
        MofNCompleteColumn(),
        console=stderr,
        transient=True,
        disable=not stderr.is_terminal,  # no stray lines in logs and pipes
    ) as progress:
        task = progress.add_task("episodes", total=None)

        def on_turn(turn_index, episodes):
            progress.update(task, total=len(episodes), completed=sum(e.done for e in episodes))

        report = evaluate_checkpoint(
            args.model,
            args.envs,
            limit=args.limit,
            general=not args.no_general,
            max_turns=args.max_turns,
            max_new_tokens=args.max_new_tokens,
            batch_size=args.batch_size,
            samples=args.samples or 0,
            temperature=args.temperature,
            success_threshold=args.success_threshold,
            seed=args.seed,
            on_turn=on_turn,
        )
    if args.out:
        report.info["written"] = [str(p) for p in report.save(args.out)]
    emit(args, report.to_dict(), lambda: render_report(report, console()))


# ---------------------------------------------------------------------------------------------
# analysis
# ---------------------------------------------------------------------------------------------
def _cmd_compare(args: argparse.Namespace) -> None:
    from toolrl_analysis.analysis.diff import compare_checkpoints, render_comparison

    if args.top < 1 or args.top_k < 1:
        raise UserError("--top and --top-k must be at least 1")
    if args.workers is not None and args.workers < 0:
        raise UserError("--workers must be 0 or more")
    with step_progress("tensors") as on_tensor:
        comparison = compare_checkpoints(
            args.base,
            args.trained,
            select=args.select,
            spectral=args.spectral,
            allow_missing=args.allow_missing,
            lora_base=args.lora_base,
            top_k=args.top_k,
            workers=args.workers,
            progress=on_tensor,
        )
    if args.out:
        comparison.summary["written"] = [str(p) for p in comparison.write(args.out)]

    def render() -> None:
        out = console()
        render_comparison(comparison, out, top=args.top)
        if args.out:
            out.print(f"wrote {len(comparison.summary['written'])} files to {args.out}")

    emit(args, comparison.to_document(), render)


def _cmd_ablate(args: argparse.Namespace) -> None:
    from toolrl_analysis.analysis.ablate import EvaluationOptions, Operation, ablate, render_ablation

    operations = [Operation(kind, values[0], scale_factor(values)) for kind, values in args.operations]
    if args.threads < 0:
        raise UserError("--threads must be 0 (torch's default) or more")
    options = EvaluationOptions(
        general=not args.no_general,
        roles=not args.no_roles,
        max_turns=at_least_one("--max-turns", args.max_turns),
        max_new_tokens=at_least_one("--max-new-tokens", args.max_new_tokens),
        batch_size=at_least_one("--batch-size", args.batch_size),
        threads=args.threads,
    )
    with step_progress("ablate") as on_step:
        ablation = ablate(
            args.base,
            args.trained,
            operations=operations,
            grid=args.grid,
            envs=args.envs,
            limit=args.limit,
            save=args.save,
            force=args.force,
            shard_bytes=byte_size(args.shard_size),
            allow_missing=args.allow_missing,
            lora_base=args.lora_base,
            seed=args.seed,
            replicates=args.bootstrap,
            metric=args.metric,
            options=options,
            progress=on_step,
        )
    if args.out:
        ablation.summary["written"] = [str(p) for p in ablation.write(args.out)]

    def render() -> None:
        out = console()
        render_ablation(ablation, out)
        if args.out:
            out.print(f"wrote {len(ablation.summary['written'])} files to {args.out}")

    emit(args, ablation.to_document(), render)


def _cmd_probe(args: argparse.Namespace) -> None:
    from toolrl_analysis.analysis.probe_run import ProbeConfig, render_probe, run_probe
    from toolrl_analysis.config import load_config

    flags = {"tasks": args.tasks, "layers": args.layers, "limit": args.limit, "seeds": args.seeds}
    overrides = list(args.set) + [f"{k}={v}" for k, v in flags.items() if v is not None]
    config = load_config(ProbeConfig, None, overrides)
    log = progress_console().print
    report = run_probe(args.base, args.trained, args.envs, backend=args.backend, config=config, log=log)
    if args.out:
        report.write(args.out)
    emit(args, report.to_document(), lambda: render_probe(report, console()))


def _cmd_reproduce(args: argparse.Namespace) -> None:
    from rich.progress import BarColumn, Progress, TextColumn

    from toolrl_analysis.report import report_document
    from toolrl_analysis.reproduce import reproduce
    from toolrl_analysis.reproduce.progress import clock

    stderr = progress_console()
    columns = (
        TextColumn("{task.description}", markup=False),  # "[3/11] train grpo" is text, not markup
        BarColumn(),
        TextColumn("{task.percentage:>3.0f}% | elapsed {task.fields[elapsed]}, ETA {task.fields[eta]}"),
    )
    # On a terminal a bar across stages under the log lines; in a log file only the plain lines.
    with Progress(*columns, console=stderr, transient=True, disable=not stderr.is_terminal) as progress:
        task = progress.add_task("reproduce", total=1.0, elapsed="0m00s", eta="?")

        def on_snapshot(snap) -> None:
            stage = f"[{snap.index}/{snap.total}] {snap.stage}"
            progress.update(
                task, completed=snap.done_fraction, description=stage, elapsed=clock(snap.elapsed_s),
                eta=clock(snap.eta_s),
            )  # fmt: skip

        summary = reproduce(
            args.out, quick=args.quick, force=args.force, base=args.base, overrides=args.set,
            config_dir=args.config_dir, on_snapshot=on_snapshot,
            log=lambda line: progress.console.print(line, markup=False, highlight=False),
        )  # fmt: skip
    document = summary | report_document(args.out)

    def render() -> None:
        out = console()
        for verdict in document["verdicts"]:
            out.print(f"{verdict['claim']} {verdict['verdict']}", markup=False)
        out.print(f"report: {summary['report']}", markup=False)

    emit(args, document, render)


# ---------------------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--json", action="store_true", help="print one machine-readable JSON document")
    # How evaluate and ablate play the held-out episodes (one set of flags, one meaning).
    episodes = argparse.ArgumentParser(add_help=False)
    episodes.add_argument("--no-general", action="store_true", help="skip the general-capability suite")
    episodes.add_argument("--max-turns", type=int, default=20, help="assistant turns per episode (FTRL: 20)")
    episodes.add_argument("--max-new-tokens", type=int, default=512, help="tokens per assistant turn")
    episodes.add_argument("--batch-size", type=int, default=16, help="prompts generated together")

    parser = argparse.ArgumentParser(prog="toolrl-analyze", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    envs = sub.add_parser("envs", help="build, check, import and export environment sets")
    envs_sub = envs.add_subparsers(dest="envs_command", required=True)
    p = envs_sub.add_parser("build", parents=[common], help="run the five-stage pipeline")
    p.add_argument("--config", default="envs/default.toml")
    p.add_argument("--out", required=True)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config key")
    p.set_defaults(func=_cmd_envs_build)
    p = envs_sub.add_parser("check", parents=[common], help="run golden calls in the sandbox")
    p.add_argument("file")
    p.add_argument("--workers", type=int, default=2, help="sandbox worker processes")
    p.set_defaults(func=_cmd_envs_check)
    p = envs_sub.add_parser("import", parents=[common], help="FTRL JSONL/parquet -> EnvSet")
    p.add_argument("file")
    p.add_argument("--out", required=True)
    p.set_defaults(func=_cmd_envs_import)
    p = envs_sub.add_parser("export", parents=[common], help="EnvSet -> FTRL JSONL or verl parquet")
    p.add_argument("source", help="an EnvSet directory or a .jsonl file")
    p.add_argument("--format", required=True, help="ftrl (JSONL) or verl (parquet)")
    p.add_argument("--out", required=True)
    p.add_argument("--keep-meta", action="store_true", help="ftrl: keep our meta (golden calls)")
    p.set_defaults(func=_cmd_envs_export)

    p = sub.add_parser("train-base", parents=[common], help="supervised warm-up of the embedded base")
    p.add_argument("--envs", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--config", default=None)
    p.add_argument("--resume", action="store_true", help="continue an interrupted run in --out")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    p.set_defaults(func=_cmd_train_base)

    p = sub.add_parser("train-grpo", parents=[common], help="RL on the environments (GRPO or Reinforce++)")
    p.add_argument("--envs", required=True)
    p.add_argument("--init", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--config", default=None)
    p.add_argument("--algo", choices=["grpo", "reinforce++"], default=None)
    p.add_argument("--resume", action="store_true")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    p.set_defaults(func=_cmd_train_grpo)

    p = sub.add_parser(
        "evaluate", parents=[common, episodes], help="Solve-P/R/F1 per scenario and general metrics"
    )
    p.add_argument("model")
    p.add_argument(
        "--envs", required=True,
        help="a .jsonl/.parquet file, or an environment set (its test.jsonl, and its test_same_world.jsonl)",
    )  # fmt: skip
    p.add_argument("--out", default=None)
    p.add_argument("--limit", type=int, default=None, help="evaluate the first N environments only")
    p.add_argument(
        "--samples", type=int, default=None,
        help="also sample N episodes per environment and report pass@1..N (default: greedy only)",
    )  # fmt: skip
    p.add_argument("--temperature", type=float, default=1.0, help="sampling temperature with --samples (1.0)")
    p.add_argument(
        "--success-threshold", type=float, default=1.0,
        help="an episode succeeds for pass@k when its Solve-F1 reaches this (1.0: solved, no wasted call)",
    )  # fmt: skip
    p.add_argument("--seed", type=int, default=0, help="seed of the sampled episodes (0)")
    p.set_defaults(func=_cmd_evaluate)

    p = sub.add_parser("compare", parents=[common], help="per-layer, per-component checkpoint diff")
    p.add_argument("base")
    p.add_argument("trained")
    p.add_argument("--out", default=None)
    p.add_argument("--select", default=None, help="restrict to a selector, e.g. 'mlp@lower'")
    p.add_argument("--spectral", action="store_true")
    p.add_argument("--allow-missing", action="store_true")
    p.add_argument("--lora-base", default=None, help="base weights for a PEFT adapter directory")
    p.add_argument("--top", type=int, default=15, help="rows in the most-changed table")
    p.add_argument("--top-k", type=int, default=8, help="singular values tracked with --spectral")
    p.add_argument("--workers", type=int, default=None, help="arithmetic threads (0: in the main thread)")
    p.set_defaults(func=_cmd_compare)

    p = sub.add_parser(
        "ablate",
        parents=[common, episodes],
        help="revert/transplant parts of the update: save the hybrid, or measure what the gain depended on",
    )
    p.add_argument("base")
    p.add_argument("trained")
    p.set_defaults(operations=[])
    splice = (
        "in order; the first revert starts from the trained model, a first transplant/scale from the base"
    )
    p.add_argument(
        "--revert",
        action=SpliceOperation,
        metavar="SELECTOR",
        help=f"take SELECTOR from the base ({splice})",
    )
    p.add_argument(
        "--transplant",
        action=SpliceOperation,
        metavar="SELECTOR",
        help="take SELECTOR from the trained model",
    )
    p.add_argument(
        "--scale",
        action=SpliceOperation,
        nargs=2,
        metavar=("SELECTOR", "ALPHA"),
        help="base + ALPHA * update on SELECTOR",
    )
    p.add_argument(
        "--grid", choices=["paper"], default=None, help="the paper's grid of variants and controls"
    )
    p.add_argument(
        "--envs", default=None, help="held-out environments: an environment set (its test.jsonl) or a file"
    )
    p.add_argument(
        "--limit", type=int, default=None, help="evaluate N environments, round-robin over scenarios"
    )
    p.add_argument(
        "--metric", default="solve_f1", help="gain retained on solve_f1|solve_p|solve_r|nll_real|context_gap"
    )
    p.add_argument("--bootstrap", type=int, default=1000, help="bootstrap replicates over environments")
    p.add_argument("--seed", type=int, default=0, help="seed of the random controls and the bootstrap")
    p.add_argument(
        "--save", default=None, help="write the hybrid: DIR (HF, safetensors), FILE.safetensors or FILE.pt"
    )
    p.add_argument("--force", action="store_true", help="replace an existing --save path")
    p.add_argument("--shard-size", default="5GB", help="largest safetensors shard of a saved HF directory")
    p.add_argument("--out", default=None, help="write the frames, ablation.json and gain_retained.png here")
    p.add_argument("--allow-missing", action="store_true")
    p.add_argument("--lora-base", default=None, help="base weights for a PEFT adapter directory")
    p.add_argument("--no-roles", action="store_true", help="skip the context-reading role table")
    p.add_argument("--threads", type=int, default=1, help="torch threads for evaluation (0: torch's default)")
    p.set_defaults(func=_cmd_ablate)

    p = sub.add_parser("probe", parents=[common], help="layer-wise probes of hidden states")
    p.add_argument("base")
    p.add_argument("trained")
    p.add_argument("--envs", required=True)
    p.add_argument("--backend", default="hf", help="hf, transformer-lens or nnsight")
    p.add_argument("--tasks", default=None, help="comma-separated (default: all four)")
    p.add_argument("--layers", default=None, help="hidden states, 0 = embeddings: N, a-b, -4:, ... or all")
    p.add_argument("--limit", type=int, default=None, help="use the first N environments")
    p.add_argument("--seeds", type=int, default=None, help="splits per probe (mean ± 95%% CI over them)")
    p.add_argument("--out", default=None)
    p.add_argument(
        "--set", action="append", default=[], metavar="KEY=VALUE", help="override a ProbeConfig key"
    )
    p.set_defaults(func=_cmd_probe)

    p = sub.add_parser("reproduce", parents=[common], help="the whole chain on the embedded default")
    p.add_argument("--out", required=True)
    p.add_argument("--quick", action="store_true", help="small sizes: a smoke run in minutes, not a result")
    p.add_argument("--force", action="store_true", help="redo every stage, up to date or not")
    p.add_argument(
        "--base",
        default="embedded",
        help="embedded (the shipped base), train (run train-base), or a policy .pt",
    )
    p.add_argument(
        "--set", action="append", default=[], metavar="STAGE.KEY=VALUE",
        help="override a stage's config key (stages: envs, base, grpo, eval, ablate, probe)",
    )  # fmt: skip
    p.add_argument(
        "--config-dir", default=None, help="where envs/default.toml and training/*.toml are (default: here)"
    )
    p.set_defaults(func=_cmd_reproduce)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        args.func(args)
    except UserError as exc:
        print(f"toolrl-analyze: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("toolrl-analyze: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # e.g. `toolrl-analyze compare ... --json | head`
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    return 0


if __name__ == "__main__":
    sys.exit(main())
