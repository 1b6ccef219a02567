"""The verl scale-out recipe (training/verl/) against verl's documented interfaces, and against verl 0.9.1's own
trainer configuration and reward loader where it is installed (`make venv` installs it without dependencies).

What verl reads, and where that is documented:
- the dataset: verl docs "Prepare Data for Post-Training" (docs/preparation/prepare_data.rst): parquet rows with
  `data_source`, `prompt` (chat messages, rendered by the tokenizer's chat template in RLHFDataset), `ability`,
  `reward_model.ground_truth`, `extra_info` (RLHFDataset also takes `extra_info.index`);
- the reward: verl docs "Implement Reward Function for Dataset" (docs/preparation/reward_function.rst) and
  verl/trainer/ppo/reward.py::get_custom_reward_fn: the file at `reward.custom_reward_function.path` (verl 0.9;
  top-level `custom_reward_function` before) is loaded with
  importlib.util.spec_from_file_location("custom_module", path), the function is getattr(module, name), and the
  reward manager calls it as fn(data_source=..., solution_str=..., ground_truth=..., extra_info=...);
- the Hydra keys: verl docs "Config Explanation" (docs/examples/config.rst), verl's flattened
  verl/trainer/config/_generated_ppo_trainer.yaml, and FTRL's launchers (bytedance/FTRL Scripts/FTRL-GRPO-Qwen25.sh,
  Scripts/FTRL-Reinforce++-Qwen25.sh), which also give the paper's hyper-parameter values checked here.
"""

from __future__ import annotations

import importlib.util
import inspect
import json
import os
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import FTRL_TEST_SET as FTRL_TEST

from toolrl_analysis.cli import main as cli_main
from toolrl_analysis.envs import ftrl_io
from toolrl_analysis.envs.schema import SCENARIOS, read_envs, write_envs
from toolrl_analysis.errors import UserError
from toolrl_analysis.models.chat_template import ASSISTANT_PREFIX, CHAT_TEMPLATE, render_chat

ROOT = Path(__file__).resolve().parents[1]
VERL_DIR = ROOT / "training" / "verl"
LAUNCHER = VERL_DIR / "run_grpo.sh"
REINFORCE_LAUNCHER = VERL_DIR / "run_reinforce_pp.sh"

# Every key below exists in verl 0.9.1's trainer configuration (verl/trainer/config/_generated_ppo_trainer.yaml,
# checked key by key against the released wheel); the launcher may set no other key. verl's dependencies cannot be
# installed beside this project's pins (it requires transformers < 5.11): this list holds where verl is absent, and
# `test_verls_own_configuration_takes_the_launcher_and_loads_the_reward` composes verl's own where it is there.
VERL_REFERENCE_KEYS = frozenset(
    {
        "algorithm.adv_estimator",
        "algorithm.use_kl_in_reward",
        "algorithm.kl_penalty",
        "algorithm.gamma",
        "algorithm.lam",
        "algorithm.norm_adv_by_std_in_grpo",
        "algorithm.kl_ctrl.kl_coef",
        "data.train_files",
        "data.val_files",
        "data.prompt_key",
        "data.reward_fn_key",
        "data.train_batch_size",
        "data.max_prompt_length",
        "data.max_response_length",
        "data.filter_overlong_prompts",
        "data.truncation",
        "data.return_raw_chat",
        "data.custom_cls.path",
        "data.custom_cls.name",
        "actor_rollout_ref.model.path",
        "actor_rollout_ref.model.use_remove_padding",
        "actor_rollout_ref.model.enable_gradient_checkpointing",
        "actor_rollout_ref.actor.optim.lr",
        "actor_rollout_ref.actor.ppo_mini_batch_size",
        "actor_rollout_ref.actor.ppo_micro_batch_size_per_gpu",
        "actor_rollout_ref.actor.use_dynamic_bsz",
        "actor_rollout_ref.actor.ppo_max_token_len_per_gpu",
        "actor_rollout_ref.actor.use_kl_loss",
        "actor_rollout_ref.actor.kl_loss_coef",
        "actor_rollout_ref.actor.kl_loss_type",
        "actor_rollout_ref.actor.entropy_coeff",
        "actor_rollout_ref.actor.loss_agg_mode",
        "actor_rollout_ref.actor.clip_ratio_low",
        "actor_rollout_ref.actor.clip_ratio_high",
        "actor_rollout_ref.actor.ppo_epochs",
        "actor_rollout_ref.actor.fsdp_config.param_offload",
        "actor_rollout_ref.actor.fsdp_config.optimizer_offload",
        "actor_rollout_ref.rollout.name",
        "actor_rollout_ref.rollout.mode",
        "actor_rollout_ref.rollout.temperature",
        "actor_rollout_ref.rollout.tensor_model_parallel_size",
        "actor_rollout_ref.rollout.gpu_memory_utilization",
        "actor_rollout_ref.rollout.n",
        "actor_rollout_ref.rollout.max_num_batched_tokens",
        "actor_rollout_ref.ref.fsdp_config.param_offload",
        "reward.reward_manager.name",
        "reward.custom_reward_function.path",
        "reward.custom_reward_function.name",
        "trainer.critic_warmup",
        "trainer.logger",
        "trainer.project_name",
        "trainer.experiment_name",
        "trainer.default_local_dir",
        "trainer.val_before_train",
        "trainer.n_gpus_per_node",
        "trainer.nnodes",
        "trainer.save_freq",
        "trainer.test_freq",
        "trainer.total_epochs",
    }
)

