"""How every command prints: one JSON document with --json, else a human summary; progress on stderr."""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
from collections.abc import Callable, Iterator
from typing import Any

from toolrl_analysis.results import json_clean


def emit(args: argparse.Namespace, document: Any, render: Callable[[], None]) -> None:
    """With --json print one JSON document on stdout; otherwise the human summary."""
    if getattr(args, "json", False):
        json.dump(json_clean(document), sys.stdout, indent=None)
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
