"""Plots as plain functions of the analysis DataFrames (docs/architecture.md, "Analysis"): notebooks,
figures/ and the CLI share them. Each returns a matplotlib Figure built without pyplot, so no global state or GUI backend
is involved; callers save it (`fig.savefig(path)`) or display it.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pandas as pd
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from toolrl_analysis.analysis.components import COMPONENTS, component_family

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


OUTSIDE = "outside blocks"  # the heatmap's row for embed, lm_head and the final norm


def _heatmap_table(components: pd.DataFrame, metric: str) -> pd.DataFrame:
    """layer x component, top block first; the parameters outside the blocks (embedding, head, final norm) in
    a row of their own at the bottom, where the embedding sits."""
    rows = components.assign(row=components["layer"].map(lambda v: OUTSIDE if pd.isna(v) else str(int(v))))
    table = rows.pivot_table(index="row", columns="component", values=metric, aggfunc="sum")
    blocks = sorted((r for r in table.index if r != OUTSIDE), key=int, reverse=True)
    order = blocks + ([OUTSIDE] if OUTSIDE in table.index else [])
    return table.reindex(index=order, columns=_ordered_components(rows["component"])).astype(float)


def plot_component_heatmap(
    components: pd.DataFrame,
    metric: str = "relative_frobenius_change",
    *,
    title: str | None = None,
    annotate: bool | None = None,
    share: bool = True,
) -> Figure:
    """Heatmap of `metric` with one row per block (layer 0 at the bottom, then the parameters outside the
    blocks: embedding, head, final norm) and one column per component: the paper's layer-by-component
    picture of what training changed. With `share` (and the column present), a second panel shows each
    cell's share of the whole squared update, where a large matrix that moved little still counts."""
    import seaborn as sns

    panels = [metric]
    if share and metric != "update_norm_share" and "update_norm_share" in components:
        panels.append("update_norm_share")
    if components.empty:
        figure = Figure(figsize=(7.5, 2.0))
        ax = figure.subplots()
        ax.text(0.5, 0.5, "no parameters", ha="center", va="center")
        ax.set_axis_off()
        return figure
    tables = [_heatmap_table(components, name) for name in panels]
    figure = Figure(figsize=(7.5 * len(panels), 1.8 + 0.32 * len(tables[0].index)), layout="constrained")
    axes = figure.subplots(1, len(panels), squeeze=False)[0]
    for ax, name, table in zip(axes, panels, tables, strict=True):
        sns.heatmap(
            table,
            ax=ax,
            cmap="viridis",
            annot=table.size <= 160 if annotate is None else annotate,
            fmt=".2g",
            annot_kws={"fontsize": 7},
            cbar_kws={"label": METRIC_LABELS.get(name, name)},
        )
        ax.set_xlabel("component")
        ax.set_ylabel("layer")
        ax.set_title(METRIC_LABELS.get(name, name), fontsize=9)
    figure.suptitle(title or "what training changed, per layer and component (blank: no such parameter)")
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
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # blocks are whole numbers
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
    """Grouped bars: for each component family, its update share per block in the lower / middle / upper
    third of the blocks (the band's share divided by its number of blocks, so that a band of two blocks does
    not look twice as concentrated as a band of one). Equal bars: spread evenly along the depth."""
    figure = Figure(figsize=(6.0, 3.8), layout="constrained")
    ax = figure.subplots()
    per_block = "n_blocks" in bands and value.startswith("share")
    values = bands.assign(shown=bands[value] / bands["n_blocks"].clip(lower=1) if per_block else bands[value])
    table = values.pivot(index="family", columns="band", values="shown")
    table = table.reindex(columns=[b for b in ("lower", "middle", "upper") if b in table.columns])
    blocks = values.drop_duplicates("band").set_index("band")
    width = 0.8 / max(1, len(table.columns))
    for i, band in enumerate(table.columns):
        positions = [x + (i - (len(table.columns) - 1) / 2) * width for x in range(len(table.index))]
        label = f"{band} third"
        if "layers" in blocks and band in blocks.index:
            label += f" (blocks {blocks.loc[band, 'layers']})"
        ax.bar(positions, table[band].fillna(0.0), width=width, label=label)
    ax.set_xticks(range(len(table.index)), list(table.index))
    ax.set_ylabel(value.replace("_", " ") + (" per block" if per_block else ""))
    ax.set_title(title or "where the update lies along the depth")
    ax.legend(frameon=False, fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.1), ncol=3)
    return figure


