"""Advantages: how a reward becomes a per-token learning signal (GRPO's group baseline, Reinforce++'s
batch-whitened return). The loss they enter is in objective.py.

Shapes: `rewards` is [N] (one scalar per completion), everything per-token is [N, T] with a 0/1 `mask`
over the completion tokens the policy produced. Conventions follow verl, the engine FTRL trained with,
so that numbers mean the same thing here and there.
"""

from __future__ import annotations

import torch


# -- advantages ------------------------------------------------------------------------------------
def group_advantages(
    rewards: torch.Tensor, group_ids: torch.Tensor, normalize_std: bool = True, eps: float = 1e-6
) -> torch.Tensor:
    """GRPO: each completion's reward minus its group's mean, divided by the group's std.

    `normalize_std=False` is Dr.GRPO (no std division, which biases towards easy/hard groups otherwise).
    A group of one has no baseline to compare against, so its advantage is 0, as is every member of a
    group whose rewards are all equal (no learning signal).
    """
    rewards = rewards.float()  # [N]
    advantages = torch.zeros_like(rewards)  # [N]
    for group in torch.unique(group_ids):
        members = group_ids == group  # [N] bool
        group_rewards = rewards[members]  # [G]
        if group_rewards.numel() < 2:
            continue
        centred = group_rewards - group_rewards.mean()
        if normalize_std:
            centred = centred / (group_rewards.std() + eps)  # unbiased std, as verl
        advantages[members] = centred
    return advantages


def reinforce_pp_advantages(
    rewards: torch.Tensor, token_kl: torch.Tensor, mask: torch.Tensor, kl_coef: float, gamma: float = 1.0
) -> torch.Tensor:
    """Reinforce++: the KL penalty is paid per token inside the return, then advantages are whitened over
    the whole batch (not per group), which is what makes it a batch-normalised REINFORCE.

    token_kl: per-token KL estimate of the policy to the reference ([N, T]).
    """
    token_rewards = -kl_coef * token_kl * mask  # [N, T]
    lengths = mask.sum(dim=1).long()  # [N]
    last = (lengths - 1).clamp(min=0)  # [N]: the outcome reward lands on the last completion token
    rows = torch.arange(rewards.shape[0])
    has_tokens = lengths > 0
    token_rewards[rows[has_tokens], last[has_tokens]] += rewards.float()[has_tokens]
    returns = torch.zeros_like(token_rewards)  # [N, T]
    running = torch.zeros(rewards.shape[0], dtype=token_rewards.dtype)  # [N]
    for t in reversed(range(token_rewards.shape[1])):
        running = token_rewards[:, t] + gamma * running * mask[:, t]
        returns[:, t] = running
    return masked_whiten(returns, mask)


def episode_group_advantages(
    rewards: torch.Tensor, groups: torch.Tensor, episodes: torch.Tensor, normalize_std: bool
) -> torch.Tensor:
    """Group advantages computed over one reward per episode, then given to each of its samples, so an
    episode with many turns does not weigh more in its group's mean and std."""
    unique, inverse = torch.unique(episodes, return_inverse=True)
    first = torch.stack([(episodes == key).nonzero()[0, 0] for key in unique])
    per_episode = group_advantages(rewards[first], groups[first], normalize_std=normalize_std)
    return per_episode[inverse]


def masked_whiten(values: torch.Tensor, mask: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    count = mask.sum()  # []
    if count < 2:
        return torch.zeros_like(values)
    mean = (values * mask).sum() / count
    variance = (((values - mean) * mask) ** 2).sum() / (count - 1)
    return (values - mean) * torch.rsqrt(variance + eps) * mask
