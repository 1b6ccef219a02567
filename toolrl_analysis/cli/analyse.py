"""`toolrl-analyze compare|overlap|ablate|probe|patch`: what changed between checkpoints, and what it did."""

from __future__ import annotations

import argparse
from dataclasses import asdict

from toolrl_analysis.cli.args import (
    SpliceOperation,
    add_config_flags,
    add_limit_flag,
    add_placement_flags,
    add_play_flags,
    byte_size,
    check_limit,
    episode_flags,
    episode_options,
    placement,
    print_config,
    require_flags,
    scale_factor,
)
from toolrl_analysis.cli.output import console, emit, progress_console, step_progress
from toolrl_analysis.episodes import VARIANT_GENERAL_TASKS
from toolrl_analysis.errors import UserError

CHECKPOINT_HELP = "the model {which}: embedded, a .pt, .safetensors, an HF directory or a run directory"
ALLOW_MISSING_HELP = "compare the tensors both checkpoints hold, instead of stopping at a missing one"


def add_parsers(sub, common: argparse.ArgumentParser) -> None:
    _add_compare(sub, common)
    _add_overlap(sub, common)
    _add_ablate(sub, common)
    _add_probe(sub, common)
    _add_patch(sub, common)


def _add_compare(sub, common: argparse.ArgumentParser) -> None:
    p = sub.add_parser("compare", parents=[common], help="per-layer, per-component checkpoint diff")
    p.add_argument("base", help=CHECKPOINT_HELP.format(which="before training"))
    p.add_argument("trained", help=CHECKPOINT_HELP.format(which="after training"))
    p.add_argument(
        "--out", default=None, help="write the tables (CSV, parquet), summary.json and figures here"
    )
    p.add_argument("--select", default=None, help="restrict to a selector, e.g. 'mlp@lower'")
    p.add_argument(
        "--spectral", action="store_true",
        help="also each matrix's SVD geometry (singular values, principal angles and energy share of the "
        "top-k subspaces) and the bf16 precision columns; reads each matrix whole",
    )  # fmt: skip
    p.add_argument("--allow-missing", action="store_true", help=ALLOW_MISSING_HELP)
    p.add_argument("--lora-base", default=None, help="base weights for a PEFT adapter directory")
    p.add_argument("--top", type=int, default=15, help="rows in the most-changed table")
    p.add_argument(
        "--top-k", type=int, default=8, help="k of the top-k singular values and subspaces (--spectral)"
    )
    p.add_argument(
        "--threads",
        type=int,
        default=None,
        help="arithmetic threads (0: in the main thread; default: by core count)",
    )
    p.set_defaults(func=_cmd_compare)


def _add_overlap(sub, common: argparse.ArgumentParser) -> None:
    p = sub.add_parser(
        "overlap", parents=[common], help="where several trained runs of one base changed it, against chance"
    )
    p.add_argument("base", help=CHECKPOINT_HELP.format(which="before training"))
    p.add_argument("runs", nargs="*", metavar="RUN", help="two or more trained runs of BASE (same formats)")
    p.add_argument(
        "--tolerance", default="0",
        help="an entry is changed when |dW| > T; 'bf16': more than half a bf16 ULP of the base weight",
    )  # fmt: skip
    p.add_argument("--select", default=None, help="restrict to a selector, e.g. 'mlp@lower'")
    p.add_argument(
        "--out", default=None, help="write overlap.csv, overlap_totals.csv, overlap.json, overlap.png"
    )
    p.set_defaults(func=_cmd_overlap)


