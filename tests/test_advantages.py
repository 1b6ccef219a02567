"""Hand-computed checks of the RL algorithm pieces."""

import math

import pytest
import torch

from toolrl_analysis.training.advantages import (
    aggregate_loss,
    clipped_policy_loss,
    entropy_from_logits,
    group_advantages,
    k3_kl,
    reinforce_pp_advantages,
)


def test_group_advantages_normalised_with_singleton_and_zero_spread_groups():
    rewards = torch.tensor([1.0, 0.0, 0.5, 0.7, 0.3, 0.3, 0.3])
    groups = torch.tensor([0, 0, 0, 1, 2, 2, 2])
    adv = group_advantages(rewards, groups)
    # group 0: mean 0.5, unbiased std 0.5 -> (+1, -1, 0)
    assert adv[:3].tolist() == pytest.approx([0.5 / (0.5 + 1e-6), -0.5 / (0.5 + 1e-6), 0.0])
    assert adv[3].item() == 0.0  # a group of one has no baseline
    assert adv[4:].tolist() == [0.0, 0.0, 0.0]  # zero spread: no signal


def test_group_advantages_dr_grpo_does_not_divide_by_std():
    rewards = torch.tensor([2.0, 0.0, 1.0, 1.0])
    groups = torch.tensor([0, 0, 1, 1])
    adv = group_advantages(rewards, groups, normalize_std=False)
    assert adv.tolist() == [1.0, -1.0, 0.0, 0.0]


def test_k3_kl_values_and_clamping():
    logp = torch.tensor([0.0, -1.0, -30.0])
    ref = torch.tensor([0.0, -2.0, 0.0])
    kl = k3_kl(logp, ref, clamp=10.0)
    assert kl[0].item() == 0.0
    r = -1.0  # ref - logp
    assert kl[1].item() == pytest.approx(math.exp(r) - r - 1)
    assert kl[2].item() == 10.0  # exp(20) - 20 - 1 clamped
    assert (k3_kl(torch.randn(100), torch.randn(100)) >= 0).all()


def test_aggregation_modes():
    loss = torch.tensor([[1.0, 2.0, 3.0, 0.0], [4.0, 0.0, 0.0, 0.0]])
    mask = torch.tensor([[1, 1, 1, 0], [1, 0, 0, 0]])
    assert aggregate_loss(loss, mask, "token-mean").item() == pytest.approx(10 / 4)
    assert aggregate_loss(loss, mask, "seq-mean-token-mean").item() == pytest.approx((2.0 + 4.0) / 2)
    assert aggregate_loss(loss, mask, "seq-mean-token-sum-norm").item() == pytest.approx(10 / 8)
    with pytest.raises(ValueError, match="unknown loss aggregation"):
        aggregate_loss(loss, mask, "mean")


def test_clipped_policy_loss_clips_both_sides_and_clip_higher():
    old = torch.zeros(1, 4)
    new = torch.log(torch.tensor([[1.5, 0.5, 1.1, 1.5]]))
    mask = torch.ones(1, 4)
    adv_pos = torch.tensor([1.0])
    loss, clip_fraction = clipped_policy_loss(new, old, adv_pos, mask, clip_eps=0.2)
    # positive advantage: ratio 1.5 clipped to 1.2; 0.5 stays (pessimistic min); 1.1 unclipped
    assert loss.item() == pytest.approx(-(1.2 + 0.5 + 1.1 + 1.2) / 4)
    assert clip_fraction.item() == pytest.approx(2 / 4)
    loss_high, _ = clipped_policy_loss(new, old, adv_pos, mask, clip_eps=0.2, clip_eps_high=0.28)
    assert loss_high.item() == pytest.approx(-(1.28 + 0.5 + 1.1 + 1.28) / 4)
    adv_neg = torch.tensor([-1.0])
    loss_neg, frac_neg = clipped_policy_loss(new, old, adv_neg, mask, clip_eps=0.2)
    # negative advantage: 0.5 clipped up to 0.8; 1.5 stays (pessimistic max)
    assert loss_neg.item() == pytest.approx((1.5 + 0.8 + 1.1 + 1.5) / 4)
    assert frac_neg.item() == pytest.approx(1 / 4)


def test_clipped_policy_loss_gradient_is_advantage_weighted_at_ratio_one():
    logp = torch.zeros(2, 3, requires_grad=True)
    adv = torch.tensor([1.0, -2.0])
    loss, _ = clipped_policy_loss(logp, logp.detach(), adv, torch.ones(2, 3), aggregation="token-mean")
    loss.backward()
    assert logp.grad.flatten().tolist() == pytest.approx([-1 / 6] * 3 + [2 / 6] * 3)


def test_reinforce_pp_whitens_kl_penalised_returns():
    rewards = torch.tensor([1.0, 0.0])
    token_kl = torch.tensor([[0.1, 0.2, 0.0], [0.0, 0.0, 0.0]])
    mask = torch.tensor([[1.0, 1.0, 0.0], [1.0, 1.0, 1.0]])
    adv = reinforce_pp_advantages(rewards, token_kl, mask, kl_coef=0.5)
    # returns: seq0 = [1 - .05 - .1, 1 - .1, pad], seq1 = [0, 0, 0]
    returns = torch.tensor([0.85, 0.9, 0.0, 0.0, 0.0])
    mean, std = returns.mean(), returns.std()
    expected = ((returns - mean) / std).tolist()
    got = [adv[0, 0], adv[0, 1], adv[1, 0], adv[1, 1], adv[1, 2]]
    assert [g.item() for g in got] == pytest.approx(expected, rel=1e-4)
    assert adv[0, 2].item() == 0.0  # masked token


def test_entropy_of_uniform_and_peaked():
    logits = torch.tensor([[[0.0, 0.0, 0.0, 0.0], [100.0, 0.0, 0.0, 0.0]]])
    ent = entropy_from_logits(logits)
    assert ent[0, 0].item() == pytest.approx(math.log(4))
    assert ent[0, 1].item() == pytest.approx(0.0, abs=1e-6)
