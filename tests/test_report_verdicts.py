"""The verdict rules, each outcome reached from numbers whose intervals are known, and the report's tables."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from toolrl_analysis.analysis.ablate.bootstrap import Estimate
from toolrl_analysis.analysis.judge.rules import tool_use_rule
from toolrl_analysis.report.tables import tool_use_table
from toolrl_analysis.report.verdicts import INCONCLUSIVE, NOT_REPRODUCED, REPRODUCED, judge_lower_mlp, judged


def spread(value: float, low: float, high: float) -> Estimate:
    """An estimate whose 95% percentile interval is (about) [low, high]."""
    replicates = np.linspace(low, high, 9501)
    pad = (high - low) * 0.0263  # 2.5% of the mass beyond each end
    replicates = np.concatenate([replicates, np.full(250, low - pad), np.full(250, high + pad)])
    return Estimate(value, replicates)


@pytest.mark.parametrize(
    "low, high, verdict",
    [
        (0.05, 0.30, REPRODUCED),  # the gain is positive at 95%
        (-0.03, 0.015, NOT_REPRODUCED),  # a gain of 2 points is excluded
        (-0.20, -0.05, NOT_REPRODUCED),  # RL made it worse
        (-0.02, 0.25, INCONCLUSIVE),  # could be nothing, could be large
        (0.0, 0.0, NOT_REPRODUCED),  # nothing moved at all
    ],
)
def test_tool_use_rule(low, high, verdict):
    assert tool_use_rule(*spread((low + high) / 2, low, high).interval) == verdict


def test_the_report_decides_general_ability_again_with_its_tool_use_verdict(tmp_path):
    """judge.json's general numbers, read by the report: kept ability is reproduced only beside a gain."""
    import json

    kept = {"value": 1.0, "low": 0.97, "high": 1.03}
    rises = {"general_tasks": {"value": 0.0, "low": -0.01, "high": 0.01}}
    numbers = {"retained": kept, "rises": rises, "measured": "R = 1.000"}
    document = {"verdicts": {"general": {"verdict": REPRODUCED, "evidence": "x", "numbers": numbers}}}
    (tmp_path / "judge").mkdir()
    (tmp_path / "judge" / "judge.json").write_text(json.dumps(document))
    assert judged(tmp_path, "general", REPRODUCED).verdict == REPRODUCED
    found = judged(tmp_path, "general", NOT_REPRODUCED)
    assert found.verdict == INCONCLUSIVE and found.evidence.startswith("R = 1.000")
    assert judged(tmp_path, "context", REPRODUCED).verdict == INCONCLUSIVE  # not measured


@pytest.mark.parametrize(("where", "verdict"), [("mlp", REPRODUCED), ("attn", NOT_REPRODUCED)])
def test_the_lower_mlp_verdict_is_the_ablation_rule_on_the_saved_files(tmp_path, where, verdict):
    """The report recomputes `ablate`'s verdict from ablation.json and likelihood.csv (a planted grid)."""
    import json
    from dataclasses import asdict

    from test_ablate_verdict import entries, planted_grid

    values = planted_grid(where, 1.0)
    rows = [
        {"variant": name, "source": "trained", "environment": i, "role": "format", "nll_sum": -float(v),
         "top1_sum": 0.0, "tokens": 10}
        for name, per_env in values.items() for i, v in enumerate(per_env)
    ]  # fmt: skip
    (tmp_path / "ablate").mkdir()
    pd.DataFrame(rows).to_csv(tmp_path / "ablate" / "likelihood.csv", index=False)
    summary = {"grid_entries": [asdict(e) for e in entries()], "model": {"blocks": 28},
               "analysis_environments": 120}  # fmt: skip
    (tmp_path / "ablate" / "ablation.json").write_text(json.dumps({"summary": summary}))
    found = judge_lower_mlp(tmp_path)
    assert found.verdict == verdict
    assert "blocks 0-8" in found.evidence and "20 matched controls" in found.evidence
    assert "E = " in found.evidence and found.rule.startswith("`ablate --grid paper`'s rule")
    assert judge_lower_mlp(tmp_path / "missing").verdict == INCONCLUSIVE


def test_tool_use_table_shows_each_policy_with_its_interval():
    estimates = {
        "base": {("overall", "solve_f1"): spread(0.25, 0.2, 0.3)},
        "grpo": {("overall", "solve_f1"): spread(0.45, 0.4, 0.5)},
    }
    table = tool_use_table(estimates, "solve_f1")
    assert table.to_dict(orient="records") == [
        {"scenario": "overall", "base": "0.250 [0.200, 0.300]", "GRPO": "0.450 [0.400, 0.500]"}
    ]
    assert isinstance(table, pd.DataFrame)