# The paper's settings, as FTRL's Qwen2.5 launchers pass them to verl.
PAPER_VALUES = {
    "actor_rollout_ref.actor.optim.lr": 1e-6,
    "data.train_batch_size": 512,
    "actor_rollout_ref.actor.ppo_mini_batch_size": 32,
    "actor_rollout_ref.rollout.n": 16,
    "actor_rollout_ref.actor.use_kl_loss": True,
    "actor_rollout_ref.actor.kl_loss_coef": 0.001,
    "actor_rollout_ref.actor.kl_loss_type": "low_var_kl",
    "algorithm.use_kl_in_reward": False,
    "actor_rollout_ref.actor.entropy_coeff": 0.001,
    "data.max_prompt_length": 16384,
    "data.max_response_length": 1024,
    "trainer.total_epochs": 1,
    "actor_rollout_ref.actor.ppo_max_token_len_per_gpu": 32768,
    "actor_rollout_ref.rollout.gpu_memory_utilization": 0.7,
    "actor_rollout_ref.rollout.max_num_batched_tokens": 32768,
    # Not passed by FTRL's scripts: the defaults of the verl FTRL ships (Code/verl/trainer/config/ppo_trainer.yaml),
    # which today's verl changed (loss_agg_mode token-mean, rollout temperature 1.0), so the launcher sets them.
    "actor_rollout_ref.actor.loss_agg_mode": "seq-mean-token-mean",
    "actor_rollout_ref.actor.clip_ratio_low": 0.2,
    "actor_rollout_ref.actor.clip_ratio_high": 0.2,
    "actor_rollout_ref.actor.ppo_epochs": 1,
    "actor_rollout_ref.rollout.temperature": 0.7,
    "algorithm.norm_adv_by_std_in_grpo": True,
}
VERL_REWARD_PARAMETERS = ["data_source", "solution_str", "ground_truth", "extra_info"]


