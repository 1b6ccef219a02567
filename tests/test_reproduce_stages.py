"""When a `reproduce` stage runs, resumes or is skipped, and why; the ETA across stages; bad settings."""

from __future__ import annotations

import json

import pytest

from toolrl_analysis.cli import main
from toolrl_analysis.errors import ConfigError
from toolrl_analysis.reproduce.progress import ChainProgress
from toolrl_analysis.reproduce.settings import load_settings, split_overrides
from toolrl_analysis.reproduce.stages import DONE, Stage, decide, prepare


def make_stage(tmp_path, config=None, resumable=False, source_text="input v1"):
    source = tmp_path / "input.txt"
    if not source.exists():
        source.write_text(source_text)

    def action(ctx):
        (tmp_path / "stage" / "out.txt").write_text("made")

    return Stage(
        "demo", tmp_path / "stage", ("out.txt",), {"input.txt": source}, config or {"lr": 0.1, "steps": 3},
        action, resumable=resumable,
    )  # fmt: skip


def finish(stage):
    hashes = stage.input_hashes()
    decision = decide(stage, hashes)
    prepare(stage, decision, hashes)
    stage.action(None)
    stage.write_record(DONE, hashes, 1.0)


def test_a_stage_runs_once_and_is_then_up_to_date(tmp_path):
    stage = make_stage(tmp_path)
    assert decide(stage, stage.input_hashes()).reason == "not run yet"
    finish(stage)
    decision = decide(stage, stage.input_hashes())
    assert (decision.run, decision.reason) == (False, "up to date")
    assert decide(stage, stage.input_hashes(), force=True).reason == "--force"


def test_a_changed_key_reruns_and_names_the_key_with_both_values(tmp_path):
    finish(make_stage(tmp_path))
    changed = make_stage(tmp_path, config={"lr": 0.2, "steps": 3})
    decision = decide(changed, changed.input_hashes())
    assert decision.run and not decision.resume
    assert decision.reason == "configuration changed: lr 0.1 -> 0.2"


def test_changed_input_bytes_rerun_and_the_same_bytes_do_not(tmp_path):
    stage = make_stage(tmp_path)
    finish(stage)
    (tmp_path / "input.txt").write_text("input v2")
    assert decide(stage, stage.input_hashes()).reason == "inputs changed: input.txt"
    (tmp_path / "input.txt").write_text("input v1")  # rewritten, same bytes: still up to date
    assert not decide(stage, stage.input_hashes()).run


def test_missing_outputs_and_outputs_without_a_record_rerun(tmp_path):
    stage = make_stage(tmp_path)
    finish(stage)
    (tmp_path / "stage" / "out.txt").unlink()
    assert decide(stage, stage.input_hashes()).reason == "outputs missing: out.txt"
    stage.action(None)
    stage.record_path.unlink()
    assert decide(stage, stage.input_hashes()).reason == "outputs exist without a record of their inputs"


def test_an_interrupted_stage_resumes_only_if_it_can_and_nothing_changed(tmp_path):
    stage = make_stage(tmp_path, resumable=True)
    hashes = stage.input_hashes()
    prepare(stage, decide(stage, hashes), hashes)  # started, never finished
    (stage.directory / "checkpoint").write_text("partial")
    decision = decide(stage, stage.input_hashes())
    assert (decision.run, decision.resume) == (True, True)
    prepare(stage, decision, hashes)  # resuming keeps the partial work
    assert (stage.directory / "checkpoint").exists()
    fresh = make_stage(tmp_path, resumable=False)
    assert decide(fresh, hashes).reason == "did not finish; starting it again"
    changed = make_stage(tmp_path, config={"lr": 0.3, "steps": 3}, resumable=True)
    decision = decide(changed, hashes)
    assert decision.run and not decision.resume
    prepare(changed, decision, hashes)  # a fresh run clears the stale partial work
    assert not (stage.directory / "checkpoint").exists()
    assert json.loads(stage.record_path.read_text())["status"] == "running"


def test_the_eta_uses_expected_times_then_the_measured_speed_and_the_stage_fraction(tmp_path):
    lines = []
    expected = {"a": 100.0, "b": 200.0, "c": 300.0}
    progress = ChainProgress(expected, {"a", "b", "c"}, tmp_path / "log.txt", echo=lines.append)
    progress.begin("a", "run", "not run yet")
    assert progress.eta() == pytest.approx(600.0, abs=1.0)
    progress.end("a", 200.0)  # twice as slow as expected: the rest is stretched
    assert progress.speed() == pytest.approx(2.0)
    progress.begin("b", "skip", "up to date")
    progress.end("b", None)  # a skipped stage costs nothing
    progress.begin("c", "run", "inputs changed: x")
    assert progress.eta() == pytest.approx(600.0, abs=1.0)
    progress.current_started -= 50.0  # 50 s in, a quarter done: its own pace says 150 s more
    progress.fraction(0.25)
    assert progress.eta() == pytest.approx(150.0, abs=1.0)
    assert progress.snapshot().done_fraction == pytest.approx((100 + 0.25 * 300) / 400)
    logged = (tmp_path / "log.txt").read_text().splitlines()
    assert len(logged) == len(lines) and "[3/3] c: run (inputs changed: x)" in logged[-2]
    assert all("ETA" in line for line in logged)


def test_stage_overrides_are_checked_and_reach_the_stage():
    assert split_overrides(["grpo.lr=0.1", "probe.seeds=3"])["grpo"] == ["lr=0.1"]
    with pytest.raises(ConfigError, match="STAGE.KEY=VALUE"):
        split_overrides(["lr=0.1"])
    with pytest.raises(ConfigError, match="unknown stage 'train'"):
        split_overrides(["train.lr=0.1"])
    settings = load_settings(quick=True, overrides=["grpo.lr=0.25", "eval.limit=3"])
    assert settings.grpo.lr == 0.25 and settings.grpo.iterations == 2 and settings.eval.limit == 3
    with pytest.raises(ConfigError, match="'max_turns'"):
        load_settings(overrides=["eval.max_turns=0"])


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--set", "grpo.nonsense=1"], "unknown config key 'nonsense'"),
        (["--set", "lr=1"], "STAGE.KEY=VALUE"),
        (["--base", "no/such/base.pt"], "--base must be embedded, train or a policy file"),
    ],
)
def test_bad_input_is_one_line_and_exit_2(tmp_path, capsys, extra, message):
    assert main(["reproduce", "--out", str(tmp_path / "run"), "--quick", *extra]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1
