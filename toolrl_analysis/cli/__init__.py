"""`toolrl-analyze`: parse, call the library, print. User errors: one line on stderr, exit status 2.

One module per group of commands; each adds its parsers (`add_parsers`) and holds its `_cmd_*` functions.
Flags that several commands share are built once, in `args`.
"""

from __future__ import annotations

import argparse
import os
import sys

from toolrl_analysis.cli import analyse, envs, evaluate, reproduce, train
from toolrl_analysis.cli.args import add_episode_flags
from toolrl_analysis.errors import UserError

# Nothing in this tool may reach for a model hub.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")


def build_parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--json", action="store_true", help="print one machine-readable JSON document")
    episodes = argparse.ArgumentParser(add_help=False)  # how evaluate and ablate play held-out episodes
    add_episode_flags(episodes)
    parser = argparse.ArgumentParser(prog="toolrl-analyze", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    envs.add_parsers(sub, common)
    train.add_parsers(sub, common)
    evaluate.add_parsers(sub, common, episodes)
    analyse.add_parsers(sub, common, episodes)
    reproduce.add_parsers(sub, common)
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
