"""Hand-computed checks of the RL algorithm pieces."""

import math
from types import SimpleNamespace

import pytest
import torch

from toolrl_analysis.training.advantages import group_advantages, reinforce_pp_advantages
from toolrl_analysis.training.objective import (
    aggregate_loss,
    clipped_policy_loss,
    entropy_from_logits,
    k3_kl,
    policy_objective,
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
    assert aggregate_loss(loss, mask, "seq-mean-token-sum-norm", horizon=4).item() == pytest.approx(10 / 8)
    with pytest.raises(ValueError, match="unknown loss aggregation"):
        aggregate_loss(loss, mask, "mean")


def test_dr_grpo_divides_by_the_constant_max_new_tokens_not_the_batch_width():
    loss = torch.tensor([[1.0, 2.0, 3.0], [4.0, 0.0, 0.0]])
    mask = torch.tensor([[1, 1, 1], [1, 0, 0]])
    wider = torch.nn.functional.pad(loss, (0, 5)), torch.nn.functional.pad(mask, (0, 5))  # [2, 8]
    narrow = aggregate_loss(loss, mask, "seq-mean-token-sum-norm", horizon=96)
    assert narrow.item() == pytest.approx(10 / (2 * 96))  # Dr.GRPO: mean over sequences of sum / 96
    assert aggregate_loss(*wider, "seq-mean-token-sum-norm", horizon=96).item() == narrow.item()
    with pytest.raises(ValueError, match="constant horizon"):
        aggregate_loss(loss, mask, "seq-mean-token-sum-norm")  # never the padded width
    with pytest.raises(ValueError, match="constant horizon"):
        aggregate_loss(*wider, "seq-mean-token-sum-norm", horizon=4)
    # The objective takes the horizon from the run's max_new_tokens: a batch padded wider loses nothing.
    config = SimpleNamespace(
        algo="grpo", clip_eps=0.2, clip_eps_high=0.28, loss_aggregation="seq-mean-token-sum-norm",
        max_new_tokens=96, entropy_coef=0.0, kl_coef=0.0, kl_clamp=10.0, kl_in_reward=False,
    )  # fmt: skip
    logp = torch.zeros(2, 3)
    adv = torch.tensor([1.0, -1.0])
    objective, _ = policy_objective(logp, torch.zeros(2, 3), logp, None, adv[:, None] * mask, mask, config)
    assert objective.item() == pytest.approx((-3.0 + 1.0) / (2 * 96))
    padded = torch.zeros(2, 8)
    wide_objective, _ = policy_objective(
        padded, padded, padded, None, adv[:, None] * wider[1], wider[1], config
    )
    assert wide_objective.item() == pytest.approx(objective.item())


@pytest.mark.parametrize("kl_in_reward", [False, True])
def test_the_kl_is_in_the_loss_unless_it_is_paid_in_the_return(kl_in_reward):
    config = SimpleNamespace(
        algo="reinforce++", clip_eps=0.2, clip_eps_high=0.2, loss_aggregation="token-mean", max_new_tokens=4,
        entropy_coef=0.0, kl_coef=0.5, kl_clamp=10.0, kl_in_reward=kl_in_reward,
    )  # fmt: skip
    logp, ref, mask = torch.zeros(1, 2), torch.tensor([[-1.0, 0.0]]), torch.ones(1, 2)
    loss, parts = policy_objective(logp, torch.zeros(1, 2), logp, ref, torch.zeros(1, 2), mask, config)
    k3 = (math.exp(-1.0) + 1.0 - 1.0) / 2  # token-mean of exp(ref - logp) - (ref - logp) - 1
    if kl_in_reward:  # Reinforce++ as Hu 2025: k1 inside the return, nothing in the loss
        assert loss.item() == 0.0 and "kl" not in parts
    else:  # FTRL's launchers, both algorithms: k3 (low_var_kl) in the loss, logged as kl
        assert loss.item() == pytest.approx(0.5 * k3) and parts["kl"].item() == pytest.approx(k3)


def test_clipped_policy_loss_clips_both_sides_and_clip_higher():
    old = torch.zeros(1, 4)
    new = torch.log(torch.tensor([[1.5, 0.5, 1.1, 1.5]]))
    mask = torch.ones(1, 4)
    adv_pos = torch.tensor([1.0])
    loss, fractions = clipped_policy_loss(new, old, adv_pos, mask, clip_eps=0.2)
    # positive advantage: ratio 1.5 clipped to 1.2; 0.5 stays (pessimistic min); 1.1 unclipped
    assert loss.item() == pytest.approx(-(1.2 + 0.5 + 1.1 + 1.2) / 4)
    assert fractions["clip_fraction"].item() == fractions["clip_high"].item() == pytest.approx(2 / 4)
    assert fractions["clip_low"].item() == fractions["clip_higher_region"].item() == 0.0
    loss_high, _ = clipped_policy_loss(new, old, adv_pos, mask, clip_eps=0.2, clip_eps_high=0.28)
    assert loss_high.item() == pytest.approx(-(1.28 + 0.5 + 1.1 + 1.28) / 4)
    # clip-higher acting: a ratio of 1.25 is above 1.2 (symmetric PPO clips it) but trains under 1.28
    acting = torch.log(torch.tensor([[1.25, 1.5, 1.0, 1.0]]))
    _, higher = clipped_policy_loss(acting, old, adv_pos, mask, clip_eps=0.2, clip_eps_high=0.28)
    assert higher["clip_higher_region"].item() == pytest.approx(1 / 4)
    assert higher["clip_high"].item() == pytest.approx(1 / 4)
    adv_neg = torch.tensor([-1.0])
    loss_neg, frac_neg = clipped_policy_loss(new, old, adv_neg, mask, clip_eps=0.2, clip_eps_high=0.28)
    # negative advantage: 0.5 clipped up to 0.8; 1.5 stays (pessimistic max)
    assert loss_neg.item() == pytest.approx((1.5 + 0.8 + 1.1 + 1.5) / 4)
    assert frac_neg["clip_low"].item() == frac_neg["clip_fraction"].item() == pytest.approx(1 / 4)
    assert frac_neg["clip_high"].item() == frac_neg["clip_higher_region"].item() == 0.0


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
