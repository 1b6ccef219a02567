"""One stage of `reproduce`, and when it may be skipped.

A stage records `stage.json` beside its outputs: the SHA-256 of every input file, the configuration it ran
with, whether it finished, and how long it took. A stage is skipped only when that record says it finished,
its inputs and configuration are the ones recorded, and its outputs exist. Otherwise it reruns and says
why: the keys that changed (old and new value), the input files that changed, the outputs that are missing,
or that it was interrupted. A stage that can continue an interrupted run (the trainers checkpoint) resumes
when the record says it stopped part-way with the same inputs and configuration.

Inputs are hashed by content, so a stage reruns exactly when an upstream stage produced different files,
and a rerun upstream stage that wrote the same bytes leaves everything after it alone.
"""

from __future__ import annotations

import json
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from toolrl_analysis.io import file_sha256
from toolrl_analysis.results import json_clean

RECORD = "stage.json"
RUNNING, DONE = "running", "done"


@dataclass
class StageContext:
    """What an action gets: whether to continue an interrupted run, and where to report its progress."""

    resume: bool
    fraction: Callable[[float], None]  # share of the stage done, 0..1
    log: Callable[[str], None]


@dataclass
class Stage:
    name: str
    directory: Path  # the stage's outputs and its record live here
    outputs: tuple[str, ...]  # files under `directory` that a finished stage has written
    inputs: dict[str, Path]  # label -> a file whose bytes the stage reads
    config: dict[str, Any]
    action: Callable[[StageContext], None]
    after: tuple[str, ...] = ()  # stages whose outputs it reads
    resumable: bool = False
    plain_config: dict[str, Any] = field(init=False)

    def __post_init__(self) -> None:
        # as JSON gives it back (tuples as lists, paths as text): a recorded value compares equal to this one
        self.plain_config = json_clean(self.config)

    @property
    def record_path(self) -> Path:
        return self.directory / RECORD

    def read_record(self) -> dict[str, Any] | None:
        try:
            record = json.loads(self.record_path.read_text(encoding="utf-8"))
        except (FileNotFoundError, json.JSONDecodeError):
            return None
        return record if isinstance(record, dict) else None

    def input_hashes(self) -> dict[str, str | None]:
        return {label: file_sha256(p) if p.is_file() else None for label, p in self.inputs.items()}

    def write_record(self, status: str, hashes: dict[str, str | None], seconds: float | None = None) -> None:
        self.directory.mkdir(parents=True, exist_ok=True)
        record = {"stage": self.name, "status": status, "inputs": hashes, "config": self.plain_config}
        if seconds is not None:
            record["seconds"] = round(seconds, 1)
        record["written_at"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        self.record_path.write_text(json.dumps(record, indent=1) + "\n", encoding="utf-8")


@dataclass
class Decision:
    run: bool
    resume: bool
    reason: str


def _changed_keys(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    keys = sorted(set(old) | set(new))
    return [
        f"{k} {old.get(k, '(unset)')!r} -> {new.get(k, '(unset)')!r}"
        for k in keys
        if old.get(k) != new.get(k)
    ]


def decide(stage: Stage, hashes: dict[str, str | None], force: bool = False) -> Decision:
    """Run, resume or skip `stage`, and why."""
    missing_inputs = [label for label, digest in hashes.items() if digest is None]
    if missing_inputs:  # only a bug in the chain's order can get here; say it plainly
        raise RuntimeError(f"stage {stage.name}: inputs missing: {', '.join(missing_inputs)}")
    if force:
        return Decision(True, False, "--force")
    record = stage.read_record()
    if record is None:
        exists = any((stage.directory / name).exists() for name in stage.outputs)
        return Decision(
            True, False, "outputs exist without a record of their inputs" if exists else "not run yet"
        )
    reasons = []
    changed = _changed_keys(record.get("config") or {}, stage.plain_config)
    if changed:  # a whole new configuration (say --quick dropped) would be a screenful: the first few
        more = f" and {len(changed) - 6} more" if len(changed) > 6 else ""
        reasons.append("configuration changed: " + "; ".join(changed[:6]) + more)
    old_inputs = record.get("inputs") or {}
    inputs = [
        label for label in sorted(set(old_inputs) | set(hashes)) if old_inputs.get(label) != hashes.get(label)
    ]
    if inputs:
        reasons.append("inputs changed: " + ", ".join(inputs))
    if reasons:
        return Decision(True, False, "; ".join(reasons))
    if record.get("status") != DONE:
        if stage.resumable:
            return Decision(True, True, "did not finish; resuming from its last checkpoint")
        return Decision(True, False, "did not finish; starting it again")
    missing = [name for name in stage.outputs if not (stage.directory / name).exists()]
    if missing:
        return Decision(True, False, "outputs missing: " + ", ".join(missing))
    return Decision(False, False, "up to date")


def prepare(stage: Stage, decision: Decision, hashes: dict[str, str | None]) -> None:
    """Before running: clear what a fresh run must not mix with, and record that the stage has started."""
    if decision.run and not decision.resume and stage.directory.exists():
        shutil.rmtree(stage.directory)
    stage.write_record(RUNNING, hashes)


def recorded_seconds(stage: Stage) -> float | None:
    """How long this stage took the last time it finished (whatever its configuration was then)."""
    record = stage.read_record()
    seconds = record.get("seconds") if record else None
    return float(seconds) if isinstance(seconds, int | float) else None
