"""Checkpoints: self-contained .pt and HF directories round-trip exactly; bad files are one-line CheckpointErrors."""

from __future__ import annotations

import json
import os

import pytest
import torch

from toolrl_analysis.errors import CheckpointError
from toolrl_analysis.models.checkpoint import POLICY_FORMAT, load_policy, save_hf_dir, save_policy
from toolrl_analysis.models.factory import FAMILIES, build_model
from toolrl_analysis.models.general import general_text
from toolrl_analysis.models.tokenizer import train_tokenizer

PROMPT = [{"role": "user", "content": "What is 12 + 30?"}]


@pytest.fixture(scope="module")
def tokenizer():
    return train_tokenizer(general_text("train", max_chars=40_000), vocab_size=600)


def _logits(model, tokenizer) -> torch.Tensor:
    text = tokenizer.apply_chat_template(PROMPT, add_generation_prompt=True, tokenize=False)
    ids = tokenizer(text, return_tensors="pt", add_special_tokens=False)
    with torch.no_grad():
        return model(**ids).logits


def _assert_same_policy(original, loaded, tokenizer) -> None:
    model, loaded_tokenizer = loaded
    assert type(model) is type(original)
    assert not model.training
    assert torch.equal(_logits(model, loaded_tokenizer), _logits(original, tokenizer))
    assert loaded_tokenizer.chat_template == tokenizer.chat_template
    assert loaded_tokenizer.padding_side == "left"
    assert model.generation_config.eos_token_id == tokenizer.eos_token_id


@pytest.mark.parametrize("family", FAMILIES)
def test_policy_file_round_trip(tokenizer, tmp_path, family):
    model = build_model("tiny", family, tokenizer=tokenizer, seed=3)
    path = save_policy(model, tokenizer, tmp_path / "run" / "policy.pt")
    assert os.listdir(tmp_path / "run") == ["policy.pt"]  # the temporary file was renamed, none left behind
    _assert_same_policy(model, load_policy(path), tokenizer)


@pytest.mark.parametrize("family", FAMILIES)
def test_hf_directory_round_trip(tokenizer, tmp_path, family):
    model = build_model("tiny", family, tokenizer=tokenizer, seed=4)
    directory = save_hf_dir(model, tokenizer, tmp_path / "hf")
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= set(os.listdir(directory))
    _assert_same_policy(model, load_policy(directory), tokenizer)
    _assert_same_policy(model, load_policy(directory / "model.safetensors"), tokenizer)


def test_policy_file_is_plain_data(tokenizer, tmp_path):
    model = build_model("tiny", "qwen2", tokenizer=tokenizer)
    payload = torch.load(
        save_policy(model, tokenizer, tmp_path / "p.pt", extra={"step": 7}), weights_only=True
    )
    assert payload["format"] == POLICY_FORMAT and payload["step"] == 7
    assert json.loads(json.dumps(payload["config"]))["model_type"] == "qwen2"
    assert {"tokenizer.json", "tokenizer_config.json"} <= set(payload["tokenizer"])
    assert all(isinstance(text, str) for text in payload["tokenizer"].values())
    state = payload["state_dict"]
    assert set(state) == set(model.state_dict())
    assert all(t.is_contiguous() for t in state.values())
    # The tied embedding is stored once and shared, as in the model.
    assert state["lm_head.weight"].data_ptr() == state["model.embed_tokens.weight"].data_ptr()


class _RunsCodeWhenUnpickled:
    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (os.mkdir, (self.marker,))


def test_unsafe_pickle_is_refused_without_running_it(tmp_path):
    marker = tmp_path / "pwned"
    torch.save({"state_dict": _RunsCodeWhenUnpickled(marker)}, tmp_path / "evil.pt")
    with pytest.raises(CheckpointError, match="refusing to load .*run code"):
        load_policy(tmp_path / "evil.pt")
    assert not marker.exists()


def test_bad_checkpoints_are_one_line_errors(tokenizer, tmp_path):
    torch.save({"model.embed_tokens.weight": torch.zeros(4, 2)}, tmp_path / "plain.pt")
    (tmp_path / "junk.pt").write_text("not a checkpoint at all")
    (tmp_path / "empty.pt").write_bytes(b"")
    torch.save({"format": "someone-else/9", "state_dict": {}}, tmp_path / "other.pt")
    torch.save(torch.zeros(3), tmp_path / "tensor.pt")
    (tmp_path / "not_a_model").mkdir()
    (tmp_path / "lonely.safetensors").write_bytes(b"")
    cases = {
        "missing.pt": "no such checkpoint",
        "Qwen/Qwen2.5-0.5B-Instruct": "no such checkpoint",  # a hub id is never fetched
        "plain.pt": "plain state dict without a model config",
        "junk.pt": "not a PyTorch checkpoint",
        "empty.pt": "not a PyTorch checkpoint",
        "other.pt": "format 'someone-else/9'",
        "tensor.pt": "not a policy checkpoint",
        "not_a_model": "not a Hugging Face model directory",
        "lonely.safetensors": "without config.json",
    }
    for name, expected in cases.items():
        target = name if "/" in name else tmp_path / name
        with pytest.raises(CheckpointError, match=expected) as caught:
            load_policy(target)
        assert "\n" not in str(caught.value), name


def test_weights_that_do_not_fit_the_config_are_named(tokenizer, tmp_path):
    model = build_model("tiny", "llama", tokenizer=tokenizer)
    path = save_policy(model, tokenizer, tmp_path / "p.pt")
    payload = torch.load(path, weights_only=True)
    payload["state_dict"]["model.layers.9.extra.weight"] = torch.zeros(1)
    del payload["state_dict"]["model.norm.weight"]
    torch.save(payload, path)
    with pytest.raises(CheckpointError, match=r"missing model\.norm\.weight; unexpected model\.layers\.9"):
        load_policy(path)
