"""Supervised warm-up: oracle trajectories, assistant-only masks, a short run that lowers the loss."""

import random

import pandas as pd
import pytest

from toolrl_analysis.cli import main
from toolrl_analysis.config import load_config
from toolrl_analysis.envs.oracle import oracle_conversations
from toolrl_analysis.envs.pipeline import EnvBuildConfig, build_envsets, write_envset
from toolrl_analysis.envs.sandbox import Sandbox
from toolrl_analysis.errors import CheckpointError, ConfigError
from toolrl_analysis.models.checkpoint import load_policy
from toolrl_analysis.models.tokenizer import build_policy_tokenizer
from toolrl_analysis.training.base_data import chat_example
from toolrl_analysis.training.sft import SFTConfig, train_base


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


def test_a_failed_call_is_context_but_never_a_target(envset):
    from toolrl_analysis.envs.oracle import FAILED_CALL
    from toolrl_analysis.training.base_data import tool_use_examples

    _, build = envset
    records = [r for r in build.train if r.scenario == "single_hop"][:4]
    tokenizer = build_policy_tokenizer(build.train, vocab_size=600)
    with Sandbox(workers=1) as sandbox:
        (messages,) = oracle_conversations(records[:1], sandbox, random.Random(0), correction_prob=1.0)
        failed = [m for m in messages if m.get(FAILED_CALL)]
        assert len(failed) == 1 and failed[0]["role"] == "assistant"
        for loss_on in ("all", "assistant"):
            (example,), info = tool_use_examples(
                tokenizer, records[:1], sandbox, seed=0, correction_prob=1.0, loss_on=loss_on, max_len=4096
            )
            ids, targets = example
            text = tokenizer.decode(ids)
            taught = tokenizer.decode([i for i, t in zip(ids, targets, strict=True) if t])
            # Two calls in the context (the failed one and its correction), one of them taught.
            call = '"arguments": {'
            assert text.count(call) == 2 and taught.count(call) == 1
            assert "No record found" in text  # the tool's answer to the misspelled name
            assert "The answer is" in taught and info["corrections"] == 1
            if loss_on == "all":
                assert "Question:" in taught


FAST = [
    "vocab_size=600", "curriculum_steps=0", "tokenizer_envs=60", "stream_envs=120", "envs_per_world=60", "general_tasks=40",
    "batch_tokens=2048", "max_seq_len=1024", "warmup_steps=5", "val_meter_envs=2", "val_solve_envs=1",
    "val_max_new_tokens=24", "threads=1", "log_every=5",
    # general material and corrections mixed in from the start, on a cosine: every part of the data path runs
    "general_from_step=0", "correction_prob=0.2", "general_text_share=0.05", "schedule=cosine",
]  # fmt: skip


def _fast(*overrides):
    return load_config(SFTConfig, None, FAST + list(overrides))


def test_fast_recipe_lowers_role_nlls_and_writes_the_run(envset, tmp_path):
    envs_dir, _ = envset
    config = _fast("steps=40", "eval_every=20", "curriculum_steps=10", "curriculum_envs=30")
    summary = train_base(envs_dir, tmp_path / "base", config, log=lambda _: None)
    curve = pd.read_csv(tmp_path / "base" / "loss.csv")
    assert list(curve["step"]) == list(range(5, 45, 5))
    assert set(curve["pool"]) == {"curriculum", "main"}
    assert curve["loss"].iloc[-2:].mean() < curve["loss"].iloc[0] - 0.5
    validation = pd.read_csv(tmp_path / "base" / "validation.csv")
    assert list(validation["step"]) == [0, 20, 40]  # 0: the untrained model
    # The meter moves: format tokens and the tool's entity kind get measurably cheaper.
    for role in ("format", "tool_kind", "arg_key"):
        first, last = validation[f"nll_{role}"].iloc[0], validation[f"nll_{role}"].iloc[-1]
        assert last < first - 0.3, (role, first, last)
    assert {"val_f1_overall", "gap_tool_kind", "top1_format"} <= set(validation.columns)
    assert (tmp_path / "base" / "validation.png").stat().st_size > 0
    # Solve-F1 stays 0 in 40 steps: nothing is in the band, so the closest checkpoint is chosen, and why is said.
    assert (
        summary["chosen_step"] in (20, 40) and "no checkpoint reached the band" in summary["chosen_because"]
    )
    assert (
        summary["data"]["main"]["examples"] > 0
        and summary["data"]["curriculum"]["scenarios"]["multi_hop"] == 0
    )
    model, tokenizer = load_policy(tmp_path / "base" / "base.pt")
    assert model.config.num_hidden_layers == 4 and tokenizer.eos_token == "<|im_end|>"
    assert (tmp_path / "base" / "hf" / "config.json").exists()


