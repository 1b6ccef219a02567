"""Progress across the stages of `reproduce`, with an ETA from stage timings.

Each stage has an expected duration: what it took the last time it finished in this run directory, else a
measured default for the mode (`EXPECTED_SECONDS`). Stages that ran in this session set a speed factor
(actual / expected, so a slower machine stretches the rest of the estimate), and the running stage reports
its own fraction done where it can (training iterations, evaluated episodes, ablation variants). Every line
goes to the run's log file as plain text; a terminal may draw the same snapshots as a bar.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path


@dataclass
class Snapshot:
    index: int  # 1-based position of the current stage
    total: int
    stage: str
    fraction: float  # of the current stage
    elapsed_s: float  # since the chain started
    eta_s: float | None  # seconds left, all remaining stages included
    done_fraction: float  # of the expected work of the stages that run


def clock(seconds: float | None) -> str:
    if seconds is None:
        return "?"
    seconds = int(round(seconds))
    hours, rest = divmod(seconds, 3600)
    return f"{hours}h{rest // 60:02d}m" if hours else f"{rest // 60}m{rest % 60:02d}s"


class ChainProgress:
    """Expected durations in, snapshots and log lines out."""

    LINE_EVERY_S = 30.0  # in-stage progress lines at most this often

    def __init__(
        self,
        expected: dict[str, float],
        will_run: set[str],
        log_path: Path,
        echo: Callable[[str], None] = print,
        on_snapshot: Callable[[Snapshot], None] | None = None,
    ) -> None:
        self.expected = expected
        self.will_run = set(will_run)
        self.order = list(expected)
        self.log_path = log_path
        self.echo = echo
        self.on_snapshot = on_snapshot
        self.started = time.perf_counter()
        self.actual: dict[str, float] = {}  # stages that ran in this session
        self.current: str | None = None
        self.current_started = 0.0
        self.current_fraction = 0.0
        self.last_line = 0.0

    # -- what is left ---------------------------------------------------------------------------
    def speed(self) -> float:
        """actual / expected over the stages that ran so far (1 before any has), kept within [1/4, 4]."""
        ran = [name for name in self.actual if self.expected.get(name)]
        if not ran:
            return 1.0
        factor = sum(self.actual[n] for n in ran) / sum(self.expected[n] for n in ran)
        return min(4.0, max(0.25, factor))

    def eta(self) -> float:
        factor = self.speed()
        later = False
        remaining = 0.0
        for name in self.order:
            if name == self.current:
                later = True
                elapsed = time.perf_counter() - self.current_started
                expected = self.expected[name] * factor
                if self.current_fraction >= 0.05:  # the stage's own pace, once it has one
                    remaining += elapsed * (1 - self.current_fraction) / self.current_fraction
                else:
                    remaining += max(0.0, expected - elapsed)
            elif later and name in self.will_run:
                remaining += self.expected[name] * factor
        return remaining

    def snapshot(self) -> Snapshot:
        names = [n for n in self.order if n in self.will_run]
        total = sum(self.expected[n] for n in names) or 1.0
        done = sum(self.expected[n] for n in names if n in self.actual)
        if self.current in names:
            done += self.expected[self.current] * self.current_fraction
        index = self.order.index(self.current) + 1 if self.current else len(self.order)
        return Snapshot(
            index=index,
            total=len(self.order),
            stage=self.current or "",
            fraction=self.current_fraction,
            elapsed_s=time.perf_counter() - self.started,
            eta_s=self.eta() if self.current else 0.0,
            done_fraction=min(1.0, done / total),
        )

    # -- events ---------------------------------------------------------------------------------
    def line(self, text: str) -> None:
        stamp = time.strftime("%H:%M:%S")
        with open(self.log_path, "a", encoding="utf-8") as handle:
            handle.write(f"{stamp} {text}\n")
        self.echo(text)

    def _prefix(self) -> str:
        snap = self.snapshot()
        return f"[{snap.index}/{snap.total}] {snap.stage}"

    def _tail(self) -> str:
        snap = self.snapshot()
        return f"elapsed {clock(snap.elapsed_s)}, ETA {clock(snap.eta_s)}"

    def begin(self, name: str, action: str, reason: str) -> None:
        self.current, self.current_started, self.current_fraction = name, time.perf_counter(), 0.0
        if action != "skip":
            self.will_run.add(name)
        self.line(f"{self._prefix()}: {action} ({reason}) | {self._tail()}")
        self._notify()

    def fraction(self, value: float) -> None:
        self.current_fraction = min(1.0, max(0.0, value))
        now = time.perf_counter()
        if now - self.last_line >= self.LINE_EVERY_S:
            self.last_line = now
            self.line(f"{self._prefix()}: {100 * self.current_fraction:.0f}% | {self._tail()}")
        self._notify()

    def end(self, name: str, seconds: float | None) -> None:
        """A stage finished (`seconds`) or was skipped (None)."""
        if seconds is not None:
            self.actual[name] = seconds
            self.current_fraction = 1.0
            self.line(f"{self._prefix()}: done in {clock(seconds)} | {self._tail()}")
        else:
            self.will_run.discard(name)
        self._notify()

    def _notify(self) -> None:
        if self.on_snapshot is not None:
            self.on_snapshot(self.snapshot())
