"""Shared-prompt log-probs: one prompt pass per group gives the same values and gradients as G passes."""

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

from toolrl_analysis.training.sequences import completion_logprobs, pack_sequences


@pytest.mark.parametrize("family", [(Qwen2Config, Qwen2ForCausalLM), (LlamaConfig, LlamaForCausalLM)])
def test_shared_prompt_pass_matches_separate_sequences(family):
    config_class, model_class = family
    torch.manual_seed(0)
    config = config_class(vocab_size=100, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                          num_attention_heads=4, num_key_value_heads=2)  # fmt: skip
    model = model_class(config)
    prompts = [[1, 2, 3, 4, 5], [6, 7]]
    completions = [[8, 9], [10, 11, 12], [13], [14, 15, 16, 17], [18], [19, 20]]

    def run(batch):
        model.zero_grad()
        logprobs, entropy = completion_logprobs(model, batch, with_entropy=True)
        (logprobs * batch.completion_mask).sum().backward()
        return (
            logprobs * batch.completion_mask,
            entropy,
            model.model.layers[0].mlp.up_proj.weight.grad.clone(),
        )

    shared = run(pack_sequences(prompts, completions, pad_token_id=0, repeats=3))
    separate = run(pack_sequences([p for p in prompts for _ in range(3)], completions, pad_token_id=0))
    assert torch.allclose(shared[0], separate[0], atol=1e-5)
    assert torch.allclose(shared[2], separate[2], atol=1e-5)
    # and against a plain full forward of one sequence
    sequence = torch.tensor([prompts[1] + completions[3]])
    with torch.no_grad():
        full = model(sequence).logits.log_softmax(-1)[0]
    expected = [full[len(prompts[1]) - 1 + i, t].item() for i, t in enumerate(completions[3])]
    assert shared[0][3, :4].tolist() == pytest.approx(expected, abs=1e-5)


def test_pack_sequences_checks_the_number_of_completions():
    with pytest.raises(ValueError, match="3 completions for 2 prompts x 2"):
        pack_sequences([[1], [2]], [[3], [4], [5]], pad_token_id=0, repeats=2)
