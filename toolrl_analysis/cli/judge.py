"""`toolrl-analyze judge|divergence`: decide the paper's claims on a pair; where the two models' outputs differ."""

from __future__ import annotations

import argparse

from toolrl_analysis.cli.args import (
    add_limit_flag,
    add_placement_flags,
    add_play_flags,
    episode_options,
    placement,
)
from toolrl_analysis.cli.output import console, emit, progress_console
from toolrl_analysis.errors import UserError

PAIR_HELP = "the model {which}: embedded, a policy .pt, a run directory or a Hugging Face model directory"
ENVS_HELP = (
    "an environment set (its analysis.jsonl for the analyses, else test.jsonl; test.jsonl for the tool-use "
    "gain) or one .jsonl/.parquet file for all"
)


def add_parsers(sub, common: argparse.ArgumentParser) -> None:
    from toolrl_analysis.analysis.judge.rules import CLAIM_NAMES

    p = sub.add_parser(
        "judge", parents=[common], help="decide the paper's claims on a pair, each by its rule"
    )
    p.add_argument("base", help=PAIR_HELP.format(which="before training"))
    p.add_argument("trained", help=PAIR_HELP.format(which="after training"))
    p.add_argument("--envs", required=True, help=ENVS_HELP)
    p.add_argument(
        "--claims", default=",".join(CLAIM_NAMES), help=f"comma-separated, among {', '.join(CLAIM_NAMES)}"
    )
    p.add_argument("--out", default=None, help="write judge.json, the per-item tables and the ablation here")
    p.add_argument(
        "--analysis-limit", type=int, default=None,
        help="analysis environments for the general, context and lower-MLP claims (default: all)",
    )  # fmt: skip
    p.add_argument("--tasks", type=int, default=None, help="held-out general tasks (default: 4096)")
    p.add_argument(
        "--controls", type=int, default=None, help="matched controls of the lower MLPs (default: 20)"
    )
    add_limit_flag(p, "test environments for the tool-use claim, balanced over scenarios")
    add_play_flags(p)
    add_placement_flags(p)
    p.set_defaults(func=_cmd_judge)

    d = sub.add_parser(
        "divergence", parents=[common], help="KL between the pair's outputs by token role and by entropy"
    )
    d.add_argument("base", help=PAIR_HELP.format(which="before training"))
    d.add_argument("trained", help=PAIR_HELP.format(which="after training"))
    d.add_argument("--envs", required=True, help="an environment set (its analysis split) or a .jsonl file")
    d.add_argument("--out", default=None, help="write the tables, top_contexts.jsonl and divergence.png here")
    d.add_argument("--top", type=int, default=20, help="max-KL tokens saved with their context")
    add_limit_flag(d)
    add_play_flags(d)
    add_placement_flags(d)
    d.set_defaults(func=_cmd_divergence)


def _positive(args: argparse.Namespace, *names: str) -> None:
    for name in names:
        value = getattr(args, name, None)
        if value is not None and value < 1:
            raise UserError(f"--{name.replace('_', '-')} must be at least 1, got {value}")


def _cmd_judge(args: argparse.Namespace) -> None:
    from toolrl_analysis.analysis.judge.run import check_claims, judge

    claims = check_claims([c.strip() for c in args.claims.split(",") if c.strip()])
    _positive(args, "analysis_limit", "tasks", "limit")
    if args.controls is not None and args.controls < 2:
        raise UserError("--controls must be at least 2 (the controls' spread is the null distribution)")
    log = progress_console().print
    found = judge(
        args.base, args.trained, args.envs, claims=claims, limit=args.limit, analysis_limit=args.analysis_limit,
        tasks=args.tasks, controls=args.controls, options=episode_options(args), log=log, placement=placement(args),
    )  # fmt: skip
    document = found.to_document()
    if args.out:
        document["summary"]["written"] = [str(p) for p in found.write(args.out)]

    def render() -> None:
        from rich.table import Table

        table = Table(title=f"{args.trained} against {args.base}", show_lines=True)
        for column in ("claim", "verdict", "evidence"):
            table.add_column(column, overflow="fold")
        for claim, found_claim in document["verdicts"].items():
            table.add_row(claim, found_claim["verdict"], found_claim["evidence"])
        out = console()
        out.print(table)
        out.print(f"{document['summary']['total_seconds']:.0f} s")

    emit(args, document, render)


def _cmd_divergence(args: argparse.Namespace) -> None:
    from toolrl_analysis.analysis.judge.divergence import measure_divergence

    _positive(args, "limit", "top")
    found = measure_divergence(
        args.base, args.trained, args.envs, limit=args.limit, options=episode_options(args), top=args.top,
        placement=placement(args),
    )  # fmt: skip
    document = found.to_document()
    if args.out:
        document["summary"]["written"] = [str(p) for p in found.write(args.out)]

    def render() -> None:
        from rich.table import Table

        out = console()
        table = Table(title="KL(base || trained) per token, by role")
        columns = ["source", "role", "tokens", "kl_base_trained", "kl_share", "entropy_base", "entropy_sharp",
                   "entropy_trained", "logp_change", "logp_change_sharp"]  # fmt: skip
        for column in columns:
            table.add_column(column)
        for row in found.by_role.itertuples():
            table.add_row(*[_cell(getattr(row, c)) for c in columns])
        out.print(table)
        s = found.summary
        out.print(
            f"{s['tokens']} tokens of {s['environments']} environments; sharpening factor {s['scale']:.3f}; the "
            f"forking tokens (top 20% of the base's entropy) carry {s['forking_kl_share']:.0%} of the KL"
        )

    emit(args, document, render)


def _cell(value) -> str:
    return f"{value:.4f}" if isinstance(value, float) else str(value)
