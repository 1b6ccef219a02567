"""GRPO / Reinforce++ on tool-use environments, the FTRL recipe, readable top to bottom.

One iteration:
  1. play training environments with the current policy (sampling at `temperature`, up to 20 turns);
  2. cut the episodes into per-step samples (history so far, remaining `unsolved_set`, `solve_rate`),
     as FTRL's `data_sample.py` does (with `oracle_prefix_share`, part of them come from golden-trajectory
     prefixes instead);
  3. sample G next-turn completions per sample and score each with the step reward (f1 by default);
  4. take clipped policy-gradient steps on those completions (advantages from advantages.py).
With `credit = "episode"` steps 2-3 are replaced by G whole episodes per environment scored by their
episode Solve-F1; every assistant turn of an episode shares its advantage and tool output never enters
the loss (it lives in the prompts).

Every `eval_every` iterations (and before the first, and after the last) a validation slice of the training environments, held
out of RL, gives greedy Solve-F1 and the role-NLL table; the test split is evaluated at most once, at the
end (`test_at_end`).
"""

from __future__ import annotations

import contextlib
import copy
import json
import math
import random
import signal
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from toolrl_analysis.config import require
from toolrl_analysis.envs.reward import REWARD_VARIANTS
from toolrl_analysis.envs.schema import EnvRecord
from toolrl_analysis.errors import TrainingDiverged
from toolrl_analysis.rollout import (
    ModelPolicy,
    decode_completion,
    generate,
    pad_token_id_for,
    run_episodes,
    stop_token_ids,
)
from toolrl_analysis.training.advantages import (
    CLIP_STATS,
    LOSS_AGGREGATIONS,
    episode_group_advantages,
    policy_objective,
    reinforce_pp_advantages,
)
from toolrl_analysis.training.base_validation import Validation
from toolrl_analysis.training.rl_curves import plot_rl_curves, validation_lines, zero_spread_warning
from toolrl_analysis.training.schedules import cosine_under_warmup, linear_warmup
from toolrl_analysis.training.sequences import check_logits_path, completion_logprobs, pack_sequences
from toolrl_analysis.training.step_samples import Sample, oracle_prefix_states, score_completions, step_states

# What one update logs from its optimiser steps (means over them; 0 when no step was taken).
UPDATE_STATS = ("loss", "kl", "entropy", "grad_norm", "ppo_kl", *CLIP_STATS)


