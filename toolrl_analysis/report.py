"""Figures and report.md of a reproduce run, regenerated from the run's saved files alone."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd

from toolrl_analysis.envs.schema import SCENARIOS

POLICIES = {"base": "base (warm-up)", "grpo": "GRPO", "reinforce_pp": "Reinforce++"}


def tool_use_table(run: Path) -> pd.DataFrame:
    """One row per (policy, scenario) with Solve-P/R/F1, from eval/<policy>/tool_use.csv."""
    frames = []
    for policy in POLICIES:
        path = run / "eval" / policy / "tool_use.csv"
        if path.exists():
            frame = pd.read_csv(path)
            frames.append(frame.assign(policy=policy))
    if not frames:
        return pd.DataFrame(columns=["policy", "scenario", "solve_p", "solve_r", "solve_f1"])
    tidy = pd.concat(frames)
    wide = tidy.pivot_table(index=["policy", "scenario"], columns="metric", values="value").reset_index()
    return wide


def general_table(run: Path) -> pd.DataFrame:
    frames = []
    for policy in POLICIES:
        path = run / "eval" / policy / "general.csv"
        if path.exists():
            frames.append(pd.read_csv(path).assign(policy=policy))
    return pd.concat(frames) if frames else pd.DataFrame(columns=["policy", "suite", "metric", "value"])


def training_curves(run: Path) -> pd.DataFrame:
    frames = []
    for policy in ("grpo", "reinforce_pp"):
        path = run / policy / "metrics.csv"
        if path.exists():
            frames.append(pd.read_csv(path).assign(policy=policy))
    return pd.concat(frames) if frames else pd.DataFrame()


def write_figures(run: str | Path, out_dir: str | Path | None = None) -> list[Path]:
    """Every figure of the run: Solve-F1 before/after, RL curves, the base loss curve (the compare step
    wrote its own heatmaps under compare/<policy>/, which are regenerated here too)."""
    from toolrl_analysis.analysis import plots

    run = Path(run)
    out = Path(out_dir) if out_dir else run / "figures"
    out.mkdir(parents=True, exist_ok=True)
    written = []

    def save(figure, name: str) -> None:
        figure.savefig(out / name, dpi=120, bbox_inches="tight")
        written.append(out / name)

    table = tool_use_table(run)
    if not table.empty:
        save(plots.plot_policy_scores(table, "solve_f1", order=list(SCENARIOS) + ["overall"]), "solve_f1.png")
    curves = training_curves(run)
    if not curves.empty:
        save(plots.plot_training_curves(curves), "rl_curves.png")
    if (run / "base" / "loss.csv").exists():
        save(plots.plot_loss_curve(pd.read_csv(run / "base" / "loss.csv")), "base_loss.png")
    for policy in ("grpo", "reinforce_pp"):
        components = run / "compare" / policy / "components.csv"
        if components.exists():
            frame = pd.read_csv(components)
            save(plots.plot_component_heatmap(frame), f"heatmap_{policy}.png")
            save(plots.plot_layer_profile(frame), f"layers_{policy}.png")
        bands = run / "compare" / policy / "bands.csv"
        if bands.exists() and not (frame := pd.read_csv(bands)).empty:
            save(plots.plot_band_summary(frame), f"bands_{policy}.png")
    return written


def _markdown(frame: pd.DataFrame, digits: int = 3) -> str:
    frame = frame.copy()
    for column in frame.columns:
        if pd.api.types.is_float_dtype(frame[column]):
            frame[column] = frame[column].map(lambda v: f"{v:.{digits}f}")
    header = "| " + " | ".join(map(str, frame.columns)) + " |"
    rule = "|" + "---|" * len(frame.columns)
    rows = ["| " + " | ".join(map(str, row)) + " |" for row in frame.itertuples(index=False)]
    return "\n".join([header, rule, *rows])


def write_report(run: str | Path) -> Path:
    """report.md: what was built, the before/after table, general ability, and where the update went."""
    run = Path(run)
    lines = ["# toolrl-analysis reproduction", ""]
    manifest_path = run / "envs" / "manifest.json"
    if manifest_path.exists():
        manifest = json.loads(manifest_path.read_text())
        lines += [
            "## Environments",
            "",
            "```json",
            json.dumps(
                {k: manifest[k] for k in manifest if k in ("counts", "integration", "tools_per_environment")},
                indent=2,
            ),
            "```",
            "",
        ]
    table = tool_use_table(run)
    if not table.empty:
        lines += ["## Tool use (held-out test set, greedy, up to 20 turns)", ""]
        f1 = table.pivot_table(index="scenario", columns="policy", values="solve_f1")
        order = [s for s in [*SCENARIOS, "overall"] if s in f1.index]
        f1 = f1.loc[order, [p for p in POLICIES if p in f1.columns]].reset_index()
        lines += ["Solve-F1 per scenario:", "", _markdown(f1), ""]
        columns = ["policy", "scenario", "solve_p", "solve_r", "solve_f1"]
        overall = table[table["scenario"] == "overall"][[c for c in columns if c in table.columns]]
        lines += ["Overall Solve-P / R / F1:", "", _markdown(overall), ""]
    general = general_table(run)
    if not general.empty:
        wide = general.pivot_table(index=["suite", "metric"], columns="policy", values="value").reset_index()
        lines += ["## General capability (must not erode)", "", _markdown(wide, 4), ""]
    for policy in ("grpo", "reinforce_pp"):
        bands = run / "compare" / policy / "bands.csv"
        if bands.exists():
            lines += [
                f"## Where the {POLICIES[policy]} update went (share of squared update norm)",
                "",
                _markdown(pd.read_csv(bands), 3),
                "",
            ]
    figures = sorted((run / "figures").glob("*.png")) if (run / "figures").exists() else []
    if figures:
        lines += ["## Figures", ""] + [f"![{f.stem}](figures/{f.name})" for f in figures] + [""]
    timings = run / "timings.json"
    if timings.exists():
        lines += ["## Wall time per stage (s)", "", "```json", timings.read_text().strip(), "```", ""]
    path = run / "report.md"
    path.write_text("\n".join(lines))
    return path
