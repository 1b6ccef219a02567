"""`toolrl-analyze probe BASE TRAINED --envs FILE`: where in the network does the trained model read its
context differently? Builds the probing dataset, captures both models' activations with one backend, fits
the per-layer probes with their controls, measures attention to context, and writes tidy frames and plots.
"""

from __future__ import annotations

import json
import re
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from toolrl_analysis.analysis.components import parse_layers
from toolrl_analysis.analysis.probe.activations import (
    SITES,
    backend_versions,
    capture_activations,
    check_backend,
    decoder_layers,
)
from toolrl_analysis.analysis.probe.attention import attention_by_block, compare_attention
from toolrl_analysis.analysis.probe.decision_points import (
    REGIONS,
    TASKS,
    ProbingDataset,
    build_dataset,
    oracle_conversations_for,
    rollout_conversations,
)
from toolrl_analysis.analysis.probe.fit import (
    ProbeSettings,
    compare_probes,
    probe_layers,
    summarise_probes,
)
from toolrl_analysis.config import require
from toolrl_analysis.episodes import EPISODES
from toolrl_analysis.errors import CheckpointError, EnvFormatError, SelectorError, UserError
from toolrl_analysis.models.placement import Placement
from toolrl_analysis.results import write_results

MODELS = ("base", "trained")


@dataclass
class ProbeConfig:
    tasks: list[str] = field(default_factory=lambda: list(TASKS))
    layers: str = "all"  # hidden states to probe: 0 = embeddings, k = after block k-1 (N, a-b, a:b, -4:, ...)
    sites: list[str] = field(default_factory=lambda: ["resid"])  # resid, attn_out, mlp_out
    seeds: int = 5  # environment splits (and control labellings); results are mean ± 95% CI over them
    test_fraction: float = 0.3  # share of environments held out from each probe
    C: float = 1.0  # inverse L2 strength of the logistic regression
    max_iter: int = 100  # L-BFGS iterations per batched fit
    min_class_count: int = 5  # rarer labels are dropped
    limit: int = 0  # use N environments, balanced over scenarios (0: all)
    correction_prob: float = 0.5  # oracle trajectories with a failed call (a useless response) first
    rollout_envs: int = 32  # environments each policy also plays greedily (0: oracle trajectories only)
    rollout_max_turns: int = 6
    rollout_max_new_tokens: int = EPISODES.max_new_tokens  # the budget every command plays episodes with
    batch_size: int = 4  # sequences per forward pass
    max_tokens: int = 4096  # longer conversations are left out
    seed: int = 0  # oracle trajectories (which calls fail first)

    def validate(self) -> None:
        unknown = [t for t in self.tasks if t not in TASKS]
        require(
            bool(self.tasks) and not unknown, "tasks", f"must be among {', '.join(TASKS)} (got {self.tasks})"
        )
        require(
            "resid" in self.sites and set(self.sites) <= set(SITES),
            "sites",
            f"must include resid, among {SITES}",
        )
        require(self.seeds >= 2, "seeds", "must be at least 2 (a CI needs two)")
        require(0.05 <= self.test_fraction <= 0.5, "test_fraction", "must be between 0.05 and 0.5")
        require(self.C > 0, "C", "must be positive")
        require(self.max_iter >= 10, "max_iter", "must be at least 10")
        require(self.min_class_count >= 2, "min_class_count", "must be at least 2")
        for key in ("limit", "rollout_envs"):
            require(getattr(self, key) >= 0, key, "must not be negative")
        require(0.0 <= self.correction_prob <= 1.0, "correction_prob", "must be between 0 and 1")
        require(self.rollout_max_turns >= 1, "rollout_max_turns", "must be at least 1")
        require(self.rollout_max_new_tokens >= 1, "rollout_max_new_tokens", "must be at least 1")
        require(self.batch_size >= 1, "batch_size", "must be at least 1")
        require(self.max_tokens >= 16, "max_tokens", "must be at least 16")

    def probe_settings(self) -> ProbeSettings:
        return ProbeSettings(self.seeds, self.test_fraction, self.C, self.max_iter, self.min_class_count)


