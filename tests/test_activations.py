"""Activation capture: the three backends return the same tensors, and those tensors are what HF computes."""

import pytest
import torch

from toolrl_analysis.analysis.probe.activations import (
    BACKENDS,
    CaptureRequest,
    UnsupportedModelError,
    capture_activations,
)
from toolrl_analysis.models.factory import build_model
from toolrl_analysis.models.tokenizer import train_tokenizer

N_REGIONS = 3


@pytest.fixture(scope="module")
def tokenizer():
    corpus = ["the mayor of Guren was born in Vaver, and the founder of Sules Foundry is Stokint Totar."] * 8
    return train_tokenizer(corpus, vocab_size=600)


@pytest.fixture(scope="module")
def requests(tokenizer):
    """Sequences of different lengths (so batches are padded), several positions, attention queries."""
    generator = torch.Generator().manual_seed(0)
    out = []
    for length in (7, 19, 12, 26, 4):
        ids = torch.randint(3, len(tokenizer), (length,), generator=generator).tolist()
        regions = [(i * 7) % N_REGIONS for i in range(length)]
        out.append(CaptureRequest(ids, [0, length // 2, length - 1], [length - 1, length // 2], regions))
    return out


def _capture(model, tokenizer, requests, backend):
    return capture_activations(
        model, tokenizer, requests, backend=backend, sites=("resid", "attn_out", "mlp_out"),
        n_regions=N_REGIONS, batch_size=2,
    )  # fmt: skip


@pytest.mark.parametrize("family", ["qwen2", "llama"])
def test_three_backends_return_the_same_tensors(tokenizer, requests, family):
    model = build_model("tiny", family=family, tokenizer=tokenizer, seed=3)
    captured = {backend: _capture(model, tokenizer, requests, backend) for backend in BACKENDS}
    reference = captured["hf"]
    assert reference.resid.shape == (15, 5, 128) and reference.attention_mass.shape == (10, 4, 4, N_REGIONS)
    for backend in ("transformer-lens", "nnsight"):
        for site in ("resid", "attn_out", "mlp_out", "attention_mass"):
            difference = (getattr(captured[backend], site) - getattr(reference, site)).abs().max().item()
            assert difference <= 1e-4, (backend, site, difference)
    # the model was handed back as it came: same attention implementation, same outputs
    assert model.config._attn_implementation == "sdpa"


def test_captured_tensors_are_what_the_model_computes(tokenizer, requests):
    model = build_model("tiny", family="qwen2", tokenizer=tokenizer, seed=4, attn_implementation="eager")
    captured = _capture(model, tokenizer, requests, "hf")
    row = 0
    for query, request in enumerate(requests):
        ids = torch.tensor([list(request.input_ids)])
        with torch.no_grad():
            out = model(ids, output_hidden_states=True, output_attentions=True)
        for position in request.positions:
            got = captured.resid[row]
            # index 0 is the embedding; blocks 1..n-1 are HF's hidden states; the last is before the final norm
            for layer in range(4):
                assert torch.allclose(got[layer], out.hidden_states[layer][0, position], atol=1e-5)
            final = model.model.norm(got[4][None])[0]
            assert torch.allclose(final, out.hidden_states[4][0, position], atol=1e-5)
            # each block adds its attention and MLP outputs to the residual stream
            for block in range(4):
                added = got[block] + captured.attn_out[row, block] + captured.mlp_out[row, block]
                assert torch.allclose(added, got[block + 1], atol=1e-5)
            row += 1
        for offset, position in enumerate(request.attention_positions):
            mass = captured.attention_mass[2 * query + offset]  # [blocks, heads, regions]
            regions = torch.tensor(list(request.token_regions))
            for block in range(4):
                pattern = out.attentions[block][0, :, position]  # [heads, tokens]
                expected = torch.stack([pattern[:, regions == r].sum(-1) for r in range(N_REGIONS)], -1)
                assert torch.allclose(mass[block], expected, atol=1e-6)
            assert torch.allclose(mass.sum(-1), torch.ones(4, 4), atol=1e-5)


def _residual_only(requests):
    return [CaptureRequest(r.input_ids, r.positions) for r in requests]


def test_qwen3_runs_on_every_backend(tokenizer, requests):
    model = build_model("tiny", family="qwen3", tokenizer=tokenizer, seed=5)
    reference = capture_activations(model, tokenizer, _residual_only(requests), backend="hf").resid
    for backend in ("transformer-lens", "nnsight"):
        resid = capture_activations(model, tokenizer, _residual_only(requests), backend=backend).resid
        assert (resid - reference).abs().max().item() <= 1e-4


def test_a_model_the_backends_cannot_read_is_named(tokenizer, requests):
    from transformers import GPT2Config, GPT2LMHeadModel

    gpt2 = GPT2LMHeadModel(GPT2Config(vocab_size=len(tokenizer), n_embd=32, n_layer=2, n_head=2)).eval()
    for backend in BACKENDS:
        with pytest.raises(UnsupportedModelError, match=r"does not support model type 'gpt2'"):
            capture_activations(gpt2, tokenizer, _residual_only(requests), backend=backend)