def test_resume_continues_to_the_same_weights(envset, tmp_path):
    import torch

    envs_dir, _ = envset
    config = _fast("steps=12", "eval_every=6", "val_solve_envs=0")
    train_base(envs_dir, tmp_path / "whole", config, log=lambda _: None)
    # The same run, stopped by its time limit after its first step, then resumed (the limit may change).
    lines = []
    first = train_base(envs_dir, tmp_path / "parts", _fast("steps=12", "eval_every=6", "val_solve_envs=0",
                                                            "time_limit_s=0.001"), log=lines.append)  # fmt: skip
    assert first["stopped_early"] and first["steps"] < 12 and "--resume" in lines[-1]
    train_base(envs_dir, tmp_path / "parts", config, resume=True, log=lambda _: None)
    whole = torch.load(tmp_path / "whole" / "checkpoints" / "step-000012.pt", weights_only=True)["state_dict"]
    parts = torch.load(tmp_path / "parts" / "checkpoints" / "step-000012.pt", weights_only=True)["state_dict"]
    assert whole.keys() == parts.keys()
    assert all(torch.equal(whole[k], parts[k]) for k in whole)
    assert (
        pd.read_csv(tmp_path / "whole" / "loss.csv")["loss"].tolist()
        == pd.read_csv(tmp_path / "parts" / "loss.csv")["loss"].tolist()
    )


def test_a_finished_run_can_be_continued_to_more_steps_or_into_its_decay(envset, tmp_path):
    import torch

    envs_dir, _ = envset
    options = ("eval_every=3", "val_solve_envs=0", "val_meter_envs=1", "schedule=constant")

    def weights(run):
        return torch.load(run / "checkpoints" / "step-000009.pt", weights_only=True)["state_dict"]

    def quiet(*overrides, run, resume=False):
        return train_base(
            envs_dir, tmp_path / run, _fast(*options, *overrides), resume=resume, log=lambda _: None
        )

    quiet("steps=9", run="whole")
    quiet("steps=6", run="more")
    assert quiet("steps=9", run="more", resume=True)["steps"] == 9
    whole, more = weights(tmp_path / "whole"), weights(tmp_path / "more")
    assert all(torch.equal(whole[k], more[k]) for k in whole)
    # a constant run branched at step 6 into a 3-step linear decay is the wsd run asked for from the start
    quiet("steps=9", "schedule=wsd", "decay_steps=3", run="wsd")
    quiet("steps=6", run="branch")
    quiet("steps=9", "schedule=wsd", "decay_steps=3", run="branch", resume=True)
    wsd, branch = weights(tmp_path / "wsd"), weights(tmp_path / "branch")
    assert all(torch.equal(wsd[k], branch[k]) for k in wsd)
    assert not all(torch.equal(wsd[k], whole[k]) for k in wsd)  # the decay did change the last steps
    # a run without general material, continued into a late general phase, is the run that planned it
    late = ("general_from_step=6", "general_every=2", "general_tasks=40", "general_text_share=0")
    quiet("steps=9", *late, run="late")
    quiet("steps=6", "general_tasks=0", "general_text_share=0", run="added")
    assert quiet("steps=9", *late, run="added", resume=True)["data"]["general"]["examples"] == 40
    planned, added = weights(tmp_path / "late"), weights(tmp_path / "added")
    assert all(torch.equal(planned[k], added[k]) for k in planned)
    assert not all(torch.equal(planned[k], whole[k]) for k in planned)
    pools = pd.read_csv(tmp_path / "added" / "loss.csv")
    assert pools["pool"].tolist()[-2:] == ["main", "general"]  # rows at steps 5 and 9 (0-based 4 and 8)
    with pytest.raises(ConfigError, match="changed: .*general_from_step"):  # general batches in the past
        quiet("steps=9", "general_from_step=4", "general_tasks=40", run="more", resume=True)
    with pytest.raises(ConfigError, match="changed: .*general_tasks"):  # general material mixed into the past
        quiet("steps=9", "general_tasks=80", run="more", resume=True)
    with pytest.raises(ConfigError, match="changed: steps"):  # fewer steps than already trained
        train_base(envs_dir, tmp_path / "more", _fast(*options, "steps=3"), resume=True)
    with pytest.raises(
        ConfigError, match="changed: steps, schedule, decay_steps"
    ):  # a decay that began at step 7
        train_base(
            envs_dir,
            tmp_path / "more",
            _fast(*options, "steps=12", "schedule=wsd", "decay_steps=5"),
            resume=True,
        )


