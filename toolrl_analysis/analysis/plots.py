"""Plots as plain functions of the analysis DataFrames (docs/architecture.md, "Analysis"): notebooks,
figures/ and the CLI share them. Each returns a matplotlib Figure built without pyplot, so no global state or GUI backend
is involved; callers save it (`fig.savefig(path)`) or display it.
"""

from __future__ import annotations

import pandas as pd
from matplotlib.figure import Figure

from toolrl_analysis.analysis.components import COMPONENTS

METRIC_LABELS = {
    "relative_frobenius_change": r"relative change $\|\Delta W\|_F / \|W\|_F$",
    "update_norm": r"$\|\Delta W\|_F$",
    "mean_abs_update": r"mean $|\Delta W|$",
    "update_norm_share": r"share of $\sum \|\Delta W\|_F^2$",
}


def _ordered_components(components: pd.Series) -> list[str]:
    present = list(dict.fromkeys(components))
    order = {c: i for i, c in enumerate(COMPONENTS)}
    return sorted(present, key=lambda c: (order.get(c, len(order)), c))


def _block_rows(frame: pd.DataFrame) -> pd.DataFrame:
    return frame[frame["layer"].notna()].assign(layer=lambda f: f["layer"].astype(int))


def plot_component_heatmap(
    components: pd.DataFrame,
    metric: str = "relative_frobenius_change",
    *,
    title: str | None = None,
    annotate: bool | None = None,
) -> Figure:
    """Heatmap of `metric` with one row per block (layer 0 at the bottom) and one column per component:
    the paper's layer-by-component picture of what training changed. Parameters outside the blocks
    (embeddings, head, final norm) have no layer and are left out."""
    import seaborn as sns

    rows = _block_rows(components)
    figure = Figure(figsize=(7.5, 1.2 + 0.32 * max(1, rows["layer"].nunique())))
    ax = figure.subplots()
    if rows.empty:
        ax.text(0.5, 0.5, "no block parameters", ha="center", va="center")
        ax.set_axis_off()
        return figure
    table = rows.pivot_table(index="layer", columns="component", values=metric, aggfunc="sum")
    table = table.reindex(columns=_ordered_components(rows["component"])).sort_index(ascending=False)
    if annotate is None:
        annotate = table.size <= 120
    sns.heatmap(
        table.astype(float),
        ax=ax,
        cmap="viridis",
        annot=annotate,
        fmt=".2g",
        annot_kws={"fontsize": 7},
        cbar_kws={"label": METRIC_LABELS.get(metric, metric)},
    )
    ax.set_xlabel("component")
    ax.set_ylabel("layer")
    ax.set_title(title or f"{METRIC_LABELS.get(metric, metric)} per layer and component")
    return figure


def plot_layer_profile(
    components: pd.DataFrame,
    metric: str = "relative_frobenius_change",
    *,
    by: str = "component",
    title: str | None = None,
    log: bool = False,
) -> Figure:
    """`metric` against layer, one line per component (by='component') or per family (by='family',
    aggregating with norms added in squares)."""
    rows = _block_rows(components)
    figure = Figure(figsize=(7.5, 4.0))
    ax = figure.subplots()
    if by == "family":
        rows = rows.assign(family=rows["component"].str.split(".").str[0])
        grouped = (
            rows.assign(update_sq=rows["update_norm"] ** 2, base_sq=rows["base_norm"] ** 2)
            .groupby(["family", "layer"], as_index=False)[["update_sq", "base_sq"]]
            .sum()
        )
        grouped[metric] = (grouped["update_sq"] / grouped["base_sq"]) ** 0.5
        for family, frame in grouped.groupby("family"):
            ax.plot(frame["layer"], frame[metric], marker="o", label=family)
    else:
        for component in _ordered_components(rows["component"]):
            frame = rows[rows["component"] == component].sort_values("layer")
            ax.plot(frame["layer"], frame[metric], marker="o", markersize=3, label=component)
    if log:
        ax.set_yscale("log")
    ax.set_xlabel("layer")
    ax.set_ylabel(METRIC_LABELS.get(metric, metric))
    ax.set_title(title or f"{METRIC_LABELS.get(metric, metric)} by layer")
    if ax.lines:
        ax.legend(fontsize=7, ncol=2, frameon=False)
    ax.grid(alpha=0.3)
    return figure


def plot_band_summary(
    bands: pd.DataFrame, value: str = "share_of_family", *, title: str | None = None
) -> Figure:
    """Grouped bars: for each component family, the share of its update in the lower / middle / upper
    third of the blocks."""
    figure = Figure(figsize=(6.0, 3.6))
    ax = figure.subplots()
    table = bands.pivot(index="family", columns="band", values=value)
    table = table.reindex(columns=[b for b in ("lower", "middle", "upper") if b in table.columns])
    width = 0.8 / max(1, len(table.columns))
    for i, band in enumerate(table.columns):
        positions = [x + (i - (len(table.columns) - 1) / 2) * width for x in range(len(table.index))]
        ax.bar(positions, table[band].fillna(0.0), width=width, label=f"{band} third")
    ax.set_xticks(range(len(table.index)), list(table.index))
    ax.set_ylabel(value.replace("_", " "))
    ax.set_title(title or "where the update lies along the depth")
    ax.legend(frameon=False, fontsize=8)
    return figure


# -- ablation ------------------------------------------------------------------------------------------
_ABLATION_BARS = (  # (kind, control, colour, hatch) within each subset's group, the control beside its subset
    ("revert", False, "#3b6ea5", None),
    ("revert", True, "#9aa5b1", "//"),
    ("transplant", False, "#d08c2f", None),
    ("transplant", True, "#c8b9a3", "//"),
)