def _add_ablate(sub, common: argparse.ArgumentParser) -> None:
    p = sub.add_parser(
        "ablate",
        parents=[common, episode_flags()],
        help="revert/transplant parts of the update: save the hybrid, or measure what the gain depended on",
    )
    p.add_argument("base", help=CHECKPOINT_HELP.format(which="before training"))
    p.add_argument("trained", help=CHECKPOINT_HELP.format(which="after training"))
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
        "--grid", choices=["paper"], default=None,
        help="the paper's grid: each third of the blocks per family, embedding, norms, the rank-k block, with "
        "matched controls and a verdict per subset",
    )  # fmt: skip
    p.add_argument(
        "--envs", default=None,
        help="held-out environments: an environment set (its analysis.jsonl, else test.jsonl) or a file",
    )  # fmt: skip
    p.add_argument(
        "--analysis-limit", type=int, default=None,
        help="environments for the teacher-forced metric, balanced over scenarios (default: all; 0: off)",
    )  # fmt: skip
    p.add_argument("--controls", type=int, default=20, help="matched random controls drawn per subset")
    p.add_argument("--rank", type=int, default=1, help="k of the grid's rank-k block")
    p.add_argument(
        "--metric", default="solve_f1", help="gain retained on solve_f1|solve_p|solve_r|nll_real|context_gap"
    )
    p.add_argument("--bootstrap", type=int, default=1000, help="bootstrap replicates over environments")
    p.add_argument("--seed", type=int, default=0, help="seed of the random controls and the bootstrap")
    p.add_argument(
        "--save",
        dest="save_path",
        default=None,  # not `save`: nnsight gives every object a .save method
        help="write the hybrid: DIR (HF, safetensors), FILE.safetensors or FILE.pt",
    )
    p.add_argument("--force", action="store_true", help="replace an existing --save path")
    p.add_argument("--shard-size", default="5GB", help="largest safetensors shard of a saved HF directory")
    p.add_argument("--out", default=None, help="write the frames, ablation.json and gain_retained.png here")
    p.add_argument("--allow-missing", action="store_true", help=ALLOW_MISSING_HELP)
    p.add_argument("--lora-base", default=None, help="base weights for a PEFT adapter directory")
    p.add_argument("--threads", type=int, default=1, help="torch threads for evaluation (0: torch's default)")
    p.add_argument(
        "--score-threads", type=int, default=2,
        help="torch threads for the teacher-forced scoring (1 when other jobs share the cores)",
    )  # fmt: skip
    add_placement_flags(p)
    p.set_defaults(func=_cmd_ablate, general_tasks=VARIANT_GENERAL_TASKS)  # the suite runs once per variant


def _add_probe(sub, common: argparse.ArgumentParser) -> None:
    p = sub.add_parser("probe", parents=[common], help="layer-wise probes of hidden states")
    p.add_argument("base", nargs="?", help=CHECKPOINT_HELP.format(which="before training"))
    p.add_argument("trained", nargs="?", help=CHECKPOINT_HELP.format(which="after training"))
    p.add_argument("--envs", default=None, help="an environment set (its test.jsonl) or a file; required")
    p.add_argument("--backend", default="hf", help="hf, transformer-lens or nnsight")
    p.add_argument("--tasks", default=None, help="comma-separated (default: all four)")
    p.add_argument("--layers", default=None, help="hidden states, 0 = embeddings: N, a-b, -4:, ... or all")
    add_limit_flag(p)
    p.add_argument("--seeds", type=int, default=None, help="splits per probe (mean ± 95%% CI over them)")
    p.add_argument("--out", default=None, help="write the tables (CSV), probe.json and figures here")
    add_config_flags(p, "probe's defaults (ProbeConfig)")
    add_placement_flags(p)
    p.set_defaults(func=_cmd_probe)


def _add_patch(sub, common: argparse.ArgumentParser) -> None:
    from toolrl_analysis.analysis.patching.run import PatchConfig

    defaults = PatchConfig()
    p = sub.add_parser(
        "patch", parents=[common],
        help="cross-model activation patching: which block and site carries the change at decision tokens",
    )  # fmt: skip
    p.add_argument("base", help=CHECKPOINT_HELP.format(which="before training"))
    p.add_argument("trained", help=CHECKPOINT_HELP.format(which="after training"))
    p.add_argument(
        "--envs", required=True, help="an environment set (its analysis.jsonl, else test.jsonl) or a file"
    )
    p.add_argument("--backend", default="hf", help="hf, transformer-lens or nnsight")
    p.add_argument(
        "--sites", default=",".join(defaults.sites), help="comma-separated: resid, attn_out, mlp_out"
    )
    p.add_argument(
        "--positions", default=",".join(defaults.positions), help="comma-separated: decision, context, all"
    )
    p.add_argument(
        "--limit", type=int, default=defaults.limit, help="use N environments, balanced over scenarios"
    )
    p.add_argument(
        "--controls", type=int, default=defaults.controls,
        help="random-position draws per decision/context set (0: none)",
    )  # fmt: skip
    p.add_argument("--seed", type=int, default=defaults.seed, help="seed of the random positions")
    p.add_argument(
        "--threads", type=int, default=defaults.threads, help="torch threads (0: as torch chooses)"
    )
    p.add_argument("--out", default=None, help="write the tables (CSV), patch.json and recovery.png here")
    add_play_flags(p)
    add_placement_flags(p)
    p.set_defaults(func=_cmd_patch)


