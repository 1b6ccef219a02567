"""Model presets: sizes, three architecture families, seeding, special ids, left-padded batches."""

from __future__ import annotations

import pytest
import torch

from toolrl_analysis.errors import ConfigError
from toolrl_analysis.models.factory import FAMILIES, PRESETS, build_model, count_parameters
from toolrl_analysis.models.general import general_text
from toolrl_analysis.models.tokenizer import train_tokenizer

EXPECTED_PARAMETERS = {
    "tiny": (0.8e6, 1.5e6),
    "small": (4e6, 6.5e6),
}  # with the default 4096-token vocabulary


@pytest.fixture(scope="module")
def tokenizer():
    return train_tokenizer(general_text("train", max_chars=40_000), vocab_size=600)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_presets_have_the_advertised_size(preset, family):
    model = build_model(preset, family)
    low, high = EXPECTED_PARAMETERS[preset]
    assert low <= count_parameters(model) <= high
    assert model.config.num_hidden_layers == PRESETS[preset].num_hidden_layers
    assert model.config.model_type == family
    assert model.get_output_embeddings().weight is model.get_input_embeddings().weight  # tied
    assert model.config._attn_implementation == "sdpa"
    assert not model.training


def test_family_specific_parameter_names():
    names = {family: set(build_model("tiny", family).state_dict()) for family in FAMILIES}
    assert "model.layers.0.self_attn.q_proj.bias" in names["qwen2"]
    assert "model.layers.0.self_attn.q_norm.weight" in names["qwen3"]
    assert not any("bias" in n or "q_norm" in n for n in names["llama"])


def test_special_ids_follow_the_tokenizer(tokenizer):
    model = build_model("tiny", "qwen3", tokenizer=tokenizer)
    assert model.config.vocab_size == len(tokenizer) == 600
    for config in (model.config, model.generation_config):
        assert config.eos_token_id == tokenizer.eos_token_id == tokenizer.convert_tokens_to_ids("<|im_end|>")
        assert config.pad_token_id == tokenizer.pad_token_id
        assert config.bos_token_id == tokenizer.pad_token_id  # Qwen has no BOS token


def test_same_seed_same_weights_and_caller_rng_untouched():
    torch.manual_seed(123)
    expected_next = torch.rand(1)
    torch.manual_seed(123)
    first = build_model("tiny", "llama", seed=7)
    assert torch.equal(torch.rand(1), expected_next)
    second = build_model("tiny", "llama", seed=7)
    other = build_model("tiny", "llama", seed=8)
    pairs = list(zip(first.state_dict().values(), second.state_dict().values(), strict=True))
    assert all(torch.equal(a, b) for a, b in pairs)
    assert not torch.equal(first.model.embed_tokens.weight, other.model.embed_tokens.weight)


def test_unknown_preset_or_family_is_a_config_error():
    with pytest.raises(ConfigError, match="preset 'huge'"):
        build_model("huge")
    with pytest.raises(ConfigError, match="family 'gpt2'"):
        build_model("tiny", "gpt2")


@pytest.mark.parametrize("family", FAMILIES)
def test_left_padded_batch_matches_single_prompts(tokenizer, family):
    model = build_model("tiny", family, tokenizer=tokenizer)
    prompts = ["What is 2 + 3?", "Repeat exactly: the quick brown fox jumps over the lazy dog"]
    batch = tokenizer(prompts, padding=True, return_tensors="pt", add_special_tokens=False)
    assert batch["attention_mask"][0, 0] == 0  # padded on the left
    with torch.no_grad():
        batched = model(**batch).logits[:, -1]
        for row, prompt in enumerate(prompts):
            single = tokenizer(prompt, return_tensors="pt", add_special_tokens=False)
            torch.testing.assert_close(batched[row], model(**single).logits[0, -1], atol=1e-4, rtol=1e-4)
        generated = model.generate(**batch, max_new_tokens=3, do_sample=False)
    assert generated.shape == (2, batch["input_ids"].shape[1] + 3)