def plot_gain_retained(variants: pd.DataFrame, *, title: str | None = None) -> Figure:
    """Fraction of the training gain each variant retains (ablate's `variants` frame), grouped by subset:
    revert, its size-matched control, transplant, its control; 95% bootstrap intervals as error bars. A
    variant whose fraction is undefined (the gain within its noise, or not evaluated) is marked n/a."""
    figure = Figure(figsize=(8.0, 3.6))
    ax = figure.subplots()
    rows = variants[variants["kind"] != "reference"]
    groups = list(dict.fromkeys(rows["subset"].where(rows["subset"] != "", rows["variant"])))
    width = 0.8 / len(_ABLATION_BARS)
    labelled: set[tuple[str, bool]] = set()
    for x, group in enumerate(groups):
        for i, (kind, control, colour, hatch) in enumerate(_ABLATION_BARS):
            chosen = rows[(rows["subset"] == group) & (rows["kind"] == kind) & (rows["control"] == control)]
            if group not in set(rows["subset"]) and i == 0:  # a user's own splice: one bar
                chosen = rows[rows["variant"] == group]
            if chosen.empty:
                continue
            row = chosen.iloc[0]
            position = x + (i - (len(_ABLATION_BARS) - 1) / 2) * width
            label = f"{kind} {'control' if control else 'subset'}"
            if pd.isna(row["gain_retained"]):
                ax.text(position, 0.02, "n/a", ha="center", va="bottom", fontsize=7, rotation=90)
                continue
            error = [
                [row["gain_retained"] - row["gain_retained_low"]],
                [row["gain_retained_high"] - row["gain_retained"]],
            ]
            ax.bar(
                position, row["gain_retained"], width=width, color=colour, hatch=hatch, yerr=error, capsize=2,
                label=None if (kind, control) in labelled else label,
            )  # fmt: skip
            labelled.add((kind, control))
    ax.axhline(0.0, color="black", linewidth=0.8)
    ax.axhline(1.0, color="black", linewidth=0.8, linestyle="--")
    ax.set_xticks(range(len(groups)), groups)
    metric = (
        variants["retained_metric"].iloc[0] if "retained_metric" in variants and len(variants) else "gain"
    )
    ax.set_ylabel(f"fraction of the {metric} gain retained")
    ax.set_title(title or "what the training gain depends on (dashed: the trained model)")
    if labelled:
        ax.legend(frameon=False, fontsize=8, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    return figure


# -- training and evaluation --------------------------------------------------------------------------
def plot_policy_scores(
    table: pd.DataFrame, metric: str = "solve_f1", order: list[str] | None = None
) -> Figure:
    """Grouped bars of `metric` per scenario, one bar per policy (base vs trained): the paper's table."""
    import seaborn as sns

    figure = Figure(figsize=(8, 3.2))
    ax = figure.subplots()
    present = [s for s in (order or sorted(table["scenario"].unique())) if s in set(table["scenario"])]
    sns.barplot(data=table, x="scenario", y=metric, hue="policy", order=present, ax=ax)
    ax.set_ylim(0, 1)
    ax.set_ylabel({"solve_p": "Solve-P", "solve_r": "Solve-R", "solve_f1": "Solve-F1"}.get(metric, metric))
    ax.set_xlabel("")
    ax.tick_params(axis="x", labelrotation=15)
    return figure


def plot_training_curves(curves: pd.DataFrame) -> Figure:
    """Mean step reward per iteration and, where measured, validation Solve-F1, one line per policy."""
    panels = ["reward_mean"] + (["val_f1_overall"] if "val_f1_overall" in curves else [])
    figure = Figure(figsize=(4.2 * len(panels), 3.0))
    axes = figure.subplots(1, len(panels), squeeze=False)[0]
    for ax, column in zip(axes, panels, strict=True):
        for policy, frame in curves.groupby("policy"):
            points = frame[["iteration", column]].dropna()
            ax.plot(
                points["iteration"],
                points[column],
                marker="o" if column != "reward_mean" else None,
                label=str(policy),
            )
        ax.set_xlabel("iteration")
        ax.set_ylabel(column.replace("_", " "))
        ax.legend()
    return figure


def plot_loss_curve(curve: pd.DataFrame) -> Figure:
    """Warm-up loss (assistant tokens) against optimiser steps."""
    figure = Figure(figsize=(4.5, 3.0))
    ax = figure.subplots()
    ax.plot(curve["step"], curve["loss"])
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.set_yscale("log")
    return figure


def plot_pass_at_k(levels: pd.DataFrame) -> Figure:
    """pass@k against k (log scale), one panel per scenario and overall, one line per policy with its 95%
    interval over environments. `levels`: pass_at_k.pass_at_k_table frames with a `policy` column."""
    scopes = list(dict.fromkeys(levels["scenario"]))
    figure = Figure(figsize=(3.0 * len(scopes), 3.0))
    axes = figure.subplots(1, len(scopes), sharey=True, squeeze=False)[0]
    for ax, scope in zip(axes, scopes, strict=True):
        for policy, frame in levels[levels["scenario"] == scope].groupby("policy", sort=False):
            frame = frame.sort_values("k")
            ax.plot(frame["k"], frame["pass_at_k"], marker="o", markersize=3, label=policy)
            ax.fill_between(frame["k"], frame["low"].clip(0, 1), frame["high"].clip(0, 1), alpha=0.2)
        ax.set_xscale("log", base=2)
        ks = sorted(levels["k"].unique())
        ax.set_xticks(ks, [str(k) for k in ks])
        ax.set_title(scope.replace("_", " "), fontsize=9)
        ax.set_xlabel("k")
        ax.set_ylim(0, 1)
    axes[0].set_ylabel("pass@k (Solve-F1 success)")
    axes[0].legend(fontsize=8)
    return figure
