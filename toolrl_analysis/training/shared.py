"""What both training commands (`train_base` in sft.py, `train_grpo` in grpo.py) do the same way: read the
environments, choose where to validate, seed torch, resolve and write policies."""

from __future__ import annotations

from pathlib import Path

import torch

from toolrl_analysis.envs.schema import EnvRecord, read_envs
from toolrl_analysis.errors import EnvFormatError
from toolrl_analysis.models.checkpoint import save_hf_dir, save_policy
from toolrl_analysis.models.embedded import resolve_model


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
