"""The GRPO / Reinforce++ recipe: every key of `train-grpo`, documented with the paper it comes from."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

from toolrl_analysis.config import require
from toolrl_analysis.envs.reward import REWARD_VARIANTS
from toolrl_analysis.training.objective import LOSS_AGGREGATIONS


@dataclass
class GRPOConfig:
    """One `train-grpo` run. The defaults are the shipped recipe for the embedded model, chosen on the
    validation split (every run tried: docs/recipes.md); `--config FILE` and `--set key=value` override them,
    and `train-grpo --print-config` prints them as TOML. A real checkpoint wants a far smaller `lr`.

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
    lr: float = 3e-4
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
    drop_flat_groups: bool = True
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
    # role-NLL table of the context-reading meter on `val_meter_envs` per scenario, both from the build's
    # validation.jsonl (held-out worlds; an older build without one: the end of train.jsonl, held out of RL).
    # Never the test split.
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

    SECTIONS: ClassVar[dict[str, tuple[str, ...]]] = {
        "algorithm": (
            "algo", "credit", "reward_variant", "group_size", "normalize_std", "clip_eps", "clip_eps_high",
            "kl_coef", "kl_in_reward", "kl_clamp", "entropy_coef", "loss_aggregation", "drop_flat_groups",
        ),
        "sampling": (
            "iterations", "envs_per_iteration", "max_samples_per_iteration", "oracle_prefix_share", "max_turns",
            "max_new_tokens", "max_prompt_tokens", "temperature", "generation_batch_size",
        ),
        "optimiser": (
            "lr", "weight_decay", "schedule", "warmup_steps", "grad_clip", "ppo_epochs", "mini_batch_size",
        ),
        "run": (
            "eval_every", "val_solve_envs", "val_meter_envs", "test_at_end", "save_every", "keep_last", "seed",
            "sandbox_workers", "threads",
        ),
    }  # fmt: skip

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