@dataclass
class ProbeReport:
    info: dict[str, Any]
    dataset: pd.DataFrame  # rows, environments, classes per task and source
    probes: pd.DataFrame  # one row per model, task, site, layer, seed
    probe_summary: pd.DataFrame  # mean and CI over seeds
    probe_comparison: pd.DataFrame  # trained - base, paired over environments
    attention: pd.DataFrame  # head-averaged attention mass per model, block, region
    attention_comparison: pd.DataFrame  # trained - base per block and region (head-averaged)
    head_comparison: pd.DataFrame  # trained - base per block, head, region
    probe_environments: pd.DataFrame | None = None  # per model, task, site, layer, environment: the counts

    def frames(self) -> dict[str, pd.DataFrame]:
        return {
            "dataset": self.dataset,
            "probes": self.probes,
            "probe_summary": self.probe_summary,
            "probe_comparison": self.probe_comparison,
            "attention_by_block": self.attention,
            "attention_comparison": self.attention_comparison,
            "head_comparison": self.head_comparison,
            "probe_environments": self.probe_environments,
        }

    def write(self, out_dir: str | Path) -> list[Path]:
        """CSV per frame, probe.json, and the plots as PNG."""
        from toolrl_analysis.analysis.probe.plots import (
            plot_attention_difference,
            plot_attention_mass,
            plot_probe_curves,
        )

        out = Path(out_dir)
        written = write_results(out, self.frames())
        figures = {f"probe_curves_{site}.png": plot_probe_curves(self.probe_summary, site)
                   for site in self.info["config"]["sites"]}  # fmt: skip
        figures["attention_mass.png"] = plot_attention_mass(self.attention)
        figures["attention_difference.png"] = plot_attention_difference(self.head_comparison)
        for name, figure in figures.items():
            figure.savefig(out / name, dpi=120)
            written.append(out / name)
        self.info["written"] = [str(p) for p in [*written, out / "probe.json"]]
        return written + write_results(out, {}, self.to_document(), "probe.json")

    def to_document(self) -> dict[str, Any]:
        return {**self.info} | {name: _records(frame) for name, frame in self.frames().items()}


def _records(frame: pd.DataFrame) -> list[dict[str, Any]]:
    return json.loads(frame.to_json(orient="records"))  # NaN -> null


# ---------------------------------------------------------------------------------------------
# Inputs
# ---------------------------------------------------------------------------------------------
def load_records(envs: str | Path, limit: int = 0):
    """The environments of a .jsonl file (or a directory's test.jsonl); `limit`: that many, balanced over
    scenarios."""
    from toolrl_analysis.envs.schema import limited, read_envs

    path = Path(envs)
    if path.is_dir():
        path = path / "test.jsonl"
    if not path.is_file():
        raise EnvFormatError(f"no environments at {path}")
    return limited(read_envs(path), limit)


def probe_layer_indices(spec: str, n_blocks: int) -> list[int]:
    """Hidden-state indices 0..n_blocks (0 = embeddings) that a layer spec names."""
    sites = n_blocks + 1
    for number in re.findall(r"-?\d+", spec):
        if not -sites <= int(number) < sites:
            raise SelectorError(
                f"layer {number} is out of range: the model has hidden states 0 (embeddings) to {n_blocks}"
            )
    layers = parse_layers(spec, sites, f"--layers {spec}")
    return sorted(layers) if layers is not None else list(range(sites))


def _load_pair(base: str, trained: str, placement: Placement | None) -> dict[str, tuple[Any, Any]]:
    from toolrl_analysis.models.checkpoint import load_pair

    # Eager attention: the weights the attention analysis reads exist only there, and every backend then
    # runs the same kernels.
    (base_model, trained_model), tokenizer = load_pair(base, trained, "probing", "eager", placement)
    models = {"base": (base_model, tokenizer), "trained": (trained_model, tokenizer)}
    depths = {name: len(decoder_layers(model)) for name, (model, _) in models.items()}
    if depths["base"] != depths["trained"]:
        raise CheckpointError(
            f"base has {depths['base']} blocks and trained {depths['trained']}: a per-layer comparison "
            "needs the same depth"
        )
    return models


