"""`toolrl-analyze reproduce`: the whole chain on the embedded default, stage by stage, from files.

envs build -> train-base -> evaluate base -> train-grpo (GRPO, then Reinforce++) -> evaluate each ->
compare base vs trained -> figures and report.md. A stage whose output already exists is skipped, so an
interrupted run continues where it stopped; `--force` redoes everything. `--quick` is a smoke run with
small sizes (minutes), not a result.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

from toolrl_analysis.config import load_config

QUICK_ENVS = ["train_size=160", "test_per_scenario=6"]
QUICK_BASE = [
    "steps=40", "stream_envs=240", "general_tasks=200", "eval_every=40", "val_meter_envs=3",
    "val_solve_envs=2", "val_max_new_tokens=48",
]  # fmt: skip
QUICK_RL = [
    "iterations=2",
    "envs_per_iteration=4",
    "max_samples_per_iteration=8",
    "eval_every=0",
    "max_turns=4",
    "save_every=1",
]
ALGORITHMS = {"grpo": "grpo", "reinforce_pp": "reinforce++"}


def _config_file(name: str) -> str | None:
    path = Path(name)
    return str(path) if path.is_file() else None


def reproduce(
    out: str | Path, quick: bool = False, force: bool = False, log: Callable[[str], None] = print
) -> dict[str, Any]:
    from toolrl_analysis.envs.pipeline import EnvBuildConfig, build_envsets, write_envset
    from toolrl_analysis.evaluate import evaluate_checkpoint
    from toolrl_analysis.training.commands import train_grpo
    from toolrl_analysis.training.grpo import GRPOConfig
    from toolrl_analysis.training.sft import SFTConfig, train_base

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    timings: dict[str, float] = {}

    def stage(name: str, done: Path, action: Callable[[], Any]) -> None:
        if done.exists() and not force:
            log(f"[skip] {name}: {done} exists")
            return
        log(f"[run ] {name}")
        started = time.perf_counter()
        action()
        timings[name] = round(time.perf_counter() - started, 1)
        log(f"[done] {name} in {timings[name]:.0f}s")

    envs = out / "envs"
    env_config = load_config(EnvBuildConfig, _config_file("envs/default.toml"), QUICK_ENVS if quick else [])
    stage("envs build", envs / "manifest.json", lambda: write_envset(build_envsets(env_config), envs))

    base_config = load_config(SFTConfig, _config_file("training/base.toml"), QUICK_BASE if quick else [])
    stage(
        "train-base", out / "base" / "base.pt", lambda: train_base(envs, out / "base", base_config, log=log)
    )

    rl_config = load_config(GRPOConfig, _config_file("training/grpo.toml"), QUICK_RL if quick else [])
    policies = {"base": out / "base" / "base.pt"}
    for run_name, algo in ALGORITHMS.items():
        config = replace(rl_config, algo=algo)
        run_dir = out / run_name
        stage(
            f"train-grpo --algo {algo}",
            run_dir / "trained.pt",
            lambda config=config, run_dir=run_dir: train_grpo(envs, out / "base", run_dir, config, log=log),
        )
        policies[run_name] = run_dir / "trained.pt"

    limit = 24 if quick else None
    # Our policy's turns are ~40 tokens; a budget of 128 keeps a rambling model from costing 512 per turn.
    eval_options = {"max_new_tokens": 128, "batch_size": 32}
    for name, policy in policies.items():
        target = out / "eval" / name
        stage(
            f"evaluate {name}",
            target / "evaluation.json",
            lambda policy=policy, target=target: evaluate_checkpoint(
                policy, envs / "test.jsonl", limit=limit, **eval_options
            ).save(target),
        )

    from toolrl_analysis.analysis.diff import compare_checkpoints

    for name in ALGORITHMS:
        target = out / "compare" / name
        stage(
            f"compare base {name}",
            target / "summary.json",
            lambda name=name, target=target: compare_checkpoints(policies["base"], policies[name]).write(
                target
            ),
        )

    from toolrl_analysis.report import write_figures, write_report

    figures = write_figures(out)
    report = write_report(out)
    (out / "timings.json").write_text(json.dumps(timings, indent=2) + "\n")
    log(f"report: {report}")
    return {"out": str(out), "report": str(report), "figures": [str(f) for f in figures], "timings": timings}
