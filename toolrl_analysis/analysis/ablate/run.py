"""`ablate(...)`: plan the pair, save the hybrid and/or evaluate the variants; the `Ablation` it returns,
its files and its terminal tables."""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd

from toolrl_analysis.analysis.ablate.bootstrap import DEFAULT_REPLICATES, stratified_resamples
from toolrl_analysis.analysis.ablate.contrasts import correlation, ratio
from toolrl_analysis.analysis.ablate.control import energy_pairs_in_memory, update_energies
from toolrl_analysis.analysis.ablate.grid import (
    DEFAULT_CONTROLS,
    DEFAULT_RANK,
    Grid,
    Variant,
    custom_variants,
    grid_variants,
)
from toolrl_analysis.analysis.ablate.likelihood import changes, role_fractions
from toolrl_analysis.analysis.ablate.save import DEFAULT_SHARD_BYTES, output_format, save_spliced
from toolrl_analysis.analysis.ablate.splice import Operation, compile_operations
from toolrl_analysis.analysis.ablate.tables import RETAINED_METRICS, build_frames
from toolrl_analysis.analysis.ablate.variants import EvaluationOptions, evaluate_variants, pairs_in_memory
from toolrl_analysis.analysis.ablate.verdict import GridEntry, grid_verdicts
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
    likelihood: pd.DataFrame | None = None  # per variant x source x environment x role (likelihood.score)
    roles: pd.DataFrame | None = None  # per main variant x source x role: the fraction kept (role_fractions)
    # One object per subset of a grid (verdict.grid_verdicts): subset, verdict, reason, rule, the numbers.
    verdicts: list[dict[str, Any]] = field(default_factory=list)

    def to_document(self) -> dict[str, Any]:
        frames = {"variants": self.variants, "metrics": self.metrics}
        return {k: None if v is None else json_records(v) for k, v in frames.items()} | {
            "verdicts": json_clean(self.verdicts),
            "summary": json_clean(self.summary),
        }

    def write(self, out_dir: str | Path) -> list[Path]:
        """variants / metrics / episodes / meter / likelihood / roles_kept as CSV and parquet, ablation.json (with the
        verdicts), gain_retained.png and, for a grid, control_null.png."""
        from toolrl_analysis.analysis.plots import plot_control_null, plot_gain_retained

        frames = {
            "variants": self.variants,
            "metrics": self.metrics,
            "episodes": self.episodes,
            "meter": self.meter,
            "likelihood": self.likelihood,
            "roles_kept": self.roles,
        }
        written = write_results(out_dir, frames, self.to_document(), "ablation.json", parquet=True)
        out = Path(out_dir)
        figures = []
        if self.variants is not None:
            figures.append(("gain_retained.png", plot_gain_retained(self.variants)))
        if any("revert" in v or "transplant" in v for v in self.verdicts):
            figures.append(("control_null.png", plot_control_null(self.verdicts)))
        for name, figure in figures:
            figure.savefig(out / name, dpi=120, bbox_inches="tight")
            written.append(out / name)
        return written


def heldout_path(envs: str | Path) -> Path:
    """The environments an ablation reads: a .jsonl/.parquet file, or an environment set's `analysis.jsonl`
    (held-out worlds kept for the analyses), or its `test.jsonl` when the set has no analysis split."""
    path = Path(envs)
    if not path.is_dir():
        return path
    return path / "analysis.jsonl" if (path / "analysis.jsonl").is_file() else path / "test.jsonl"


