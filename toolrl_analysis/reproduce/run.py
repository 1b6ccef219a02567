"""`reproduce(...)`: run the chain, skipping what is up to date, resuming what was interrupted, and logging
progress with an ETA to RUN/reproduce.log; then the figures and report.md."""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from toolrl_analysis.models.placement import Placement
from toolrl_analysis.reproduce.chain import build_stages
from toolrl_analysis.reproduce.progress import ChainProgress, Snapshot, clock
from toolrl_analysis.reproduce.settings import load_settings
from toolrl_analysis.reproduce.stages import DONE, Stage, StageContext, decide, prepare, recorded_seconds

LOG_FILE = "reproduce.log"
RUN_FILE = "reproduce.json"
REPORT = "report"  # the last step: figures and report.md, always redone (seconds, from saved tables)

# Measured wall times (s) on 2 CPU cores (the default run of December 2026 from a fresh clone; every further
# GRPO seed is expected to take as long as the first), used for the ETA until a stage has run here once.
EXPECTED_SECONDS = {
    False: {"envs": 4, "base": 1, "evaluate base": 80, "pass@k base": 110, "train grpo": 855,
            "train reinforce++": 930, "evaluate grpo": 60, "evaluate reinforce++": 75, "pass@k grpo": 95,
            "compare grpo": 2, "compare reinforce++": 2, "overlap": 3, "ablate": 1140, "probe": 40, "judge": 152,
            "patch": 150, REPORT: 5},
    True: {"envs": 5, "base": 2, "evaluate base": 15, "train grpo": 20, "train reinforce++": 20,
           "evaluate grpo": 15, "evaluate reinforce++": 15, "compare grpo": 2, "compare reinforce++": 2,
           "ablate": 60, "probe": 30, "pass@k base": 10, "pass@k grpo": 10, "judge": 10, "patch": 20,
           REPORT: 10},
}  # fmt: skip


def expected_seconds(defaults: dict[str, float], stage: str) -> float:
    """A stage's expected time before it has run here; every GRPO seed as long as the first run."""
    return float(defaults.get(stage, defaults.get(stage.split(" seed ")[0], 60)))


def planned(stages: list[Stage], force: bool) -> set[str]:
    """The stages expected to run: out of date now, or downstream of one that is (for the ETA)."""
    will: set[str] = set()
    for stage in stages:
        if force or any(name in will for name in stage.after):
            will.add(stage.name)
            continue
        hashes = stage.input_hashes()
        if None in hashes.values() or decide(stage, hashes).run:
            will.add(stage.name)
    return will | {REPORT}


def reproduce(
    out: str | Path,
    quick: bool = False,
    force: bool = False,
    base: str = "embedded",
    overrides: list[str] | None = None,
    log: Callable[[str], None] = print,
    on_snapshot: Callable[[Snapshot], None] | None = None,
    placement: Placement | None = None,
) -> dict[str, Any]:
    from toolrl_analysis.report import write_figures, write_report

    settings = load_settings(quick, base, overrides, placement)
    run = Path(out)
    run.mkdir(parents=True, exist_ok=True)
    stages = build_stages(run, settings)
    defaults = EXPECTED_SECONDS[quick]
    expected = {s.name: recorded_seconds(s) or expected_seconds(defaults, s.name) for s in stages}
    expected[REPORT] = float(defaults[REPORT])
    document = settings.document() | {"stages": [s.name for s in stages]}
    (run / RUN_FILE).write_text(json.dumps(document, indent=1, default=str) + "\n", encoding="utf-8")

    progress = ChainProgress(
        expected, planned(stages, force), run / LOG_FILE, echo=log, on_snapshot=on_snapshot
    )
    progress.line(f"reproduce {'--quick ' if quick else ''}--out {run} (base: {settings.base})")
    timings: dict[str, dict[str, Any]] = {}
    for stage in stages:
        hashes = stage.input_hashes()
        decision = decide(stage, hashes, force)
        if not decision.run:
            progress.begin(stage.name, "skip", decision.reason)
            progress.end(stage.name, None)
            timings[stage.name] = {"status": "skipped", "seconds": recorded_seconds(stage)}
            continue
        progress.begin(stage.name, "resume" if decision.resume else "run", decision.reason)
        prepare(stage, decision, hashes)
        started = time.perf_counter()
        try:
            stage.action(StageContext(decision.resume, progress.fraction, progress.line))
        except KeyboardInterrupt:
            progress.line(f"interrupted during {stage.name}; run the same command again to continue there")
            raise
        seconds = time.perf_counter() - started
        stage.write_record(DONE, hashes, seconds)
        progress.end(stage.name, seconds)
        timings[stage.name] = {
            "status": "resumed" if decision.resume else "ran",
            "seconds": round(seconds, 1),
        }

    progress.begin(REPORT, "run", "always redone from the saved tables")
    started = time.perf_counter()
    (run / "timings.json").write_text(json.dumps(timings, indent=1) + "\n", encoding="utf-8")
    figures = write_figures(run)
    report = write_report(run)
    progress.end(REPORT, time.perf_counter() - started)
    total = time.perf_counter() - progress.started
    progress.line(f"report: {report} ({len(figures)} figures; {clock(total)} in all)")
    return {"out": str(run), "report": str(report), "figures": [str(f) for f in figures], "timings": timings}
