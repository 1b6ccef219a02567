"""The objective one optimiser step minimises: PPO's clipped surrogate, the k3 KL to the reference, the
entropy bonus, and how per-token terms become one number. `policy_objective` at the bottom is the whole
objective; the functions above it are its parts.

Shapes: every per-token tensor is [N, T] with a 0/1 `mask` over the completion tokens the policy produced.
Conventions follow verl, the engine FTRL trained with, so that numbers mean the same thing here and there.
"""

from __future__ import annotations

from typing import Protocol

import torch

LOSS_AGGREGATIONS = ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum-norm")
# The clip fractions `clipped_policy_loss` reports.
CLIP_STATS = ("clip_fraction", "clip_low", "clip_high", "clip_higher_region")


# -- KL and entropy --------------------------------------------------------------------------------
def k3_kl(logprobs: torch.Tensor, ref_logprobs: torch.Tensor, clamp: float = 10.0) -> torch.Tensor:
    """Schulman's k3 estimator of KL(policy || reference) per token, verl's `low_var_kl`.

    k3 = exp(ref - logp) - (ref - logp) - 1 >= 0, unbiased and low-variance; the log-ratio is clamped
    to +-20 before exp and the result to [-clamp, clamp] so one outlier token cannot blow up the loss.
    """
    log_ratio = (ref_logprobs - logprobs).clamp(-20.0, 20.0)  # [N, T]
    kl = torch.exp(log_ratio) - log_ratio - 1.0  # [N, T]
    return kl.clamp(-clamp, clamp)


def entropy_from_logits(logits: torch.Tensor) -> torch.Tensor:
    """Per-token entropy of the categorical distribution given by `logits` ([N, T, V] -> [N, T])."""
    log_probs = torch.log_softmax(logits.float(), dim=-1)  # [N, T, V]
    return -(log_probs.exp() * log_probs).sum(dim=-1)


# -- aggregation and the policy loss ---------------------------------------------------------------
def aggregate_loss(
    loss: torch.Tensor, mask: torch.Tensor, mode: str = "token-mean", horizon: int | None = None
) -> torch.Tensor:
    """Reduce a per-token loss [N, T] to a scalar.

    token-mean: every token weighs the same (long answers weigh more).
    seq-mean-token-mean: every sequence weighs the same (original GRPO).
    seq-mean-token-sum-norm: the mean over sequences of token sums divided by a constant `horizon` (Dr.GRPO:
      the generation budget, `max_new_tokens`; oat's `masked_sum(..., constant_normalizer=generate_max_length)`,
      verl's `loss_scale_factor`). Not the padded width T of the batch, which changes from batch to batch and
      would bring back the length bias Dr.GRPO removes.
    """
    mask = mask.to(loss.dtype)
    if mode == "token-mean":
        return (loss * mask).sum() / mask.sum().clamp(min=1.0)
    if mode == "seq-mean-token-mean":
        per_sequence = (loss * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1.0)  # [N]
        return per_sequence.mean()
    if mode == "seq-mean-token-sum-norm":
        if horizon is None or horizon < loss.shape[1]:
            raise ValueError(f"seq-mean-token-sum-norm needs a constant horizon >= the width {loss.shape[1]}")
        return (loss * mask).sum() / (loss.shape[0] * horizon)
    raise ValueError(f"unknown loss aggregation '{mode}' (choose from {', '.join(LOSS_AGGREGATIONS)})")


def clipped_policy_loss(
    logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    clip_eps: float = 0.2,
    clip_eps_high: float | None = None,
    aggregation: str = "token-mean",
    horizon: int | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """PPO's clipped surrogate. `advantages` is [N] (broadcast over tokens) or [N, T].

    clip_eps_high > clip_eps is DAPO's clip-higher: low-probability tokens may grow further, which keeps
    entropy from collapsing. Returns (loss, fractions of the completion tokens): `clip_low` (negative
    advantage, ratio below 1 - clip_eps: no gradient), `clip_high` (positive advantage, ratio above
    1 + clip_eps_high: no gradient), `clip_higher_region` (positive advantage, ratio in (1 + clip_eps,
    1 + clip_eps_high]: the tokens symmetric PPO would clip and clip-higher still trains; 0 when the bounds
    are equal), and `clip_fraction` = clip_low + clip_high.
    """
    if advantages.dim() == 1:
        advantages = advantages[:, None].expand_as(logprobs)  # [N] -> [N, T]
    high = clip_eps if clip_eps_high is None else clip_eps_high
    ratio = torch.exp((logprobs - old_logprobs).clamp(-20.0, 20.0))  # [N, T]
    unclipped = -advantages * ratio  # [N, T]
    clipped = -advantages * ratio.clamp(1.0 - clip_eps, 1.0 + high)  # [N, T]
    per_token = torch.maximum(unclipped, clipped)  # [N, T]
    with torch.no_grad():
        positive, negative = advantages > 0, advantages < 0  # [N, T]
        regions = {
            "clip_low": negative & (ratio < 1.0 - clip_eps),
            "clip_high": positive & (ratio > 1.0 + high),
            "clip_higher_region": positive & (ratio > 1.0 + clip_eps) & (ratio <= 1.0 + high),
        }
        tokens = mask.sum().clamp(min=1.0)
        fractions = {name: (region.to(mask.dtype) * mask).sum() / tokens for name, region in regions.items()}
        fractions["clip_fraction"] = fractions["clip_low"] + fractions["clip_high"]
    return aggregate_loss(per_token, mask, aggregation, horizon), fractions


# -- the objective ----------------------------------------------------------------------------------
class ObjectiveConfig(Protocol):
    """The fields of `GRPOConfig` the objective reads."""

    clip_eps: float
    clip_eps_high: float
    loss_aggregation: str
    max_new_tokens: int
    entropy_coef: float
    kl_coef: float
    kl_clamp: float
    kl_in_reward: bool


def policy_objective(
    logprobs: torch.Tensor,
    entropy: torch.Tensor,
    old_logprobs: torch.Tensor,
    ref_logprobs: torch.Tensor | None,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    config: ObjectiveConfig,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The loss one optimiser step minimises, and its logged parts (kl, entropy, the clip fractions).

    loss = clipped policy loss - entropy_coef * entropy + kl_coef * k3 KL to the reference (verl's
    `use_kl_loss` with `low_var_kl`, FTRL's setting for GRPO and Reinforce++). With `kl_in_reward` the KL is
    paid inside the return instead (`reinforce_pp_advantages`) and is not part of this loss: `kl` is then
    not reported here. Every per-token input is [N, T]; `ref_logprobs` is None when there is no reference
    model. All three terms aggregate the same way (`loss_aggregation`, horizon `max_new_tokens`).
    """
    horizon = config.max_new_tokens
    pg_loss, fractions = clipped_policy_loss(
        logprobs,
        old_logprobs,
        advantages,
        mask,
        clip_eps=config.clip_eps,
        clip_eps_high=config.clip_eps_high,
        aggregation=config.loss_aggregation,
        horizon=horizon,
    )  # [], {name: []}
    entropy_mean = aggregate_loss(entropy, mask, config.loss_aggregation, horizon)  # []
    loss = pg_loss - config.entropy_coef * entropy_mean
    parts = {"entropy": entropy_mean.detach(), **fractions}
    if ref_logprobs is not None and not config.kl_in_reward:
        kl = aggregate_loss(
            k3_kl(logprobs, ref_logprobs, clamp=config.kl_clamp), mask, config.loss_aggregation, horizon
        )  # []
        loss = loss + config.kl_coef * kl
        parts["kl"] = kl.detach()
    return loss, parts
