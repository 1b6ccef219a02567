"""GRPO / Reinforce++ on tool-use environments, the FTRL recipe, readable top to bottom.

One iteration:
  1. play training environments with the current policy (sampling at `temperature`, up to 20 turns);
  2. cut the episodes into per-step samples (history so far, remaining `unsolved_set`, `solve_rate`),
     as FTRL's `data_sample.py` does (with `oracle_prefix_share`, part of them come from golden-trajectory
     prefixes instead);
  3. sample G next-turn completions per sample and score each with the step reward (f1 by default);
  4. take clipped policy-gradient steps on those completions (advantages.py, then the objective of
     objective.py; `update` below: one batch record, sliced once per mini-batch, one optimiser step each).
With `credit = "episode"` steps 2-3 are replaced by G whole episodes per environment scored by their
episode Solve-F1; every assistant turn of an episode shares its advantage and tool output never enters
the loss (it lives in the prompts).

Every `eval_every` iterations (and before the first, and after the last) the build's validation split
(held-out worlds; older builds: a slice of train held out of RL) gives greedy Solve-F1 and the role-NLL table;
the test split is evaluated at most once, at the end (`test_at_end`). The recipe is `GRPOConfig`
(grpo_config.py); `train_grpo` at the bottom is the `train-grpo` command.
"""

from __future__ import annotations

import contextlib
import copy
import json
import random
import signal
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from toolrl_analysis.envs.sandbox import Sandbox
from toolrl_analysis.envs.schema import EnvRecord, read_envs
from toolrl_analysis.errors import ConfigError, TrainingDiverged
from toolrl_analysis.models.checkpoint import load_policy
from toolrl_analysis.models.placement import Placement, resolve_dtype
from toolrl_analysis.rollout import (
    ModelPolicy,
    decode_completion,
    generate,
    pad_token_id_for,
    run_episodes,
    stop_token_ids,
)
from toolrl_analysis.training.advantages import episode_group_advantages, reinforce_pp_advantages
from toolrl_analysis.training.grpo_config import GRPOConfig
from toolrl_analysis.training.objective import CLIP_STATS, policy_objective
from toolrl_analysis.training.resume import load_train_state, save_train_state
from toolrl_analysis.training.rl_curves import plot_rl_curves, validation_lines, zero_spread_warning
from toolrl_analysis.training.schedules import cosine_under_warmup, linear_warmup
from toolrl_analysis.training.sequences import (
    SequenceBatch,
    check_logits_path,
    completion_logprobs,
    pack_sequences,
)
from toolrl_analysis.training.shared import (
    resolve_policy_path,
    save_trained_policy,
    seed_torch,
    training_records,
    validation_source,
)
from toolrl_analysis.training.step_samples import Sample, oracle_prefix_states, score_completions, step_states
from toolrl_analysis.training.validation import Validation

# What one update logs from its optimiser steps (means over them; 0 when no step was taken).
UPDATE_STATS = ("loss", "kl", "entropy", "grad_norm", "ppo_kl", *CLIP_STATS)


@dataclass
class UpdateBatch:
    """One iteration's samples as tensors, built once; `select` slices every field the same way.
    N completions of U prompts (`sequences.repeats` completions each), T completion tokens (padded)."""

    sequences: SequenceBatch
    old_logprobs: torch.Tensor  # [N, T], the behaviour policy's (from sampling)
    ref_logprobs: torch.Tensor | None  # [N, T], the frozen reference's; None without a KL term
    advantages: torch.Tensor  # [N, T]

    @property
    def prompts(self) -> int:
        return self.sequences.prompt_ids.shape[0]

    @property
    def mask(self) -> torch.Tensor:
        return self.sequences.completion_mask  # [N, T]

    def select(self, prompts: torch.Tensor) -> UpdateBatch:
        """The prompts `prompts` ([u]) and all their completions ([n = u * repeats] rows)."""
        rows = self.sequences.completion_rows(prompts)
        ref = None if self.ref_logprobs is None else self.ref_logprobs[rows]
        return UpdateBatch(
            self.sequences.select_prompts(prompts), self.old_logprobs[rows], ref, self.advantages[rows]
        )