def _check_tasks(dataset: ProbingDataset, tasks: list[str], min_count: int, envs: str) -> None:
    for task in tasks:
        labels = dataset.rows.loc[dataset.rows["task"] == task, "label"]
        counts = labels.value_counts()
        if (counts >= min_count).sum() < 2:
            raise UserError(
                f"the environments in {envs} cannot label task {task!r}: "
                f"{len(labels)} rows, {int((counts >= min_count).sum())} classes with >= {min_count} rows "
                "(it needs meta.subquestions, and source_response needs multi-hop environments)"
            )


# ---------------------------------------------------------------------------------------------
# The command
# ---------------------------------------------------------------------------------------------
def run_probe(
    base: str | Path,
    trained: str | Path,
    envs: str | Path,
    *,
    backend: str = "hf",
    config: ProbeConfig | None = None,
    log: Callable[[str], None] = lambda line: None,
    placement: Placement | None = None,
) -> ProbeReport:
    from toolrl_analysis.envs.sandbox import Sandbox
    from toolrl_analysis.envs.schema import balanced_slice

    config = config or ProbeConfig()
    check_backend(backend)
    timings: dict[str, float] = {}
    started = time.perf_counter()
    records = load_records(envs, config.limit)
    models = _load_pair(str(base), str(trained), placement)
    n_blocks = len(decoder_layers(models["base"][0]))
    layers = probe_layer_indices(config.layers, n_blocks)
    tokenizer = models["base"][1]

    with Sandbox(workers=2) as sandbox:
        conversations = oracle_conversations_for(records, sandbox, config.seed, config.correction_prob)
        if config.rollout_envs:
            playable = balanced_slice([r for r in records if r.meta.get("subquestions")], config.rollout_envs)
            for name, (model, model_tokenizer) in models.items():
                log(f"rollouts of {name} on {len(playable)} environments")
                conversations += rollout_conversations(
                    model, model_tokenizer, playable, sandbox, name,
                    max_turns=config.rollout_max_turns, max_new_tokens=config.rollout_max_new_tokens,
                )  # fmt: skip
    positions_limit = int(
        getattr(models["base"][0].config, "max_position_embeddings", 0) or config.max_tokens
    )
    dataset = build_dataset(conversations, tokenizer, max_tokens=min(config.max_tokens, positions_limit))
    _check_tasks(dataset, config.tasks, config.min_class_count, str(envs))
    timings["dataset_s"] = time.perf_counter() - started

    log(f"capturing activations ({backend}) of {len(dataset.trajectories)} conversations")
    requests = dataset.capture_requests()
    features: dict[tuple[str, str], np.ndarray] = {}
    attention: dict[str, np.ndarray] = {}
    for name, (model, model_tokenizer) in models.items():
        captured = capture_activations(
            model, model_tokenizer, requests, backend=backend, sites=config.sites,
            n_regions=len(REGIONS), batch_size=config.batch_size,
        )  # fmt: skip
        for site in config.sites:
            features[(name, site)] = captured.site(site).numpy()
        attention[name] = captured.attention_mass.numpy()
    timings["capture_s"] = time.perf_counter() - started - timings["dataset_s"]

    log(f"fitting probes: {len(config.tasks)} tasks x {len(layers)} layers x {config.seeds} seeds x 2 models")
    index = dataset.positions().set_index(["trajectory", "position"])["feature"]
    frames, counts = [], []
    for task in config.tasks:
        rows = dataset.rows[dataset.rows["task"] == task]
        feature_rows = index.loc[list(zip(rows["trajectory"], rows["position"], strict=True))].to_numpy()
        for (name, site), values in features.items():
            result, per_environment = probe_layers(
                values[feature_rows], rows["label"], rows["env_id"], rows["control_type"], layers,
                config.probe_settings(),
            )  # fmt: skip
            frames.append(result.assign(model=name, task=task, site=site))
            counts.append(per_environment.assign(model=name, task=task, site=site))
    probes = pd.concat(frames, ignore_index=True)
    probe_environments = pd.concat(counts, ignore_index=True)
    timings["probes_s"] = time.perf_counter() - started - timings["dataset_s"] - timings["capture_s"]
    timings["total_s"] = time.perf_counter() - started

    point_envs = [t.env_id for t in dataset.trajectories for _ in t.decision_positions]
    info = {
        "base": str(base),
        "trained": str(trained),
        "envs": str(envs),
        "backend": backend,
        "versions": backend_versions(),
        "blocks": n_blocks,
        "layers": layers,
        "regions": list(REGIONS),
        "conversations": len(dataset.trajectories),
        "decision_points": int(sum(len(t.decision_positions) for t in dataset.trajectories)),
        "dropped": dataset.dropped,
        "config": asdict(config),
        "timings": timings,
    }
    return ProbeReport(
        info=info,
        dataset=dataset.summary(),
        probes=probes,
        probe_summary=summarise_probes(probes),
        probe_comparison=compare_probes(probe_environments),
        probe_environments=probe_environments,
        attention=attention_by_block(attention, REGIONS, point_envs),
        attention_comparison=compare_attention(attention, REGIONS, per_head=False, groups=point_envs),
        head_comparison=compare_attention(attention, REGIONS, groups=point_envs),
    )