def _load_like_verl(path: Path, name: str):
    """verl/trainer/ppo/reward.py::get_custom_reward_fn, minus verl."""
    spec = importlib.util.spec_from_file_location("custom_module", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return getattr(module, name)


def _prepare_module():
    spec = importlib.util.spec_from_file_location("toolrl_verl_prepare", VERL_DIR / "prepare_data.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _render(template: str = CHAT_TEMPLATE):
    return lambda messages, tools: render_chat(
        messages, tools=tools, add_generation_prompt=True, chat_template=template
    )


def _trl_template(name: str) -> str:
    """Real Qwen chat templates, as shipped by trl (an optional extra)."""
    from importlib.resources import files

    path = files("trl") / "chat_templates" / name
    assert path.is_file(), f"trl ships no {name}"
    return path.read_text(encoding="utf-8")


def _golden_calls(row: dict, extra: int = 0) -> tuple[str, int]:
    """The environment's first golden turn (from meta) as Qwen tool-call text, plus `extra` repeats of its first
    call; returns the text and the number of sub-questions the golden calls solve."""
    meta = json.loads(row["extra_info"]["meta"])
    by_id = {sub["id"]: sub for sub in meta["subquestions"]}
    calls = [by_id[i] for i in meta["golden_turns"][0]]
    calls = calls + calls[:1] * extra
    text = "\n".join(
        "<tool_call>\n" + json.dumps({"name": c["tool"], "arguments": c["arguments"]}) + "\n</tool_call>"
        for c in calls
    )
    return text, len(meta["golden_turns"][0])


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """A small generated EnvSet, exported to verl parquet with the CLI; the records and the rows read back."""
    import pyarrow.parquet as pq

    from toolrl_analysis.envs.pipeline import EnvBuildConfig, build_envsets, write_envset

    base = tmp_path_factory.mktemp("verl")
    write_envset(build_envsets(EnvBuildConfig(train_size=8, test_per_scenario=1)), base / "set")
    out = base / "train.parquet"
    assert cli_main(["envs", "export", str(base / "set"), "--format", "verl", "--out", str(out)]) == 0
    records = ftrl_io.load_source(base / "set")
    yield {
        "base": base,
        "set": base / "set",
        "parquet": out,
        "records": records,
        "rows": pq.read_table(out).to_pylist(),
    }
    # The reward entry point keeps one sandbox per process (verl calls it many times); close ours.
    if ftrl_io._SANDBOX is not None:
        ftrl_io._SANDBOX.close()
        ftrl_io._SANDBOX = None


@pytest.fixture(scope="module")
def tokenizer_dir(exported):
    """A tiny tokenizer with the embedded chat template, saved like an HF model directory (MODEL for verl)."""
    from toolrl_analysis.models.tokenizer import train_tokenizer

    texts = [render_chat(r.messages, tools=r.tools) for r in exported["records"]]
    path = exported["base"] / "tokenizer"
    train_tokenizer(texts, vocab_size=512).save_pretrained(path)
    return path


# -- the exported data -----------------------------------------------------------------------------------------
def test_export_has_every_field_verls_rlhf_dataset_reads(exported, tokenizer_dir):
    import pandas as pd

    from toolrl_analysis.models.tokenizer import load_tokenizer

    frame = pd.read_parquet(exported["parquet"])
    assert {"prompt", "data_source", "ability", "reward_model", "extra_info"} <= set(frame.columns)
    rows, records = exported["rows"], exported["records"]
    assert len(rows) == len(records) == 12
    tokenizer = load_tokenizer(tokenizer_dir)
    for index, (row, record) in enumerate(zip(rows, records, strict=True)):
        prompt = row["prompt"]
        assert isinstance(prompt, list) and prompt
        assert all(set(m) == {"role", "content"} and isinstance(m["content"], str) for m in prompt)
        assert prompt[0]["role"] == "user" and record.question in prompt[0]["content"]
        assert isinstance(row["data_source"], str) and row["data_source"].removeprefix("self/") in SCENARIOS
        assert isinstance(row["ability"], str) and row["ability"]
        assert row["reward_model"]["ground_truth"] == record.answer
        info = row["extra_info"]
        assert isinstance(info, dict) and info["index"] == index and info["split"] == record.split
        assert json.loads(info["tools"]) == record.tools and json.loads(info["codes"]) == record.codes
        assert json.loads(info["unsolved_set"]) == record.unsolved_set
        assert info["solve_rate"] == record.solve_rate and json.loads(info["meta"])["golden_turns"]
        # RLHFDataset: apply_chat_template(prompt, add_generation_prompt=True), then tokenize.
        text = tokenizer.apply_chat_template(prompt, add_generation_prompt=True, tokenize=False)
        assert text.endswith(ASSISTANT_PREFIX) and record.question in text
        assert (
            len(tokenizer(text, add_special_tokens=False)["input_ids"])
            <= PAPER_VALUES["data.max_prompt_length"]
        )


def test_export_loads_through_hf_datasets_like_rlhf_dataset(exported, tmp_path):
    import datasets

    dataset = datasets.load_dataset("parquet", data_files=str(exported["parquet"]), cache_dir=str(tmp_path))[
        "train"
    ]
    row = dataset[0]
    assert (
        row["prompt"][0]["role"] == "user"
        and row["reward_model"]["ground_truth"] == exported["rows"][0]["reward_model"]["ground_truth"]
    )
    assert row["extra_info"]["index"] == 0


# -- the reward entry point ------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "name",
    [
        "compute_score",
        "compute_score_f1",
        "compute_score_precision",
        "compute_score_rate",
        "compute_score_pr",
    ],
)
def test_reward_functions_have_verls_signature(name):
    function = _load_like_verl(VERL_DIR / "reward.py", name)
    parameters = list(inspect.signature(function).parameters.values())
    assert [p.name for p in parameters[:4]] == VERL_REWARD_PARAMETERS
    assert parameters[3].default is None
    assert all(p.default is not inspect.Parameter.empty for p in parameters[4:])  # reward_kwargs only


def test_reward_scores_one_turn_with_ftrls_step_reward(exported):
    compute_score = _load_like_verl(VERL_DIR / "reward.py", "compute_score")
    rows = exported["rows"]
    # A parallel row (several golden calls in its first turn) and a row with a single one.
    golden_sizes = [len(json.loads(r["extra_info"]["meta"])["golden_turns"][0]) for r in rows]
    chosen = [rows[golden_sizes.index(max(golden_sizes))], rows[golden_sizes.index(1)]]
    assert max(golden_sizes) >= 2
    for row in chosen:

        def score(text, fn=compute_score, row=row):
            return fn(
                data_source=row["data_source"],
                solution_str=text,
                ground_truth=row["reward_model"]["ground_truth"],
                extra_info=row["extra_info"],
            )

        golden, q = _golden_calls(row)
        assert score(golden) == pytest.approx(2 * q / (q + 1)) and score(golden) > 0  # p = q
        assert score(golden + "<|im_end|>") == pytest.approx(2 * q / (q + 1))  # decoded with special tokens
        repeated, _ = _golden_calls(row, extra=1)  # the repeat finds nothing left to solve: p = q + 1
        assert score(repeated) == pytest.approx(2 * q / (q + 2))
        assert score("<tool_call>\n{not json\n</tool_call>") == -0.3
        assert score("") == -0.5 and score("<|im_end|>") == -0.5
        # The variants, by name (as the launcher picks them) and by verl's reward_kwargs.
        for name, expected in (("precision", 1.0), ("rate", q), ("pr", q), ("f1", 2 * q / (q + 1))):
            by_name = _load_like_verl(VERL_DIR / "reward.py", f"compute_score_{name}")
            assert score(golden, fn=by_name) == pytest.approx(expected)
            assert compute_score(
                row["data_source"],
                golden,
                row["reward_model"]["ground_truth"],
                row["extra_info"],
                variant=name,
            ) == pytest.approx(expected)
        # Same value as the package's own entry point, which verl could also load by path.
        assert score(golden) == ftrl_io.compute_score(
            row["data_source"], golden, row["reward_model"]["ground_truth"], row["extra_info"]
        )
    with pytest.raises(ValueError, match="unknown reward variant"):
        compute_score("self/single_hop", "", "x", chosen[0]["extra_info"], variant="recall")


# -- tools into the prompt -------------------------------------------------------------------------------------
def _history_state(record, string_arguments: bool = False):
    """A per-step state with history: the golden first turn called, its results back, the rest unsolved.
    FTRL's sampler writes arguments as JSON strings (OpenAI style); ours writes objects."""
    meta = record.meta
    by_id = {sub["id"]: sub for sub in meta["subquestions"]}
    calls = [by_id[i] for i in meta["golden_turns"][0]]
    state = record.copy()
    encode = json.dumps if string_arguments else dict
    state.messages = [
        *record.messages,
        {
            "role": "assistant",
            "content": None if string_arguments else "",
            "tool_calls": [
                {"type": "function", "function": {"name": c["tool"], "arguments": encode(c["arguments"])}}
                for c in calls
            ],
        },
        *({"role": "tool", "name": c["tool"], "content": f"result: {c['answer']}"} for c in calls),
    ]
    return state


@pytest.mark.parametrize("template", ["embedded", "qwen2_5.jinja", "qwen3.jinja"])
def test_prepared_prompts_render_like_the_original_with_tools(exported, template):
    prepare = _prepare_module()
    render = _render(CHAT_TEMPLATE if template == "embedded" else _trl_template(template))
    records = exported["records"]
    states = [_history_state(r, string_arguments=i % 2 == 1) for i, r in enumerate(records[:4])]
    rows = ftrl_io.verl_rows(records + states)
    conversations = [r.messages for r in records + states]
    counts = prepare.prepare_rows(rows, conversations, render)
    assert counts["prepared"] == len(rows)
    for row, record in zip(rows, records + states, strict=True):
        prompt = row["prompt"]
        assert prompt[0]["role"] == "system" and all(set(m) == {"role", "content"} for m in prompt)
        assert render(prompt, None) == render(record.messages, record.tools)  # what verl renders == tools=
        assert all(tool["function"]["name"] in prompt[0]["content"] for tool in record.tools)
        assert row["extra_info"][prepare.PREPARED_FLAG] is True
    assert prepare.prepare_rows(rows, conversations, render)["already"] == len(rows)  # idempotent


def test_prepare_refuses_a_template_that_lists_tools_elsewhere(exported):
    prepare = _prepare_module()
    in_user_turn = (
        "{% for m in messages %}<{{ m.role }}>{{ m.content }}"
        "{% if loop.last and tools %}{{ tools | tojson }}{% endif %}</{{ m.role }}>{% endfor %}"
    )
    record = exported["records"][0]
    with pytest.raises(UserError, match="does not list tools in the system turn"):
        prepare.prompt_with_tools(record.messages, record.tools, _render(in_user_turn))
    raising = "{{ raise_exception('only one call per turn') }}"
    with pytest.raises(UserError, match="chat template failed: only one call per turn"):
        prepare.prompt_with_tools(record.messages, record.tools, _render(raising))


def test_prepare_handles_ftrls_published_tool_schemas(tmp_path):
    prepare = _prepare_module()
    render = _render(_trl_template("qwen2_5.jinja"))
    records = read_envs(FTRL_TEST)[::10]
    rows = ftrl_io.verl_rows(records)
    prepare.prepare_rows(rows, [r.messages for r in records], render)
    for row, record in zip(rows, records, strict=True):
        assert render(row["prompt"], None) == render(record.messages, record.tools)


# -- the launcher ----------------------------------------------------------------------------------------------
def _dry_run(script: Path, env: dict[str, str], *args: str, cwd: Path) -> dict[str, str]:
    """Run a launcher with DRY_RUN=1 and return the Hydra overrides of the main_ppo command it would run."""
    result = subprocess.run(
        ["bash", str(script), *args],
        env={**os.environ, "DRY_RUN": "1", "PYTHON": sys.executable, **env},
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    line = next(line for line in result.stdout.splitlines() if "verl.trainer.main_ppo" in line)
    argv = shlex.split(line)
    assert argv[:3] == [sys.executable, "-m", "verl.trainer.main_ppo"]
    overrides = [arg.split("=", 1) for arg in argv[3:]]
    assert all(len(pair) == 2 for pair in overrides), argv
    return dict(overrides) | {"__order__": [key for key, _ in overrides]}


def _value(text: str):
    lowered = text.lower()
    if lowered in ("true", "false"):
        return lowered == "true"
    try:
        return int(text)
    except ValueError:
        pass
    try:
        return float(text)
    except ValueError:
        return text


def test_launchers_parse():
    for script in (LAUNCHER, REINFORCE_LAUNCHER):
        assert subprocess.run(["bash", "-n", str(script)], capture_output=True).returncode == 0, script


def test_launcher_runs_main_ppo_with_the_papers_settings(exported, tokenizer_dir):
    env = {
        "TRAIN_FILE": "train.parquet",  # relative: the launcher hands verl absolute paths
        "MODEL": str(tokenizer_dir),
        "N_GPUS": "4",
        "NNODES": "2",
        "OUT_DIR": str(exported["base"] / "run"),
    }
    keys = _dry_run(LAUNCHER, env, "trainer.save_freq=7", cwd=exported["base"])
    order = keys.pop("__order__")
    assert set(order[:-1]) <= VERL_REFERENCE_KEYS, set(order[:-1]) - VERL_REFERENCE_KEYS
    assert order[-1] == "trainer.save_freq" and keys["trainer.save_freq"] == "7"  # "$@" last: it wins
    for key, expected in PAPER_VALUES.items():
        assert _value(keys[key]) == expected, key
    assert keys["algorithm.adv_estimator"] == "grpo"
    assert keys["trainer.n_gpus_per_node"] == "4" and keys["trainer.nnodes"] == "2"
    assert keys["actor_rollout_ref.model.path"] == str(tokenizer_dir)
    # The reward file verl will load by path, and the function it will take from it.
    reward_path = Path(keys["reward.custom_reward_function.path"])
    assert reward_path == VERL_DIR / "reward.py"
    assert keys["reward.custom_reward_function.name"] == "compute_score_f1"
    _load_like_verl(reward_path, keys["reward.custom_reward_function.name"])
    # verl 0.9: no legacy reward keys (main_ppo ignores them), and no rollout mode unless asked ("sync" raises)
    assert not {"custom_reward_function.path", "reward_model.reward_manager"} & set(keys)
    assert "actor_rollout_ref.rollout.mode" not in keys
    asked = _dry_run(LAUNCHER, {**env, "ROLLOUT_MODE": "async"}, cwd=exported["base"])
    assert asked["actor_rollout_ref.rollout.mode"] == "async"
    # The training file is the export, prepared: every prompt carries its tools in the system turn.
    import pyarrow.parquet as pq

    train = Path(keys["data.train_files"])
    assert train.is_absolute() and train.is_file() and keys["data.val_files"] == str(train)
    prepared = pq.read_table(train).to_pylist()
    assert len(prepared) == len(exported["rows"])
    for row, record in zip(prepared, exported["records"], strict=True):
        assert render_chat(row["prompt"], add_generation_prompt=True) == render_chat(
            record.messages, tools=record.tools, add_generation_prompt=True
        )


def test_reinforce_launcher_and_variant_and_errors(exported):
    env = {"TRAIN_FILE": str(exported["parquet"]), "MODEL": "some/model", "PREPARE": "0"}
    keys = _dry_run(REINFORCE_LAUNCHER, {**env, "REWARD_VARIANT": "pr"}, cwd=exported["base"])
    assert keys["algorithm.adv_estimator"] == "reinforce_plus_plus"
    assert keys["reward.custom_reward_function.name"] == "compute_score_pr"
    assert keys["data.train_files"] == str(exported["parquet"])
    for key, expected in PAPER_VALUES.items():
        assert _value(keys[key]) == expected, key
    # The other KL placement (train-grpo's kl_in_reward): k1 in the reward, no KL loss.
    paid = _dry_run(REINFORCE_LAUNCHER, {**env, "KL_IN_REWARD": "1"}, cwd=exported["base"])
    assert paid["algorithm.use_kl_in_reward"] == "True" and paid["algorithm.kl_penalty"] == "kl"
    assert (
        paid["actor_rollout_ref.actor.use_kl_loss"] == "False"
        and paid["algorithm.kl_ctrl.kl_coef"] == "0.001"
    )
    assert set(paid.pop("__order__")) <= VERL_REFERENCE_KEYS
    for bad in (
        {"ALGO": "ppo"},
        {"REWARD_VARIANT": "recall"},
        {"TRAIN_FILE": "missing.parquet"},
        {"KL_IN_REWARD": "yes"},
        {"ALGO": "grpo", "KL_IN_REWARD": "1"},
    ):
        result = subprocess.run(
            ["bash", str(LAUNCHER)],
            env={**os.environ, "DRY_RUN": "1", **env, **bad},
            cwd=exported["base"],
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert result.returncode == 2 and result.stderr.startswith("error:"), (bad, result.stderr)


def test_prepare_script_reads_an_envset_jsonl_with_history(exported, tokenizer_dir, tmp_path):
    prepare = _prepare_module()
    states = [_history_state(r, string_arguments=i == 1) for i, r in enumerate(exported["records"][:3])]
    write_envs(states, tmp_path / "states.jsonl")
    out = tmp_path / "states.parquet"
    assert (
        prepare.main([str(tmp_path / "states.jsonl"), "--tokenizer", str(tokenizer_dir), "--out", str(out)])
        == 0
    )
    import pyarrow.parquet as pq

    rows = pq.read_table(out).to_pylist()
    for row, state in zip(rows, states, strict=True):
        assert "<tool_call>" in row["prompt"][2]["content"]  # the earlier calls survive, as text
        assert render_chat(row["prompt"], add_generation_prompt=True) == render_chat(
            state.messages, tools=state.tools, add_generation_prompt=True
        )
    assert (
        prepare.main([str(tmp_path / "nope.parquet"), "--tokenizer", str(tokenizer_dir), "--out", str(out)])
        == 2
    )


@pytest.mark.parametrize(
    ("extra_info", "message"),
    [
        ("not an object", "extra_info must be an object"),
        (
            {"index": 3, "env_id": "e3", "codes": "{not json", "unsolved_set": "{}"},
            "field 'codes' is not valid JSON",
        ),
        ({"index": 3, "env_id": "e3", "codes": "{}"}, "extra_info lacks unsolved_set"),
        ({"index": 3, "env_id": "e3", "codes": "[1]", "unsolved_set": "{}"}, "field 'codes' must be a dict"),
    ],
)
def test_an_unreadable_extra_info_is_an_error_naming_the_row(extra_info, message):
    with pytest.raises(UserError, match=message) as caught:
        ftrl_io.compute_score("self/single_hop", "<tool_call>{}</tool_call>", "x", extra_info)
    text = str(caught.value)
    assert "\n" not in text and (isinstance(extra_info, str) or text.startswith("verl row 3 (e3): "))


def test_prepare_exits_2_on_a_row_with_a_bad_extra_info(exported, tokenizer_dir, tmp_path, capsys):
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = [dict(row) for row in exported["rows"]]
    rows[2] = {**rows[2], "extra_info": {**rows[2]["extra_info"], "unsolved_set": "{'single': quotes}"}}
    bad = tmp_path / "bad.parquet"
    pq.write_table(pa.Table.from_pylist(rows), bad)
    prepare = _prepare_module()
    code = prepare.main([str(bad), "--tokenizer", str(tokenizer_dir), "--out", str(tmp_path / "out.parquet")])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and "Traceback" not in err
    assert err.startswith(
        f"error: verl row 2 ({rows[2]['extra_info']['env_id']}): extra_info field 'unsolved_set'"
    )
    assert not (tmp_path / "out.parquet").exists()


# -- verl's own configuration --------------------------------------------------------------------------------
VERL_SPEC = importlib.util.find_spec("verl")
HYDRA_SPEC = importlib.util.find_spec("hydra")
NOT_INSTALLED = (
    "verl 0.9.1 is not installed (`make venv` installs it without its dependencies, with hydra-core): verl's "
    "own trainer configuration was not composed and its reward loader was not run"
)


@pytest.mark.skipif(VERL_SPEC is None or HYDRA_SPEC is None, reason=NOT_INSTALLED)
def test_verls_own_configuration_takes_the_launcher_and_loads_the_reward(exported, tokenizer_dir):
    """verl's installed `ppo_trainer` configuration composed by Hydra with every override the launcher passes
    (Hydra refuses a key the configuration lacks), then the reward loaded by verl's own loader
    (`verl.utils.import_utils.load_extern_object`, what `get_custom_reward_fn` calls) from the composed keys
    and called as verl calls it. verl is installed without its dependencies (it pins transformers < 5.11),
    so only modules that import nothing of verl's dependencies are run: the loader's module is read by path."""
    from hydra import compose, initialize_config_dir

    env = {
        "TRAIN_FILE": "train.parquet",
        "MODEL": str(tokenizer_dir),
        "OUT_DIR": str(exported["base"] / "run"),
    }
    keys = _dry_run(LAUNCHER, env, cwd=exported["base"])
    overrides = [f"{key}={keys[key]}" for key in keys.pop("__order__")]
    package = Path(VERL_SPEC.submodule_search_locations[0])
    with initialize_config_dir(config_dir=str(package / "trainer" / "config"), version_base=None):
        config = compose("ppo_trainer", overrides=overrides)
        with pytest.raises(Exception, match="custom_reward_fn"):  # Hydra refuses a key verl does not have
            compose("ppo_trainer", overrides=["reward.custom_reward_fn.path=x"])
    assert config.reward.reward_manager.name == "naive"
    assert config.algorithm.adv_estimator == "grpo"
    reward = config.reward.custom_reward_function
    assert Path(reward.path) == VERL_DIR / "reward.py"
    spec = importlib.util.spec_from_file_location("verl_import_utils", package / "utils" / "import_utils.py")
    import_utils = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(import_utils)
    compute_score = import_utils.load_extern_object(module_path=reward.path, object_name=reward.name)
    kwargs = dict(reward.get("reward_kwargs") or {})
    row = exported["rows"][0]
    golden, q = _golden_calls(row)
    arguments = dict(data_source=row["data_source"], ground_truth=row["reward_model"]["ground_truth"],
                     extra_info=row["extra_info"], **kwargs)  # fmt: skip
    assert compute_score(solution_str=golden, **arguments) == pytest.approx(2 * q / (q + 1))
    assert compute_score(solution_str="<tool_call>\n{not json\n</tool_call>", **arguments) == -0.3
