"""Model presets for the embedded policy, built in-process (no download) as Qwen2, Qwen3 or Llama.

The same preset shapes exist for three architecture families so that diffing, ablation and probing are tested
on more than one parameter-naming scheme. Embeddings are tied (the 4k-token embedding is most of a tiny model).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from toolrl_analysis.errors import ConfigError

FAMILIES = ("qwen2", "qwen3", "llama")
# Fastest on CPU for batched (left-padded) generation in our measurements; eager is a close second.
DEFAULT_ATTENTION = "sdpa"
DEFAULT_VOCAB_SIZE = 4096
# Special-token ids of our own tokenizer (train_tokenizer puts <|endoftext|>, <|im_start|>, <|im_end|> first).
DEFAULT_SPECIAL_IDS = {"bos_token_id": 0, "eos_token_id": 2, "pad_token_id": 0}


@dataclass(frozen=True)
class ModelPreset:
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    # FTRL's test prompts reach ~1.5k tokens with our tokenizer; leave room for multi-turn episodes.
    max_position_embeddings: int = 4096

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads


PRESETS: dict[str, ModelPreset] = {
    # ~1.1M parameters with a 4096-token vocabulary (0.5M of them the tied embedding).
    "tiny": ModelPreset(hidden_size=128, intermediate_size=256, num_hidden_layers=4, num_attention_heads=4,
                        num_key_value_heads=2),
    # ~5M parameters.
    "small": ModelPreset(hidden_size=256, intermediate_size=640, num_hidden_layers=6, num_attention_heads=8,
                         num_key_value_heads=4),
}  # fmt: skip


def preset(name: str) -> ModelPreset:
    if name not in PRESETS:
        raise ConfigError(f"unknown model preset '{name}' (known: {', '.join(PRESETS)})")
    return PRESETS[name]


def special_token_ids(tokenizer: Any) -> dict[str, int | None]:
    """bos/eos/pad ids for the model config, taken from the tokenizer (Qwen has no bos: use the pad id)."""
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    bos = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else pad
    return {"bos_token_id": bos, "eos_token_id": tokenizer.eos_token_id, "pad_token_id": pad}


def model_config(
    preset_name: str = "tiny",
    family: str = "qwen2",
    vocab_size: int = DEFAULT_VOCAB_SIZE,
    special_ids: dict[str, int | None] | None = None,
):
    """A transformers config of the preset's shape for `family`."""
    from transformers import LlamaConfig, Qwen2Config, Qwen3Config

    shape = preset(preset_name)
    classes = {"qwen2": Qwen2Config, "qwen3": Qwen3Config, "llama": LlamaConfig}
    if family not in classes:
        raise ConfigError(f"unknown model family '{family}' (known: {', '.join(FAMILIES)})")
    fields = asdict(shape)
    if family != "qwen2":  # Qwen3 defaults head_dim to 128 whatever the width; state it for both
        fields["head_dim"] = shape.head_dim
    return classes[family](
        vocab_size=vocab_size,
        tie_word_embeddings=True,
        **fields,
        **(special_ids or DEFAULT_SPECIAL_IDS),
    )


def build_model(
    preset: str = "tiny",
    family: str = "qwen2",
    vocab_size: int | None = None,
    tokenizer: Any = None,
    seed: int = 0,
    attn_implementation: str = DEFAULT_ATTENTION,
):
    """A freshly initialised causal LM (float32, eval mode), the same weights for the same seed.

    `vocab_size` defaults to the tokenizer's length (or 4096 without a tokenizer); the config's and generation
    config's bos/eos/pad ids follow the tokenizer.
    """
    import torch
    from transformers import AutoModelForCausalLM

    if tokenizer is not None:
        vocab_size = max(vocab_size or 0, len(tokenizer))
        special_ids = special_token_ids(tokenizer)
    else:
        vocab_size = vocab_size or DEFAULT_VOCAB_SIZE
        special_ids = dict(DEFAULT_SPECIAL_IDS)
    config = model_config(preset, family, vocab_size, special_ids)
    # Seed a private RNG stream so building a model does not disturb the caller's random state.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(config, attn_implementation=attn_implementation)
    sync_special_ids(model, special_ids)
    return model.eval()


def sync_special_ids(model: Any, special_ids: dict[str, int | None]) -> None:
    """Make config and generation config agree on bos/eos/pad (generate() reads the generation config)."""
    for key, value in special_ids.items():
        setattr(model.config, key, value)
        if getattr(model, "generation_config", None) is not None:
            setattr(model.generation_config, key, value)


def count_parameters(model: Any) -> int:
    """Distinct parameters (a tied embedding counts once)."""
    return sum(p.numel() for p in model.parameters())
