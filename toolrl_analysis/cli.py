"""`toolrl-analyze`: parse, call the library, print. User errors: one line on stderr, exit status 2."""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Callable
from typing import Any

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


# ---------------------------------------------------------------------------------------------
# envs
# ---------------------------------------------------------------------------------------------
def _cmd_envs_build(args: argparse.Namespace) -> None:
    from pathlib import Path

    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn

    from toolrl_analysis.config import load_config
    from toolrl_analysis.envs.pipeline import EnvBuildConfig, build_envsets, render_build, write_envset

    # The default path is relative to the repository; elsewhere its values are the dataclass defaults.
    config_path = args.config if args.config != "envs/default.toml" or Path(args.config).is_file() else None
    overrides = list(args.set) + ([f"seed={args.seed}"] if args.seed is not None else [])
    config = load_config(EnvBuildConfig, config_path, overrides)
    total = config.train_size + 4 * config.test_per_scenario
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


def _cmd_train_base(args: argparse.Namespace) -> None:
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from toolrl_analysis.config import load_config
    from toolrl_analysis.training.sft import SFTConfig, train_base

    config = load_config(SFTConfig, _config_path(args.config, "training/base.toml"), args.set)
    columns = (
        TextColumn("warm-up {task.fields[loss]}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
    )
    with Progress(*columns, console=progress_console(), transient=True) as progress:
        task = progress.add_task("sft", total=config.copy_warmup_steps + config.steps, loss="")
        summary = train_base(
            args.envs,
            args.out,
            config,
            on_step=lambda step, loss: progress.update(task, completed=step, loss=f"loss {loss:.3f}"),
            log=lambda line: progress.console.print(line),
        )
    emit(
        args,
        summary,
        lambda: console().print(
            f"base written to {summary['out']}/base.pt and {summary['out']}/hf "
            f"({summary['parameters']:,} parameters, {summary['steps']} steps, loss "
            f"{summary['first_loss']:.3f} -> {summary['final_loss']:.3f}, {summary['seconds']:.0f}s)"
        ),
    )


def _cmd_train_grpo(args: argparse.Namespace) -> None:
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from toolrl_analysis.config import load_config
    from toolrl_analysis.training.grpo import GRPOConfig, train_grpo

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
            if "heldout_solve_f1" in row:
                status += f" held-out F1 {row['heldout_solve_f1']:.3f}"
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
            f"and {summary['out']}/hf; metrics in {summary['out']}/metrics.csv"
            + (" (interrupted; resume with --resume)" if summary["interrupted"] else "")
        ),
    )


def _cmd_evaluate(args: argparse.Namespace) -> None:
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn

    from toolrl_analysis.evaluate import evaluate_checkpoint, render_report

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
            on_turn=on_turn,
        )
    if args.out:
        report.info["written"] = [str(p) for p in report.save(args.out)]
    emit(args, report.to_dict(), lambda: render_report(report, console()))


# ---------------------------------------------------------------------------------------------
# analysis
# ---------------------------------------------------------------------------------------------
def _cmd_compare(args: argparse.Namespace) -> None:
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn

    from toolrl_analysis.analysis.diff import compare_checkpoints, render_comparison

    if args.top < 1 or args.top_k < 1:
        raise UserError("--top and --top-k must be at least 1")
    if args.workers is not None and args.workers < 0:
        raise UserError("--workers must be 0 or more")
    stderr = progress_console()
    with Progress(
        TextColumn("tensors"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.description}"),
        console=stderr,
        transient=True,
        disable=not stderr.is_terminal,
    ) as progress:
        task = progress.add_task("", total=None)

        def on_tensor(name: str, done: int, total: int) -> None:
            progress.update(task, completed=done, total=total, description=name)

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
    raise UserError("ablate is not available yet")


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
    from toolrl_analysis.reproduce import reproduce

    log = progress_console().print
    summary = reproduce(args.out, quick=args.quick, force=args.force, log=log)
    emit(args, summary, lambda: console().print(f"done: {summary['report']}"))


# ---------------------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--json", action="store_true", help="print one machine-readable JSON document")

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

    p = sub.add_parser("evaluate", parents=[common], help="Solve-P/R/F1 per scenario and general metrics")
    p.add_argument("model")
    p.add_argument("--envs", required=True)
    p.add_argument("--out", default=None)
    p.add_argument("--limit", type=int, default=None, help="evaluate the first N environments only")
    p.add_argument("--no-general", action="store_true", help="skip the general-capability suite")
    p.add_argument("--max-turns", type=int, default=20, help="assistant turns per episode (FTRL: 20)")
    p.add_argument("--max-new-tokens", type=int, default=512, help="tokens per assistant turn")
    p.add_argument("--batch-size", type=int, default=16, help="prompts generated together")
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
        "ablate", parents=[common], help="revert/transplant subsets of the update, re-evaluate"
    )
    p.add_argument("base")
    p.add_argument("trained")
    p.add_argument("--envs", default=None)
    p.add_argument("--grid", choices=["paper"], default=None)
    p.add_argument("--revert", action="append", default=[], metavar="SELECTOR")
    p.add_argument("--save", default=None)
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
    p.add_argument("--force", action="store_true", help="redo stages whose outputs exist")
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