def heldout_records(envs: str | Path, limit: int | None) -> list[EnvRecord]:
    """The held-out environments (`heldout_path`); with `limit`, that many balanced over scenarios
    (`limited`)."""
    if limit is not None and limit < 1:
        raise ConfigError("--limit must be a positive number of environments")
    return limited(read_envs(heldout_path(envs)), limit)


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
    controls: int = DEFAULT_CONTROLS,
    rank: int = DEFAULT_RANK,
    analysis_limit: int | None = None,
    subsets: Sequence[str] | None = None,
    progress: Progress | None = None,
) -> Ablation:
    """Splice (base, trained) as `operations` say and `--save` the hybrid, and/or evaluate the variants
    (the user's splice, or a grid) on held-out environments beside the base and the trained model: main
    variants played on `limit` environments (Solve-F1), every variant scored by the teacher-forced metric
    on `analysis_limit` of them (all when None; 0 turns it off). `subsets` restricts the grid (and, with
    `rank` 0, leaves out its rank-k block)."""
    _check_request(operations, grid, envs, save, metric)
    if replicates < 2:
        raise ConfigError("--bootstrap needs at least 2 replicates")
    if grid and controls < 2:
        raise ConfigError("--controls must be at least 2 (the controls' spread is the null distribution)")
    if rank < 0 or (rank == 0 and subsets is None):
        raise ConfigError(f"--rank must be at least 1, got {rank}")
    if analysis_limit is not None and analysis_limit < 0:
        raise ConfigError("--analysis-limit must be a number of environments (0: no teacher-forced metric)")
    records = heldout_records(envs, limit) if envs is not None else None
    analysis_records = None
    if envs is not None and analysis_limit != 0:
        analysis_records = heldout_records(envs, analysis_limit)
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
            energies = update_energies(energy_pairs_in_memory(pairs))
            chosen = {} if subsets is None else {"subsets": tuple(subsets)}
            built = grid_variants(grid, plan, energies, pairs, seed=seed, draws=controls, rank=rank, **chosen)
        else:
            built = Grid(custom_variants(plan, operations), [])
        variants = built.variants
        results = evaluate_variants(
            base_ckpt, trained_ckpt, plan, pairs, variants, records, options or EvaluationOptions(),
            analysis_records=analysis_records, progress=progress,
        )  # fmt: skip
    finally:
        base_ckpt.close()
        trained_ckpt.close()
    resamples = stratified_resamples([r.scenario for r in records], replicates, seed)
    metrics, frame = build_frames(variants, results, resamples, metric)
    scored = [r.likelihood.assign(variant=r.variant.name) for r in results if r.likelihood is not None]
    likelihood = pd.concat(scored, ignore_index=True) if scored else None
    summary.update(
        {
            "grid": grid,
            "operations": [op.label for op in operations],
            "environments": len(records),
            "envs": str(heldout_path(envs)),
            "analysis_environments": len(analysis_records or ()),
            "metric": metric,
            "bootstrap_replicates": replicates,
            "control_draws": controls if grid else 0,
            "rank": rank if grid else None,
            "controls": _control_summaries(variants),
            "grid_entries": [asdict(entry) for entry in built.entries],
        }
    )
    verdicts: list[dict[str, Any]] = []
    roles = None
    if likelihood is not None:
        roles = role_fractions(likelihood, [v.name for v in variants if v.main and v.buildable])
        values = changes(likelihood)
        frame = _with_fractions(frame, values)
        verdicts = grid_verdicts(built.entries, values) if built.entries and "trained" in values else []
        summary["tracking"] = _tracking(frame, values, metric)
    summary["seconds"] = time.perf_counter() - started
    played = [r.episodes.assign(variant=r.variant.name) for r in results if r.episodes is not None]
    meters = [r.meter.assign(variant=r.variant.name) for r in results if r.meter is not None]
    return Ablation(
        frame, metrics, summary, pd.concat(played, ignore_index=True),
        pd.concat(meters, ignore_index=True) if meters else None, likelihood, roles, verdicts,
    )  # fmt: skip


def verdicts_of(document: dict[str, Any], likelihood: pd.DataFrame) -> list[dict[str, Any]]:
    """The grid's verdicts recomputed from saved files (ablation.json and likelihood.csv), by the same rule."""
    entries = [GridEntry(**entry) for entry in (document.get("summary") or {}).get("grid_entries", [])]
    values = changes(likelihood)
    return grid_verdicts(entries, values) if entries and "trained" in values else []


def _with_fractions(frame: pd.DataFrame, values: dict[str, Any]) -> pd.DataFrame:
    """Each variant's fraction of the change in the teacher-forced metric, with Fieller's interval."""
    change = values.get("trained")
    rows = []
    for name in frame["variant"]:
        if name not in values or change is None:
            rows.append((float("nan"),) * 3)
            continue
        found = ratio(values[name], change)
        rows.append((found.value, found.low, found.high))
    columns = ["ll_retained", "ll_retained_low", "ll_retained_high"]
    return frame.assign(**{c: [r[i] for r in rows] for i, c in enumerate(columns)})


def _tracking(frame: pd.DataFrame, values: dict[str, Any], metric: str) -> dict[str, float]:
    """How well the teacher-forced metric tracks the played metric over the played variants: Pearson's r of
    (variant - base) in each (mean LL per environment; `metric`), with a Fisher-z interval. Differences, not
    fractions: a fraction of a gain within its noise is undefined, a difference never is."""
    played = frame[frame["played"] & frame["variant"].isin(list(values))]
    if metric not in played or "base" not in set(played["variant"]):
        return {"r": float("nan"), "low": float("nan"), "high": float("nan"), "n": 0}
    base = float(played.loc[played["variant"] == "base", metric].iloc[0])
    likelihood = [float(values[name].mean()) for name in played["variant"]]
    found = correlation(likelihood, played[metric].to_numpy(float) - base)
    return {**found, "metric": metric}


def _control_summaries(variants: Sequence[Variant]) -> list[dict[str, Any]]:
    """Per subset: how many controls were drawn, their parameter count and update energy, or why none."""
    out: dict[str, dict[str, Any]] = {}
    for variant in variants:
        if not variant.control or variant.kind != "revert" or variant.low_rank is not None:
            continue
        entry = out.setdefault(
            variant.subset, {"subset": variant.subset, "draws": 0, "parameters": 0, "energy_ratios": [],
                             "note": variant.note},
        )  # fmt: skip
        if variant.drawn is not None:
            entry["draws"] += 1
            entry["parameters"] = variant.drawn.parameters
            entry["energy_ratios"].append(variant.drawn.energy_ratio)
    return list(out.values())
