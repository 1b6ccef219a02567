"""How every command prints: one JSON document with --json, else a human summary; progress on stderr."""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
from collections.abc import Callable, Iterator
from typing import Any


def emit(args: argparse.Namespace, document: Any, render: Callable[[], None]) -> None:
    """With --json print one JSON document on stdout; otherwise the human summary."""
    if getattr(args, "json", False):
        from toolrl_analysis.results import json_clean  # pandas: loaded only when a document is printed

        json.dump(json_clean(document), sys.stdout, indent=None)
        sys.stdout.write("\n")
    else:
        render()


def console():
    """Human output on stdout. Piped into a file it is not cut at 80 columns: tables keep every column."""
    from rich.console import Console

    out = Console(stderr=False, highlight=False)
    return out if out.is_terminal else Console(stderr=False, highlight=False, width=160)


def progress_console():
    """Progress bars go to stderr so that --json keeps stdout to one document."""
    from rich.console import Console

    return Console(stderr=True)


def progress_bar(*columns):
    """A live bar on stderr when it is a terminal; otherwise nothing is drawn (see `progress_line`)."""
    from rich.progress import Progress

    stderr = progress_console()
    return Progress(*columns, console=stderr, transient=True, disable=not stderr.is_terminal)


def progress_line(text: str) -> None:
    """Without a terminal (a log file, a pipe) progress is a plain line on stderr instead of a bar."""
    if not sys.stderr.isatty():
        print(text, file=sys.stderr, flush=True)


@contextlib.contextmanager
def step_progress(label: str) -> Iterator[Callable[[str, int, int], None]]:
    """A progress bar on stderr (a line per tenth of the work without a terminal) and its callback
    `(name, done, total)`."""
    from rich.progress import BarColumn, MofNCompleteColumn, TextColumn, TimeElapsedColumn

    columns = (
        TextColumn(label),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TextColumn("{task.description}"),
    )
    shown: set[tuple[int, int]] = set()
    with progress_bar(*columns) as progress:
        task = progress.add_task("", total=None)

        def update(name: str, done: int, total: int) -> None:
            progress.update(task, completed=done, total=total, description=name)
            tenth = (total, 10 * done // max(1, total))  # a new phase (another total) starts its tenths anew
            if tenth not in shown:
                shown.add(tenth)
                progress_line(f"{label}: {done}/{total} {name}")

        yield update
