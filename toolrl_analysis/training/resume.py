"""One resume format for both trainers: a policy file (`models.checkpoint.save_policy`, so every checkpoint
also loads as a policy) with the trainer's own state under `train_state`, loaded with weights_only=True. A
missing, corrupt or foreign file is a one-line CheckpointError, never a traceback."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from toolrl_analysis.errors import CheckpointError
from toolrl_analysis.models.checkpoint import read_checkpoint_file, save_policy

TRAIN_STATE = "train_state"


def save_train_state(model: Any, tokenizer: Any, path: str | Path, state: dict[str, Any]) -> Path:
    """The weights, the tokenizer and `state` (plain data and tensors: optimiser, schedule, position), atomically."""
    return save_policy(model, tokenizer, path, extra={TRAIN_STATE: state})


def load_train_state(path: str | Path) -> tuple[dict[str, Any], dict[str, Any]]:
    """(the model's state dict, the trainer's state) of a file `save_train_state` wrote."""
    payload = read_checkpoint_file(path)
    if isinstance(payload, dict) and {"iteration", "model", "optimizer", "scheduler"} <= set(payload):
        # train-grpo's checkpoints before this format (a plain dict of the same state); still resumable
        return payload["model"], {k: v for k, v in payload.items() if k != "model"}
    if not isinstance(payload, dict) or not isinstance(payload.get(TRAIN_STATE), dict):
        raise CheckpointError(
            f"{path} is not a training checkpoint (no '{TRAIN_STATE}'); it cannot be resumed"
        )
    if not isinstance(payload.get("state_dict"), dict):
        raise CheckpointError(f"{path} is a damaged training checkpoint: its weights are missing")
    return payload["state_dict"], payload[TRAIN_STATE]
