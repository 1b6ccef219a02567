"""`toolrl-analyze`: parse, call the library, print. User errors: one line on stderr, exit status 2.

One module per group of commands; each adds its parsers (`add_parsers`) and holds its `_cmd_*` functions.
Flags that several commands share are built once, in `args`.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from toolrl_analysis.cli import analyse, envs, evaluate, judge, reproduce, train
from toolrl_analysis.cli.args import check_out_dir
from toolrl_analysis.errors import UserError

# Nothing in this tool may reach for a model hub.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")


class DefaultsFormatter(argparse.HelpFormatter):
    """Each flag's help ends with its default, unless it has none worth saying (off, unset) or says it."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        default = action.default
        unset = default is None or default is False or default is argparse.SUPPRESS or default == []
        if unset or "default" in text or not action.option_strings:
            return text
        return f"{text} (default: %(default)s)"


class HelpParser(argparse.ArgumentParser):
    """Every command's --help shows each flag's default (subcommands inherit the class)."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("formatter_class", DefaultsFormatter)
        super().__init__(*args, **kwargs)


def build_parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--json", action="store_true", help="print one machine-readable JSON document")
    parser = HelpParser(prog="toolrl-analyze", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    envs.add_parsers(sub, common)
    train.add_parsers(sub, common)
    evaluate.add_parsers(sub, common)
    analyse.add_parsers(sub, common)
    judge.add_parsers(sub, common)
    reproduce.add_parsers(sub, common)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if getattr(args, "out_is_file", False):
            if args.out is not None and Path(args.out).is_dir():
                raise UserError(f"--out {args.out} is a directory; name the file to write")
        elif not getattr(args, "print_config", False):  # every output directory, before any work starts
            check_out_dir(
                getattr(args, "out", None), force=args.force if getattr(args, "replaces_out", False) else None
            )
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
