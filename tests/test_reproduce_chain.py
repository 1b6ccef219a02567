"""`reproduce` end to end, at tiny sizes, from a small random base: every stage runs, the report carries its
verdicts and rules, the figures are redrawn byte for byte from the saved tables, an up-to-date run skips every
stage, a changed key of the GRPO recipe reruns the GRPO stages and everything after them (nothing before),
and a GRPO stage interrupted part-way resumes from its checkpoint. One scenario, so the chain runs about twice."""

from __future__ import annotations

import contextlib
import json
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
from conftest import TINY, tiny_chain_base

from toolrl_analysis.report import CLAIMS, RULES, judge_all, write_figures
from toolrl_analysis.reproduce import reproduce
from toolrl_analysis.training.grpo import GRPOConfig

REPO = Path(__file__).resolve().parents[1]
# On top of --quick: a 2-block model of width 32 and a handful of environments keep the chain near a minute.
STAGES = [
    "envs", "base", "evaluate base", "pass@k base", "train grpo", "train grpo seed 1", "train reinforce++",
    "evaluate grpo", "evaluate grpo seed 1", "evaluate reinforce++", "pass@k grpo", "compare grpo",
    "compare reinforce++", "overlap", "ablate", "probe", "judge", "patch",
]  # fmt: skip


@pytest.fixture(scope="module")
def base_policy(tmp_path_factory):
    return tiny_chain_base(tmp_path_factory.mktemp("chain-base"))


def run_chain(run, base_policy, lines, extra=()):
    return reproduce(run, quick=True, base=str(base_policy), overrides=[*TINY, *extra], log=lines.append)


def statuses(summary):
    return {name: info["status"] for name, info in summary["timings"].items()}


