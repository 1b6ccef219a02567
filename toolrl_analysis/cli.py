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
    raise UserError("envs build is not available yet")


def _cmd_envs_check(args: argparse.Namespace) -> None:
    raise UserError("envs check is not available yet")


def _cmd_envs_import(args: argparse.Namespace) -> None:
    raise UserError("envs import is not available yet")


def _cmd_envs_export(args: argparse.Namespace) -> None:
    raise UserError("envs export is not available yet")


# ---------------------------------------------------------------------------------------------
# models, training, evaluation
# ---------------------------------------------------------------------------------------------
def _cmd_train_base(args: argparse.Namespace) -> None:
    raise UserError("train-base is not available yet")


def _cmd_train_grpo(args: argparse.Namespace) -> None:
    raise UserError("train-grpo is not available yet")


def _cmd_evaluate(args: argparse.Namespace) -> None:
    raise UserError("evaluate is not available yet")


# ---------------------------------------------------------------------------------------------
# analysis
# ---------------------------------------------------------------------------------------------
def _cmd_compare(args: argparse.Namespace) -> None:
    raise UserError("compare is not available yet")


def _cmd_ablate(args: argparse.Namespace) -> None:
    raise UserError("ablate is not available yet")


def _cmd_probe(args: argparse.Namespace) -> None:
    raise UserError("probe is not available yet")


def _cmd_reproduce(args: argparse.Namespace) -> None:
    raise UserError("reproduce is not available yet")


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
    p.set_defaults(func=_cmd_envs_check)
    p = envs_sub.add_parser("import", parents=[common], help="FTRL JSONL/parquet -> EnvSet")
    p.add_argument("file")
    p.add_argument("--out", required=True)
    p.set_defaults(func=_cmd_envs_import)
    p = envs_sub.add_parser("export", parents=[common], help="EnvSet -> FTRL JSONL or verl parquet")
    p.add_argument("source", help="an EnvSet directory or a .jsonl file")
    p.add_argument("--format", choices=["ftrl", "verl"], required=True)
    p.add_argument("--out", required=True)
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
    p.set_defaults(func=_cmd_evaluate)

    p = sub.add_parser("compare", parents=[common], help="per-layer, per-component checkpoint diff")
    p.add_argument("base")
    p.add_argument("trained")
    p.add_argument("--out", default=None)
    p.add_argument("--select", default=None, help="restrict to a selector, e.g. 'mlp@lower'")
    p.add_argument("--spectral", action="store_true")
    p.add_argument("--allow-missing", action="store_true")
    p.add_argument("--lora-base", default=None, help="base weights for a PEFT adapter directory")
    p.set_defaults(func=_cmd_compare)

    p = sub.add_parser("ablate", parents=[common], help="revert/transplant subsets of the update, re-evaluate")
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
    p.add_argument("--backend", choices=["hf", "transformer-lens", "nnsight"], default="hf")
    p.add_argument("--out", default=None)
    p.set_defaults(func=_cmd_probe)

    p = sub.add_parser("reproduce", parents=[common], help="the whole chain on the embedded default")
    p.add_argument("--out", required=True)
    p.add_argument("--quick", action="store_true")
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
    return 0


if __name__ == "__main__":
    sys.exit(main())
