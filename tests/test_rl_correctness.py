"""The trainer against its references (issue 9): it learns a trivially learnable task, its log-probs are taken
at the sampling temperature, it refuses a model whose forward post-processes logits, and an iteration without
reward spread is a warning. Real (tiny) models, real sampling, real optimiser steps; no environments needed,
because the task's samples come from the trainer's own `collect` extension point."""

import pytest
import torch
from conftest import tiny_random_qwen2
from transformers import Qwen2ForCausalLM

from toolrl_analysis.errors import CheckpointError
from toolrl_analysis.models.tokenizer import train_tokenizer
from toolrl_analysis.rollout import generate
from toolrl_analysis.training.grpo import GRPOConfig, GRPOTrainer
from toolrl_analysis.training.sequences import (
    check_logits_path,
    completion_logprobs,
    logits_path_error,
    pack_sequences,
)
from toolrl_analysis.training.step_samples import Sample

PROMPTS = [[5 + 3 * i, 7 + i, 11, 13 + 2 * i] for i in range(8)]


@pytest.fixture(scope="module")
def tokenizer():
    text = "the tool returns an answer; call the tool with its arguments and read the result. " * 20
    return train_tokenizer([text, "0 1 2 3 4 5 6 7 8 9 <tool_call> </tool_call>"], vocab_size=512)


class OneTokenTask(GRPOTrainer):
    """A trivially learnable RL task: one sampled token per completion, reward 1 when it is a multiple of 4
    (a quarter of the vocabulary under a near-uniform untrained policy), else 0; or a constant reward."""

    constant_reward: float | None = None

    def collect(self):
        c = self.config
        completions = generate(
            self.model, PROMPTS, max_new_tokens=1, temperature=c.temperature, eos_token_ids=self.stop_ids,
            pad_token_id=self.pad_id, generator=self._generator(1), samples_per_prompt=c.group_size,
        )  # fmt: skip
        samples = [
            Sample(
                PROMPTS[i // c.group_size],
                comp.ids,
                comp.logprobs,
                self.reward(comp.ids),
                i // c.group_size,
                i,
            )
            for i, comp in enumerate(completions)
        ]
        return samples, {}

    def reward(self, ids: list[int]) -> float:
        return self.constant_reward if self.constant_reward is not None else float(ids[0] % 4 == 0)


@torch.no_grad()
def expected_reward(model, temperature: float) -> float:
    """The exact probability of a rewarded first token, averaged over the prompts (no sampling noise)."""
    logits = torch.stack([model(input_ids=torch.tensor([p])).logits[0, -1] for p in PROMPTS])  # [8, V]
    probs = torch.softmax(logits.float() / temperature, dim=-1)
    return probs[:, ::4].sum(dim=-1).mean().item()


def task_config(**overrides) -> GRPOConfig:
    values = dict(
        iterations=8, group_size=8, max_new_tokens=1, lr=1e-2, mini_batch_size=16, eval_every=0, save_every=0,
        temperature=1.0, drop_flat_groups=False,
    )  # fmt: skip
    config = GRPOConfig(**(values | overrides))
    config.validate()
    return config


# measured rise of the expected reward from 0.25: 0.95 (GRPO), 0.62 (GRPO without flat groups: fewer Adam steps
# once groups saturate), 0.84 (Reinforce++), 0.81 (Reinforce++ without flat groups)
@pytest.mark.parametrize(
    "overrides, rise",
    [
        ({"algo": "grpo"}, 0.4),
        ({"algo": "grpo", "drop_flat_groups": True}, 0.25),
        ({"algo": "reinforce++"}, 0.4),
        ({"algo": "reinforce++", "drop_flat_groups": True}, 0.4),
    ],
)
def test_the_trainer_learns_a_trivially_learnable_task(tokenizer, tmp_path, overrides, rise):
    model = tiny_random_qwen2(tokenizer).train()
    config = task_config(**overrides)
    before = expected_reward(model, config.temperature)
    trainer = OneTokenTask(config, model, tokenizer, [], tmp_path, sandbox=None, log=lambda _: None)
    history = trainer.train()
    after = expected_reward(model, config.temperature)
    assert 0.15 < before < 0.35  # a quarter of a near-uniform vocabulary
    assert after > before + rise, (before, after)
    rewards = [row["reward_mean"] for row in history]
    assert sum(rewards[-2:]) / 2 > rewards[0] + rise, rewards
    for key in (
        "kl",
        "entropy",
        "clip_low",
        "clip_high",
        "clip_higher_region",
        "zero_spread_groups",
        "ppo_kl",
    ):
        assert key in history[-1], key
    assert (tmp_path / "curves.png").read_bytes()[:4] == b"\x89PNG"


def test_an_iteration_without_reward_spread_is_a_warning(tokenizer, tmp_path):
    lines = []
    model = tiny_random_qwen2(tokenizer).train()
    trainer = OneTokenTask(task_config(iterations=2), model, tokenizer, [], tmp_path, None, log=lines.append)
    trainer.constant_reward = 0.0
    history = trainer.train()
    assert [row["zero_spread_groups"] for row in history] == [1.0, 1.0]
    warnings = [line for line in lines if line.startswith("warning:")]
    assert len(warnings) == 2 and "iteration 1: 100% of groups have no reward spread" in warnings[0]
    assert all(torch.isfinite(p).all() for p in model.parameters())


class HalfFlatTask(OneTokenTask):
    """Prompts 0-3 score every completion 1 (flat groups); prompts 4-7 score the one-token task."""

    def collect(self):
        samples, stats = super().collect()
        for s in samples:
            if s.group < 4:
                s.reward = 1.0
        return samples, stats


def test_flat_groups_can_be_left_out_of_the_update(tokenizer, tmp_path):
    torch.manual_seed(0)
    model = tiny_random_qwen2(tokenizer).train()
    kept = HalfFlatTask(
        task_config(iterations=1), model, tokenizer, [], tmp_path / "kept", None, log=lambda _: None
    )
    row = kept.train()[0]
    assert row["updated_samples"] == row["samples"] == 64
    model = tiny_random_qwen2(tokenizer).train()
    initial = [p.detach().clone() for p in model.parameters()]
    config = task_config(iterations=1, drop_flat_groups=True)
    dropped = HalfFlatTask(config, model, tokenizer, [], tmp_path / "dropped", None, log=lambda _: None)
    row = dropped.train()[0]
    # the four flat groups (prompts 0-3) leave, and any flat group of the real task with them: exactly the
    # flat share, counted over everything sampled before the filter
    assert row["samples"] == 64 and row["zero_spread_groups"] >= 0.5
    assert 0 < row["updated_samples"] == round(64 * (1 - row["zero_spread_groups"])) <= 32
    assert not all(torch.equal(a, b) for a, b in zip(initial, model.parameters(), strict=True))  # it stepped

    # every group flat: no optimiser step at all (not even the KL and entropy terms), a warning, no crash
    model = tiny_random_qwen2(tokenizer).train()
    before = [p.detach().clone() for p in model.parameters()]
    lines = []
    flat = OneTokenTask(task_config(iterations=2, drop_flat_groups=True), model, tokenizer, [], tmp_path / "f",
                        None, log=lines.append)  # fmt: skip
    flat.constant_reward = 1.0
    history = flat.train()
    assert [row["updated_samples"] for row in history] == [0, 0]
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters(), strict=True))
    assert sum(line.startswith("warning:") for line in lines) == 2
    assert [row["lr"] for row in history] == [config.lr, config.lr]


