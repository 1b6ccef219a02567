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
from toolrl_analysis.envs.schema import EnvRecord, read_envs
from toolrl_analysis.errors import ConfigError, EnvFormatError
from toolrl_analysis.models.checkpoint import load_policy, save_hf_dir, save_policy
from toolrl_analysis.models.embedded import resolve_model
from toolrl_analysis.training.base_validation import Validation
from toolrl_analysis.training.grpo import GRPOConfig, GRPOTrainer, read_rows


def training_records(envs_dir: str | Path) -> list[EnvRecord]:
    """The training environments: `train.jsonl` inside an environment-set directory, or a .jsonl file."""
    envs_dir = Path(envs_dir)
    train_path = envs_dir / "train.jsonl" if envs_dir.is_dir() else envs_dir
    if not train_path.exists():
        raise EnvFormatError(f"no training environments at {train_path}")
    return read_envs(train_path)


def validation_source(envs_dir: Path, records: list[EnvRecord]) -> tuple[list[EnvRecord], str]:
    """Where a run validates: the build's validation.jsonl (held-out worlds, so a recipe is chosen for what
    transfers), else the end of the training records, held out of training (older builds, single files)."""
    path = envs_dir / "validation.jsonl"
    if envs_dir.is_dir() and path.is_file():
        return read_envs(path), "environments of held-out worlds (validation.jsonl)"
    return records, "training environments held out of RL (the end of train.jsonl)"


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
    """Load the environments and the initial policy, train on train.jsonl minus its validation slice, and
    write `trained.pt` plus an HF directory, metrics.csv, validation.csv and curves.png (and, with
    `test_at_end`, the one evaluation on the test split in test/)."""
    import pandas as pd

    envs_dir, out_dir = Path(envs_dir), Path(out_dir)
    records = training_records(envs_dir)
    test_path = envs_dir / "test.jsonl"
    if config.test_at_end and not test_path.is_file():
        raise ConfigError(f"config key 'test_at_end' needs a test split, and {test_path} does not exist")
    seed_torch(config.seed, config.threads)
    model, tokenizer = load_policy(resolve_policy_path(init))
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "config.json").write_text(json.dumps(asdict(config), indent=2))
    with Sandbox(workers=config.sandbox_workers) as sandbox:
        validation = None
        source, where = validation_source(envs_dir, records)
        if config.eval_every:
            validation = Validation.build(
                tokenizer, source, sandbox, config.val_meter_envs, config.val_solve_envs,
                config.max_new_tokens, max_turns=config.max_turns, batch_size=config.generation_batch_size,
            )  # fmt: skip
        held_out = {id(r) for r in validation.records} if validation else set()
        train_records = [r for r in records if id(r) not in held_out]
        n_val = len(validation.records) if validation else 0
        log(f"{len(train_records)} training environments; validation on {n_val} {where}")
        trainer = GRPOTrainer(config, model, tokenizer, train_records, out_dir, sandbox, validation, log=log)
        history = trainer.train(resume=resume, on_iteration=on_iteration)
        save_trained_policy(model, tokenizer, out_dir, "trained.pt")
        test = None
        if config.test_at_end and not trainer.stop_requested:
            test = evaluate_test_split(model, tokenizer, test_path, sandbox, config, out_dir / "test")
            log(f"test split (evaluated once): Solve-F1 {test:.3f}; tables in {out_dir / 'test'}")
    for name in ("metrics", "validation"):
        rows = read_rows(out_dir / f"{name}.jsonl")
        if rows:
            pd.DataFrame(rows).to_csv(out_dir / f"{name}.csv", index=False)
    return {
        "out": str(out_dir),
        "iterations": trainer.iteration,
        "history": history,
        "interrupted": trainer.stop_requested,
        "training_envs": len(train_records),
        "validation_envs": [r.env_id for r in validation.records] if validation else [],
        "test_solve_f1": test,
    }


def evaluate_test_split(model, tokenizer, test_path: Path, sandbox, config: GRPOConfig, out: Path) -> float:
    """The one evaluation of the test split (greedy, the run's turn and token budgets, general suite and
    role table included), written as `evaluate --out` writes it; returns the overall Solve-F1."""
    from toolrl_analysis.evaluate import evaluate

    model.eval()
    report = evaluate(
        model, tokenizer, read_envs(test_path), sandbox=sandbox, max_turns=config.max_turns,
        max_new_tokens=config.max_new_tokens, batch_size=config.generation_batch_size,
    )  # fmt: skip
    report.save(out)
    return report.metric("solve_f1")
