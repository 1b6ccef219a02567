"""Every figure of a run, drawn from its saved tables alone (no model runs), byte-identical for the same run.

PNGs carry no date; the one metadata field matplotlib writes by default (its version) is dropped too, so
the bytes depend only on the tables and the plotting code.
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from toolrl_analysis.report.tables import (
    ORDER,
    POLICIES,
    TRAINED,
    ablation_verdicts,
    read_csv,
    success_counts_of,
    tool_use_points,
)

DPI = 120
METADATA = {"Software": None}


def save_figure(figure, path: Path, tight: bool = True) -> Path:
    figure.savefig(path, dpi=DPI, bbox_inches="tight" if tight else None, metadata=METADATA)
    return path


def training_curves(run: Path, name: str = "metrics.csv") -> pd.DataFrame:
    """Every trained policy's per-iteration rows: metrics.csv (iterations 1..N), or validation.csv (from
    iteration 0, the policy before training)."""
    frames = [
        frame.assign(policy=POLICIES[policy])
        for policy in TRAINED
        if (frame := read_csv(run / policy / name)) is not None
    ]
    return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()


def pass_at_k_levels(run: Path) -> pd.DataFrame | None:
    """pass@k with intervals of the base and GRPO, on the environments both were sampled on."""
    from toolrl_analysis.pass_at_k import pass_at_k_table

    found = {policy: success_counts_of(run, policy) for policy in ("base", "grpo")}
    if any(v is None for v in found.values()):
        return None
    shared = set(found["base"][0]["env_id"]) & set(found["grpo"][0]["env_id"])
    frames = [
        pass_at_k_table(counts[counts["env_id"].isin(shared)]).assign(policy=POLICIES[policy])
        for policy, (counts, _) in found.items()
    ]
    return pd.concat(frames, ignore_index=True)


def write_figures(run: str | Path, out_dir: str | Path | None = None) -> list[Path]:
    """Solve-F1 per policy and scenario, the RL curves, the base's loss curve, the parameter-change
    heatmaps, layer profiles and band summaries, the ablation chart, the probe and attention plots, and the
    output divergence by token role."""
    from toolrl_analysis.analysis import plots
    from toolrl_analysis.analysis.probe.plots import (
        plot_attention_difference,
        plot_attention_mass,
        plot_probe_curves,
    )

    run = Path(run)
    out = Path(out_dir) if out_dir else run / "figures"
    out.mkdir(parents=True, exist_ok=True)
    written = []

    def save(figure, name: str) -> None:
        written.append(save_figure(figure, out / name))

    points = tool_use_points(run)
    if not points.empty:
        save(plots.plot_policy_scores(points, "solve_f1", order=ORDER), "solve_f1.png")
    if (levels := pass_at_k_levels(run)) is not None:
        save(plots.plot_pass_at_k(levels), "pass_at_k.png")
    curves = training_curves(run)
    if not curves.empty:
        save(plots.plot_training_curves(curves, training_curves(run, "validation.csv")), "rl_curves.png")
    if (loss := read_csv(run / "base" / "loss.csv")) is not None:
        save(plots.plot_loss_curve(loss), "base_loss.png")
    for policy in TRAINED:
        if (components := read_csv(run / "compare" / policy / "components.csv")) is not None:
            save(plots.plot_component_heatmap(components), f"heatmap_{policy}.png")
            save(plots.plot_layer_profile(components), f"layers_{policy}.png")
        if (bands := read_csv(run / "compare" / policy / "bands.csv")) is not None and not bands.empty:
            save(plots.plot_band_summary(bands), f"bands_{policy}.png")
        parameters = read_csv(run / "compare" / policy / "parameters.csv")
        if parameters is not None and "principal_energy_share" in parameters:
            save(plots.plot_update_geometry(parameters), f"geometry_{policy}.png")
    if (pairs := read_csv(run / "overlap" / "overlap.csv")) is not None and not pairs.empty:
        save(plots.plot_overlap_by_layer(pairs), "overlap.png")
    if (recovery := read_csv(run / "patch" / "recovery.csv")) is not None and not recovery.empty:
        from toolrl_analysis.analysis.patching.plots import plot_recovery

        save(plot_recovery(recovery), "patching.png")
    if (variants := read_csv(run / "ablate" / "variants.csv")) is not None:
        save(plots.plot_gain_retained(variants), "gain_retained.png")
    if grid := ablation_verdicts(run):
        save(plots.plot_control_null(grid), "control_null.png")
    probe = run / "probe"
    if (summary := read_csv(probe / "probe_summary.csv")) is not None:
        for site in dict.fromkeys(summary["site"]):
            save(plot_probe_curves(summary, site), f"probe_curves_{site}.png")
    if (by_block := read_csv(probe / "attention_by_block.csv")) is not None:
        save(plot_attention_mass(by_block), "attention_mass.png")
    if (heads := read_csv(probe / "head_comparison.csv")) is not None:
        save(plot_attention_difference(heads), "attention_difference.png")
    divergence = run / "judge" / "divergence"
    roles, deciles = read_csv(divergence / "by_role.csv"), read_csv(divergence / "by_entropy.csv")
    if roles is not None and deciles is not None:
        from toolrl_analysis.analysis.judge.plots import plot_divergence

        save(plot_divergence(roles, deciles), "divergence.png")
    return written
