"""`ablate(...)`: plan the pair, save the hybrid and/or evaluate the variants; the `Ablation` it returns,
its files and its terminal tables."""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd

from toolrl_analysis.analysis.ablate.bootstrap import DEFAULT_REPLICATES, stratified_resamples
from toolrl_analysis.analysis.ablate.control import energy_pairs_in_memory, energy_ratio_text, update_energies
from toolrl_analysis.analysis.ablate.grid import Variant, custom_variants, grid_variants
from toolrl_analysis.analysis.ablate.save import DEFAULT_SHARD_BYTES, output_format, save_spliced
from toolrl_analysis.analysis.ablate.splice import Operation, compile_operations
from toolrl_analysis.analysis.ablate.tables import RETAINED_METRICS, build_frames
from toolrl_analysis.analysis.ablate.variants import EvaluationOptions, evaluate_variants, pairs_in_memory
from toolrl_analysis.analysis.checkpoints import open_pair
from toolrl_analysis.analysis.diff import plan_pairs
from toolrl_analysis.envs.schema import EnvRecord, limited, read_envs
from toolrl_analysis.errors import ConfigError, UserError
from toolrl_analysis.results import json_clean, json_records, write_results

Progress = Callable[[str, int, int], None]


@dataclass
class Ablation:
    """What `ablate` did: the variants' frames (None without --envs) and a JSON-able summary."""

    variants: pd.DataFrame | None
    metrics: pd.DataFrame | None
    summary: dict[str, Any] = field(default_factory=dict)
    # Per variant x environment: the episodes and the meter's sums, so that a later reader (the report)
    # can draw the same paired bootstrap and compare two variants directly.
    episodes: pd.DataFrame | None = None
    meter: pd.DataFrame | None = None

    def to_document(self) -> dict[str, Any]:
        frames = {"variants": self.variants, "metrics": self.metrics}
        return {k: None if v is None else json_records(v) for k, v in frames.items()} | {
            "summary": json_clean(self.summary)
        }

    def write(self, out_dir: str | Path) -> list[Path]:
        """variants / metrics / episodes / meter as CSV and parquet, ablation.json, and gain_retained.png."""
        from toolrl_analysis.analysis.plots import plot_gain_retained

        frames = {
            "variants": self.variants,
            "metrics": self.metrics,
            "episodes": self.episodes,
            "meter": self.meter,
        }
        written = write_results(out_dir, frames, self.to_document(), "ablation.json", parquet=True)
        out = Path(out_dir)
        if self.variants is not None:
            figure = plot_gain_retained(self.variants)
            figure.savefig(out / "gain_retained.png", dpi=120, bbox_inches="tight")
            written.append(out / "gain_retained.png")
        return written


def heldout_records(envs: str | Path, limit: int | None) -> list[EnvRecord]:
    """The held-out environments: `test.jsonl` of an environment set, or a .jsonl/.parquet file; with
    `limit`, that many balanced over scenarios (`limited`)."""
    if limit is not None and limit < 1:
        raise ConfigError("--limit must be a positive number of environments")
    path = Path(envs)
    return limited(read_envs(path / "test.jsonl" if path.is_dir() else path), limit)


def _check_request(operations, grid, envs, save, metric) -> None:
    if grid and operations:
        raise UserError("--grid evaluates its own variants: drop --revert/--transplant/--scale, or the grid")
    if grid and save:
        raise UserError(
            "--save writes one hybrid: give its operations (--revert/--transplant/--scale), not --grid"
        )
    if not grid and not operations:
        raise UserError("nothing to ablate: give --grid paper, or operations (--revert/--transplant/--scale)")
    if envs is None and save is None:
        raise UserError("nothing to do: --envs evaluates the variants, --save writes the hybrid (or both)")
    if metric not in RETAINED_METRICS:
        raise ConfigError(f"--metric must be one of {', '.join(RETAINED_METRICS)}, got {metric!r}")
    if save is not None:
        output_format(Path(save))  # a bad suffix fails here, before any model is read


def ablate(
    base: str | Path,
    trained: str | Path,
    *,
    operations: Sequence[Operation] = (),
    grid: str | None = None,
    envs: str | Path | None = None,
    limit: int | None = None,
    save: str | Path | None = None,
    force: bool = False,
    shard_bytes: int = DEFAULT_SHARD_BYTES,
    allow_missing: bool = False,
    lora_base: str | Path | None = None,
    seed: int = 0,
    replicates: int = DEFAULT_REPLICATES,
    metric: str = "solve_f1",
    options: EvaluationOptions | None = None,
    progress: Progress | None = None,
) -> Ablation:
    """Splice (base, trained) as `operations` say and `--save` the hybrid, and/or evaluate the variants
    (the user's splice, or a grid) on held-out environments beside the base and the trained model."""
    _check_request(operations, grid, envs, save, metric)
    if replicates < 2:
        raise ConfigError("--bootstrap needs at least 2 replicates")
    records = heldout_records(envs, limit) if envs is not None else None
    started = time.perf_counter()
    base_ckpt, trained_ckpt = open_pair(str(base), str(trained), lora_base=lora_base)
    summary: dict[str, Any] = {"base": str(base), "trained": str(trained), "seed": seed}
    try:
        plan = plan_pairs(base_ckpt, trained_ckpt, allow_missing=allow_missing)
        summary["model"] = {
            "family": plan.mapping.family,
            "blocks": plan.mapping.n_layers,
            "shared_tensors": len(plan.matched),
        }
        if save is not None:
            splice = compile_operations(plan, operations)
            summary["saved"] = save_spliced(
                base_ckpt,
                trained_ckpt,
                plan,
                splice,
                save,
                force=force,
                shard_bytes=shard_bytes,
                progress=progress,
            )
        if records is None:
            return Ablation(None, None, summary)
        pairs = pairs_in_memory(base_ckpt, trained_ckpt, plan)
        if grid:
            variants = grid_variants(grid, plan, update_energies(energy_pairs_in_memory(pairs)), seed)
        else:
            variants = custom_variants(plan, operations)
        results = evaluate_variants(
            base_ckpt,
            trained_ckpt,
            plan,
            pairs,
            variants,
            records,
            options or EvaluationOptions(),
            progress=progress,
        )
    finally:
        base_ckpt.close()
        trained_ckpt.close()
    resamples = stratified_resamples([r.scenario for r in records], replicates, seed)
    metrics, frame = build_frames(variants, results, resamples, metric)
    summary.update(
        {
            "grid": grid,
            "operations": [op.label for op in operations],
            "environments": len(records),
            "envs": str(envs),
            "metric": metric,
            "bootstrap_replicates": replicates,
            "controls": [_control_summary(v) for v in variants if v.drawn is not None and v.kind == "revert"],
            "seconds": time.perf_counter() - started,
        }
    )
    episodes = pd.concat([r.episodes.assign(variant=r.variant.name) for r in results], ignore_index=True)
    meters = [r.meter.assign(variant=r.variant.name) for r in results if r.meter is not None]
    return Ablation(
        frame, metrics, summary, episodes, pd.concat(meters, ignore_index=True) if meters else None
    )


