"""The terminal summaries: a comparison's most-changed components and depth bands; the overlap of runs."""

from __future__ import annotations

import math

import pandas as pd

from toolrl_analysis.analysis.diff.compare import Comparison
from toolrl_analysis.analysis.diff.overlap import Overlap
from toolrl_analysis.analysis.diff.tables import BANDS
from toolrl_analysis.errors import first_names


def render_comparison(comparison: Comparison, console, top: int = 15) -> None:
    """Rich tables: the most-changed (layer, component) rows and the band summary."""
    from rich.table import Table

    summary = comparison.summary
    console.print(
        f"[bold]{summary['base']['path']}[/] -> [bold]{summary['trained']['path']}[/]: "
        f"{summary['n_tensors']} tensors, {summary['n_parameters']:,} parameters, {summary['n_layers']} blocks "
        f"({summary['architecture']}); {summary['n_changed_rows']} of {summary['n_rows']} parameter tensors (or parts) changed, "
        f"overall relative change {summary['relative_frobenius_change']:.3g}"
    )
    for key, label in (("only_in_base", "only in base"), ("only_in_trained", "only in trained")):
        if summary[key]:
            console.print(
                f"[yellow]skipped {len(summary[key])} tensors {label}:[/] {first_names(summary[key])}"
            )
    if summary["unmapped"]:
        console.print(f"unmapped (component 'other'): {first_names(summary['unmapped'])}")
    if summary["spectral"] and summary.get("spectral_memory_matrix"):
        console.print(
            f"spectral: about {summary['spectral_memory_bytes'] / 2**20:,.0f} MiB for the largest matrix, "
            f"{summary['spectral_memory_matrix']} {summary['spectral_memory_shape']}"
        )

    table = Table(title=f"most-changed components (top {top})")
    for column in ("layer", "component", "numel", "rel.change", "share", "mean|dW|", "max|dW|", "cosine"):
        table.add_column(column, justify="left" if column == "component" else "right", no_wrap=True)
    for row in comparison.most_changed(top).itertuples():
        table.add_row(
            "-" if pd.isna(row.layer) else str(row.layer),
            row.component,
            f"{row.numel:,}",
            _fmt(row.relative_frobenius_change),
            _fmt(row.update_norm_share),
            _fmt(row.mean_abs_update),
            _fmt(row.max_abs_update),
            _fmt(row.cosine_similarity, digits=6),
        )
    console.print(table)

    if not comparison.bands.empty:
        bands = Table(title="update share by depth third (sum ||dW||^2)")
        bands.add_column("family")
        for band in BANDS:
            layers = comparison.bands.loc[comparison.bands["band"] == band, "layers"].iloc[0]
            bands.add_column(f"{band} ({layers})", justify="right")
        for family, frame in comparison.bands.groupby("family", sort=False):
            shares = dict(zip(frame["band"], frame["share_of_family"], strict=True))
            bands.add_row(family, *(f"{shares.get(band, 0.0):.1%}" for band in BANDS))
        console.print(bands)


def render_overlap(overlap: Overlap, console) -> None:
    """A rich table: per pair of runs, over every compared parameter, each overlap beside its chance."""
    from rich.table import Table

    summary = overlap.summary
    bf16 = summary["tolerance"] == "bf16"
    console.print(
        f"[bold]{summary['base']}[/]: {len(summary['runs'])} runs, {summary['n_tensors']} tensors, "
        f"{summary['n_parameters']:,} parameters; changed means |dW| > "
        + ("half a bf16 ULP of the base weight" if bf16 else f"{summary['tolerance']:g}")
    )
    for run in summary["runs"]:
        console.print(f"  {run['run']}: {run['changed']:,} entries changed ({run['density']:.3%})")
    table = Table(title="update overlap (chance: independent masks of the same densities)")
    for column in ("run a", "run b"):  # paths: folded, so that the numbers always fit
        table.add_column(column, overflow="fold")
    for column in ("|A∩B|/|A|", "|A∩B|/|B|", "Jaccard", "sign agree"):
        table.add_column(column, justify="right", no_wrap=True)
    for row in overlap.totals.itertuples():
        table.add_row(
            row.run_a,
            row.run_b,
            f"{_fmt(row.overlap_ab)} ({_fmt(row.overlap_ab_chance)})",
            f"{_fmt(row.overlap_ba)} ({_fmt(row.overlap_ba_chance)})",
            f"{_fmt(row.jaccard)} ({_fmt(row.jaccard_chance)})",
            f"{_fmt(row.sign_agreement)} (0.5)",
        )
    console.print(table)


def _fmt(value: float, digits: int = 3) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    return f"{value:.{digits}g}"