def test_the_chain_reports_redraws_skips_and_resumes_after_a_changed_grpo_key(tmp_path, base_policy):
    run, lines = tmp_path / "run", []
    summary = run_chain(run, base_policy, lines)
    assert statuses(summary) == dict.fromkeys(STAGES, "ran")

    report = (run / "report.md").read_text()
    assert report.splitlines()[2].startswith("> **Smoke run (`--quick`).**")  # said at the top
    for text in [*CLAIMS.values(), *RULES.values()]:
        assert text in report
    verdicts = {v.key: v.verdict for v in judge_all(run)[0]}
    # A random policy solves nothing before or after RL: the rules must say there is no gain, that there is
    # then nothing to attribute, no better reading of the context, and no gain whose cost general ability is.
    assert verdicts["tool_use"] == "not reproduced"
    assert verdicts["lower_mlp"] == "inconclusive"
    assert verdicts["context"] in ("not reproduced", "inconclusive")
    assert verdicts["general"] in ("not reproduced", "inconclusive")
    assert (run / "judge" / "divergence" / "by_role.csv").is_file() and (
        run / "figures" / "divergence.png"
    ).is_file()
    log = (run / "reproduce.log").read_text()
    assert "[5/19] train grpo: run (not run yet)" in log and "[19/19] report" in log and "ETA" in log
    # Held-out worlds and the training worlds' own split, a second training seed, and pass@k, in the report
    assert (run / "eval" / "grpo" / "same_world" / "episodes.csv").is_file()
    assert (run / "grpo-seed1" / "trained.pt").is_file()
    assert json.loads((run / "grpo-seed1" / "stage.json").read_text())["config"]["seed"] == 1
    for text in (
        "same world [95%]",
        "grpo-seed1",
        "mean ± sd over 2 seeds",
        "pass@k and coverage",
        "Kind of gain",
        "## 9. The update against the base's weights",
        "## 10. Do GRPO seeds change the same weights?",
        "## 11. Which blocks carry the change at the decision tokens?",
    ):
        assert text in report
    # the analyses beyond the paper, each with its files and figure
    assert "principal_energy_share" in pd.read_csv(run / "compare" / "grpo" / "parameters.csv")
    assert json.loads((run / "overlap" / "overlap.json").read_text())["tolerance"] == "bf16"
    # a random policy writes no tool call: patching has nothing to explain, and the report says so
    assert (run / "patch" / "recovery.csv").is_file()
    assert "Not measured: nothing to patch: no conversation holds a tool call" in report

    # Every figure again, from the saved tables alone, as the README runs it: the same bytes, within 30 s.
    started = time.perf_counter()
    subprocess.run(
        [sys.executable, "figures/make_figures.py", "--run", str(run), "--out", str(tmp_path / "again")],
        cwd=REPO, check=True, capture_output=True,
    )  # fmt: skip
    assert time.perf_counter() - started < 30
    first = {p.name: p.read_bytes() for p in (run / "figures").glob("*.png")}
    assert {p.name: p.read_bytes() for p in (tmp_path / "again").glob("*.png")} == first
    assert {"solve_f1.png", "rl_curves.png", "heatmap_grpo.png", "bands_reinforce_pp.png", "gain_retained.png",
            "probe_curves_resid.png", "attention_mass.png", "attention_difference.png", "geometry_grpo.png",
            "overlap.png"} <= set(first)  # fmt: skip

    # Up to date: nothing runs again.
    assert set(statuses(run_chain(run, base_policy, lines)).values()) == {"skipped"}

    # One key of the GRPO recipe changes (`--set grpo.lr=...`), and the GRPO stage is interrupted part-way
    # (Ctrl-C): nothing before it reruns, and rerunning the same command resumes it from its checkpoint, then
    # runs everything after it.
    changed = ["grpo.lr=1.234e-4"]
    lines.clear()
    with interrupted_after_one_grpo_iteration(), pytest.raises(KeyboardInterrupt):
        run_chain(run, base_policy, lines, changed)
    old_lr = GRPOConfig().lr
    assert f"[5/19] train grpo: run (configuration changed: lr {old_lr!r} -> 0.0001234)" in "\n".join(lines)
    assert [line.split(":")[0] for line in lines if ": skip (up to date)" in line] == [
        "[1/19] envs", "[2/19] base", "[3/19] evaluate base", "[4/19] pass@k base",
    ]  # fmt: skip
    assert lines[-1] == "interrupted during train grpo; run the same command again to continue there"
    assert json.loads((run / "grpo" / "stage.json").read_text())["status"] == "running"

    lines.clear()
    after = statuses(run_chain(run, base_policy, lines, changed))
    assert after == {name: {"envs": "skipped", "base": "skipped", "evaluate base": "skipped",
                            "pass@k base": "skipped", "train grpo": "resumed"}.get(name, "ran")
                     for name in STAGES}  # fmt: skip
    assert "[5/19] train grpo: resume (did not finish; resuming from its last checkpoint)" in "\n".join(lines)
    assert "resumed from iteration 1" in "\n".join(lines)
    assert pd.read_csv(run / "grpo" / "metrics.csv")["iteration"].tolist() == [1, 2]
    assert any(line.startswith("[8/19] evaluate grpo: run (inputs changed: policy)") for line in lines)
    assert json.loads((run / "grpo" / "stage.json").read_text())["config"]["lr"] == 1.234e-4


@contextlib.contextmanager
def interrupted_after_one_grpo_iteration():
    from toolrl_analysis.training.grpo import GRPOTrainer

    update = GRPOTrainer.update

    def update_then_ctrl_c(self, samples):
        stats = update(self, samples)
        self.stop_requested = True  # what the trainer's SIGINT handler does: finish the iteration, save, stop
        return stats

    GRPOTrainer.update = update_then_ctrl_c
    try:
        yield
    finally:
        GRPOTrainer.update = update


def test_figures_need_only_the_saved_tables(tmp_path):
    """An empty run directory draws nothing and reports that nothing was run, without touching a model."""
    run = tmp_path / "empty"
    run.mkdir()
    assert write_figures(run) == []
    verdicts = {v.key: v.verdict for v in judge_all(run)[0]}
    assert set(verdicts.values()) == {"inconclusive"}
