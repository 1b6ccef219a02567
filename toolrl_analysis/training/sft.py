"""Supervised warm-up of the embedded base: teach a from-scratch tiny model the tool-call format.

The data are oracle trajectories on the training environments (golden calls from `meta`, tool output
from really running the tools in the sandbox, then a final answer), mixed with general text and short
general tasks. The loss covers assistant tokens only (the chat template's `{% generation %}` marks them),
except for general text, which is plain language modelling.

The base must be competent but clearly imperfect, so that RL has room to show gains (target held-out
Solve-F1 0.2-0.6 with multi-hop weaker). This is controlled deliberately, not by accident:
  * `multi_hop_share` keeps only a fraction of the multi-hop demonstrations;
  * `correction_prob` inserts failed calls followed by their correction, as FTRL's environments produce;
  * `steps` bounds the training itself.

Before the supervised steps, `copy_warmup_steps` of synthetic copying (a random token sequence, then the
same sequence again; loss on the repeat) give the from-scratch model induction heads within about a
minute. Without them a 1M-parameter model does not learn to copy a name from the question into a tool
argument within the time budget: it learns the format and writes a generic name.
"""

from __future__ import annotations

import json
import math
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from toolrl_analysis.config import require
from toolrl_analysis.envs.oracle import oracle_conversations
from toolrl_analysis.envs.schema import SCENARIOS, EnvRecord
from toolrl_analysis.training.schedules import warmup_then_cosine

MULTI_HOP = ("multi_hop", "parallel_multi_hop")


@dataclass
class SFTConfig:
    """One `train-base` run (training/base.toml; every field can be set with `--set key=value`).

    Each field's comment says what it does, its unit, and where it comes from. The data recipe follows FTRL's
    environments (Ye et al. 2025); the copying warm-up is the induction-head task (Olsson et al. 2022).
    """

    # Model size from models/factory.PRESETS: "tiny" (about 1.1M parameters) or "small" (about 5M).
    preset: str = "tiny"
    # Architecture (parameter names and layout): "qwen2", "qwen3" or "llama".
    family: str = "qwen2"
    # Tokens in the byte-level BPE vocabulary trained on the environments and general text.
    vocab_size: int = 4096
    # Fraction of multi-hop / parallel multi-hop demonstrations kept (fewer keeps the base imperfect).
    multi_hop_share: float = 0.35
    # Probability that a trajectory has one failed call (a misspelled argument) followed by its correction.
    correction_prob: float = 0.2
    # General-text sequences, as a fraction of the tool-use examples (plain language modelling).
    general_text_share: float = 0.1
    # Short general tasks (arithmetic, copying, reversing) added as chat examples.
    general_tasks: int = 1500
    # Optimiser steps of synthetic copying before the supervised steps (see the module docstring).
    copy_warmup_steps: int = 100
    # Tokens per copied sequence (each copy example is 2 * copy_length tokens).
    copy_length: int = 32
    # Optimiser steps of supervised training after the copying warm-up.
    steps: int = 300
    # Padded tokens per batch (examples of similar length are batched together).
    batch_tokens: int = 8192
    # Tokens; longer tool-use examples are dropped and general text is cut into windows of this length.
    max_seq_len: int = 1280
    # AdamW peak learning rate.
    lr: float = 3e-3
    # AdamW decoupled weight decay (Loshchilov & Hutter 2019).
    weight_decay: float = 0.01
    # Optimiser steps of linear warm-up, counted from the first copying step; then a cosine to 10% of lr over
    # the remaining copy_warmup_steps + steps (training/schedules.py, warmup_then_cosine).
    warmup_steps: int = 30
    # Maximum global L2 norm of the gradient per optimiser step.
    grad_clip: float = 1.0
    # Seed of the tokenizer, the model's initialisation, the data mix and the batch order.
    seed: int = 0
    # torch intra-op threads; 0 keeps torch's default.
    threads: int = 2
    # Optimiser steps between rows of the loss curve (loss.csv).
    log_every: int = 10
    # Seconds; 0 = no limit, otherwise stop early (and say so) after this long.
    time_limit_s: float = 0.0

    def validate(self) -> None:
        from toolrl_analysis.models.factory import FAMILIES, PRESETS

        require(self.preset in PRESETS, "preset", f"must be one of {', '.join(PRESETS)}")
        require(self.family in FAMILIES, "family", f"must be one of {', '.join(FAMILIES)}")
        require(256 <= self.vocab_size <= 65536, "vocab_size", "must be between 256 and 65536")
        for key in ("multi_hop_share", "correction_prob"):
            require(0.0 <= getattr(self, key) <= 1.0, key, "must be between 0 and 1")
        require(self.general_text_share >= 0, "general_text_share", "must not be negative")
        require(self.general_tasks >= 0, "general_tasks", "must not be negative")
        require(self.steps >= 1, "steps", "must be at least 1")
        require(self.copy_warmup_steps >= 0, "copy_warmup_steps", "must not be negative")
        require(
            4 <= self.copy_length <= self.max_seq_len // 2,
            "copy_length",
            "must be between 4 and max_seq_len/2",
        )
        require(self.batch_tokens >= self.max_seq_len, "batch_tokens", "must be at least max_seq_len")
        require(self.max_seq_len >= 64, "max_seq_len", "must be at least 64")
        require(self.lr > 0 and math.isfinite(self.lr), "lr", "must be a positive number")
        require(self.weight_decay >= 0, "weight_decay", "must not be negative")
        require(self.warmup_steps >= 0, "warmup_steps", "must not be negative")
        require(self.grad_clip > 0, "grad_clip", "must be positive")
        require(self.threads >= 0, "threads", "must not be negative")
        require(self.log_every >= 1, "log_every", "must be at least 1")
        require(self.time_limit_s >= 0, "time_limit_s", "must not be negative")


