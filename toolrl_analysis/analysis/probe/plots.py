"""Plots of the probe and attention frames (the command saves them under --out; notebooks call them too).
Like `plots.py`, each returns a matplotlib Figure built without pyplot."""

from __future__ import annotations

import pandas as pd
from matplotlib.figure import Figure

MODEL_COLOURS = {"base": "tab:blue", "trained": "tab:orange"}


def _band(
    ax, frame: pd.DataFrame, x: str, metric: str, label: str, colour: str, dashed: bool = False
) -> None:
    """A mean line with its 95% CI as a shaded band."""
    frame = frame.sort_values(x)
    ax.plot(frame[x], frame[f"{metric}_mean"], color=colour, linestyle="--" if dashed else "-",
            marker="o", markersize=3, label=label)  # fmt: skip
    ax.fill_between(frame[x], frame[f"{metric}_ci_low"], frame[f"{metric}_ci_high"], color=colour, alpha=0.2)


def plot_probe_curves(summary: pd.DataFrame, site: str = "resid") -> Figure:
    """Per task (columns): probe accuracy (top; dashed: control task; dotted grey: majority class) and
    selectivity (bottom) against the hidden-state index (0 = embeddings), base vs trained, mean ± 95% CI
    over seeds."""
    rows = summary[summary["site"] == site]
    tasks = list(dict.fromkeys(rows["task"]))
    figure = Figure(figsize=(3.6 * max(1, len(tasks)), 5.6))
    axes = figure.subplots(2, max(1, len(tasks)), squeeze=False, sharex="col")
    for column, task in enumerate(tasks):
        top, bottom = axes[0][column], axes[1][column]
        for model, frame in rows[rows["task"] == task].groupby("model", sort=False):
            colour = MODEL_COLOURS.get(str(model)) or f"C{len(top.lines) % 10}"
            _band(top, frame, "layer", "accuracy", f"{model}", colour)
            _band(top, frame, "layer", "control_accuracy", f"{model} control", colour, dashed=True)
            _band(bottom, frame, "layer", "selectivity", f"{model}", colour)
        majority = rows[rows["task"] == task].groupby("layer")["majority_accuracy_mean"].mean()
        top.plot(majority.index, majority.values, color="grey", linestyle=":", label="majority class")
        top.set_title(task)
        top.set_ylim(0, 1.02)
        bottom.axhline(0.0, color="grey", linewidth=0.8)
        bottom.set_xlabel("hidden state (0 = embeddings)")
        if column == 0:
            top.set_ylabel("probe accuracy")
            bottom.set_ylabel("selectivity")
        for ax in (top, bottom):
            ax.grid(alpha=0.3)
    if tasks:
        axes[0][0].legend(fontsize=7, frameon=False)
    figure.suptitle(f"linear probes on {site}, mean ± 95% CI over seeds")
    figure.tight_layout()
    return figure


def plot_attention_mass(by_block: pd.DataFrame) -> Figure:
    """Per region (panels): head-averaged attention mass from the decision token against the block, base vs
    trained, mean ± 95% CI over decision points."""
    regions = list(dict.fromkeys(by_block["region"]))
    figure = Figure(figsize=(3.2 * max(1, len(regions)), 3.2))
    axes = figure.subplots(1, max(1, len(regions)), squeeze=False, sharey=True)[0]
    for ax, region in zip(axes, regions, strict=False):
        for model, frame in by_block[by_block["region"] == region].groupby("model", sort=False):
            frame = frame.rename(
                columns={"mean": "mass_mean", "ci_low": "mass_ci_low", "ci_high": "mass_ci_high"}
            )
            _band(ax, frame, "block", "mass", str(model), MODEL_COLOURS.get(str(model), "C2"))
        ax.set_title(region.replace("_", " "))
        ax.set_xlabel("block")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("attention mass from the decision token")
    axes[0].legend(fontsize=7, frameon=False)
    figure.tight_layout()
    return figure


def plot_attention_difference(comparison: pd.DataFrame) -> Figure:
    """Per region: trained minus base attention mass per block (rows) and head (columns); a dot marks the
    differences that survive Holm's correction."""
    import seaborn as sns

    regions = list(dict.fromkeys(comparison["region"]))
    figure = Figure(figsize=(3.0 * max(1, len(regions)), 3.0))
    axes = figure.subplots(1, max(1, len(regions)), squeeze=False)[0]
    limit = float(comparison["diff_mean"].abs().max() or 1e-9)
    for ax, region in zip(axes, regions, strict=False):
        rows = comparison[comparison["region"] == region]
        table = rows.pivot(index="block", columns="head", values="diff_mean").sort_index(ascending=False)
        sns.heatmap(table, ax=ax, cmap="RdBu_r", vmin=-limit, vmax=limit, cbar=ax is axes[-1])
        marked = rows[rows["significant"]]
        order = list(table.index)
        ax.scatter(marked["head"] + 0.5, [order.index(b) + 0.5 for b in marked["block"]], s=8, color="black")
        ax.set_title(region.replace("_", " "))
    figure.suptitle("attention mass, trained - base (dots: significant after Holm)")
    figure.tight_layout()
    return figure
