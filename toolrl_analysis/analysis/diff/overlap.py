"""Where several trained runs of one base changed it, and whether they agree (docs/architecture.md, "Analysis").

Run r's update mask is the set of entries with |dW_r| > tolerance (0 by default: any change; `bf16`: more
than half a bf16 ULP of the base weight, `metrics.bf16_half_ulp`, i.e. a change a bf16 copy keeps). For each
pair of runs (A, B) and each (layer, component), the same grouping as `compare`:

- one-sided overlaps overlap_ab = |A n B| / |A| and overlap_ba = |A n B| / |B|, beside their chance levels
  under independent masks of the same densities, d_B and d_A;
- the Jaccard index |A n B| / |A u B|, beside its chance level d_A d_B / (d_A + d_B - d_A d_B);
- sign agreement: the share of A n B where dW_A and dW_B have the same sign (chance 0.5).

Each frame keeps the counts behind its ratios (numel, changed_a, changed_b, intersection, agree), so rows
add up to layers, bands or the whole model. The checkpoints stream in row chunks like `compare`'s: memory
holds one chunk of the base and of every run.
"""

from __future__ import annotations

import itertools
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd
import torch

from toolrl_analysis.analysis.checkpoints import Checkpoint, open_checkpoint
from toolrl_analysis.analysis.components import FAMILY_LABELS
from toolrl_analysis.analysis.diff.buffers import ScratchBuffers
from toolrl_analysis.analysis.diff.metrics import bf16_half_ulp
from toolrl_analysis.analysis.diff.plan import MatchedTensor, PairPlan, plan_pairs
from toolrl_analysis.analysis.diff.stream import (
    DEFAULT_CHUNK_ELEMENTS,
    chunk_ranges,
    part_rows,
    read_chunk,
    torch_threads,
)
from toolrl_analysis.analysis.diff.tables import sort_by_component
from toolrl_analysis.errors import CheckpointError, UserError, first_names
from toolrl_analysis.results import json_clean, json_records, write_results

BF16 = "bf16"
# `expected` is the intersection independent masks would have, |A| |B| / n, per (layer, component): summed with
# the counts, it keeps the chance levels of a band or a model exact when densities differ between its tensors
COUNT_COLUMNS = ("numel", "changed_a", "changed_b", "intersection", "agree", "expected")


def parse_tolerance(value: float | str) -> float | str:
    """A tolerance >= 0, or "bf16" (half a bf16 ULP of each base weight); UserError otherwise."""
    if isinstance(value, str) and value.strip().lower() == BF16:
        return BF16
    try:
        tolerance = float(value)
    except (TypeError, ValueError):
        raise UserError(f"--tolerance must be a number >= 0 or 'bf16', not {value!r}") from None
    if not tolerance >= 0 or math.isinf(tolerance):
        raise UserError(f"--tolerance must be a finite number >= 0 or 'bf16', not {value!r}")
    return tolerance


def overlap_ratios(frame: pd.DataFrame) -> pd.DataFrame:
    """The ratios and their chance levels from the count columns (any grouping of rows summed). For one
    (layer, component) the chance levels are d_B, d_A and d_A d_B / (d_A + d_B - d_A d_B); for a sum of rows
    they come from the summed expected intersection, never from pooled densities (a band mixes tensors of
    different densities, and pooled densities would misstate what independent masks give)."""
    numel = frame["numel"].where(frame["numel"] > 0)
    d_a, d_b = frame["changed_a"] / numel, frame["changed_b"] / numel
    union = frame["changed_a"] + frame["changed_b"] - frame["intersection"]
    expected = frame["expected"]
    expected_union = frame["changed_a"] + frame["changed_b"] - expected
    return frame.assign(
        density_a=d_a,
        density_b=d_b,
        union=union,
        overlap_ab=frame["intersection"] / frame["changed_a"].where(frame["changed_a"] > 0),
        overlap_ab_chance=expected / frame["changed_a"].where(frame["changed_a"] > 0),
        overlap_ba=frame["intersection"] / frame["changed_b"].where(frame["changed_b"] > 0),
        overlap_ba_chance=expected / frame["changed_b"].where(frame["changed_b"] > 0),
        jaccard=frame["intersection"] / union.where(union > 0),
        jaccard_chance=expected / expected_union.where(expected_union > 0),
        sign_agreement=frame["agree"] / frame["intersection"].where(frame["intersection"] > 0),
        sign_agreement_chance=0.5,
    )


