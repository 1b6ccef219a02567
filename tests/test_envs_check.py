"""`envs check`: golden calls in the real sandbox, verified by the real reward module."""

import contextlib
import io
import json

import pytest
from conftest import FTRL_TEST_SET as FTRL_TEST

from toolrl_analysis import cli
from toolrl_analysis.envs.check import check_records, summarize
from toolrl_analysis.envs.pipeline import EnvBuildConfig, build_envsets, write_envset
from toolrl_analysis.envs.sandbox import Sandbox
from toolrl_analysis.envs.schema import SCENARIOS, read_envs, write_envs


@pytest.fixture(scope="module")
def envset(tmp_path_factory):
    out = tmp_path_factory.mktemp("checked")
    config = EnvBuildConfig(train_size=12, test_per_scenario=3, parameter_type_generalisation=0.5)
    write_envset(build_envsets(config), out)
    return out


@pytest.fixture(scope="module")
def sandbox():
    with Sandbox(workers=2) as box:
        yield box


def run_json(argv):
    buffer = io.StringIO()
    with contextlib.redirect_stdout(buffer):
        code = cli.main([*argv, "--json"])
    return code, json.loads(buffer.getvalue())


def test_oracle_solves_every_generated_environment(envset, sandbox):
    records = read_envs(envset / "test.jsonl") + read_envs(envset / "train.jsonl")
    checks = check_records(records, sandbox)
    assert all(c.status == "ok" for c in checks), [c.problems for c in checks if c.status != "ok"]
    summary = summarize(checks)
    assert summary["ok"] and not summary["failures"]
    for scenario in SCENARIOS:
        row = summary["scenarios"][scenario]
        assert row["solve_p"] == row["solve_r"] == row["solve_f1"] == 1.0
    assert summary["scenarios"]["overall"]["checked"] == len(records)


def test_cli_check_reports_per_scenario_f1(envset):
    code, document = run_json(["envs", "check", str(envset / "test.jsonl")])
    assert code == 0 and document["ok"]
    assert {s: document["scenarios"][s]["solve_f1"] for s in SCENARIOS} == {s: 1.0 for s in SCENARIOS}


def test_a_broken_tool_is_listed_by_env_id_and_fails_the_command(envset, tmp_path, capsys):
    records = read_envs(envset / "test.jsonl")
    broken = records[0]
    name = broken.meta["subquestions"][0]["tool"]
    answer = broken.meta["subquestions"][0]["answer"]
    broken.codes[name] = broken.codes[name].replace(repr(answer), repr("Somewhere Else"))
    write_envs(records, tmp_path / "broken.jsonl")
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["envs", "check", str(tmp_path / "broken.jsonl")])
    assert exit_info.value.code == 1
    out = capsys.readouterr().out
    assert "FAILED" in out and broken.env_id in out


def test_imported_ftrl_records_are_reported_as_having_no_golden_calls(tmp_path):
    lines = FTRL_TEST.read_text(encoding="utf-8").splitlines()[::25]
    (tmp_path / "ftrl.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
    code, document = run_json(["envs", "check", str(tmp_path / "ftrl.jsonl")])
    assert code == 0 and document["ok"]
    overall = document["scenarios"]["overall"]
    assert (
        overall["no_golden_calls"] == len(lines) and overall["checked"] == 0 and overall["solve_f1"] is None
    )


def test_wrong_calls_run_cleanly_in_the_sandbox(envset, sandbox):
    """Tool code never raises: every wrong call comes back as a normal tool message."""
    calls = []
    for record in read_envs(envset / "test.jsonl"):
        for name, code in record.codes.items():
            subject = name.split("_")[0]
            for arguments in (
                {},
                {"x": 1},
                {subject: None},
                {subject: ["a", 3]},
                {subject: "the nobody", "field": 1},
            ):
                calls.append((code, name, arguments))
    results = sandbox.call_many(calls)
    assert all(r.ok and r.content for r in results), [r for r in results if not r.ok][:3]


def test_verl_compute_score_scores_one_turn_with_sandbox_and_reward(envset):
    from toolrl_analysis.envs.ftrl_io import compute_score, score_breakdown, verl_rows
    from toolrl_analysis.envs.toolcalls import ToolCall, format_tool_calls

    record = next(r for r in read_envs(envset / "test.jsonl") if r.scenario == "single_hop")
    row = verl_rows([record])[0]
    sq = record.meta["subquestions"][0]
    text = format_tool_calls([ToolCall(name=sq["tool"], arguments=sq["arguments"])])
    good = score_breakdown(row["data_source"], text, row["reward_model"]["ground_truth"], row["extra_info"])
    assert good["n_solved"] == 1 and good["score"] == pytest.approx(1.0)
    assert compute_score(row["data_source"], "", record.answer, row["extra_info"]) == pytest.approx(-0.5)
