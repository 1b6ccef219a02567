"""A PEFT LoRA adapter diffed against its base equals the diff against the merged weights."""

from __future__ import annotations

import warnings

import peft  # noqa: E402
import pytest
import torch
from test_compare_support import random_state_dict, tiny_model, write_checkpoint

from toolrl_analysis.analysis.checkpoints import LoraCheckpoint, open_checkpoint
from toolrl_analysis.analysis.diff import SPARSITY_COLUMNS, compare_checkpoints
from toolrl_analysis.errors import CheckpointError

METRICS = (
    "update_norm",
    "relative_frobenius_change",
    "mean_abs_update",
    "max_abs_update",
    "cosine_similarity",
)

CASES = {
    # Linear layers, a per-module rank and alpha, rsLoRA scaling, and an adapted embedding.
    "qwen2": dict(
        r=4,
        lora_alpha=8,
        target_modules=["q_proj", "v_proj", "down_proj", "embed_tokens"],
        rank_pattern={"down_proj": 2},
        alpha_pattern={"v_proj": 3},
        use_rslora=True,
    ),
    # GPT-2's Conv1D layers store weights [in, out]: PEFT's fan_in_fan_out transposes the update.
    "gpt2": dict(r=4, lora_alpha=16, target_modules=["c_attn", "c_fc"], fan_in_fan_out=True),
    # lora_bias=True also trains the biases of the adapted layers.
    "llama": dict(r=2, lora_alpha=4, target_modules=["o_proj", "up_proj"], modules_to_save=["lm_head"]),
}


@pytest.fixture(scope="module", params=sorted(CASES))
def adapter_case(request, tmp_path_factory):
    arch = request.param
    root = tmp_path_factory.mktemp(f"lora-{arch}")
    model = tiny_model(arch)
    model.load_state_dict(random_state_dict(model))
    base_dir = write_checkpoint(model.state_dict(), "hf-single", root / "base", model)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        peft_model = peft.get_peft_model(model, peft.LoraConfig(**CASES[arch]))
        generator = torch.Generator().manual_seed(1)
        with torch.no_grad():
            for name, parameter in peft_model.named_parameters():
                # PEFT initialises B to zero (a no-op adapter); give every adapter tensor a value.
                if "lora_" in name or "modules_to_save" in name:
                    parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.1)
        peft_model.save_pretrained(root / "adapter")
        merged = peft_model.merge_and_unload()
    merged_file = write_checkpoint(
        {k: v.detach().clone().contiguous() for k, v in merged.state_dict().items()},
        "safetensors",
        root / "merged.safetensors",
    )
    return arch, base_dir, root / "adapter", merged_file


def test_adapter_diff_equals_merged_diff(adapter_case):
    arch, base_dir, adapter_dir, merged_file = adapter_case
    via_adapter = compare_checkpoints(base_dir, adapter_dir).parameters
    via_merged = compare_checkpoints(base_dir, merged_file).parameters
    # The merged file also stores GPT-2's tied lm_head, which the HF base directory leaves out (the diff
    # reads it from the embedding there); the other rows must line up one to one.
    via_merged = via_merged[via_merged["name"].isin(set(via_adapter["name"]))].reset_index(drop=True)
    assert list(via_adapter["name"]) == list(via_merged["name"])
    assert list(via_adapter["part"]) == list(via_merged["part"])
    changed = via_merged["update_norm"] > 0
    assert changed.sum() >= 8, "the adapter should touch several tensors"
    assert list(via_adapter["update_norm"] > 0) == list(changed)
    for column in METRICS:
        # The merged file carries W + dW rounded to float32; the adapter's dW is exact.
        assert via_adapter[column].to_numpy() == pytest.approx(
            via_merged[column].to_numpy(), rel=2e-5, abs=1e-7
        ), column
    for column in SPARSITY_COLUMNS:
        assert via_adapter[column].to_numpy() == pytest.approx(via_merged[column].to_numpy(), abs=1e-3), (
            column
        )


def test_adapter_reads_as_merged_weights(adapter_case):
    arch, base_dir, adapter_dir, merged_file = adapter_case
    with open_checkpoint(adapter_dir, lora_base=base_dir) as adapter, open_checkpoint(merged_file) as merged:
        assert isinstance(adapter, LoraCheckpoint)
        for name in adapter.names():
            if name in merged:
                torch.testing.assert_close(
                    adapter.get(name).float(), merged.get(name).float(), rtol=1e-5, atol=1e-6
                )
        # Row ranges of the update agree with the whole update (the diff reads in chunks).
        module = next(m for m in adapter.modules.values() if m.target not in adapter.replaced)
        whole = adapter.delta(module.target)
        rows = adapter.info(module.target).rows
        pieces = torch.cat(
            [adapter.delta(module.target, start, min(rows, start + 5)) for start in range(0, rows, 5)]
        )
        torch.testing.assert_close(pieces, whole)


def test_lora_base_option_and_errors(adapter_case, tmp_path):
    arch, base_dir, adapter_dir, merged_file = adapter_case
    explicit = compare_checkpoints(merged_file, adapter_dir, lora_base=base_dir)
    # merged vs base+adapter: the same weights up to float32 rounding.
    assert explicit.parameters["relative_frobenius_change"].max() < 1e-5
    with pytest.raises(CheckpointError, match="LoRA adapter"):
        open_checkpoint(adapter_dir)
    with pytest.raises(CheckpointError, match="--lora-base"):
        compare_checkpoints(adapter_dir, base_dir)


def test_dora_is_refused(adapter_case, tmp_path):
    import json
    import shutil

    arch, base_dir, adapter_dir, _ = adapter_case
    dora = tmp_path / "dora"
    shutil.copytree(adapter_dir, dora)
    config = json.loads((dora / "adapter_config.json").read_text())
    config["use_dora"] = True
    (dora / "adapter_config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match="DoRA"):
        open_checkpoint(dora, lora_base=base_dir)
