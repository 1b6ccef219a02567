"""Flags that several commands share (configuration, episodes), and argument types that do more than
argparse's own: each bad value is a UserError (one line, exit status 2)."""

from __future__ import annotations

import argparse
import sys
from typing import Any

from toolrl_analysis.errors import UserError


def add_config_flags(parser: argparse.ArgumentParser, recipe: str) -> None:
    """--config, --set and --print-config, the same on every command that has a configuration."""
    parser.add_argument(
        "--config", default=None, metavar="FILE",
        help=f"a TOML file of keys that override the {recipe} (tables are only for reading; keys are flat)",
    )  # fmt: skip
    parser.add_argument(
        "--set", action="append", default=[], metavar="KEY=VALUE", help="override one key (after --config)"
    )
    parser.add_argument(
        "--print-config", action="store_true",
        help="print the resolved configuration as TOML and exit (needs no other argument; --config takes it)",
    )  # fmt: skip


def print_config(args: argparse.Namespace, config: Any) -> bool:
    """With --print-config, write `config` as TOML on stdout and say so (the command then stops)."""
    from toolrl_analysis.config import config_toml

    if not args.print_config:
        return False
    sys.stdout.write(config_toml(config))
    return True


def require_flags(args: argparse.Namespace, *names: str) -> None:
    """Flags a command needs unless it only prints its configuration (argparse cannot say "unless")."""
    missing = [f"--{name.replace('_', '-')}" for name in names if getattr(args, name) is None]
    if missing:
        raise UserError(f"the following arguments are required: {', '.join(missing)}")


def check_out_dir(path: str | None, flag: str = "--out", force: bool | None = None) -> None:
    """An output directory, checked before any work starts: it exists as a directory or can be created. With
    `force` given (a command that replaces its output), an existing non-empty directory needs --force."""
    import os
    from pathlib import Path

    if path is None:
        return
    target = Path(path)
    if target.exists() and not target.is_dir():
        raise UserError(f"{flag} {path} exists and is not a directory")
    ancestor = next(p for p in (target, *target.parents) if p.exists())
    if not ancestor.is_dir():
        raise UserError(f"{flag} {path}: {ancestor} is a file, not a directory")
    if not os.access(ancestor, os.W_OK | os.X_OK):
        raise UserError(f"{flag} {path}: cannot write under {ancestor}")
    if force is False and target.is_dir() and any(target.iterdir()):
        raise UserError(f"{flag} {path} already holds files; pass --force to replace them")


def episode_flags() -> argparse.ArgumentParser:
    """A parent parser of the flags for how held-out episodes are played and measured (episodes.EpisodeOptions
    and the suites beside them): one set of flags, one meaning, in evaluate and ablate. A fresh one per
    command, so that one command's defaults never leak into another's."""
    parser = argparse.ArgumentParser(add_help=False)
    add_episode_flags(parser)
    return parser


def add_episode_flags(parser: argparse.ArgumentParser) -> None:
    """The flags of `episode_flags`."""
    from toolrl_analysis.episodes import GENERAL_TASKS

    add_play_flags(parser)
    parser.add_argument("--no-general", action="store_true", help="skip the general-capability suite")
    parser.add_argument(
        "--general-tasks", type=int, default=GENERAL_TASKS, help="exact-match tasks of the general suite"
    )
    parser.add_argument("--no-roles", action="store_true", help="skip the context-reading role-NLL table")
    add_limit_flag(parser)


def add_play_flags(parser: argparse.ArgumentParser) -> None:
    """How episodes are played (episodes.EpisodeOptions), for a command that only plays them."""
    from toolrl_analysis.episodes import EPISODES

    parser.add_argument(
        "--max-turns", type=int, default=EPISODES.max_turns, help="assistant turns per episode (FTRL's)"
    )
    parser.add_argument(
        "--max-new-tokens", type=int, default=EPISODES.max_new_tokens, help="tokens per assistant turn"
    )
    parser.add_argument(
        "--batch-size", type=int, default=EPISODES.batch_size, help="prompts generated together"
    )
    parser.add_argument(
        "--thinking", choices=["auto", "on", "off"], default="auto",
        help="Qwen3's enable_thinking, passed to the chat template (auto: the template's own default)",
    )  # fmt: skip


def add_limit_flag(
    parser: argparse.ArgumentParser, help: str = "use N environments, balanced over scenarios"
) -> None:
    """--limit N: the same slice in every command, N environments balanced over scenarios."""
    parser.add_argument("--limit", type=int, default=None, help=f"{help} (default: all of them)")


def check_limit(args: argparse.Namespace) -> None:
    """--limit is left out for all environments; given, it is at least 1 (every command that has it)."""
    if args.limit is not None and args.limit < 1:
        raise UserError(f"--limit must be at least 1 (leave it out for all), got {args.limit}")


def episode_options(args: argparse.Namespace):
    """The EpisodeOptions the flags of `add_episode_flags` ask for (a bad value: one line, exit 2)."""
    from toolrl_analysis.episodes import EpisodeOptions

    check_limit(args)
    if getattr(args, "general_tasks", 1) < 1:
        raise UserError(
            f"--general-tasks must be at least 1 (--no-general skips the suite), got {args.general_tasks}"
        )
    thinking = {"auto": None, "on": True, "off": False}[getattr(args, "thinking", "auto")]
    return EpisodeOptions(args.max_turns, args.max_new_tokens, args.batch_size, thinking)


def scale_factor(values: list[str]) -> float | None:
    """The factor of `--scale SELECTOR FACTOR` (None when only the selector was given)."""
    if len(values) < 2:
        return None
    try:
        return float(values[1])
    except ValueError:
        raise UserError(f"--scale {values[0]} {values[1]}: the factor must be a number") from None


def byte_size(text: str) -> int:
    """'5GB', '500MB', '20KB' or a number of bytes (decimal units, as Hugging Face's max_shard_size)."""
    import re

    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?B?)\s*", text.upper())
    if not match:
        raise UserError(f"--shard-size {text!r}: use a size such as 5GB, 500MB or 20KB")
    unit = {"": 1, "B": 1, "K": 10**3, "KB": 10**3, "M": 10**6, "MB": 10**6, "G": 10**9, "GB": 10**9}
    unit |= {"T": 10**12, "TB": 10**12}
    size = int(float(match[1]) * unit[match[2]])
    if size < 1:
        raise UserError(f"--shard-size {text!r} must be positive")
    return size


class SpliceOperation(argparse.Action):
    """--revert / --transplant / --scale all append to one list, so their order on the line is kept."""

    def __call__(self, parser, namespace, values, option_string=None):
        kind = option_string.lstrip("-")
        operations = list(getattr(namespace, "operations", None) or [])
        operations.append((kind, [values] if isinstance(values, str) else list(values)))
        namespace.operations = operations


def add_placement_flags(parser: argparse.ArgumentParser) -> None:
    """--device and --dtype: where every model a command loads runs (models.placement)."""
    parser.add_argument(
        "--device", default="auto",
        help="auto (a GPU when torch sees one, spread over GPUs when a model needs it), cpu, cuda or cuda:N",
    )  # fmt: skip
    parser.add_argument(
        "--dtype", default="auto", help="auto (the checkpoint's stored dtype), float32, bfloat16 or float16"
    )


def placement(args: argparse.Namespace):
    """The Placement the flags ask for, checked now (a missing GPU or an unusable dtype: one line, exit 2)."""
    from toolrl_analysis.models.placement import Placement

    chosen = Placement(args.device, args.dtype)
    chosen.resolve()
    return chosen
