"""Test-wide settings: no network, fixed seeds, one torch thread per xdist worker."""

import os

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from pathlib import Path  # noqa: E402

import pytest  # noqa: E402

# The paper's published 200-environment test set, in FTRL's own format, beside the repository (shared/).
# FTRL's published test set (not shipped: its data carry no licence). The suite reads it from TOOLRL_FTRL_TEST,
# else from the workplace's shared data beside the clone.
FTRL_TEST_SET = Path(
    os.environ.get(
        "TOOLRL_FTRL_TEST", Path(__file__).resolve().parents[2] / "shared" / "data" / "ftrl-test.jsonl"
    )
)
assert FTRL_TEST_SET.is_file(), (
    f"the published FTRL test set is missing: {FTRL_TEST_SET}; download it from github.com/bytedance/FTRL "
    "(Data/jsonl/raw/) and point TOOLRL_FTRL_TEST at it"
)


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


# On top of `reproduce --quick`: a 2-block model of width 32 and a handful of environments keep the chain
# near a minute (test_reproduce_chain, and the notebooks reading a run).
TINY = [
    "envs.train_size=24", "envs.test_per_scenario=3",
    "grpo.iterations=2", "grpo.envs_per_iteration=2", "grpo.max_samples_per_iteration=4", "grpo.group_size=2",
    "grpo.max_turns=2", "grpo.max_new_tokens=16", "grpo.mini_batch_size=8",
    "eval.limit=0", "eval.max_turns=2", "eval.max_new_tokens=16", "eval.general_tasks=8",
    "ablate.limit=8", "ablate.max_turns=1", "ablate.max_new_tokens=8", "ablate.bootstrap=100",
    "ablate.analysis_limit=8", "ablate.controls=2", "ablate.score_threads=1",  # tests share 2 cores
    "probe.seeds=2", "probe.min_class_count=2", "probe.max_iter=20", "grpo.seeds=2", "eval.samples=2",
]  # fmt: skip


def tiny_chain_base(root: Path) -> Path:
    """A tiny random policy with a tokenizer trained on a small build: the base of a TINY chain."""
    from toolrl_analysis.envs.pipeline import EnvBuildConfig, build_envsets
    from toolrl_analysis.models.checkpoint import save_policy
    from toolrl_analysis.models.tokenizer import build_policy_tokenizer

    tokenizer = build_policy_tokenizer(
        build_envsets(EnvBuildConfig(seed=3, train_size=16)).train, vocab_size=700
    )
    return save_policy(tiny_random_qwen2(tokenizer, max_positions=4096), tokenizer, root / "base.pt")