@dataclass
class Overlap:
    """Pairwise overlaps of the update masks of several runs of one base."""

    pairs: pd.DataFrame  # one row per (layer, component, pair of runs)
    totals: pd.DataFrame  # one row per pair of runs, over every compared parameter
    summary: dict[str, Any]

    def to_document(self) -> dict[str, Any]:
        return {"rows": json_records(self.pairs), "summary": json_clean(self.summary)}

    def write(self, out_dir: str | Path) -> list[Path]:
        """overlap.csv, overlap_totals.csv, overlap.json and overlap.png under out_dir."""
        from toolrl_analysis.analysis import plots

        frames = {"overlap": self.pairs, "overlap_totals": self.totals}
        written = write_results(out_dir, frames, self.summary, "overlap.json")
        path = Path(out_dir) / "overlap.png"
        plots.plot_overlap_by_layer(self.pairs).savefig(path, dpi=120, bbox_inches="tight")
        return [*written, path]


@dataclass
class _Counts:
    numel: int = 0
    changed: list[int] = field(default_factory=list)
    intersection: dict[tuple[int, int], int] = field(default_factory=dict)
    agree: dict[tuple[int, int], int] = field(default_factory=dict)


def overlap_runs(
    base: str | Path | Checkpoint,
    runs: Sequence[str | Path | Checkpoint],
    *,
    tolerance: float | str = 0.0,
    select: str | None = None,
    chunk_elements: int = DEFAULT_CHUNK_ELEMENTS,
    progress: Callable[[str, int, int], None] | None = None,
) -> Overlap:
    """Overlap of the update masks of `runs` (two or more checkpoints trained from `base`; any format
    compare accepts, a PEFT adapter applied to `base`). Raises UserError for fewer than two runs, a bad
    tolerance, or a run whose tensors (names, shapes, architecture) do not match the base's."""
    if len(runs) < 2:
        raise UserError(f"overlap needs at least two trained runs of the base, got {len(runs)}")
    tolerance = parse_tolerance(tolerance)
    labels = _labels(runs)
    started = time.perf_counter()
    opened: list[Checkpoint] = []

    def open_one(path, lora_base=None) -> Checkpoint:
        if isinstance(path, Checkpoint):
            return path
        checkpoint = open_checkpoint(path, lora_base=lora_base)
        opened.append(checkpoint)
        return checkpoint

    try:
        base_checkpoint = open_one(base)
        trained = [open_one(run, lora_base=base_checkpoint) for run in runs]
        plans = [
            _plan(base_checkpoint, run, label, select) for run, label in zip(trained, labels, strict=True)
        ]
        counts = _stream(base_checkpoint, trained, plans, tolerance, chunk_elements, progress)
    finally:
        for checkpoint in opened:
            checkpoint.close()
    pairs, totals = _frames(counts, labels)
    plan = plans[0]
    n_parameters = sum(c.numel for c in counts.values())
    changed = [sum(c.changed[i] for c in counts.values()) for i in range(len(labels))]
    summary = {
        "base": str(base_checkpoint.path),
        "runs": [
            {"run": label, "path": str(c.path), "changed": n, "density": n / max(1, n_parameters)}
            for label, c, n in zip(labels, trained, changed, strict=True)
        ],
        "tolerance": tolerance,
        "selector": select,
        "architecture": FAMILY_LABELS.get(plan.mapping.family, plan.mapping.family),
        "n_layers": plan.mapping.n_layers,
        "n_tensors": len(plan.matched),
        "n_parameters": n_parameters,
        "totals": totals.to_dict(orient="records"),
        "seconds": time.perf_counter() - started,
    }
    return Overlap(pairs, totals, summary)


def _labels(runs: Sequence) -> list[str]:
    """Each run as given; a repeated one gets its position appended, so that every label is unique."""
    names = [str(r.path) if isinstance(r, Checkpoint) else str(r) for r in runs]
    return [name if names.count(name) == 1 else f"{name} (#{i})" for i, name in enumerate(names, start=1)]