def flat_groups(samples: Sequence[Sample]) -> set[int]:
    """Groups whose completions all scored the same: no reward spread, so no GRPO signal."""
    rewards: dict[int, set[float]] = {}
    for sample in samples:
        rewards.setdefault(sample.group, set()).add(sample.reward)
    return {group for group, values in rewards.items() if len(values) == 1}


def drop_flat_groups(samples: Sequence[Sample]) -> list[Sample]:
    """DAPO's dynamic-sampling filter without its refill: the flat groups leave the update."""
    flat = flat_groups(samples)
    return [s for s in samples if s.group not in flat]


def reward_stats(samples: Sequence[Sample]) -> dict[str, float]:
    """What an iteration's rewards look like, before any filter: mean, std, the share of flat groups."""
    rewards = torch.tensor([s.reward for s in samples])  # [N]
    return {
        "reward_mean": rewards.mean().item(),
        "reward_std": rewards.std().item() if len(rewards) > 1 else 0.0,
        "zero_spread_groups": len(flat_groups(samples)) / len({s.group for s in samples}),
        "samples": len(samples),
    }


# -- the trainer -----------------------------------------------------------------------------------
class GRPOTrainer:
    def __init__(
        self,
        config: GRPOConfig,
        model: torch.nn.Module,
        tokenizer,
        train_records: Sequence[EnvRecord],
        out_dir: str | Path,
        sandbox,
        validation: Validation | None = None,
        log: Callable[[str], None] = print,
    ):
        """`validation` is measured every `eval_every` iterations; its environments must not be among
        `train_records` (`train_grpo` takes them out)."""
        self.config, self.model, self.tokenizer = config, model, tokenizer
        self.train_records, self.validation = list(train_records), validation
        self.out_dir, self.sandbox, self.log = Path(out_dir), sandbox, log
        self.reference = copy.deepcopy(model).eval().requires_grad_(False) if config.kl_coef > 0 else None
        self.optimizer = torch.optim.AdamW(
            model.parameters(), lr=config.lr, weight_decay=config.weight_decay, betas=(0.9, 0.999)
        )
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, self._lr_factor)
        self.iteration = 0
        self.plotted_at = -1  # the iteration curves.png was last drawn at
        self.stop_requested = False
        self.stop_ids = stop_token_ids(tokenizer, model)
        self.pad_id = pad_token_id_for(tokenizer)
        check_logits_path(model, self.pad_id)  # log-probs from the hidden states must be what is sampled

    def _lr_factor(self, step: int) -> float:
        c = self.config
        if c.schedule == "constant":
            return 1.0
        if c.schedule == "warmup":
            return linear_warmup(step, c.warmup_steps)
        return cosine_under_warmup(step, c.warmup_steps, c.iterations)

    # -- sampling ----------------------------------------------------------------------------------
    def _generator(self, salt: int) -> torch.Generator:
        # Every random draw derives from (seed, iteration): a resumed run replays an uninterrupted one.
        return torch.Generator().manual_seed(self.config.seed * 1_000_003 + self.iteration * 101 + salt)

    def _iteration_records(self) -> list[EnvRecord]:
        rng = np.random.default_rng([self.config.seed, self.iteration])
        count = min(self.config.envs_per_iteration, len(self.train_records))
        return [self.train_records[i] for i in rng.choice(len(self.train_records), count, replace=False)]

    def _policy(self, salt: int) -> ModelPolicy:
        c = self.config
        return ModelPolicy(
            self.model,
            self.tokenizer,
            max_new_tokens=c.max_new_tokens,
            temperature=c.temperature,
            batch_size=c.generation_batch_size,
            generator=self._generator(salt),
        )

    def collect_step_samples(self) -> tuple[list[Sample], dict[str, float]]:
        c = self.config
        records = self._iteration_records()
        episodes = run_episodes(
            self._policy(1),
            records,
            self.sandbox,
            max_turns=c.max_turns,
            max_prompt_tokens=c.max_prompt_tokens,
            reward_variant=c.reward_variant,
        )
        states = step_states(episodes)
        rng = random.Random(f"{c.seed}-{self.iteration}")
        oracle: list = []
        if c.oracle_prefix_share > 0:
            found = oracle_prefix_states(records, self.tokenizer, self.sandbox, c.max_prompt_tokens)
            wanted = round(c.max_samples_per_iteration * c.oracle_prefix_share)
            oracle = rng.sample(found, min(wanted, len(found)))
        own = c.max_samples_per_iteration - len(oracle)
        if len(states) > own:
            states = rng.sample(states, own)
        states += oracle
        completions = []
        generator = self._generator(2)
        per_batch = max(1, c.generation_batch_size // c.group_size)
        for start in range(0, len(states), per_batch):
            completions += generate(
                self.model,
                [state.prompt_ids for state in states[start : start + per_batch]],
                max_new_tokens=c.max_new_tokens,
                temperature=c.temperature,
                eos_token_ids=self.stop_ids,
                pad_token_id=self.pad_id,
                generator=generator,
                samples_per_prompt=c.group_size,
            )
        prompts = [state.prompt_ids for state in states for _ in range(c.group_size)]
        texts = [decode_completion(self.tokenizer, comp.ids, self.stop_ids) for comp in completions]
        expanded_states = [state for state in states for _ in range(c.group_size)]
        rewards = score_completions(texts, expanded_states, self.sandbox, c.reward_variant)
        samples = [
            Sample(prompt, comp.ids, comp.logprobs, reward, index // c.group_size, index)
            for index, (prompt, comp, reward) in enumerate(zip(prompts, completions, rewards, strict=True))
        ]
        rollout_f1 = float(np.mean([e.metrics()["solve_f1"] for e in episodes])) if episodes else 0.0
        return samples, {
            "rollout_solve_f1": rollout_f1,
            "step_states": len(states),
            "oracle_states": len(oracle),
        }

    def collect_episode_samples(self) -> tuple[list[Sample], dict[str, float]]:
        c = self.config
        records = self._iteration_records()
        repeated = [record for record in records for _ in range(c.group_size)]
        episodes = run_episodes(
            self._policy(1),
            repeated,
            self.sandbox,
            max_turns=c.max_turns,
            max_prompt_tokens=c.max_prompt_tokens,
            reward_variant=c.reward_variant,
        )
        samples = []
        for index, episode in enumerate(episodes):
            reward = episode.metrics()["solve_f1"]
            for turn in episode.turns:
                samples.append(
                    Sample(
                        turn.prompt_ids,
                        turn.completion_ids,
                        turn.logprobs,
                        reward,
                        index // c.group_size,
                        index,
                    )
                )
        f1 = float(np.mean([e.metrics()["solve_f1"] for e in episodes])) if episodes else 0.0
        return samples, {"rollout_solve_f1": f1, "step_states": len(samples)}

    def collect(self) -> tuple[list[Sample], dict[str, float]]:
        """One iteration's samples (and rollout statistics) for `update`."""
        if self.config.credit == "episode":
            return self.collect_episode_samples()
        return self.collect_step_samples()

    # -- the update --------------------------------------------------------------------------------
    def update(self, samples: list[Sample]) -> dict[str, float]:
        """Policy-gradient steps on one iteration's samples (`ppo_epochs` passes in mini-batches)."""
        c = self.config
        logged = reward_stats(samples)
        if c.drop_flat_groups:
            samples = drop_flat_groups(samples)
        logged["updated_samples"] = len(samples)
        if not samples:  # every group flat: no step is taken (its loss terms log as 0); the schedule advances
            return {**dict.fromkeys(UPDATE_STATS, 0.0), **logged, "tokens": 0, "lr": self._advance_schedule()}
        batch = self._update_batch(samples)
        stats: dict[str, list[float]] = {k: [] for k in UPDATE_STATS}
        order_rng = torch.Generator().manual_seed(c.seed * 7919 + self.iteration)
        prompts_per_step = max(1, c.mini_batch_size // batch.sequences.repeats)
        self.model.train()
        for _ in range(c.ppo_epochs):
            order = torch.randperm(batch.prompts, generator=order_rng)  # [U]
            for start in range(0, batch.prompts, prompts_per_step):
                part = batch.select(order[start : start + prompts_per_step])  # sliced once, every field
                logprobs, entropy = completion_logprobs(
                    self.model, part.sequences, with_entropy=True, temperature=c.temperature
                )  # [n, T], [n, T]
                loss, terms = policy_objective(
                    logprobs, entropy, part.old_logprobs, part.ref_logprobs, part.advantages, part.mask, c
                )
                stats["grad_norm"].append(self._optimiser_step(loss))
                stats["loss"].append(loss.item())
                for key, value in terms.items():
                    stats[key].append(value.item())
                # How far the policy has moved from the behaviour policy on these tokens (verl's ppo_kl): 0
                # on the first step of an iteration, when sampling and training log-probs agree.
                drift = (part.old_logprobs - logprobs.detach()) * part.mask  # [n, T]
                stats["ppo_kl"].append((drift.sum() / part.mask.sum().clamp(min=1.0)).item())
        summary = {k: float(np.mean(v)) if v else 0.0 for k, v in stats.items()}
        mask = batch.mask
        if c.kl_in_reward and batch.ref_logprobs is not None:  # the k1 paid in the return, per token
            k1 = (batch.old_logprobs - batch.ref_logprobs) * mask  # [N, T]
            summary["kl"] = (k1.sum() / mask.sum().clamp(min=1.0)).item()
        return summary | logged | {"tokens": int(mask.sum().item()), "lr": self._advance_schedule()}

    def _update_batch(self, samples: list[Sample]) -> UpdateBatch:
        """One iteration's samples as tensors: packed sequences, behaviour and reference log-probs, advantages.

        Step credit: samples come in blocks of G completions of one prompt, which runs through the model once
        per block. Episode credit: every turn has its own prompt."""
        c = self.config
        share = c.group_size if c.credit == "step" else 1
        prompts = [samples[i].prompt_ids for i in range(0, len(samples), share)]  # U = N / share
        if any(s.prompt_ids != prompts[i // share] for i, s in enumerate(samples)):
            raise ValueError(f"step-credit samples must come in blocks of {share} completions of one prompt")
        sequences = pack_sequences(prompts, [s.completion_ids for s in samples], self.pad_id, repeats=share)
        mask = sequences.completion_mask  # [N, T]
        old_logprobs = torch.zeros_like(mask)  # [N, T]: the behaviour policy's, from sampling
        for row, sample in enumerate(samples):
            old_logprobs[row, : len(sample.behaviour_logprobs)] = torch.tensor(sample.behaviour_logprobs)
        ref_logprobs = self._reference_logprobs(sequences) if self.reference is not None else None  # [N, T]
        rewards, groups, episodes = (
            torch.tensor([getattr(s, k) for s in samples]) for k in ("reward", "group", "episode")
        )
        advantages = self._advantages(rewards, groups, episodes, old_logprobs, ref_logprobs, mask)  # [N, T]
        return UpdateBatch(sequences, old_logprobs, ref_logprobs, advantages)

    def _optimiser_step(self, loss: torch.Tensor) -> float:
        """Backward, clip, step; the gradient norm before clipping. A non-finite loss or gradient stops the run
        before the weights are touched."""
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.config.grad_clip)
        if not (torch.isfinite(loss) and torch.isfinite(grad_norm)):
            raise TrainingDiverged(
                f"loss {loss.item()}, gradient norm {grad_norm.item()} at iteration {self.iteration}; stopped, "
                f"last good checkpoint kept in {self.checkpoint_dir}"
            )
        self.optimizer.step()
        return grad_norm.item()

    def _advance_schedule(self) -> float:
        """The learning rate this iteration used; the schedule runs over iterations, updated or not."""
        lr = self.scheduler.get_last_lr()[0]
        self.scheduler.step()
        return lr

    def _advantages(self, rewards, groups, episodes, old_logprobs, ref_logprobs, mask) -> torch.Tensor:
        """[N, T] advantages: GRPO's group-normalised episode reward on every token, or Reinforce++'s
        whitened returns (with `kl_in_reward`, the k1 KL to the reference paid per token inside them)."""
        c = self.config
        if c.algo == "grpo":
            return episode_group_advantages(rewards, groups, episodes, c.normalize_std)[:, None] * mask
        paid = c.kl_in_reward and ref_logprobs is not None
        token_kl = (old_logprobs - ref_logprobs) if paid else torch.zeros_like(mask)  # [N, T]
        return reinforce_pp_advantages(rewards, token_kl, mask, kl_coef=c.kl_coef)

    @torch.no_grad()
    def _reference_logprobs(self, batch) -> torch.Tensor:
        out = torch.zeros_like(batch.completion_mask)
        n_prompts = batch.prompt_ids.shape[0]
        step = max(1, self.config.mini_batch_size // batch.repeats)
        for start in range(0, n_prompts, step):
            units = torch.arange(start, min(n_prompts, start + step))
            out[batch.completion_rows(units)] = completion_logprobs(
                self.reference, batch.select_prompts(units), temperature=self.config.temperature
            )[0]
        return out

    # -- checkpoints -------------------------------------------------------------------------------
    @property
    def checkpoint_dir(self) -> Path:
        return self.out_dir / "checkpoints"

    def save_checkpoint(self) -> Path:
        """Atomic, in the resume format both trainers share (resume.py). Keeps the newest `keep_last`."""
        path = self.checkpoint_dir / f"iter-{self.iteration:06d}.pt"
        state = {
            "iteration": self.iteration,
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "config": asdict(self.config),
        }
        save_train_state(self.model, self.tokenizer, path, state)
        for old in sorted(self.checkpoint_dir.glob("iter-*.pt"))[: -self.config.keep_last]:
            old.unlink()
        return path

    def load_latest_checkpoint(self) -> bool:
        checkpoints = sorted(self.checkpoint_dir.glob("iter-*.pt"))
        if not checkpoints:
            return False
        weights, state = load_train_state(checkpoints[-1])
        self.model.load_state_dict(weights)
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.iteration = int(state["iteration"])
        return True

    # -- the loop ----------------------------------------------------------------------------------
    def validate(self) -> dict[str, Any]:
        """Greedy Solve-F1 and the role-NLL table on the validation slice; logged and kept in
        validation.jsonl."""
        self.model.eval()
        row = self.validation.run(self.model, self.tokenizer, self.sandbox, self.iteration)
        row = {"iteration": row.pop("step"), **row}
        with (self.out_dir / "validation.jsonl").open("a") as handle:
            handle.write(json.dumps(row) + "\n")
        for line in validation_lines(row):
            self.log(line)
        return row

    def plot(self) -> Path | None:
        """curves.png from the run's metrics.jsonl and validation.jsonl (the newest row per iteration)."""
        rows, validation = (read_rows(self.out_dir / name) for name in ("metrics.jsonl", "validation.jsonl"))
        self.plotted_at = self.iteration
        return plot_rl_curves(rows, validation, self.out_dir / "curves.png")

    def train(
        self, resume: bool = False, on_iteration: Callable[[dict[str, Any]], None] | None = None
    ) -> list[dict]:
        c = self.config
        if resume and self.load_latest_checkpoint():
            self.log(f"resumed from iteration {self.iteration}")
        self.out_dir.mkdir(parents=True, exist_ok=True)
        if not resume:
            for name in ("metrics.jsonl", "validation.jsonl"):
                (self.out_dir / name).unlink(missing_ok=True)
        validating = self.validation is not None and c.eval_every > 0
        if validating and self.iteration == 0:
            self.validate()  # where every validation curve starts
        history = []
        with _sigint_sets_flag(self):
            while self.iteration < c.iterations and not self.stop_requested:
                if not all(torch.isfinite(p).all() for p in self.model.parameters()):
                    raise TrainingDiverged(
                        f"model weights became NaN or Inf before iteration {self.iteration}; stopped, last "
                        f"good checkpoint kept in {self.checkpoint_dir}"
                    )
                started = time.perf_counter()
                samples, rollout_stats = self.collect()
                sampled = time.perf_counter()
                if not samples:
                    raise TrainingDiverged(f"iteration {self.iteration} produced no samples")
                update_stats = self.update(samples)
                updated = time.perf_counter()
                self.iteration += 1
                row = {
                    "iteration": self.iteration,
                    **rollout_stats,
                    **update_stats,
                    "sample_seconds": sampled - started,
                    "update_seconds": updated - sampled,
                    "samples_per_second": len(samples) / (updated - started),
                    "tokens_per_second": update_stats["tokens"] / (updated - started),
                }
                if (warning := zero_spread_warning(row)) is not None:
                    self.log(warning)
                validated = validating and (
                    self.iteration % c.eval_every == 0 or self.iteration == c.iterations
                )
                if validated:
                    row.update({k: v for k, v in self.validate().items() if k != "iteration"})
                with (self.out_dir / "metrics.jsonl").open("a") as handle:
                    handle.write(json.dumps(row) + "\n")
                if validated:  # the curves so far, for a run one watches
                    self.plot()
                if c.save_every and (self.iteration % c.save_every == 0 or self.iteration == c.iterations):
                    self.save_checkpoint()
                history.append(row)
                if on_iteration is not None:
                    on_iteration(row)
            if self.stop_requested:
                self.save_checkpoint()
                self.log(f"interrupted: saved iteration {self.iteration} to {self.checkpoint_dir}")
        if self.plotted_at != self.iteration:
            self.plot()
        return history


# -- the command ----------------------------------------------------------------------------------
def train_grpo(
    envs_dir: str | Path,
    init: str | Path,
    out_dir: str | Path,
    config: GRPOConfig,
    resume: bool = False,
    on_iteration: Callable[[dict[str, Any]], None] | None = None,
    log: Callable[[str], None] = print,
    placement: Placement | None = None,
) -> dict[str, Any]:
    """Load the environments and the initial policy (on `placement`'s device, in float32 whatever the checkpoint
    stores: AdamW steps on bfloat16 weights lose every change below half a ULP), train on train.jsonl minus its validation slice, and
    write `trained.pt` plus an HF directory, metrics.csv, validation.csv and curves.png (and, with
    `test_at_end`, the one evaluation on the test split in test/)."""
    import pandas as pd

    envs_dir, out_dir = Path(envs_dir), Path(out_dir)
    placement = placement or Placement()
    if resolve_dtype(placement.dtype, "cpu") not in (None, torch.float32):
        raise ConfigError(
            f"--dtype {placement.dtype}: train-grpo trains float32 weights (AdamW on {placement.dtype} weights drops "
            "every step below half a ULP, so at a real checkpoint's learning rate most weights never move); "
            "leave --dtype out, or train in mixed precision with verl"
        )
    records = training_records(envs_dir)
    test_path = envs_dir / "test.jsonl"
    if config.test_at_end and not test_path.is_file():
        raise ConfigError(f"config key 'test_at_end' needs a test split, and {test_path} does not exist")
    seed_torch(config.seed, config.threads)
    model, tokenizer = load_policy(
        resolve_policy_path(init), placement=Placement(placement.device, "float32")
    )
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


def read_rows(path: Path) -> list[dict[str, Any]]:
    """The JSON lines of `path` (none if it is missing), keeping the newest row of each iteration: a run
    resumed from an older checkpoint repeats the iterations after it."""
    if not path.exists():
        return []
    rows = {}
    for line in path.read_text().splitlines():
        if line.strip():
            row = json.loads(line)
            rows[row["iteration"]] = row
    return [rows[key] for key in sorted(rows)]


@contextlib.contextmanager
def _sigint_sets_flag(trainer: GRPOTrainer):
    """Ctrl-C finishes the current iteration, saves, and returns instead of dying mid-write."""

    def handler(signum, frame):
        trainer.stop_requested = True

    try:
        previous = signal.signal(signal.SIGINT, handler)
    except ValueError:  # not in the main thread
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
