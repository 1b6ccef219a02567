"""`compare_checkpoints`: plan, stream, aggregate; and the `Comparison` it returns."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd

from toolrl_analysis.analysis.checkpoints import Checkpoint, open_pair
from toolrl_analysis.analysis.components import ParameterPart
from toolrl_analysis.analysis.diff.buffers import ScratchBuffers
from toolrl_analysis.analysis.diff.metrics import UpdateStats, spectral_memory_bytes, spectral_metrics
from toolrl_analysis.analysis.diff.plan import MatchedTensor, plan_pairs
from toolrl_analysis.analysis.diff.stream import (
    DEFAULT_CHUNK_ELEMENTS,
    ChunkPipeline,
    default_workers,
    stream_tensor,
    torch_threads,
    whole_tensor_stats,
)
from toolrl_analysis.analysis.diff.tables import (
    band_summary,
    component_table,
    identity_row,
    no_spectral,
    parameters_frame,
    summarize,
)
from toolrl_analysis.results import json_clean, json_records, write_results


@dataclass
class Comparison:
    """Everything `compare` found: tidy frames plus a JSON-able summary."""

    parameters: pd.DataFrame  # one row per parameter (part)
    components: pd.DataFrame  # one row per (layer, component)
    bands: pd.DataFrame  # share of the update norm per family and third of the depth
    singular_values: pd.DataFrame | None
    summary: dict[str, Any]

    def most_changed(self, n: int = 15, metric: str = "relative_frobenius_change") -> pd.DataFrame:
        return self.components.sort_values(metric, ascending=False, kind="stable").head(n)

    def to_document(self) -> dict[str, Any]:
        """{"rows": [...], "summary": {...}} with non-finite numbers as null (valid JSON)."""
        return {"rows": json_records(self.parameters), "summary": json_clean(self.summary)}

    def write(self, out_dir: str | Path) -> list[Path]:
        """CSV + parquet of the frames, summary.json, heatmap.png, layers.png and bands.png under out_dir."""
        from toolrl_analysis.analysis import plots

        frames = {"parameters": self.parameters, "components": self.components, "bands": self.bands}
        frames["singular_values"] = self.singular_values
        written = write_results(out_dir, frames, self.summary, "summary.json", parquet=True)
        out = Path(out_dir)
        figures = {
            "heatmap.png": plots.plot_component_heatmap(self.components),
            "layers.png": plots.plot_layer_profile(self.components),
        }
        if not self.bands.empty:
            figures["bands.png"] = plots.plot_band_summary(self.bands)
        for filename, figure in figures.items():
            figure.savefig(out / filename, dpi=120, bbox_inches="tight")
            written.append(out / filename)
        return written


def compare_checkpoints(
    base: str | Path | Checkpoint,
    trained: str | Path | Checkpoint,
    *,
    select: str | None = None,
    spectral: bool = False,
    allow_missing: bool = False,
    lora_base: str | Path | None = None,
    top_k: int = 8,
    chunk_elements: int = DEFAULT_CHUNK_ELEMENTS,
    workers: int | None = None,
    progress: Callable[[str, int, int], None] | None = None,
) -> Comparison:
    """Diff two checkpoints (any accepted format, e.g. base.pt vs trained.safetensors or a LoRA adapter).

    Paths are opened (and closed) here; Checkpoint objects are used as given. `progress(name, done, total)`
    is called after each tensor. `workers` threads do the arithmetic while the calling thread reads;
    0 does everything in the calling thread (default: `default_workers()`). `spectral=True` adds the
    SPECTRAL_COLUMNS (base-relative geometry: `spectral_metrics`) and the PRECISION_COLUMNS (bf16
    half-ULP sparsity and vanishing share: `UpdateStats`); it reads each matrix whole and runs in this
    thread. Either way the summary's `spectral_memory_bytes` says about how much memory the spectral
    path needs for the largest matrix (`spectral_memory_bytes`), beside that matrix's name and shape.
    """
    opened = not isinstance(base, Checkpoint) or not isinstance(trained, Checkpoint)
    if opened:
        base, trained = open_pair(str(base), str(trained), lora_base=lora_base)
    started = time.perf_counter()
    rows: list[dict] = []
    singular_rows: list[pd.DataFrame] = []
    try:
        plan = plan_pairs(base, trained, select=select, allow_missing=allow_missing)
        total, done = len(plan.matched), [0]

        def record(item: MatchedTensor, stats: list[UpdateStats], spectral_rows: dict | None = None) -> None:
            for part, part_stats in zip(item.parts, stats, strict=True):
                row = identity_row(item, part)
                row.update(part_stats.metrics())
                if spectral:
                    row.update((spectral_rows or {}).get(part, no_spectral()))
                rows.append(row)
            done[0] += 1
            if progress is not None:
                progress(item.name, done[0], total)

        if spectral:
            for item in plan.matched:
                spectral_rows: dict[ParameterPart, dict] = {}

                def on_part(part, part_base, part_update, _rows=spectral_rows):
                    if part_base.dim() >= 2:
                        row, values = spectral_metrics(part_base, part_update, top_k)
                        _rows[part] = row
                        identity = dict(
                            name=part.name, part=part.part, layer=part.layer, component=part.component
                        )
                        singular_rows.append(values.assign(**identity))

                if len(item.base.shape) >= 2:
                    stats = whole_tensor_stats(
                        base, trained, item, on_part, chunk_elements=chunk_elements, precision=True
                    )
                else:
                    with torch_threads(1):
                        stats = stream_tensor(
                            base, trained, item, chunk_elements=chunk_elements, precision=True
                        )
                record(item, stats, spectral_rows)
        elif (workers := default_workers() if workers is None else workers) == 0:
            buffers = ScratchBuffers()
            with torch_threads(1):
                for item in plan.matched:
                    record(
                        item,
                        stream_tensor(base, trained, item, chunk_elements=chunk_elements, buffers=buffers),
                    )
        else:
            ChunkPipeline(base, trained, workers, chunk_elements).run(plan.matched, record)
        elapsed = time.perf_counter() - started
    finally:
        if opened:
            base.close()
            trained.close()
    bytes_read = sum(item.base.nbytes + item.trained.nbytes for item in plan.matched)
    parameters = parameters_frame(rows)
    components = component_table(parameters)
    bands = band_summary(parameters, plan.mapping.n_layers)
    singular_values = None
    if spectral:
        columns = ["name", "part", "layer", "component", "index", "base", "trained", "change"]
        singular_values = (
            pd.concat(singular_rows, ignore_index=True)[columns]
            if singular_rows
            else pd.DataFrame(columns=columns)
        )
    summary = summarize(base, trained, plan, parameters, components, bands, elapsed, bytes_read, spectral)
    summary.update(spectral_memory(plan.matched, top_k))
    return Comparison(parameters, components, bands, singular_values, summary)


def spectral_memory(matched: list[MatchedTensor], top_k: int) -> dict[str, Any]:
    """The matrix whose spectral metrics need the most memory, and about how much (bytes) they add."""
    largest: dict[str, Any] = {"spectral_memory_bytes": 0, "spectral_memory_matrix": None}
    for item in matched:
        shape = item.base.shape
        if len(shape) < 2 or item.base.numel == 0:
            continue
        itemsize = max(item.base.dtype.itemsize, item.trained.dtype.itemsize)
        need = spectral_memory_bytes(shape[0], item.base.numel // shape[0], itemsize, top_k)
        if need > largest["spectral_memory_bytes"]:
            largest = {
                "spectral_memory_bytes": need,
                "spectral_memory_matrix": item.name,
                "spectral_memory_shape": list(shape),
            }
    return largest