@dataclass
class GRPOConfig:
    """One `train-grpo` run (training/grpo.toml; every field can be set with `--set key=value`).

    Each field's comment says what it does, its unit, and the paper or reference it follows. References:
    GRPO (Shao et al. 2024, DeepSeekMath), Dr.GRPO (Liu et al. 2025, "Understanding R1-Zero-Like Training"),
    DAPO (Yu et al. 2025), Reinforce++ (Hu 2025), PPO (Schulman et al. 2017), FTRL (Ye et al. 2025), and verl,
    the engine FTRL trained with, whose conventions advantages.py follows.
    """

    # Advantage estimator: "grpo" (rewards centred, and by default scaled, within each group; GRPO) or
    # "reinforce++" (KL paid per token inside the return, advantages whitened over the batch; Reinforce++).
    algo: str = "grpo"
    # What one sample is: "step" (FTRL: each state an episode passed through, G next turns scored by the step
    # reward) or "episode" (G whole episodes per environment, every turn scored by the episode's Solve-F1).
    credit: str = "step"
    # Iterations (sample, then update) of the run; the learning-rate schedule runs over them.
    iterations: int = 40
    # Training environments played per iteration (a seeded draw without replacement).
    envs_per_iteration: int = 16
    # G: completions per state (episodes per environment with episode credit); the group is the baseline.
    group_size: int = 8
    # States kept per iteration (a seeded random subset when there are more); each gets G completions.
    max_samples_per_iteration: int = 48
    # Assistant turns before an episode stops (FTRL: 20).
    max_turns: int = 20
    # Tokens sampled per assistant turn.
    max_new_tokens: int = 96
    # Tokens; an episode whose next prompt is longer stops (`prompt_too_long`).
    max_prompt_tokens: int = 1536
    # Sampling temperature of rollouts and completions (> 0). The log-probs of the ratio, the KL and the entropy
    # are taken from logits / temperature as well, as verl does (its actor and reference divide the logits by
    # the rollout temperature), so the ratio is exactly 1 before the first step at any temperature. FTRL: 0.7.
    temperature: float = 1.0
    # Step reward with p calls and q newly solved sub-questions: "f1" 2q/(p+1) (FTRL's), "precision" q/p,
    # "rate" q, "pr" q^2/p (envs/reward.py).
    reward_variant: str = "f1"
    # AdamW peak learning rate (betas 0.9, 0.999).
    lr: float = 5e-5
    # AdamW decoupled weight decay (Loshchilov & Hutter 2019).
    weight_decay: float = 0.0
    # Learning-rate multiplier per iteration: "constant", "warmup" (linear ramp over warmup_steps), or
    # "cosine" (down to 10% over `iterations`, times the warm-up ramp; training/schedules.py).
    schedule: str = "constant"
    # Iterations of linear warm-up ("warmup" and "cosine" schedules).
    warmup_steps: int = 0
    # Maximum global L2 norm of the gradient per optimiser step.
    grad_clip: float = 1.0
    # PPO ratio clip, lower side: the ratio is clipped at 1 - clip_eps (PPO).
    clip_eps: float = 0.2
    # Upper side, 1 + clip_eps_high; above clip_eps it is DAPO's clip-higher (keeps entropy from collapsing).
    clip_eps_high: float = 0.28
    # Weight of the KL to the frozen initial policy; 0 keeps no reference model.
    kl_coef: float = 0.001
    # Where that KL goes. False: a k3 estimate (verl's low_var_kl) added to the loss, for GRPO and Reinforce++
    # alike, as FTRL's launchers do (use_kl_loss=True, use_kl_in_reward=False). True (Reinforce++ only): the
    # k1 estimate log pi_old - log pi_ref paid per token inside the return (Reinforce++, Hu 2025; verl's
    # use_kl_in_reward=True with kl_penalty=kl), and no KL in the loss. The logged `kl` is the one optimised.
    kl_in_reward: bool = False
    # Per-token k3 values are clamped to [-kl_clamp, kl_clamp] (verl).
    kl_clamp: float = 10.0
    # Weight of the entropy bonus (subtracted from the loss).
    entropy_coef: float = 0.001
    # Per-token loss to scalar: "token-mean" (every token alike; DAPO), "seq-mean-token-mean" (every
    # sequence alike; original GRPO, and FTRL's verl default), "seq-mean-token-sum-norm" (token sums over the
    # constant `max_new_tokens`, averaged over sequences; Dr.GRPO).
    loss_aggregation: str = "token-mean"
    # Divide group-centred rewards by the group's std (GRPO); False leaves them unscaled (Dr.GRPO).
    normalize_std: bool = True
    # Leave groups whose completions all scored the same out of the update. Under GRPO their advantages are 0,
    # so they only add KL and entropy terms and cost a forward and backward pass; under Reinforce++ (baseline:
    # the batch mean) they would carry batch-level signal, which the filter removes. DAPO's dynamic-sampling
    # filter (`algorithm.filter_groups` in verl's DAPO recipe, applied before the advantages are computed)
    # without its refill: the update is smaller, not topped up with new samples. Not in FTRL's recipe.
    drop_flat_groups: bool = False
    # Share of each iteration's states (max_samples_per_iteration) taken from oracle prefixes: the states on
    # an environment's golden trajectory after one or more correct turns, so later hops and the final answer
    # get practised although the policy rarely reaches them itself (step credit only; the rest are the
    # policy's own states, as in FTRL). Not in FTRL's recipe; 0 turns it off.
    oracle_prefix_share: float = 0.0
    # Passes over one iteration's samples (PPO epochs).
    ppo_epochs: int = 1
    # Completions per optimiser step, rounded down to whole groups in step credit (at least one group).
    mini_batch_size: int = 64
    # Sequences sampled together in one batched generate() call.
    generation_batch_size: int = 64
    # Iterations between validations (and one before the first iteration and one after the last, so the
    # trained policy is always measured); 0 never validates. A validation
    # is greedy Solve-F1 (max_turns, max_new_tokens) on `val_solve_envs` environments per scenario and the
    # role-NLL table of the context-reading meter on `val_meter_envs` per scenario, both from the end of
    # train.jsonl (the slice train-base validates on) and both held out of RL training. Never the test split.
    eval_every: int = 10
    val_solve_envs: int = 16
    val_meter_envs: int = 25
    # After the last iteration, evaluate the trained policy once on the whole test split (out/test/, as
    # `evaluate` writes it; greedy, max_turns and max_new_tokens as above). Choose on validation, report test once.
    test_at_end: bool = False
    # Iterations between checkpoints (and one at the last iteration); 0 saves only on Ctrl-C.
    save_every: int = 10
    # Newest checkpoints kept in out/checkpoints.
    keep_last: int = 2
    # Every random draw (environments, sampling, mini-batch order) derives from (seed, iteration), so a
    # resumed run replays an uninterrupted one.
    seed: int = 0
    # Sandbox worker processes that run tool calls.
    sandbox_workers: int = 2
    # torch intra-op threads; 0 keeps torch's default.
    threads: int = 0

    def validate(self) -> None:
        require(self.algo in ("grpo", "reinforce++"), "algo", "must be 'grpo' or 'reinforce++'")
        require(self.credit in ("step", "episode"), "credit", "must be 'step' or 'episode'")
        require(self.reward_variant in REWARD_VARIANTS, "reward_variant", f"must be one of {REWARD_VARIANTS}")
        require(
            self.loss_aggregation in LOSS_AGGREGATIONS,
            "loss_aggregation",
            f"must be one of {LOSS_AGGREGATIONS}",
        )
        require(
            self.schedule in ("constant", "warmup", "cosine"),
            "schedule",
            "must be constant, warmup or cosine",
        )
        for key in (
            "iterations",
            "envs_per_iteration",
            "max_samples_per_iteration",
            "max_turns",
            "max_new_tokens",
            "max_prompt_tokens",
            "ppo_epochs",
            "mini_batch_size",
            "generation_batch_size",
            "keep_last",
            "sandbox_workers",
        ):
            require(getattr(self, key) >= 1, key, "must be at least 1")
        require(self.group_size >= 2, "group_size", "must be at least 2 (a group of one has no baseline)")
        require(self.lr > 0 and math.isfinite(self.lr), "lr", "must be a positive number")
        for key in (
            "weight_decay",
            "warmup_steps",
            "kl_coef",
            "entropy_coef",
            "eval_every",
            "val_solve_envs",
            "val_meter_envs",
            "save_every",
            "threads",
        ):
            require(getattr(self, key) >= 0, key, "must not be negative")
        require(self.temperature > 0, "temperature", "must be positive (sampling)")
        require(0.0 <= self.oracle_prefix_share <= 1.0, "oracle_prefix_share", "must be a share in [0, 1]")
        require(
            self.credit == "step" or self.oracle_prefix_share == 0,
            "oracle_prefix_share",
            "needs credit 'step' (oracle prefixes are states, not episodes)",
        )
        require(self.grad_clip > 0, "grad_clip", "must be positive")
        require(0 < self.clip_eps < 1, "clip_eps", "must be in (0, 1)")
        require(self.clip_eps_high >= self.clip_eps, "clip_eps_high", "must be at least clip_eps")
        require(self.kl_clamp > 0, "kl_clamp", "must be positive")
        require(  # a constant schedule has no ramp: a warm-up set with it would silently do nothing
            self.schedule != "constant" or self.warmup_steps == 0,
            "warmup_steps",
            "has no effect with schedule 'constant' (use schedule 'warmup' or 'cosine')",
        )
        require(
            not self.kl_in_reward or self.algo == "reinforce++",
            "kl_in_reward",
            "puts the KL into Reinforce++'s per-token return; GRPO takes it as a loss (set it to false)",
        )


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
        """Policy-gradient steps on one iteration's samples. Shapes: N completions of U distinct prompts,
        T completion tokens (padded)."""
        c = self.config
        all_rewards = torch.tensor([s.reward for s in samples])  # [N]
        all_groups = torch.tensor([s.group for s in samples])  # [N]
        group_ids = torch.unique(all_groups)
        flat = {int(g) for g in group_ids if all_rewards[all_groups == g].unique().numel() == 1}
        logged = dict(
            reward_mean=all_rewards.mean().item(),
            reward_std=all_rewards.std().item() if len(all_rewards) > 1 else 0.0,
            zero_spread_groups=len(flat) / len(group_ids),
            samples=len(samples),
        )
        if c.drop_flat_groups:
            samples = [s for s in samples if s.group not in flat]
        logged["updated_samples"] = len(samples)
        if not samples:  # every group flat: no step is taken (its loss terms log as 0); the schedule advances
            return {**dict.fromkeys(UPDATE_STATS, 0.0), **logged, "tokens": 0, "lr": self._advance_schedule()}
        rewards = torch.tensor([s.reward for s in samples])  # [N]
        groups = torch.tensor([s.group for s in samples])  # [N]
        episodes = torch.tensor([s.episode for s in samples])  # [N]
        # Step credit: samples come in blocks of G completions of one prompt, which runs through the model
        # once per block. Episode credit: every turn has its own prompt.
        share = c.group_size if c.credit == "step" else 1
        prompts = [samples[i].prompt_ids for i in range(0, len(samples), share)]  # U = N / share
        if any(s.prompt_ids != prompts[i // share] for i, s in enumerate(samples)):
            raise ValueError(f"step-credit samples must come in blocks of {share} completions of one prompt")
        batch = pack_sequences(prompts, [s.completion_ids for s in samples], self.pad_id, repeats=share)
        mask = batch.completion_mask  # [N, T]
        old_logprobs = torch.zeros_like(mask)  # [N, T]: the behaviour policy's, from sampling
        for row, sample in enumerate(samples):
            old_logprobs[row, : len(sample.behaviour_logprobs)] = torch.tensor(sample.behaviour_logprobs)
        ref_logprobs = self._reference_logprobs(batch) if self.reference is not None else None  # [N, T]
        advantages = self._advantages(rewards, groups, episodes, old_logprobs, ref_logprobs, mask)  # [N, T]

        stats: dict[str, list[float]] = {k: [] for k in UPDATE_STATS}
        order_rng = torch.Generator().manual_seed(c.seed * 7919 + self.iteration)
        self.model.train()
        prompts_per_step = max(1, c.mini_batch_size // share)
        for _ in range(c.ppo_epochs):
            order = torch.randperm(len(prompts), generator=order_rng)  # [U]
            for start in range(0, len(prompts), prompts_per_step):
                units = order[start : start + prompts_per_step]  # [u] prompts of this mini-batch
                index = batch.completion_rows(units)  # [n = u * share] their completions
                sub = batch.select_prompts(units)
                logprobs, entropy = completion_logprobs(
                    self.model, sub, with_entropy=True, temperature=c.temperature
                )  # [n, T], [n, T]
                loss, parts = policy_objective(
                    logprobs,
                    entropy,
                    old_logprobs[index],
                    None if ref_logprobs is None else ref_logprobs[index],
                    advantages[index],
                    sub.completion_mask,
                    c,
                )
                if not torch.isfinite(loss):
                    raise TrainingDiverged(
                        f"loss became {loss.item()} at iteration {self.iteration}; stopped, last good "
                        f"checkpoint kept in {self.out_dir / 'checkpoints'}"
                    )
                self.optimizer.zero_grad(set_to_none=True)
                loss.backward()
                grad_norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), c.grad_clip)
                if not torch.isfinite(grad_norm):
                    raise TrainingDiverged(
                        f"gradient norm became {grad_norm.item()} at iteration {self.iteration}; stopped, "
                        f"last good checkpoint kept in {self.out_dir / 'checkpoints'}"
                    )
                self.optimizer.step()
                stats["loss"].append(loss.item())
                for key, value in parts.items():
                    stats[key].append(value.item())
                stats["grad_norm"].append(grad_norm.item())
                # How far the policy has moved from the behaviour policy on these tokens (verl's ppo_kl): 0
                # on the first step of an iteration, when sampling and training log-probs agree.
                drift = (old_logprobs[index] - logprobs.detach()) * sub.completion_mask  # [n, T]
                stats["ppo_kl"].append((drift.sum() / sub.completion_mask.sum().clamp(min=1.0)).item())
        lr = self._advance_schedule()
        summary = {k: float(np.mean(v)) if v else 0.0 for k, v in stats.items()}
        if c.kl_in_reward and ref_logprobs is not None:  # the k1 paid in the return, per token
            summary["kl"] = (((old_logprobs - ref_logprobs) * mask).sum() / mask.sum().clamp(min=1.0)).item()
        summary.update(**logged, tokens=int(mask.sum().item()), lr=lr)
        return summary

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
        """Atomic: written to a temporary name, then renamed. Keeps the newest `keep_last`."""
        self.checkpoint_dir.mkdir(parents=True, exist_ok=True)
        path = self.checkpoint_dir / f"iter-{self.iteration:06d}.pt"
        state = {
            "iteration": self.iteration,
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "config": json.dumps(asdict(self.config)),
        }
        tmp = path.with_suffix(".pt.tmp")
        torch.save(state, tmp)
        tmp.replace(path)
        for old in sorted(self.checkpoint_dir.glob("iter-*.pt"))[: -self.config.keep_last]:
            old.unlink()
        return path

    def load_latest_checkpoint(self) -> bool:
        checkpoints = sorted(self.checkpoint_dir.glob("iter-*.pt"))
        if not checkpoints:
            return False
        state = torch.load(checkpoints[-1], weights_only=True)
        self.model.load_state_dict(state["model"])
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