def _plan(base: Checkpoint, run: Checkpoint, label: str, select: str | None) -> PairPlan:
    try:
        return plan_pairs(base, run, select=select)
    except CheckpointError as exc:
        raise CheckpointError(f"run {label} is not a trained copy of the base: {exc}") from None


def _stream(base, trained, plans, tolerance, chunk_elements, progress) -> dict[tuple, _Counts]:
    reference = [item.name for item in plans[0].matched]
    for plan, run in zip(plans[1:], trained[1:], strict=True):
        names = [item.name for item in plan.matched]
        if names != reference:  # each matches the base, yet not each other: tied heads stored differently
            differ = sorted(set(names) ^ set(reference)) or ["(the same tensors in another order)"]
            raise CheckpointError(
                f"{trained[0].path} and {run.path} hold different tensors: {first_names(differ)}"
            )
    pair_ids = list(itertools.combinations(range(len(trained)), 2))
    counts: dict[tuple, _Counts] = {}
    buffers = [ScratchBuffers() for _ in trained]
    with torch_threads(1):
        for done, items in enumerate(zip(*(p.matched for p in plans), strict=True), start=1):
            item: MatchedTensor = items[0]
            for start, stop in chunk_ranges(item.base, chunk_elements):
                base_rows, updates = _read_updates(base, trained, items, start, stop, buffers)
                for part in item.parts:
                    part_base = part_rows(part, base_rows, start, stop)
                    if part_base is None:
                        continue
                    key = (part.layer, part.component)
                    if key not in counts:
                        counts[key] = _Counts(changed=[0] * len(trained))
                    threshold = bf16_half_ulp(part_base) if tolerance == BF16 else tolerance
                    part_updates = [part_rows(part, u, start, stop) for u in updates]
                    _count(counts[key], part_updates, threshold, pair_ids)
            if progress is not None:
                progress(item.name, done, len(reference))
    return counts


def _read_updates(base, trained, items, start, stop, buffers) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """The base's rows (float32) and each run's update on them."""
    base_rows, updates = None, []
    for run, item, scratch in zip(trained, items, buffers, strict=True):
        chunk = read_chunk(base, run, item, start, stop, scratch)
        if base_rows is None:
            base_rows = chunk.base.float().reshape(-1) if chunk.base.dim() == 0 else chunk.base.float()
        update = chunk.update if chunk.update is not None else chunk.trained.float() - chunk.base.float()
        updates.append(update.reshape(base_rows.shape))
    return base_rows, updates


def _count(counts: _Counts, updates: list[torch.Tensor], threshold, pair_ids) -> None:
    counts.numel += updates[0].numel()
    masks = [torch.abs(u) > threshold for u in updates]
    negative = [torch.signbit(u) for u in updates]
    for i, mask in enumerate(masks):
        counts.changed[i] += int(mask.sum())
    for a, b in pair_ids:
        both = masks[a] & masks[b]
        counts.intersection[a, b] = counts.intersection.get((a, b), 0) + int(both.sum())
        agree = both & (negative[a] == negative[b])  # nonzero on the intersection: signbit is the sign
        counts.agree[a, b] = counts.agree.get((a, b), 0) + int(agree.sum())


def _frames(counts: dict[tuple, _Counts], labels: list[str]) -> tuple[pd.DataFrame, pd.DataFrame]:
    records = []
    for (layer, component), c in counts.items():
        for a, b in itertools.combinations(range(len(labels)), 2):
            records.append(
                {
                    "layer": layer,
                    "component": component,
                    "run_a": labels[a],
                    "run_b": labels[b],
                    "numel": c.numel,
                    "changed_a": c.changed[a],
                    "changed_b": c.changed[b],
                    "intersection": c.intersection[a, b],
                    "agree": c.agree[a, b],
                    "expected": c.changed[a] * c.changed[b] / c.numel if c.numel else 0.0,
                }
            )
    frame = pd.DataFrame(records)
    frame["layer"] = pd.array(frame["layer"].tolist(), dtype="Int64")
    pairs = overlap_ratios(sort_by_component(frame))
    totals = overlap_ratios(
        frame.groupby(["run_a", "run_b"], sort=False, as_index=False)[list(COUNT_COLUMNS)].sum()
    )
    return pairs, totals
