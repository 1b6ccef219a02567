"""The terminal summary of a comparison: rich tables of the most-changed components and the depth bands."""

from __future__ import annotations

import math

import pandas as pd

from toolrl_analysis.analysis.diff.compare import Comparison
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


def _fmt(value: float, digits: int = 3) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    return f"{value:.{digits}g}"
