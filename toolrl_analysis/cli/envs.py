"""`toolrl-analyze envs build|check|import|export`: environment sets."""

from __future__ import annotations

import argparse

from toolrl_analysis.cli.args import add_config_flags, print_config, require_flags
from toolrl_analysis.cli.output import console, emit, progress_bar


def add_parsers(sub, common: argparse.ArgumentParser) -> None:
    envs = sub.add_parser("envs", help="build, check, import and export environment sets")
    envs_sub = envs.add_subparsers(dest="envs_command", required=True)
    p = envs_sub.add_parser("build", parents=[common], help="run the five-stage pipeline")
    p.add_argument("--out", default=None, help="the environment-set directory to write (required)")
    p.add_argument("--seed", type=int, default=None, help="the build's seed (a key of the config)")
    p.add_argument("--force", action="store_true", help="replace the files of an existing --out")
    add_config_flags(p, "shipped build")
    p.set_defaults(func=_cmd_envs_build, replaces_out=True)
    p = envs_sub.add_parser("check", parents=[common], help="run golden calls in the sandbox")
    p.add_argument("file", help="a .jsonl or .parquet file of environment records")
    p.add_argument("--workers", type=int, default=2, help="sandbox worker processes (default 2)")
    p.set_defaults(func=_cmd_envs_check)
    p = envs_sub.add_parser("import", parents=[common], help="FTRL JSONL/parquet -> EnvSet")
    p.add_argument("file", help="FTRL's JSONL or verl parquet file")
    p.add_argument(
        "--out", required=True, help="the environment-set directory to write (one .jsonl per split)"
    )
    p.set_defaults(func=_cmd_envs_import)
    p = envs_sub.add_parser("export", parents=[common], help="EnvSet -> FTRL JSONL or verl parquet")
    p.add_argument("source", help="an EnvSet directory or a .jsonl file")
    p.add_argument("--format", required=True, help="ftrl (JSONL) or verl (parquet)")
    p.add_argument("--out", required=True, help="the file to write")
    p.add_argument("--keep-meta", action="store_true", help="ftrl: keep our meta (golden calls)")
    p.set_defaults(func=_cmd_envs_export, out_is_file=True)


def _cmd_envs_build(args: argparse.Namespace) -> None:
    from rich.progress import BarColumn, MofNCompleteColumn, TextColumn

    from toolrl_analysis.config import load_config
    from toolrl_analysis.envs.pipeline import (
        EnvBuildConfig,
        build_envsets,
        build_size,
        render_build,
        write_envset,
    )

    overrides = list(args.set) + ([f"seed={args.seed}"] if args.seed is not None else [])
    config = load_config(EnvBuildConfig, args.config, overrides)
    if print_config(args, config):
        return
    require_flags(args, "out")
    total = build_size(config)
    columns = (TextColumn("building environments"), BarColumn(), MofNCompleteColumn())
    with progress_bar(*columns) as progress:
        task = progress.add_task("build", total=total)
        build = build_envsets(config, progress=lambda n: progress.advance(task, n))
        paths = write_envset(build, args.out)
    files = {k: str(v) for k, v in paths.items()}
    document = {"out": str(args.out), "files": files, "manifest": build.manifest}
    emit(args, document, lambda: render_build(build.manifest, str(args.out), console()))


def _cmd_envs_check(args: argparse.Namespace) -> None:
    from rich.progress import BarColumn, MofNCompleteColumn, TextColumn

    from toolrl_analysis.envs.check import check_records, golden_calls, render_check, summarize
    from toolrl_analysis.envs.sandbox import Sandbox
    from toolrl_analysis.envs.schema import read_envs

    records = read_envs(args.file)
    total = sum(len(turn) for r in records if r.meta.get("golden_turns") for turn in golden_calls(r))
    columns = (TextColumn("golden calls"), BarColumn(), MofNCompleteColumn())
    progress = progress_bar(*columns)
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
