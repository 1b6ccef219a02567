"""`sample-states`: FTRL's per-step states written as verl parquet, read back through the verl reward."""

import json

import pandas as pd
import pytest
from conftest import tiny_random_qwen2

from toolrl_analysis.cli import main
from toolrl_analysis.envs.ftrl_io import compute_score, export_verl
from toolrl_analysis.envs.pipeline import EnvBuildConfig, build_envsets, write_envset
from toolrl_analysis.envs.sandbox import Sandbox
from toolrl_analysis.models.checkpoint import save_policy
from toolrl_analysis.models.tokenizer import build_policy_tokenizer
from toolrl_analysis.rollout import ScriptedPolicy, run_episodes
from toolrl_analysis.training.state_sampler import state_records
from toolrl_analysis.training.step_samples import oracle_scripts


@pytest.fixture(scope="module")
def setting(tmp_path_factory):
    root = tmp_path_factory.mktemp("states")
    build = build_envsets(EnvBuildConfig(seed=4, train_size=12, test_per_scenario=1))
    write_envset(build, root / "envs")
    tokenizer = build_policy_tokenizer(build.train, vocab_size=600)
    records = [r for r in build.train if r.meta.get("golden_turns")]
    multi = [r for r in records if len(r.meta["golden_turns"]) >= 2][:3]
    return root, tokenizer, multi


def test_every_state_of_an_episode_scores_in_verl_as_it_did_in_the_rollout(setting, tmp_path):
    _, tokenizer, records = setting
    scripts = oracle_scripts(records)
    with Sandbox(workers=1, timeout=10.0) as sandbox:
        # each record played twice with the same script: the second pass reaches only states seen already
        episodes = run_episodes(ScriptedPolicy(tokenizer, scripts * 2), records * 2, sandbox, max_turns=6)
    states = state_records(episodes, sample_of=lambda index: index // len(records))
    turns = [turn for episode in episodes[: len(records)] for turn in episode.turns]
    assert len(turns) >= 2 * len(records) and len(states) == len(turns)  # one per turn played, not twice
    frame = pd.read_parquet(export_verl(states, tmp_path / "states.parquet"))
    assert len(frame) == len(states)
    for row, turn in zip(frame.itertuples(), turns, strict=True):
        info = row.extra_info
        assert json.loads(info["unsolved_set"]) == turn.unsolved_set_before
        assert info["solve_rate"] == pytest.approx(turn.solve_rate_before)
        assert [m["role"] for m in row.prompt] == [m["role"] for m in turn.messages]
        # the turn the rollout played, scored from the parquet row alone, gets the rollout's own reward
        score = compute_score(row.data_source, turn.text, row.reward_model["ground_truth"], info)
        assert score == pytest.approx(turn.reward.score)
    later = [row for row in frame.itertuples() if json.loads(row.extra_info["meta"])["state"]["turn"] >= 1]
    assert later and all("<tool_call>" in row.prompt[1]["content"] for row in later)  # calls kept as text
    solve_rates = [s.solve_rate for s in states if s.env_id == records[0].env_id]
    assert solve_rates == sorted(solve_rates) and solve_rates[-1] > solve_rates[0]


def test_the_command_writes_the_states_of_a_sampled_policy(setting, tmp_path, capsys):
    root, tokenizer, _ = setting
    policy = save_policy(tiny_random_qwen2(tokenizer, seed=2, max_positions=4096), tokenizer, root / "p.pt")
    out = tmp_path / "next.parquet"
    arguments = ["sample-states", str(policy), "--envs", str(root / "envs"), "--out", str(out), "--limit", "4",
                 "--samples", "2", "--max-turns", "2", "--max-new-tokens", "12", "--json"]  # fmt: skip
    assert main(arguments) == 0
    summary = json.loads(capsys.readouterr().out)
    frame = pd.read_parquet(out)
    assert summary["states"] == len(frame) and summary["episodes"] == 8 and summary["environments"] == 4
    openings = frame[
        [json.loads(m)["state"]["turn"] == 0 for m in frame["extra_info"].map(lambda i: i["meta"])]
    ]
    assert len(openings) == 4  # the opening prompt, shared by both samples of an environment, once each
    assert set(frame["extra_info"].map(lambda i: i["split"])) == {"train"}
    assert main([*arguments[:-1], "--samples", "0"]) == 2
    assert "--samples must be at least 1" in capsys.readouterr().err
