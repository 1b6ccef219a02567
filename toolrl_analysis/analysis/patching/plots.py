"""The patching heatmaps. Like `plots.py`, a function of the saved table returning a matplotlib Figure built
without pyplot."""

from __future__ import annotations

import pandas as pd
from matplotlib.figure import Figure

from toolrl_analysis.analysis.probe.activations import SITES


def _panels(recovery: pd.DataFrame) -> list[tuple[str, str]]:
    """(position set, column): each set's recovery, then its random control where it has one."""
    out = []
    for name, rows in recovery.groupby("positions", sort=False):
        out.append((name, "recovery"))
        if rows["control_recovery"].notna().any():
            out.append((name, "control_recovery"))
    return out


def plot_recovery(recovery: pd.DataFrame) -> Figure:
    """Rows: sufficiency, necessity; columns: each position set and its random control. Each panel is
    block (top block first) x site, coloured by recovery from 0 to 1 (numbers outside that range are
    written as they are; blank: undefined)."""
    import seaborn as sns

    directions = list(dict.fromkeys(recovery["direction"]))
    panels = _panels(recovery)
    if recovery.empty or not panels:
        figure = Figure(figsize=(6, 2))
        ax = figure.subplots()
        ax.text(0.5, 0.5, "nothing patched", ha="center", va="center")
        ax.set_axis_off()
        return figure
    n_layers = recovery["layer"].nunique()
    sites = [s for s in SITES if s in set(recovery["site"])]
    figure = Figure(
        figsize=(1.2 + 0.9 * len(sites) * len(panels), 1.0 + len(directions) * (0.9 + 0.32 * n_layers)),
        layout="constrained",
    )
    axes = figure.subplots(len(directions), len(panels), squeeze=False)
    for i, direction in enumerate(directions):
        mine = recovery[recovery["direction"] == direction]
        for j, (name, column) in enumerate(panels):
            rows = mine[mine["positions"] == name]
            table = rows.pivot_table(index="layer", columns="site", values=column, dropna=False)
            table = table.reindex(index=sorted(table.index, reverse=True), columns=sites).astype(float)
            ax = axes[i][j]
            sns.heatmap(table, ax=ax, cmap="viridis", vmin=0.0, vmax=1.0, annot=True, fmt=".2f", cbar=False,
                        annot_kws={"fontsize": 7})  # fmt: skip
            label = name if column == "recovery" else f"{name}: random"
            ax.set_title(f"{direction}, {label}", fontsize=9)
            ax.set_xlabel("site" if i == len(directions) - 1 else "")
            ax.set_ylabel("block" if j == 0 else "")
    # one colour bar for every panel, so each panel keeps the same width
    figure.colorbar(axes[0][0].collections[0], ax=axes, shrink=0.8, label="recovery")
    figure.suptitle("recovery of the training's change in log p(tool-call tokens)", fontsize=10)
    return figure