def render_probe(report: ProbeReport, console) -> None:
    """Per task: the best layer of each model, and the layers where trained and base differ (Holm)."""
    from rich.table import Table

    info = report.info
    console.print(
        f"probe ({info['backend']}): {info['conversations']} conversations, {info['decision_points']} decision "
        f"points, hidden states {info['layers'][0]}-{info['layers'][-1]} "
        f"({info['timings']['total_s']:.0f}s)"
    )
    table = Table(
        "task", "site", "base best layer", "trained best layer", "differs at (trained - base)", "median MDE"
    )
    summary, comparison = report.probe_summary, report.probe_comparison
    for (task, site), rows in summary.groupby(["task", "site"], sort=False):
        best = {}
        for model in MODELS:
            frame = rows[rows["model"] == model]
            top = frame.loc[frame["accuracy_mean"].idxmax()]
            best[model] = (
                f"{int(top['layer'])}: {top['accuracy_mean']:.2f} "
                f"[{top['accuracy_ci_low']:.2f}, {top['accuracy_ci_high']:.2f}]"
            )
        differs = comparison[
            (comparison["task"] == task) & (comparison["site"] == site) & comparison["significant"]
        ]
        text = (
            ", ".join(f"{r.metric} @{r.layer} {r.diff_mean:+.2f}" for r in differs.itertuples()) or "nowhere"
        )
        mde = comparison.loc[
            (comparison["task"] == task)
            & (comparison["site"] == site)
            & (comparison["metric"] == "selectivity"),
            "mde",
        ].median()
        table.add_row(task, site, best["base"], best["trained"], text, f"{mde:.3f}")
    console.print(table)
    table = Table(
        "attention from the decision token to", "base", "trained", "trained - base [95% CI] per block"
    )
    for region, rows in report.attention_comparison.groupby("region", sort=False):
        cells = [f"{r.block}: {r.diff_mean:+.3f} [{r.diff_ci_low:+.3f}, {r.diff_ci_high:+.3f}]{'*' if r.significant else ''}"
                 for r in rows.itertuples()]  # fmt: skip
        table.add_row(
            region, f"{rows['base_mean'].mean():.3f}", f"{rows['trained_mean'].mean():.3f}", "\n".join(cells)
        )
    console.print(table)
    heads = report.head_comparison
    console.print(f"heads whose attention differs after Holm's correction: {int(heads['significant'].sum())} of {len(heads)} "
                  "(head_comparison.csv); * marks a block that differs")  # fmt: skip
