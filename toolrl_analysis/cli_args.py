"""Argument types and actions of `toolrl-analyze` that do more than argparse's own: each bad value is a
UserError (one line, exit status 2)."""

from __future__ import annotations

import argparse

from toolrl_analysis.errors import UserError


def scale_factor(values: list[str]) -> float | None:
    """The factor of `--scale SELECTOR FACTOR` (None when only the selector was given)."""
    if len(values) < 2:
        return None
    try:
        return float(values[1])
    except ValueError:
        raise UserError(f"--scale {values[0]} {values[1]}: the factor must be a number") from None


def at_least_one(flag: str, value: int) -> int:
    if value < 1:
        raise UserError(f"{flag} must be at least 1, got {value}")
    return value


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