def plot_overlap_by_layer(pairs: pd.DataFrame, *, title: str | None = None) -> Figure:
    """Overlap of several runs' update masks per block, against chance (`overlap`'s per-(layer, component)
    frame, its counts summed over each block's components): the one-sided overlap |A n B| / |A|, the Jaccard
    index and the sign agreement, one colour per pair of runs, solid measured and dashed chance."""
    from toolrl_analysis.analysis.diff.overlap import COUNT_COLUMNS, overlap_ratios

    rows = _block_rows(pairs)
    panels = (
        ("overlap_ab", r"$|A \cap B| / |A|$"),
        ("jaccard", r"Jaccard $|A \cap B| / |A \cup B|$"),
        ("sign_agreement", r"sign agreement on $A \cap B$"),
    )
    figure = Figure(figsize=(12.0, 3.8), layout="constrained")
    axes = figure.subplots(1, len(panels))
    if rows.empty:
        for ax in axes:
            ax.text(0.5, 0.5, "no blocks", ha="center", va="center")
            ax.set_axis_off()
        return figure
    layers = overlap_ratios(
        rows.groupby(["run_a", "run_b", "layer"], sort=False, as_index=False)[list(COUNT_COLUMNS)].sum()
    )
    for i, ((run_a, run_b), frame) in enumerate(layers.groupby(["run_a", "run_b"], sort=False)):
        frame = frame.sort_values("layer")
        colour = f"C{i % 10}"  # matplotlib's default cycle
        for ax, (metric, _) in zip(axes, panels, strict=True):
            ax.plot(
                frame["layer"],
                frame[metric],
                marker="o",
                markersize=3,
                color=colour,
                label=f"{run_a} / {run_b}",
            )
            ax.plot(frame["layer"], frame[f"{metric}_chance"], linestyle="--", color=colour, alpha=0.7)
    for ax, (_, label) in zip(axes, panels, strict=True):
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_xlabel("layer")
        ax.set_ylabel(label)
        ax.set_ylim(0, 1.02)
        ax.grid(alpha=0.3)
    figure.legend(*axes[0].get_legend_handles_labels(), loc="outside lower center", fontsize=7, frameon=False)
    figure.suptitle(
        title
        or "where the runs' updates coincide, per block (dashed: independent masks of the same densities)"
    )
    return figure


# -- ablation ------------------------------------------------------------------------------------------
def plot_update_geometry(parameters: pd.DataFrame, *, title: str | None = None) -> Figure:
    """Per block, for the attention and MLP matrices: the principal-energy share of the update over its chance
    level (log scale; 1 = no more inside the base's top-k block than an update of i.i.d. entries) and the
    largest principal angle between the base's and the trained model's top-k subspaces (degrees)."""
    matrices = parameters.dropna(subset=["principal_energy_share", "layer"]).copy()
    matrices["family"] = matrices["component"].map(component_family)
    matrices["over_chance"] = matrices["principal_energy_share"] / matrices["principal_energy_chance"]
    figure = Figure(figsize=(10, 3.6), layout="constrained")
    energy, angle = figure.subplots(1, 2)
    for family, group in matrices[matrices["family"].isin(["attn", "mlp"])].groupby("family"):
        by_layer = group.groupby("layer").agg(
            over=("over_chance", "median"), angle=("principal_angle_max", "max")
        )
        energy.plot(by_layer.index, by_layer["over"], marker="o", label=family)
        angle.plot(by_layer.index, by_layer["angle"], marker="o", label=family)
    energy.axhline(1.0, color="grey", linestyle="--", linewidth=1)
    energy.set_yscale("log")
    energy.set(xlabel="block", ylabel="rho_k / chance (median)", title="update inside the base's top-k block")
    angle.set(xlabel="block", ylabel="degrees (max)", title="rotation of the top-k subspaces")
    for axis in (energy, angle):
        axis.legend(frameon=False)
        axis.xaxis.set_major_locator(MaxNLocator(integer=True))
    if title:
        figure.suptitle(title)
    return figure


