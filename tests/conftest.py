"""Test-wide settings: no network, fixed seeds, one torch thread per xdist worker."""

import os

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from pathlib import Path  # noqa: E402

import pytest  # noqa: E402

# The paper's published 200-environment test set, in FTRL's own format, beside the repository (shared/).
FTRL_TEST_SET = Path(__file__).resolve().parents[2] / "shared" / "data" / "ftrl-test.jsonl"
assert FTRL_TEST_SET.is_file(), f"the published FTRL test set is missing: {FTRL_TEST_SET}"


@pytest.fixture(autouse=True)
def _one_torch_thread():
    # Two xdist workers share two cores; more threads only contend.
    try:
        import torch
    except ImportError:  # pragma: no cover
        yield
        return
    torch.set_num_threads(1)
    torch.manual_seed(0)
    yield


def tiny_random_qwen2(tokenizer, seed: int = 0, max_positions: int = 1024):
    """An untrained 2-layer Qwen2 sized to `tokenizer`: a real HF model for tests that need any policy."""
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    config = Qwen2Config(
        vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=max_positions,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
    )  # fmt: skip
    torch.manual_seed(seed)
    return Qwen2ForCausalLM(config).eval()