def _cmd_compare(args: argparse.Namespace) -> None:
    from toolrl_analysis.analysis.diff import compare_checkpoints, render_comparison

    if args.top < 1 or args.top_k < 1:
        raise UserError("--top and --top-k must be at least 1")
    if args.threads is not None and args.threads < 0:
        raise UserError("--threads must be 0 or more")
    with step_progress("tensors") as on_tensor:
        comparison = compare_checkpoints(
            args.base,
            args.trained,
            select=args.select,
            spectral=args.spectral,
            allow_missing=args.allow_missing,
            lora_base=args.lora_base,
            top_k=args.top_k,
            workers=args.threads,
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


def _cmd_overlap(args: argparse.Namespace) -> None:
    from toolrl_analysis.analysis.diff import overlap_runs, render_overlap

    if len(args.runs) < 2:  # here rather than by nargs: argparse's own error is several lines
        raise UserError(f"overlap needs BASE and at least two trained runs, got {len(args.runs)} run(s)")
    with step_progress("tensors") as on_tensor:
        overlap = overlap_runs(
            args.base, args.runs, tolerance=args.tolerance, select=args.select, progress=on_tensor
        )
    if args.out:
        overlap.summary["written"] = [str(p) for p in overlap.write(args.out)]

    def render() -> None:
        out = console()
        render_overlap(overlap, out)
        if args.out:
            out.print(f"wrote {len(overlap.summary['written'])} files to {args.out}")

    emit(args, overlap.to_document(), render)


def _cmd_ablate(args: argparse.Namespace) -> None:
    from toolrl_analysis.analysis.ablate import EvaluationOptions, Operation, ablate, render_ablation

    operations = [Operation(kind, values[0], scale_factor(values)) for kind, values in args.operations]
    if args.threads < 0 or args.score_threads < 0:
        raise UserError("--threads and --score-threads must be 0 (torch's default) or more")
    episodes = episode_options(args)
    options = EvaluationOptions(
        general=not args.no_general,
        roles=not args.no_roles,
        threads=args.threads,
        score_threads=args.score_threads,
        general_tasks=args.general_tasks,
        placement=placement(args),
        **asdict(episodes),
    )
    with step_progress("ablate") as on_step:
        ablation = ablate(
            args.base,
            args.trained,
            operations=operations,
            grid=args.grid,
            envs=args.envs,
            limit=args.limit,
            save=args.save_path,
            force=args.force,
            shard_bytes=byte_size(args.shard_size),
            allow_missing=args.allow_missing,
            lora_base=args.lora_base,
            seed=args.seed,
            replicates=args.bootstrap,
            metric=args.metric,
            options=options,
            controls=args.controls,
            rank=args.rank,
            analysis_limit=args.analysis_limit,
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
    from toolrl_analysis.analysis.probe.run import ProbeConfig, render_probe, run_probe
    from toolrl_analysis.config import load_config

    check_limit(args)  # ProbeConfig reads limit 0 as "all"; on the command line 0 is a mistake, as elsewhere
    flags = {"tasks": args.tasks, "layers": args.layers, "limit": args.limit, "seeds": args.seeds}
    overrides = list(args.set) + [f"{k}={v}" for k, v in flags.items() if v is not None]
    config = load_config(ProbeConfig, args.config, overrides)
    if print_config(args, config):
        return
    require_flags(args, "base", "trained", "envs")
    where = placement(args)
    log = progress_console().print
    report = run_probe(
        args.base, args.trained, args.envs, backend=args.backend, config=config, log=log, placement=where
    )
    if args.out:
        report.write(args.out)
    emit(args, report.to_document(), lambda: render_probe(report, console()))


def _cmd_patch(args: argparse.Namespace) -> None:
    from toolrl_analysis.analysis.patching.run import PatchConfig, patch_pair, render_patching

    check_limit(args)
    config = PatchConfig(
        sites=[s.strip() for s in args.sites.split(",") if s.strip()],
        positions=[s.strip() for s in args.positions.split(",") if s.strip()],
        limit=args.limit, controls=args.controls, seed=args.seed, threads=args.threads,
    )  # fmt: skip
    where = placement(args)
    log = progress_console().print
    with step_progress("patch") as on_step:
        found = patch_pair(args.base, args.trained, args.envs, backend=args.backend, config=config,
                           options=episode_options(args), placement=where, log=log, progress=on_step)  # fmt: skip
    document = found.to_document()
    if args.out:
        document["summary"]["written"] = [str(p) for p in found.write(args.out)]

    def render() -> None:
        out = console()
        render_patching(found, out)
        if args.out:
            out.print(f"wrote {len(document['summary']['written'])} files to {args.out}")

    emit(args, document, render)