def plot_gain_retained(variants: pd.DataFrame, *, title: str | None = None) -> Figure:
    """Fraction of the training's change each main variant keeps (ablate's `variants` frame), by subset:
    revert and transplant, in the teacher-forced log-likelihood (solid) and in Solve-F1 (hatched), with 95%
    Fieller intervals; the mean of the subset's matched controls (LL) as a diamond. A fraction that is
    undefined (the change within its noise, or not measured) is marked n/a."""
    figure = Figure(figsize=(9.0, 3.6))
    ax = figure.subplots()
    rows = variants[variants["kind"] != "reference"]
    main = rows[~rows["control"].astype(bool)]
    groups = list(dict.fromkeys(main["subset"].where(main["subset"] != "", main["variant"])))
    bars = [
        (kind, column) for kind in ("revert", "transplant") for column in ("ll_retained", "gain_retained")
    ]
    width = 0.8 / len(bars)
    labelled: set[str] = set()
    for x, group in enumerate(groups):
        for i, (kind, column) in enumerate(bars):
            chosen = main[(main["subset"] == group) & (main["kind"] == kind)]
            if group not in set(main["subset"]):  # a user's own splice: its two bars in the revert places
                chosen = main[main["variant"] == group] if kind == "revert" else chosen.iloc[0:0]
            if chosen.empty or column not in chosen:
                continue
            row = chosen.iloc[0]
            position = x + (i - (len(bars) - 1) / 2) * width
            label = f"{kind}, {'LL' if column == 'll_retained' else 'Solve-F1'}"
            if pd.isna(row[column]):
                ax.text(position, 0.02, "n/a", ha="center", va="bottom", fontsize=6, rotation=90)
                continue
            low, high = row.get(f"{column}_low"), row.get(f"{column}_high")
            # a degenerate interval (no spread at all) can sit a rounding error off its point
            error = None if pd.isna(low) else [[max(row[column] - low, 0.0)], [max(high - row[column], 0.0)]]
            ax.bar(
                position, row[column], width=width, color=_KIND_COLOURS[kind],
                hatch="//" if column == "gain_retained" else None, alpha=1.0 if column == "ll_retained" else 0.5,
                yerr=error, capsize=2, label=None if label in labelled else label,
            )  # fmt: skip
            labelled.add(label)
            controls = rows[(rows["subset"] == group) & (rows["kind"] == kind) & rows["control"].astype(bool)]
            if (
                column == "ll_retained"
                and "ll_retained" in controls
                and controls["ll_retained"].notna().any()
            ):
                name = "controls' mean (LL)"
                ax.plot(position, controls["ll_retained"].mean(), "D", color="black", markersize=4,
                        label=None if name in labelled else name)  # fmt: skip
                labelled.add(name)
    ax.axhline(0.0, color="black", linewidth=0.8)
    ax.axhline(1.0, color="black", linewidth=0.8, linestyle="--")
    ax.set_xticks(range(len(groups)), groups, rotation=30, ha="right", fontsize=8)
    ax.set_ylabel("fraction of the change kept")
    ax.set_title(title or "what the training's change depends on (dashed: the trained model)")
    if labelled:
        ax.legend(frameon=False, fontsize=8, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    return figure


_KIND_COLOURS = {"revert": "#c0504d", "transplant": "#4f81bd"}


def plot_control_null(verdicts: Sequence[dict]) -> Figure:
    """Each subset in its controls' null distribution: the fraction of the change kept by reverting (left)
    or transplanting (right) each matched control (dots), and by the subset itself (a bar with its 95%
    interval), one row per subset with controls; the verdict beside it."""
    shown = [v for v in verdicts if "revert" in v or "transplant" in v]
    figure = Figure(figsize=(9.0, 0.5 + 0.45 * max(len(shown), 1)))
    axes = figure.subplots(1, 2, sharey=True, squeeze=False)[0]
    for ax, side in zip(axes, ("revert", "transplant"), strict=True):
        for y, found in enumerate(shown):
            details, fraction = found.get(side), found.get(f"{side}_fraction")
            if not details or not fraction:
                continue
            values = details["controls"]["values"]
            jitter = (np.arange(len(values)) % 5 - 2) * 0.05
            ax.plot(values, y + jitter, "o", color="0.55", markersize=3)
            ax.plot([fraction["value"]] * 2, [y - 0.3, y + 0.3], color=_KIND_COLOURS[side], linewidth=2)
            if np.isfinite(fraction["low"]) and np.isfinite(fraction["high"]):
                ax.fill_betweenx([y - 0.3, y + 0.3], fraction["low"], fraction["high"],
                                 color=_KIND_COLOURS[side], alpha=0.2)  # fmt: skip
        ax.axvline(0.0, color="black", linewidth=0.6)
        ax.axvline(1.0, color="black", linewidth=0.6, linestyle="--")
        ax.set_xlabel(f"fraction of the change kept ({side})")
    axes[0].set_yticks(range(len(shown)), [f"{v['subset']}: {v['verdict']}" for v in shown], fontsize=8)
    axes[0].invert_yaxis()
    figure.suptitle("subsets (bars, 95% interval) against their matched controls (dots)", fontsize=10)
    return figure


# -- training and evaluation --------------------------------------------------------------------------
def plot_policy_scores(
    table: pd.DataFrame, metric: str = "solve_f1", order: list[str] | None = None
) -> Figure:
    """Grouped bars of `metric` per scenario, one bar per policy (base vs trained): the paper's table. With
    `low` and `high` columns (a 95% interval over environments) each bar carries its interval."""
    figure = Figure(figsize=(8, 3.2), layout="constrained")
    ax = figure.subplots()
    present = [s for s in (order or sorted(table["scenario"].unique())) if s in set(table["scenario"])]
    policies = list(dict.fromkeys(table["policy"]))
    width = 0.8 / max(1, len(policies))
    for i, policy in enumerate(policies):
        rows = table[table["policy"] == policy].set_index("scenario").reindex(present)
        positions = [x + (i - (len(policies) - 1) / 2) * width for x in range(len(present))]
        error = None
        if {"low", "high"} <= set(rows.columns):
            error = [(rows[metric] - rows["low"]).clip(lower=0), (rows["high"] - rows[metric]).clip(lower=0)]
        ax.bar(positions, rows[metric], width=width, yerr=error, capsize=2, label=str(policy))
    ax.set_xticks(range(len(present)), present)
    ax.set_ylim(0, 1)
    ax.set_ylabel({"solve_p": "Solve-P", "solve_r": "Solve-R", "solve_f1": "Solve-F1"}.get(metric, metric))
    ax.tick_params(axis="x", labelrotation=15)
    ax.legend(frameon=False, fontsize=8)
    ax.set_title("test split (held-out worlds); bars: 95% intervals over environments", fontsize=9)
    return figure


def plot_training_curves(curves: pd.DataFrame, validation: pd.DataFrame | None = None) -> Figure:
    """Mean step reward per iteration and, where measured, validation Solve-F1 from iteration 0 (the policy
    before training), one line per policy, with ±1 standard error where the run saved it. Both axes start at
    a natural origin, so a small change looks small."""
    if validation is None or validation.empty or "val_f1_overall" not in validation:
        validation = curves if "val_f1_overall" in curves else None
    panels = ["reward_mean"] + (["val_f1_overall"] if validation is not None else [])
    figure = Figure(figsize=(4.6 * len(panels), 3.2), layout="constrained")
    axes = figure.subplots(1, len(panels), squeeze=False)[0]
    for ax, column in zip(axes, panels, strict=True):
        source = curves if column == "reward_mean" else validation
        for policy, frame in source.groupby("policy", sort=False):
            points = frame.dropna(subset=[column]).sort_values("iteration")
            if column == "reward_mean":
                ax.plot(points["iteration"], points[column], label=str(policy))
                continue
            error = points.get(f"{column}_se")  # ±1 s.e., where the run saved it
            ax.errorbar(
                points["iteration"], points[column], yerr=error, marker="o", capsize=2, label=str(policy)
            )
        if column == "val_f1_overall":
            top = float(source[column].max()) if not source[column].dropna().empty else 1.0
            ax.set_ylim(0, min(1.0, max(0.1, 1.3 * top)))
            ax.set_ylabel("validation Solve-F1" + (" (± s.e.)" if f"{column}_se" in source else ""))
        else:
            ax.set_ylabel("mean step reward")
        ax.set_xlabel("iteration")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.legend(frameon=False, fontsize=8)
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