def test_log_probs_are_taken_at_the_sampling_temperature(tokenizer, tmp_path):
    model = tiny_random_qwen2(tokenizer)
    with torch.no_grad():  # sharper logits, so that temperature matters a lot
        model.get_output_embeddings().weight.mul_(30.0)
    temperature = 0.5
    completions = generate(
        model, PROMPTS[:2], max_new_tokens=6, temperature=temperature, eos_token_ids=[-1], pad_token_id=0,
        generator=torch.Generator().manual_seed(0), samples_per_prompt=3,
    )  # fmt: skip
    batch = pack_sequences(PROMPTS[:2], [c.ids for c in completions], pad_token_id=0, repeats=3)
    behaviour = torch.tensor([c.logprobs for c in completions])  # [6, 6]
    at_temperature, _ = completion_logprobs(model, batch, temperature=temperature)
    at_one, _ = completion_logprobs(model, batch)
    assert torch.allclose(at_temperature, behaviour, atol=1e-4)
    assert (at_one - behaviour).abs().mean() > 0.1  # what the ratio was computed against before
    # In the trainer: the first step of an iteration sees the behaviour policy exactly (verl's ppo_kl 0).
    config = task_config(iterations=1, temperature=temperature, kl_coef=0.0, mini_batch_size=64)
    trainer = OneTokenTask(config, model, tokenizer, [], tmp_path, None, log=lambda _: None)
    assert abs(trainer.train()[0]["ppo_kl"]) < 1e-4


class SoftCappedQwen2(Qwen2ForCausalLM):
    """A model whose forward post-processes its logits (Gemma-2-style soft-capping, plus a logit scale)."""

    def forward(self, *args, **kwargs):
        output = super().forward(*args, **kwargs)
        output.logits = 2.0 * torch.tanh(output.logits / 2.0) * 3.0
        return output


def test_a_model_whose_forward_post_processes_logits_is_refused(tokenizer, tmp_path):
    plain = tiny_random_qwen2(tokenizer)
    assert logits_path_error(plain, pad_token_id=0) < 1e-5
    check_logits_path(plain, pad_token_id=0)
    capped = SoftCappedQwen2(plain.config)
    capped.load_state_dict(plain.state_dict())
    with pytest.raises(CheckpointError, match="changes its logits after the output layer"):
        GRPOTrainer(task_config(), capped, tokenizer, [], tmp_path, None)