# -- demonstrations ------------------------------------------------------------------------------
def demonstration_records(
    records: Sequence[EnvRecord], config: SFTConfig, rng: random.Random
) -> list[EnvRecord]:
    """All single-hop demonstrations, a `multi_hop_share` of the multi-hop ones (records with golden calls)."""
    usable = [r for r in records if r.meta.get("golden_turns")]
    return [r for r in usable if r.scenario not in MULTI_HOP or rng.random() < config.multi_hop_share]


# -- tokenised examples ----------------------------------------------------------------------------
def chat_example(tokenizer, messages, tools=None) -> tuple[list[int], list[int]]:
    """Token ids and the assistant-token mask (1 on what the model must learn to write)."""
    out = tokenizer.apply_chat_template(
        messages, tools=tools, tokenize=True, return_dict=True, return_assistant_tokens_mask=True
    )
    return list(out["input_ids"]), list(out["assistant_masks"])


def text_examples(tokenizer, texts: Sequence[str], max_len: int) -> list[tuple[list[int], list[int]]]:
    """General text, chunked to `max_len` tokens; every token is a target."""
    examples = []
    for text in texts:
        ids = tokenizer(text, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
        for start in range(0, len(ids), max_len):
            chunk = ids[start : start + max_len]
            if len(chunk) > 8:
                examples.append((chunk, [1] * len(chunk)))
    return examples


def token_budget_batches(
    examples: Sequence[tuple[list[int], list[int]]], batch_tokens: int, rng: random.Random
) -> list[list[int]]:
    """Batches of similar length (little padding) holding at most `batch_tokens` padded tokens, shuffled."""
    order = sorted(range(len(examples)), key=lambda i: (len(examples[i][0]), rng.random()))
    batches, current, longest = [], [], 0
    for index in order:
        length = len(examples[index][0])
        if current and max(longest, length) * (len(current) + 1) > batch_tokens:
            batches.append(current)
            current, longest = [], 0
        current.append(index)
        longest = max(longest, length)
    if current:
        batches.append(current)
    rng.shuffle(batches)
    return batches


def collate(examples: Sequence[tuple[list[int], list[int]]], pad_id: int) -> dict[str, torch.Tensor]:
    width = max(len(ids) for ids, _ in examples)
    input_ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    labels = torch.full((len(examples), width), -100, dtype=torch.long)
    attention = torch.zeros((len(examples), width), dtype=torch.long)
    for row, (ids, mask) in enumerate(examples):
        input_ids[row, : len(ids)] = torch.tensor(ids)
        attention[row, : len(ids)] = 1
        labels[row, : len(ids)] = torch.where(torch.tensor(mask, dtype=torch.bool), torch.tensor(ids), -100)
    return {"input_ids": input_ids, "attention_mask": attention, "labels": labels}


def copy_batch(
    vocab_size: int, first_id: int, config: SFTConfig, generator: torch.Generator
) -> dict[str, torch.Tensor]:
    """Random sequences followed by themselves; only the repeat is a target, so the model must copy."""
    rows = max(1, config.batch_tokens // (2 * config.copy_length))
    first = torch.randint(first_id, vocab_size, (rows, config.copy_length), generator=generator)
    input_ids = torch.cat([first, first], dim=1)
    labels = input_ids.clone()
    labels[:, : config.copy_length] = -100
    return {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids), "labels": labels}


# -- the command -----------------------------------------------------------------------------------
def build_examples(tokenizer, records, sandbox, config: SFTConfig) -> tuple[list, dict[str, Any]]:
    from toolrl_analysis.models.general import general_tasks, general_text, task_chat

    rng = random.Random(config.seed)
    demos = demonstration_records(records, config, rng)
    conversations = oracle_conversations(demos, sandbox, rng, config.correction_prob)
    tool_examples = [chat_example(tokenizer, m, r.tools) for m, r in zip(conversations, demos, strict=True)]
    kept = [e for e in tool_examples if len(e[0]) <= config.max_seq_len]
    task_examples = [
        chat_example(tokenizer, task_chat(t))
        for t in general_tasks(config.general_tasks, config.seed, "train")
    ]
    prose = text_examples(tokenizer, general_text("train"), config.max_seq_len)
    rng.shuffle(prose)
    prose = prose[: int(config.general_text_share * len(kept))]
    info = {
        "demonstrations": {s: sum(r.scenario == s for r in demos) for s in SCENARIOS},
        "tool_use_examples": len(kept),
        "dropped_too_long": len(tool_examples) - len(kept),
        "corrections": sum(
            len([m for m in c if m["role"] == "assistant"]) - 1 > len(r.meta.get("golden_turns", []))
            for c, r in zip(conversations, demos, strict=True)
        ),
        "general_task_examples": len(task_examples),
        "general_text_examples": len(prose),
    }
    return kept + task_examples + prose, info


def train_base(
    envs_dir: str | Path,
    out_dir: str | Path,
    config: SFTConfig,
    on_step: Callable[[int, float], None] | None = None,
    log: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Tokenizer + model from scratch, supervised on oracle trajectories; writes base.pt and hf/."""
    import pandas as pd

    from toolrl_analysis.envs.sandbox import Sandbox
    from toolrl_analysis.errors import TrainingDiverged
    from toolrl_analysis.models.factory import build_model, count_parameters
    from toolrl_analysis.models.tokenizer import build_policy_tokenizer
    from toolrl_analysis.training.commands import save_trained_policy, seed_torch, training_records

    out_dir = Path(out_dir)
    records = training_records(envs_dir)
    seed_torch(config.seed, config.threads)
    started = time.perf_counter()

    tokenizer = build_policy_tokenizer(records, vocab_size=config.vocab_size, seed=config.seed)
    model = build_model(config.preset, family=config.family, tokenizer=tokenizer, seed=config.seed)
    with Sandbox(workers=2) as sandbox:
        examples, info = build_examples(tokenizer, records, sandbox, config)
    log(
        f"{count_parameters(model):,} parameters; {len(examples)} examples "
        f"({info['tool_use_examples']} tool use); data ready in {time.perf_counter() - started:.1f}s"
    )

    optimizer = torch.optim.AdamW(model.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer,
        lambda s: warmup_then_cosine(s, config.warmup_steps, config.copy_warmup_steps + config.steps),
    )
    rng = random.Random(config.seed)
    pad_id = tokenizer.pad_token_id
    batches: list[list[int]] = []
    curve, step, tokens_seen, stopped_early = [], 0, 0, False
    model.train()
    train_started = time.perf_counter()
    copy_generator = torch.Generator().manual_seed(config.seed)
    first_word_id = len(tokenizer.all_special_ids) + 1
    total_steps = config.copy_warmup_steps + config.steps
    while step < total_steps:
        if step < config.copy_warmup_steps:
            batch = copy_batch(len(tokenizer), first_word_id, config, copy_generator)
        else:
            if not batches:
                batches = token_budget_batches(examples, config.batch_tokens, rng)
            batch = collate([examples[i] for i in batches.pop()], pad_id)
        loss = model(**batch).loss
        if not torch.isfinite(loss):
            raise TrainingDiverged(f"warm-up loss became {loss.item()} at step {step}; lower config key 'lr'")
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), config.grad_clip)
        optimizer.step()
        scheduler.step()
        step += 1
        tokens_seen += int(batch["attention_mask"].sum())
        if step % config.log_every == 0 or step == total_steps:
            elapsed = time.perf_counter() - train_started
            curve.append(
                {
                    "step": step,
                    "phase": "copy" if step <= config.copy_warmup_steps else "sft",
                    "loss": loss.item(),
                    "lr": scheduler.get_last_lr()[0],
                    "tokens": tokens_seen,
                    "seconds": elapsed,
                }
            )
        if on_step is not None:
            on_step(step, loss.item())
        if config.time_limit_s and time.perf_counter() - started > config.time_limit_s:
            stopped_early = True
            log(f"time limit reached after {step} steps")
            break

    out_dir.mkdir(parents=True, exist_ok=True)
    model.eval()
    save_trained_policy(model, tokenizer, out_dir, "base.pt")
    pd.DataFrame(curve).to_csv(out_dir / "loss.csv", index=False)
    sft_curve = [row for row in curve if row["phase"] == "sft"]
    summary = {
        "out": str(out_dir),
        "parameters": count_parameters(model),
        "steps": step,
        "stopped_early": stopped_early,
        "final_loss": sft_curve[-1]["loss"] if sft_curve else None,
        "first_loss": sft_curve[0]["loss"] if sft_curve else None,
        "tokens": tokens_seen,
        "seconds": time.perf_counter() - started,
        "data": info,
        "config": asdict(config),
    }
    (out_dir / "train_base.json").write_text(json.dumps(summary, indent=2))
    return summary
