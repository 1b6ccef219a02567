"""Helpers for the compare tests: tiny real-architecture state dicts, planted updates with hand-computed
metrics, and writers for every checkpoint format. (No tests here; imported by tests/test_compare_*.py.)"""

from __future__ import annotations

import json
from pathlib import Path

import torch

ARCHITECTURES = ("qwen2", "llama", "gpt2")
FORMATS = ("pt", "pt-wrapped", "pt-policy", "safetensors", "hf-single", "hf-sharded", "hf-bin")
HIDDEN, LAYERS = 32, 4

# The planted update: layer 1's mlp.down scaled by 1.1, and a random update of 5% of the norm on
# layer 3's attn.q (for GPT-2, the q third of the fused c_attn).
PLANTED = {
    "qwen2": ("model.layers.1.mlp.down_proj.weight", "model.layers.3.self_attn.q_proj.weight"),
    "llama": ("model.layers.1.mlp.down_proj.weight", "model.layers.3.self_attn.q_proj.weight"),
    "gpt2": ("transformer.h.1.mlp.c_proj.weight", "transformer.h.3.attn.c_attn.weight"),
}


def tiny_model(architecture: str, layers: int = LAYERS):
    """A tiny randomly initialised transformers model with the architecture's real parameter names."""
    import transformers

    torch.manual_seed(0)
    if architecture == "gpt2":
        config = transformers.GPT2Config(
            n_embd=HIDDEN,
            n_layer=layers,
            n_head=4,
            vocab_size=100,
            n_positions=64,
            bos_token_id=0,
            eos_token_id=0,
        )
        return transformers.GPT2LMHeadModel(config)
    common = dict(
        hidden_size=HIDDEN,
        intermediate_size=64,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=100,
        tie_word_embeddings=False,
        pad_token_id=0,
        bos_token_id=0,
        eos_token_id=0,
    )
    configs = {
        "qwen2": (transformers.Qwen2Config, transformers.Qwen2ForCausalLM),
        "llama": (transformers.LlamaConfig, transformers.LlamaForCausalLM),
        "mistral": (transformers.MistralConfig, transformers.MistralForCausalLM),
        "qwen3": (transformers.Qwen3Config, transformers.Qwen3ForCausalLM),
    }
    config_class, model_class = configs[architecture]
    if architecture == "qwen3":
        common["head_dim"] = 8
    return model_class(config_class(**common))


def random_state_dict(model, seed: int = 0, dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    """Every tensor random and nonzero (so every cosine is defined); tied tensors stay one tensor."""
    generator = torch.Generator().manual_seed(seed)
    state, seen = {}, {}
    for name, tensor in model.state_dict().items():
        key = tensor.data_ptr()
        if key in seen:
            state[name] = state[seen[key]]
            continue
        seen[key] = name
        values = torch.randn(tensor.shape, generator=generator) * 0.05
        if name.endswith("norm.weight") or ".ln_" in name:
            values = values + 1.0
        state[name] = values.to(dtype).contiguous()
    return state


def plant_update(architecture: str, base: dict[str, torch.Tensor], seed: int = 1) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    trained = dict(base)
    down, query = PLANTED[architecture]
    trained[down] = (base[down].float() * 1.1).to(base[down].dtype)
    weight = base[query].float().clone()
    # GPT-2 Conv1D weights are [in, out]: q is the first third of the columns.
    q = weight[:, :HIDDEN] if architecture == "gpt2" else weight
    noise = torch.randn(q.shape, generator=generator)
    q += noise * (0.05 * q.norm() / noise.norm())
    trained[query] = weight.to(base[query].dtype)
    return trained


def expected_metrics(base: torch.Tensor, trained: torch.Tensor) -> dict[str, float]:
    """The metrics by hand, in float64 from the stored values."""
    w, t = base.double().reshape(-1), trained.double().reshape(-1)
    d = t - w
    return {
        "relative_frobenius_change": float(d.norm() / w.norm()),
        "mean_abs_update": float(d.abs().mean()),
        "max_abs_update": float(d.abs().max()),
        "cosine_similarity": float(w @ t / (w.norm() * t.norm())),
        "update_sparsity_0": float((d.abs() <= 0).double().mean()),
        "update_sparsity_1e-6": float((d.abs() <= 1e-6).double().mean()),
        "update_sparsity_1e-5": float((d.abs() <= 1e-5).double().mean()),
        "update_norm": float(d.norm()),
        "base_norm": float(w.norm()),
    }


def planted_expectations(architecture: str, base: dict, trained: dict) -> dict[tuple[str, str], dict]:
    """{(name, part): hand-computed metrics} for the rows the planted update touches."""
    down, query = PLANTED[architecture]
    expected = {(down, ""): expected_metrics(base[down], trained[down])}
    if architecture == "gpt2":
        expected[(query, "q")] = expected_metrics(base[query][:, :HIDDEN], trained[query][:, :HIDDEN])
    else:
        expected[(query, "")] = expected_metrics(base[query], trained[query])
    return expected


def write_checkpoint(state: dict[str, torch.Tensor], fmt: str, path: Path, model=None) -> Path:
    """Write `state` in format `fmt` at `path` (a file or a directory, by format); `model` supplies the
    config and does the HF saving for the hf-* formats."""
    from safetensors.torch import save_file

    path = Path(path)
    config = model.config.to_dict() if model is not None else {}
    if fmt == "pt":
        torch.save(state, path)
    elif fmt == "pt-wrapped":
        torch.save({"model": state, "step": 3}, path)
    elif fmt == "pt-policy":
        document = {
            "format": "toolrl-analysis.policy/1",
            "state_dict": state,
            "config": json.loads(json.dumps(config, default=str)),
            "tokenizer": {"tokenizer.json": "{}"},
        }
        torch.save(document, path)
    elif fmt == "safetensors":
        save_file(_untied(state), str(path))
    elif fmt in ("hf-single", "hf-sharded"):
        model.load_state_dict(state)
        model.save_pretrained(path, max_shard_size="20KB" if fmt == "hf-sharded" else "5GB")
    elif fmt == "hf-bin":
        path.mkdir(parents=True, exist_ok=True)
        torch.save(state, path / "pytorch_model.bin")
        (path / "config.json").write_text(json.dumps(config, default=str))
    else:  # pragma: no cover
        raise ValueError(fmt)
    return path


def planted_qwen2_pair(root: Path, base_format: str, trained_format: str) -> tuple[dict, dict, Path, Path]:
    """A tiny Qwen2 state dict and its planted update, written as root/base and root/trained in the given
    formats: (base state, trained state, base path, trained path)."""
    model = tiny_model("qwen2")
    base = random_state_dict(model)
    trained = plant_update("qwen2", base)
    base_path = write_checkpoint(base, base_format, root / f"base{suffix(base_format)}", model)
    trained_path = write_checkpoint(trained, trained_format, root / f"trained{suffix(trained_format)}", model)
    return base, trained, base_path, trained_path


def _untied(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    # safetensors refuses shared storage; a tied copy is just another tensor on disk.
    seen, out = set(), {}
    for name, tensor in state.items():
        out[name] = tensor.clone() if tensor.data_ptr() in seen else tensor
        seen.add(tensor.data_ptr())
    return out


def suffix(fmt: str) -> str:
    return {"pt": ".pt", "pt-wrapped": ".pt", "pt-policy": ".pt", "safetensors": ".safetensors"}.get(fmt, "")