def test_resume_refuses_a_changed_recipe_and_a_missing_run(envset, tmp_path):
    envs_dir, _ = envset
    with pytest.raises(ConfigError, match="nothing to resume"):
        train_base(envs_dir, tmp_path / "none", _fast("steps=4"), resume=True)
    (tmp_path / "corrupt" / "checkpoints").mkdir(parents=True)
    (tmp_path / "corrupt" / "checkpoints" / "state.pt").write_bytes(b"\x80\x02 half a file")
    with pytest.raises(CheckpointError, match="state.pt"):  # one line, the weights never unpickled
        train_base(envs_dir, tmp_path / "corrupt", _fast("steps=4"), resume=True)
    train_base(envs_dir, tmp_path / "run", _fast("steps=2", "eval_every=2", "val_solve_envs=0"), log=print)
    with pytest.raises(ConfigError, match="already holds a train-base run"):
        train_base(envs_dir, tmp_path / "run", _fast("steps=2"))
    with pytest.raises(ConfigError, match="changed: lr"):
        train_base(envs_dir, tmp_path / "run", _fast("steps=2", "eval_every=2", "val_solve_envs=0", "lr=1e-3"),
                   resume=True)  # fmt: skip


def test_bad_config_values_name_the_key(tmp_path):
    with pytest.raises(ConfigError, match="'lr'"):
        load_config(SFTConfig, None, ["lr=-1"])
    with pytest.raises(ConfigError, match="'mix'"):
        load_config(SFTConfig, None, ["mix=1,1,1"])
    with pytest.raises(ConfigError, match="'curriculum_steps'"):
        load_config(SFTConfig, None, ["steps=10", "curriculum_steps=20"])
    with pytest.raises(ConfigError, match="'general_from_step'"):
        load_config(SFTConfig, None, ["general_from_step=5", "general_tasks=0", "general_text_share=0"])
    with pytest.raises(ConfigError, match="'band'"):
        load_config(SFTConfig, None, ["band=0.6,0.2"])
    with pytest.raises(ConfigError, match="'loss_on'"):
        load_config(SFTConfig, None, ["loss_on=everything"])
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
    assert main(["train-base", "--envs", str(tmp_path), "--out", str(tmp_path / "b"), "--resume"]) == 2
    assert "nothing to resume" in capsys.readouterr().err


def test_cli_prints_plain_progress_lines_without_a_terminal(envset, tmp_path, capsys):
    envs_dir, _ = envset
    args = ["train-base", "--envs", str(envs_dir), "--out", str(tmp_path / "b")]
    for item in [*FAST, "steps=10", "eval_every=5", "val_solve_envs=0"]:
        args += ["--set", item]
    assert main(args) == 0
    lines = [line for line in capsys.readouterr().err.splitlines() if line.startswith("step ")]
    assert [line.split()[1] for line in lines] == ["5/10", "10/10"]
    assert "loss" in lines[0] and "tok/s" in lines[0] and "ETA" in lines[0]
    assert "NLL kind" in lines[1]  # the validation at step 5 reports its role NLLs
