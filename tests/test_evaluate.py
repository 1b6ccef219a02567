"""Evaluation end to end on a tiny random Qwen2 HF directory, FTRL's long test prompts, and CLI bad input."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest
from conftest import FTRL_TEST_SET as FTRL_TEST
from conftest import tiny_random_qwen2

from toolrl_analysis.cli import main
from toolrl_analysis.envs.schema import EnvRecord, read_envs, write_envs
from toolrl_analysis.evaluate import (
    OVERALL,
    SOLVE_METRICS,
    EvaluationReport,
    evaluate,
    evaluate_checkpoint,
    heldout_lm_loss,
    summarize_tool_use,
)

LOOKUP_CODE = """
def population_of(city):
    return {"Lyon": "522,250"}.get(city, "unknown city")
"""


def _records(n: int = 4) -> list[EnvRecord]:
    tool = {
        "type": "function",
        "function": {
            "name": "population_of",
            "description": "Population of a city.",
            "parameters": {
                "type": "object",
                "properties": {"city": {"type": "string"}},
                "required": ["city"],
            },
        },
    }
    scenarios = ["single_hop", "multi_hop", "parallel_single_hop", "parallel_multi_hop"]
    return [
        EnvRecord(
            messages=[{"role": "user", "content": f"How many people live in Lyon? ({i})"}],
            tools=[tool],
            codes={"population_of": LOOKUP_CODE},
            unsolved_set={"population_of": ["522250"]},
            answer="522250",
            data_source=f"self/{scenarios[i % 4]}",
            meta={
                "env_id": f"lyon-{i}",
                "subquestions": [{"id": 0, "tool": "population_of", "answer": "522250", "hop": 1}],
            },
        )
        for i in range(n)
    ]


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory) -> Path:
    """A tiny random Qwen2 saved as a Hugging Face directory with our tokenizer."""

    from toolrl_analysis.models.chat_template import render_chat
    from toolrl_analysis.models.general import general_text
    from toolrl_analysis.models.tokenizer import train_tokenizer

    corpus = [render_chat(r.messages, tools=r.tools) for r in _records()] + general_text(
        "train", max_chars=20_000
    )
    tokenizer = train_tokenizer(corpus, vocab_size=700)
    directory = tmp_path_factory.mktemp("tiny-qwen2")
    model = tiny_random_qwen2(tokenizer, max_positions=512)
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


@pytest.fixture(scope="module")
def envs_file(tmp_path_factory) -> Path:
    return write_envs(_records(), tmp_path_factory.mktemp("envs") / "test.jsonl")


def test_evaluate_a_random_hf_directory_end_to_end(hf_dir, envs_file, tmp_path):
    report = evaluate_checkpoint(hf_dir, envs_file, max_new_tokens=24, n_general_tasks=6)
    assert set(report.tool_use.columns) == {"scenario", "metric", "value", "episodes"}
    scenarios = ["single_hop", "parallel_single_hop", "multi_hop", "parallel_multi_hop", OVERALL]
    assert list(report.tool_use["scenario"].unique()) == scenarios
    expected_metrics = {*SOLVE_METRICS, "calls_per_episode", "turns_per_episode", "format_error_rate",
                        "prompt_too_long_rate"}  # fmt: skip
    assert set(report.tool_use["metric"]) == expected_metrics
    assert report.tool_use["value"].between(0, 20).all()
    assert len(report.episodes) == 4 and report.episodes["stop_reason"].notna().all()
    assert set(report.hops["scenario"]) <= {"multi_hop", "parallel_multi_hop", OVERALL}
    general = report.general.set_index(["suite", "metric"])["value"]
    assert general["heldout_text", "loss"] > 0 and general["heldout_text", "perplexity"] > 1
    assert 0 <= general["tasks", "exact_match"] <= general["tasks", "contains_answer"] <= 1
    assert general["tasks", "tasks"] == 6

    written = report.save(tmp_path / "eval")
    assert {p.name for p in written} == {
        "tool_use.csv",
        "hops.csv",
        "episodes.csv",
        "general.csv",
        "evaluation.json",
    }
    pd.testing.assert_frame_equal(
        pd.read_csv(tmp_path / "eval" / "tool_use.csv"), report.tool_use, check_dtype=False
    )
    document = json.loads((tmp_path / "eval" / "evaluation.json").read_text())
    assert document["info"]["model"] == str(hf_dir) and len(document["episodes"]) == 4


def test_ftrl_test_prompts_longer_than_the_model_stop_instead_of_crashing(hf_dir):
    from toolrl_analysis.models.checkpoint import load_policy

    model, tokenizer = load_policy(hf_dir)  # 512 positions; FTRL prompts are far longer
    records = read_envs(FTRL_TEST)[::50]  # one per scenario
    report = evaluate(model, tokenizer, records, general=False, max_new_tokens=16)
    assert (report.episodes["stop_reason"] == "prompt_too_long").all()
    assert report.metric("solve_r") == 0.0 and report.metric("prompt_too_long_rate") == 1.0
    assert report.hops.empty  # FTRL records carry no meta


def test_overall_solve_scores_average_the_scenarios_not_the_episodes():
    table = pd.DataFrame(
        {
            "scenario": ["single_hop", "single_hop", "single_hop", "multi_hop"],
            "turns": [1, 2, 1, 3],
            "calls": [0, 1, 1, 2],
            "format_errors": [1, 0, 0, 0],
            "stop_reason": ["no_call"] * 4,
            "solve_p": [1.0, 1.0, 0.0, 0.5],
            "solve_r": [0.0, 1.0, 0.0, 0.5],
            "solve_f1": [0.0, 1.0, 0.0, 0.5],
        }
    )
    value = summarize_tool_use(table).set_index(["scenario", "metric"])["value"]
    assert value["single_hop", "solve_f1"] == pytest.approx(1 / 3)
    assert value[OVERALL, "solve_f1"] == pytest.approx((1 / 3 + 0.5) / 2)
    assert value[OVERALL, "calls_per_episode"] == pytest.approx(1.0)
    assert value[OVERALL, "format_error_rate"] == pytest.approx(1 / 7)


def test_heldout_loss_of_a_uniform_model_is_log_vocab(hf_dir):
    import math

    import torch

    from toolrl_analysis.models.checkpoint import load_policy

    model, tokenizer = load_policy(hf_dir)
    with torch.no_grad():
        model.lm_head.weight.zero_()  # every logit 0: the uniform distribution
    result = heldout_lm_loss(model, tokenizer, ["some held-out text", "more text to score here"])
    assert result["loss"] == pytest.approx(math.log(model.config.vocab_size), rel=1e-4)


# -- command line ---------------------------------------------------------------------------------------------------
def test_cli_evaluate_prints_one_json_document(hf_dir, envs_file, capsys):
    code = main(["evaluate", str(hf_dir), "--envs", str(envs_file), "--limit", "2", "--no-general",
                 "--max-new-tokens", "16", "--json"])  # fmt: skip
    assert code == 0
    document = json.loads(capsys.readouterr().out)
    assert document["general"] is None and len(document["episodes"]) == 2
    assert {row["metric"] for row in document["tool_use"]} >= set(SOLVE_METRICS)


def test_limit_is_balanced_over_scenarios_as_in_every_command(hf_dir, tmp_path, capsys):
    # single-hop first, as in a test file: the first 4 records hold two scenarios, --limit 4 takes all four
    ordered = sorted(_records(8), key=lambda r: r.scenario != "single_hop")
    path = write_envs(ordered, tmp_path / "ordered.jsonl")
    code = main(["evaluate", str(hf_dir), "--envs", str(path), "--limit", "4", "--no-general", "--max-turns", "1",
                 "--max-new-tokens", "4", "--json"])  # fmt: skip
    assert code == 0
    episodes = json.loads(capsys.readouterr().out)["episodes"]
    assert sorted(e["scenario"] for e in episodes) == sorted(set(r.scenario for r in ordered))


def test_cli_evaluate_renders_tables_and_writes_files(hf_dir, envs_file, tmp_path, capsys):
    code = main(["evaluate", str(hf_dir), "--envs", str(envs_file), "--no-general", "--max-new-tokens", "8",
                 "--out", str(tmp_path / "out")])  # fmt: skip
    assert code == 0
    captured = capsys.readouterr()
    out = captured.out
    assert "Solve-P" in out and "parallel_multi_hop" in out and "overall" in out
    assert (tmp_path / "out" / "tool_use.csv").is_file() and not (tmp_path / "out" / "general.csv").exists()
    # stderr is not a terminal here (a log, a pipe): progress comes as plain lines, one per turn
    progress = [line for line in captured.err.splitlines() if line.startswith("evaluate: turn ")]
    assert progress and progress[0].startswith("evaluate: turn 1/20, ") and "episodes finished" in progress[0]


@pytest.mark.parametrize("kind", ["missing", "text file", "directory without config", "bad limit"])
def test_cli_evaluate_bad_input_exits_2_with_one_line(kind, envs_file, hf_dir, tmp_path, capsys):
    model = {
        "missing": tmp_path / "nope.pt",
        "text file": tmp_path / "notes.pt",
        "directory without config": tmp_path,
        "bad limit": hf_dir,
    }[kind]
    (tmp_path / "notes.pt").write_text("this is not a checkpoint\n")
    extra = ["--limit", "0"] if kind == "bad limit" else []
    assert main(["evaluate", str(model), "--envs", str(envs_file), "--no-general", *extra]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    lines = captured.err.strip().splitlines()
    assert (
        len(lines) == 1 and lines[0].startswith("toolrl-analyze: error:") and "Traceback" not in captured.err
    )


def test_cli_evaluate_missing_envs_file_exits_2(hf_dir, tmp_path, capsys):
    assert main(["evaluate", str(hf_dir), "--envs", str(tmp_path / "none.jsonl")]) == 2
    assert len(capsys.readouterr().err.strip().splitlines()) == 1


def test_report_metric_lookup():
    report = EvaluationReport(
        episodes=pd.DataFrame(),
        tool_use=pd.DataFrame([{"scenario": OVERALL, "metric": "solve_f1", "value": 0.25, "episodes": 3}]),
        hops=pd.DataFrame(),
        general=None,
    )
    assert report.metric("solve_f1") == 0.25
    with pytest.raises(KeyError):
        report.metric("solve_f1", "single_hop")


def test_an_environment_set_is_evaluated_on_held_out_worlds_and_on_its_training_worlds(tmp_path, capsys):
    from toolrl_analysis.envs.pipeline import EnvBuildConfig, build_envsets, write_envset

    config = EnvBuildConfig(seed=2, train_size=4, test_per_scenario=1, validation_per_scenario=0,
                            same_world_test_per_scenario=1, train_worlds=2)  # fmt: skip
    write_envset(build_envsets(config), tmp_path / "set")
    argv = ["evaluate", "embedded", "--envs", str(tmp_path / "set"), "--no-general", "--max-turns", "2",
            "--max-new-tokens", "48", "--out", str(tmp_path / "out"), "--json"]  # fmt: skip
    assert main(argv) == 0
    document = json.loads(capsys.readouterr().out)
    assert document["info"]["envs"].endswith("test.jsonl")
    assert document["same_world"]["info"]["envs"].endswith("test_same_world.jsonl")
    test_ids = {e["env_id"] for e in document["episodes"]}
    same_ids = {e["env_id"] for e in document["same_world"]["episodes"]}
    assert len(test_ids) == len(same_ids) == 4 and not test_ids & same_ids
    assert (tmp_path / "out" / "same_world" / "tool_use.csv").is_file()
    assert document["same_world"]["general"] is None and document["same_world"]["roles"] is None
