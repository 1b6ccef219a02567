"""Supervised warm-up: oracle trajectories, assistant-only masks, a short run that lowers the loss."""

import random

import pandas as pd
import pytest

from toolrl_analysis.cli import main
from toolrl_analysis.config import load_config
from toolrl_analysis.envs.oracle import oracle_conversations
from toolrl_analysis.envs.pipeline import EnvBuildConfig, build_envsets, write_envset
from toolrl_analysis.envs.sandbox import Sandbox
from toolrl_analysis.errors import ConfigError
from toolrl_analysis.models.checkpoint import load_policy
from toolrl_analysis.models.tokenizer import build_policy_tokenizer
from toolrl_analysis.training.sft import SFTConfig, chat_example, train_base


@pytest.fixture(scope="module")
def envset(tmp_path_factory):
    build = build_envsets(EnvBuildConfig(seed=3, train_size=32, test_per_scenario=2))
    out = tmp_path_factory.mktemp("envs")
    write_envset(build, out)
    return out, build


def test_oracle_conversations_run_real_tools_and_show_corrections(envset):
    _, build = envset
    records = build.train[:8]
    with Sandbox(workers=2) as sandbox:
        conversations = oracle_conversations(records, sandbox, random.Random(0), correction_prob=1.0)
    corrected = 0
    for record, messages in zip(records, conversations, strict=True):
        tool_outputs = [m["content"] for m in messages if m["role"] == "tool"]
        # every sub-answer appears in some real tool output, and the episode ends with the final answer
        for answers in record.unsolved_set.values():
            for answer in answers:
                assert any(answer.lower() in out.lower() for out in tool_outputs)
        assert messages[-1] == {"role": "assistant", "content": f"The answer is {record.answer}."}
        n_calls = sum(len(m.get("tool_calls", [])) for m in messages)
        if n_calls > sum(len(t) for t in record.meta["golden_turns"]):
            corrected += 1
            # the failed call got an informative error from the real tool code
            assert any("no record" in out.lower() or "error" in out.lower() for out in tool_outputs)
    assert corrected >= 6  # a failed call is inserted whenever an argument can be misspelled


def test_assistant_mask_covers_only_what_the_model_writes(envset):
    _, build = envset
    tokenizer = build_policy_tokenizer(build.train, vocab_size=600)
    with Sandbox(workers=1) as sandbox:
        (messages,) = oracle_conversations(build.train[:1], sandbox, random.Random(0), 0.0)
    ids, mask = chat_example(tokenizer, messages, build.train[0].tools)
    learned = tokenizer.decode([i for i, m in zip(ids, mask, strict=True) if m])
    context = tokenizer.decode([i for i, m in zip(ids, mask, strict=True) if not m])
    assert "<tool_call>" in learned and "The answer is" in learned and learned.count("<|im_end|>") >= 2
    assert "<tool_response>" not in learned and "Question:" not in learned
    assert "<tool_response>" in context and "Question:" in context


def test_short_warm_up_lowers_loss_and_writes_checkpoints(envset, tmp_path):
    envs_dir, _ = envset
    config = SFTConfig(
        vocab_size=600,
        steps=30,
        batch_tokens=2048,
        max_seq_len=1024,
        lr=3e-3,
        warmup_steps=5,
        general_tasks=64,
        general_text_share=0.05,
        log_every=5,
        threads=1,
    )
    summary = train_base(envs_dir, tmp_path / "base", config, log=lambda _: None)
    curve = pd.read_csv(tmp_path / "base" / "loss.csv")
    assert list(curve.columns) == ["step", "phase", "loss", "lr", "tokens", "seconds"]
    assert curve["phase"].iloc[0] == "copy" and curve["phase"].iloc[-1] == "sft"
    supervised = curve[curve["phase"] == "sft"]["loss"]
    early, late = supervised.iloc[:2].mean(), supervised.iloc[-2:].mean()
    assert late < 0.75 * early, (early, late)
    assert summary["data"]["tool_use_examples"] > 0
    model, tokenizer = load_policy(tmp_path / "base" / "base.pt")
    assert model.config.num_hidden_layers == 4
    assert (tmp_path / "base" / "hf" / "config.json").exists()
    assert tokenizer.eos_token == "<|im_end|>"


def test_bad_config_values_name_the_key(tmp_path):
    with pytest.raises(ConfigError, match="'lr'"):
        load_config(SFTConfig, None, ["lr=-1"])
    with pytest.raises(ConfigError, match="'multi_hop_share'"):
        load_config(SFTConfig, None, ["multi_hop_share=2"])
    with pytest.raises(ConfigError, match="unknown config key 'learning_rate'"):
        load_config(SFTConfig, None, ["learning_rate=1"])


def test_cli_train_base_rejects_bad_input(tmp_path, capsys):
    assert main(["train-base", "--envs", str(tmp_path / "nope"), "--out", str(tmp_path / "b")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("toolrl-analyze: error:") and "\n" not in err
    assert (
        main(["train-base", "--envs", str(tmp_path), "--out", str(tmp_path / "b"), "--set", "lr=-0.1"]) == 2
    )
    assert "'lr'" in capsys.readouterr().err
