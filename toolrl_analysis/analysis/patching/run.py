"""`toolrl-analyze patch BASE TRAINED --envs DIR`: cross-model activation patching (CMAP, arXiv 2402.14811)
at decision tokens. Which block and site carries what RL changed in how the model writes its tool calls?

The trained model plays the held-out environments greedily (`texts`); on those token sequences each
direction (`measure.DIRECTIONS`) patches one site of one block at one position set, or at as many random
positions (the control), and scores the trained model's tool-call tokens; `summary` turns the per-environment
changes into recoveries with intervals over environments.

Cost: 2 directions x sites x blocks x (sets + controls x controlled sets) forward passes per batch of
conversations, plus one greedy episode per environment; the hf backend starts a patch of block L at block
L (`backends._HFRunner`). Every site of every block is captured at every position for one batch of both
models at a time (batch x tokens x width x 3 x blocks floats, twice). The embedded pair (4 blocks) with the
defaults below: 528 passes of 8 conversations of ~650 tokens, 152 s in all on 2 shared cores.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd

from toolrl_analysis.analysis.patching.backends import check_sites, patch_runner
from toolrl_analysis.analysis.patching.measure import DIRECTIONS, Progress, grid_size, measure
from toolrl_analysis.analysis.patching.summary import change_summary, headline, recovery_table
from toolrl_analysis.analysis.patching.texts import POSITION_SETS, PatchText, build_texts
from toolrl_analysis.analysis.probe.activations import SITES, backend_versions, decoder_layers
from toolrl_analysis.errors import CheckpointError, UserError

Log = Callable[[str], None]


@dataclass
class PatchConfig:
    sites: list[str] = field(default_factory=lambda: list(SITES))  # resid, attn_out, mlp_out
    positions: list[str] = field(default_factory=lambda: list(POSITION_SETS))  # decision, context, all
    # environments, balanced over scenarios: 16 keeps the embedded pair near 2.5 minutes on 2 cores
    limit: int | None = 16
    controls: int = 4  # random-position draws per controlled set (0: none); each costs a set's passes
    seed: int = 0  # the random draws
    batch_size: int = 8  # conversations per forward pass
    # torch threads for the grid (0: torch's default); measured on 2 shared cores, one thread ran a forward
    # pass of 8 x 700 tokens in 0.27 s and two in 1.2 s
    threads: int = 1

    def validate(self) -> None:
        unknown = [p for p in self.positions if p not in POSITION_SETS]
        if unknown or not self.positions:
            raise UserError(
                f"unknown position set {unknown[0]!r}; the sets are {', '.join(POSITION_SETS)}"
                if unknown
                else f"no position set: choose among {', '.join(POSITION_SETS)}"
            )
        if self.limit is not None and self.limit < 1:
            raise UserError(f"--limit must be at least 1, got {self.limit}")
        if self.controls < 0:
            raise UserError(f"--controls must be 0 or more, got {self.controls}")
        if self.threads < 0:
            raise UserError(f"--threads must be 0 (torch's default) or more, got {self.threads}")
        if self.batch_size < 1:
            raise UserError(f"the batch size must be at least 1, got {self.batch_size}")


class NothingToPatch(UserError):
    """No conversation holds a tool call of the trained model: there is no change to explain."""


@dataclass
class Patching:
    environments: pd.DataFrame  # per environment: tokens, targets, set sizes, lp_base, lp_trained, change
    patches: pd.DataFrame  # per environment x direction x set x draw x site x block (draw 0: the set itself)
    recovery: pd.DataFrame  # per direction x set x site x block, over environments
    summary: dict[str, Any] = field(default_factory=dict)

    def to_document(self) -> dict[str, Any]:
        from toolrl_analysis.results import json_clean, json_records

        return json_clean({"summary": self.summary, "headline": headline(self.recovery),
                           "recovery": json_records(self.recovery)})  # fmt: skip

    def write(self, out_dir: str | Path) -> list[Path]:
        """environments / patches / recovery as CSV, patch.json and recovery.png."""
        from toolrl_analysis.analysis.patching.plots import plot_recovery
        from toolrl_analysis.results import write_results

        frames = {"environments": self.environments, "patches": self.patches, "recovery": self.recovery}
        written = write_results(out_dir, frames, self.to_document(), "patch.json")
        figure = plot_recovery(self.recovery)
        path = Path(out_dir) / "recovery.png"
        figure.savefig(path, dpi=120)
        return [*written, path]


def _check_pair(base: Any, trained: Any) -> int:
    """The number of blocks; a pair whose blocks or widths differ has no activation to swap."""
    depths = [len(decoder_layers(m)) for m in (base, trained)]
    widths = [int(m.config.hidden_size) for m in (base, trained)]
    if depths[0] != depths[1] or widths[0] != widths[1]:
        raise CheckpointError(
            f"base has {depths[0]} blocks of width {widths[0]} and trained {depths[1]} of width {widths[1]}: "
            "patching needs one architecture"
        )
    return depths[0]


def patch_models(
    base: Any,
    trained: Any,
    tokenizer: Any,
    texts: Sequence[PatchText],
    *,
    backend: str = "hf",
    config: PatchConfig | None = None,
    progress: Progress | None = None,
) -> Patching:
    """The patching grid of two loaded models on `texts` (see the module docstring)."""
    from toolrl_analysis.analysis.diff import torch_threads

    config = config or PatchConfig()
    config.validate()
    sites = check_sites(config.sites, backend)
    n_blocks = _check_pair(base, trained)
    if not texts:
        raise NothingToPatch("nothing to patch: no conversation holds a tool call of the trained model")
    started = time.perf_counter()
    runners = {"base": patch_runner(base, tokenizer, backend, sites),
               "trained": patch_runner(trained, tokenizer, backend, sites)}  # fmt: skip
    layers = list(range(n_blocks))
    sets = list(dict.fromkeys(config.positions))
    with torch_threads(config.threads) if config.threads else contextlib.nullcontext():
        environments, patches = measure(
            runners, texts, sites=sites, sets=sets, layers=layers, controls=config.controls, seed=config.seed,
            batch_size=config.batch_size, pad_token_id=int(getattr(base.config, "pad_token_id", None) or 0),
            progress=progress,
        )  # fmt: skip
    recovery = recovery_table(environments, patches)
    summary = {
        "backend": backend, "versions": backend_versions(), "blocks": n_blocks, "sites": list(sites),
        "positions": sets, "directions": {k: f"{runs} run, {source}'s activations patched in"
                                          for k, (runs, source) in DIRECTIONS.items()},
        "controls": config.controls, "seed": config.seed, "environments": len(texts),
        "forward_passes": grid_size(len(texts), config.batch_size, sets, sites, layers, config.controls),
        "change": change_summary(environments), "patch_seconds": time.perf_counter() - started,
    }  # fmt: skip
    return Patching(environments, patches, recovery, summary)


def patch_pair(
    base: str | Path,
    trained: str | Path,
    envs: str | Path,
    *,
    backend: str = "hf",
    config: PatchConfig | None = None,
    options=None,
    placement=None,
    log: Log = lambda line: None,
    progress: Progress | None = None,
) -> Patching:
    """Load the pair where `placement` says (`checkpoint.load_pair`, as `judge`: one tokenizer), play the trained model greedily on the held-out
    environments (`ablate.run.heldout_path`, `--limit` of them balanced over scenarios) and patch."""
    from toolrl_analysis.analysis.ablate.run import heldout_path, heldout_records
    from toolrl_analysis.analysis.diff import torch_threads
    from toolrl_analysis.analysis.probe.decision_points import rollout_conversations
    from toolrl_analysis.envs.sandbox import Sandbox
    from toolrl_analysis.episodes import EPISODES
    from toolrl_analysis.models.checkpoint import load_pair

    config = config or PatchConfig()
    config.validate()
    check_sites(config.sites, backend)  # before any model is read
    options = options or EPISODES
    started = time.perf_counter()
    records = heldout_records(envs, config.limit)
    (base_model, trained_model), tokenizer = load_pair(base, trained, "patching", placement=placement)
    _check_pair(base_model, trained_model)
    log(f"the trained model plays {len(records)} environments greedily")
    with (
        Sandbox(workers=2) as sandbox,
        torch_threads(1),
    ):  # generation of a small model: one thread is fastest
        conversations = rollout_conversations(
            trained_model, tokenizer, records, sandbox, "trained", max_turns=options.max_turns,
            max_new_tokens=options.max_new_tokens, batch_size=options.batch_size, thinking=options.thinking,
        )  # fmt: skip
    limit = int(getattr(base_model.config, "max_position_embeddings", 0) or 4096)
    texts, dropped = build_texts(conversations, tokenizer, max_tokens=min(limit, 4096))
    played = time.perf_counter() - started
    log(f"patching {len(texts)} conversations ({backend})")
    found = patch_models(base_model, trained_model, tokenizer, texts, backend=backend, config=config,
                         progress=progress)  # fmt: skip
    found.summary = {
        "base": str(base), "trained": str(trained), "envs": str(heldout_path(envs)),
        "text": "the trained model's greedy trajectories", "dropped": dropped, "config": asdict(config),
        **found.summary, "play_seconds": played, "total_seconds": time.perf_counter() - started,
    }  # fmt: skip
    return found


def render_patching(found: Patching, console) -> None:
    """Per direction: each site and block, its recovery per position set, and the random control beside it."""
    from rich.markup import escape
    from rich.table import Table

    from toolrl_analysis.analysis.stats import bounds_text

    s = found.summary
    change = s["change"]
    console.print(
        f"patching ({s['backend']}): {s['environments']} environments, {change['targets']} tool-call tokens; "
        f"lp_trained - lp_base = {bounds_text(change['mean'], change['low'], change['high'])} nats per "
        f"environment ({change['raised']} raised)"
    )
    recovery = found.recovery
    for direction, mine in recovery.groupby("direction", sort=False):
        sets = list(dict.fromkeys(mine["positions"]))
        table = Table(title=f"{direction}: {s['directions'][direction]}")
        table.add_column("site@block")
        for name in sets:
            table.add_column(f"{name} [95% CI]")
            if mine.loc[mine["positions"] == name, "control_recovery"].notna().any():
                table.add_column(f"{name}: random")
                table.add_column(f"{name} - random (Holm p)")
        for (site, layer), rows in mine.groupby(["site", "layer"], sort=False):
            cells = [f"{site}@{layer}"]
            for name in sets:
                row = rows[rows["positions"] == name].iloc[0]
                cells.append(bounds_text(row["recovery"], row["low"], row["high"]))
                if mine.loc[mine["positions"] == name, "control_recovery"].notna().any():
                    cells.append(f"{row['control_recovery']:.2f} ± {row['control_sd']:.2f}")
                    cells.append(f"{bounds_text(row['difference'], row['difference_low'], row['difference_high'])} "
                                 f"({row['p_holm']:.2g})")  # fmt: skip
            table.add_row(*[escape(cell) for cell in cells])  # "[unbounded]" is no markup
        console.print(table)
    reasons = sorted(set(recovery["reason"].dropna()) - {""})
    for reason in reasons[:1]:
        console.print(f"undefined or unbounded: {reason}")
    if "total_seconds" in s:
        console.print(f"{s['total_seconds']:.0f} s")