def _control_summary(variant: Variant) -> dict[str, Any]:
    drawn = variant.drawn
    return {
        "subset": drawn.subset,
        "parameters": drawn.parameters,
        "pool_parameters": drawn.pool_parameters,
        "energy_ratio": drawn.energy_ratio,
        "tilt": drawn.tilt,
        "tensors": len(drawn.regions),
        "note": drawn.note,
    }


# ---------------------------------------------------------------------------------------------
# Terminal rendering (used by the CLI)
# ---------------------------------------------------------------------------------------------
def _fixed(value: float, digits: int) -> str:
    text = f"{value:.{digits}f}"
    return text.lstrip("-") if float(text) == 0 else text  # no "-0.00"


def _cell(value: float | None, se: float | None = None, digits: int = 3) -> str:
    if value is None or pd.isna(value):
        return "n/a"
    text = _fixed(value, digits)
    return text if se is None or pd.isna(se) else f"{text}±{_fixed(se, digits)}"


def _count(value: int) -> str:
    for size, suffix in ((10**9, "G"), (10**6, "M"), (10**3, "k")):
        if value >= size:
            return f"{value / size:.1f}{suffix}"
    return str(value)


def render_ablation(ablation: Ablation, console) -> None:
    """The saved hybrid, then two tables (the gain retained; general ability and context reading) and notes."""
    from rich import box
    from rich.markup import escape  # selectors and paths may hold brackets; they are text, not markup
    from rich.table import Table

    saved = ablation.summary.get("saved")
    if saved:
        console.print(
            escape(
                f"saved {saved['splice']} ({saved['parameters_changed']:,} parameters from the "
                f"{'base' if saved['start'] == 'trained' else 'trained model'}) to {saved['path']} "
                f"[{saved['format']}, {saved['bytes'] / 1e6:.1f} MB in {saved['seconds']:.1f} s]"
            )
        )
    frame = ablation.variants
    if frame is None:
        return
    metric = ablation.summary.get("metric", "solve_f1")
    title = f"Gain retained in {metric} ({ablation.summary.get('environments')} environments, 95% bootstrap)"
    # Narrow enough for an 80-column log: no outer padding, controls shown as ctrl(...).
    layout = {"box": box.SIMPLE_HEAD, "pad_edge": False, "show_edge": False, "collapse_padding": True}
    table = Table(title=title, **layout)
    for column in ("variant", "params", "share", metric, "retained [95%]"):
        table.add_column(column, justify="left" if column == "variant" else "right", no_wrap=True)
    general = Table(title="General ability and context reading", **layout)
    for column in ("variant", "exact match", "text loss", "oracle NLL", "context gap"):
        general.add_column(column, justify="left" if column == "variant" else "right", no_wrap=True)
    for row in frame.to_dict(orient="records"):
        retained = _cell(row["gain_retained"], digits=2)
        if not pd.isna(row["gain_retained"]):
            low, high = _fixed(row["gain_retained_low"], 2), _fixed(row["gain_retained_high"], 2)
            retained += f" [{low},{high}]"
        style = "bold" if row["kind"] == "reference" else None
        name = escape(row["variant"].replace("control(", "ctrl("))
        table.add_row(
            name, _count(int(row["parameters"])), _cell(row["update_share"], digits=2),
            _cell(row.get(metric), row.get(f"{metric}_se")), retained, style=style,
        )  # fmt: skip
        general.add_row(
            name, _cell(row.get("tasks.exact_match"), row.get("tasks.exact_match_se"), 2),
            _cell(row.get("heldout_text.loss")), _cell(row.get("nll_real"), row.get("nll_real_se")),
            _cell(row.get("context_gap"), row.get("context_gap_se")), style=style,
        )  # fmt: skip
    console.print(table)
    console.print(general)
    reasons = dict.fromkeys(r for r in frame["gain_retained_reason"] if isinstance(r, str) and r)
    for reason in reasons:
        console.print(escape(f"n/a: {reason}"))
    for control in ablation.summary.get("controls", []):
        note = f"; {control['note']}" if control["note"] else ""
        console.print(
            escape(
                f"control({control['subset']}): {control['parameters']:,} parameters from {control['tensors']} "
                f"tensors, update energy {energy_ratio_text(control['energy_ratio'])}{note}"
            )
        )
