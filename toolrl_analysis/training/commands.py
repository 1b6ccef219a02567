"""The training commands: `train_grpo` (train-grpo) here, `train_base` (train-base) in sft.py, and the steps
both take the same way: reading the environments, seeding torch, writing the trained policy."""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch

from toolrl_analysis.envs.sandbox import Sandbox
from toolrl_analysis.envs.schema import EnvRecord, balanced_slice, read_envs
from toolrl_analysis.errors import EnvFormatError
from toolrl_analysis.models.checkpoint import load_policy, save_hf_dir, save_policy
from toolrl_analysis.models.embedded import resolve_model
from toolrl_analysis.training.grpo import GRPOConfig, GRPOTrainer


def training_records(envs_dir: str | Path) -> list[EnvRecord]:
    """The training environments: `train.jsonl` inside an environment-set directory, or a .jsonl file."""
    envs_dir = Path(envs_dir)
    train_path = envs_dir / "train.jsonl" if envs_dir.is_dir() else envs_dir
    if not train_path.exists():
        raise EnvFormatError(f"no training environments at {train_path}")
    return read_envs(train_path)


def seed_torch(seed: int, threads: int = 0) -> None:
    """torch's global seed, and its intra-op thread count unless `threads` is 0 (torch's default)."""
    if threads:
        torch.set_num_threads(threads)
    torch.manual_seed(seed)


def save_trained_policy(model, tokenizer, out_dir: Path, filename: str) -> None:
    """The policy twice: our self-contained .pt (`out_dir/filename`) and an HF directory (`out_dir/hf`)."""
    save_policy(model, tokenizer, out_dir / filename)
    save_hf_dir(model, tokenizer, out_dir / "hf")


def resolve_policy_path(path: str | Path) -> Path:
    """A run directory (holding trained.pt or base.pt), a .pt file, an HF model directory, or `embedded`."""
    path = resolve_model(path)
    if path.is_dir() and not (path / "config.json").exists():
        for name in ("trained.pt", "base.pt"):
            if (path / name).exists():
                return path / name
    return path


def train_grpo(
    envs_dir: str | Path,
    init: str | Path,
    out_dir: str | Path,
    config: GRPOConfig,
    resume: bool = False,
    on_iteration: Callable[[dict[str, Any]], None] | None = None,
    log: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Load the environments and the initial policy, train, and write `trained.pt` plus an HF directory."""
    import pandas as pd

    envs_dir, out_dir = Path(envs_dir), Path(out_dir)
    train_records = training_records(envs_dir)
    test_path = envs_dir / "test.jsonl"
    eval_records = balanced_slice(read_envs(test_path), config.eval_envs) if test_path.exists() else []
    seed_torch(config.seed, config.threads)
    model, tokenizer = load_policy(resolve_policy_path(init))
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "config.json").write_text(json.dumps(asdict(config), indent=2))
    with Sandbox(workers=config.sandbox_workers) as sandbox:
        trainer = GRPOTrainer(
            config, model, tokenizer, train_records, out_dir, sandbox, eval_records, log=log
        )
        history = trainer.train(resume=resume, on_iteration=on_iteration)
    save_trained_policy(model, tokenizer, out_dir, "trained.pt")
    if history or (out_dir / "metrics.jsonl").exists():
        rows = [json.loads(line) for line in (out_dir / "metrics.jsonl").read_text().splitlines() if line]
        pd.DataFrame(rows).to_csv(out_dir / "metrics.csv", index=False)
    return {
        "out": str(out_dir),
        "iterations": trainer.iteration,
        "history": history,
        "interrupted": trainer.stop_requested,
    }
