"""`judge` and `divergence` on planted pairs whose verdicts are known: a pure sharpening (the base's logits
doubled), a base whose upper MLPs are damaged, the base against itself, and a model that adds a logit bias
at the tokens of one role only (the KL then has a closed form)."""

from __future__ import annotations

import json
import math

import numpy as np
import pandas as pd
import pytest
import torch

from toolrl_analysis.analysis.judge.rules import (
    INCONCLUSIVE,
    NOT_REPRODUCED,
    REPRODUCED,
    context_rule,
    general_rule,
)
from toolrl_analysis.cli import main

SMALL = {"limit": 4, "analysis_limit": 12, "tasks": 1024}


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    """The shipped embedded base, saved as base.pt; `sharp.pt`, the base with its final norm's weights
    doubled (every logit x 2: the same greedy choices, only more confident); `damaged.pt`, noise in the
    upper block's MLP; and a small environment set with test and analysis splits."""
    from toolrl_analysis.envs.pipeline import EnvBuildConfig, build_envsets, write_envset
    from toolrl_analysis.models.checkpoint import load_policy, save_policy

    root = tmp_path_factory.mktemp("judge")
    config = EnvBuildConfig(seed=3, train_size=8, test_per_scenario=1, validation_per_scenario=0,
                            same_world_test_per_scenario=0, analysis_worlds=1, analysis_per_scenario=3)  # fmt: skip
    write_envset(build_envsets(config), root / "envs")
    model, tokenizer = load_policy("embedded")
    save_policy(model, tokenizer, root / "base.pt")
    with torch.no_grad():
        model.model.norm.weight.mul_(2.0)
        save_policy(model, tokenizer, root / "sharp.pt")
        model.model.norm.weight.div_(2.0)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for parameter in model.model.layers[-1].mlp.parameters():
            parameter.add_(torch.randn(parameter.shape, generator=generator) * parameter.std() * 3.0)
    save_policy(model, tokenizer, root / "damaged.pt")
    return root


def _judge(pair, trained, claims, **extra):
    from toolrl_analysis.analysis.judge.run import judge
    from toolrl_analysis.episodes import EpisodeOptions

    options = EpisodeOptions(max_turns=3, max_new_tokens=64, batch_size=8)
    return judge(pair / "base.pt", pair / trained, pair / "envs", claims=claims, options=options,
                 **(SMALL | extra))  # fmt: skip


def test_pure_sharpening_is_not_context_understanding(pair):
    """Doubling the logits: the fitted factor is 2, the sharpened base is the trained model, and the context
    verdict cannot be `reproduced` (here the data exclude an improvement over the sharpened base)."""
    found = _judge(pair, "sharp.pt", ("context",)).verdicts["context"]
    assert found.numbers["scale"] == pytest.approx(2.0, rel=1e-3)
    over_sharpened = found.numbers["tests"]["nll"]["sharpened"]
    assert abs(over_sharpened["value"]) < 1e-3
    assert found.verdict == NOT_REPRODUCED


def test_sharpening_alone_widens_the_context_gap(pair):
    """What the old rule read as understanding: the gap grows under pure sharpening, on the same tokens."""
    from toolrl_analysis.analysis.judge.outputs import compare_tokens
    from toolrl_analysis.analysis.judge.run import context_claim, load_pair
    from toolrl_analysis.context_meter import oracle_meter_set
    from toolrl_analysis.envs.sandbox import Sandbox
    from toolrl_analysis.envs.schema import read_envs

    models, tokenizer = load_pair(pair / "base.pt", pair / "sharp.pt")
    with Sandbox(workers=1) as sandbox:
        meter, _ = oracle_meter_set(tokenizer, read_envs(pair / "envs" / "analysis.jsonl"), sandbox)
    _, roles = context_claim(models, meter)
    pooled = roles.set_index("role").loc["understanding"]
    assert pooled["gap_trained"] > pooled["gap_base"]  # sharper, so the swapped context costs more
    assert pooled["gap_sharp"] == pytest.approx(pooled["gap_trained"], rel=1e-3)
    assert pooled["top1_trained"] == pooled["top1_base"]
    compared = compare_tokens(*models, meter.real)
    assert (compared.tokens["argmax_base"] == compared.tokens["argmax_trained"]).all()


def test_damaged_general_ability_is_not_kept(pair):
    found = _judge(pair, "damaged.pt", ("general",)).verdicts["general"]
    assert found.verdict == NOT_REPRODUCED
    retained = found.numbers["retained"]
    assert found.numbers["lost"] > found.numbers["gained"]
    assert retained["high"] < 0.9 or any(r["low"] > 0.02 for r in found.numbers["rises"].values())


def test_the_base_against_itself_reproduces_nothing(pair, tmp_path):
    """Every claim, the lower MLPs' ablation included: nothing changed, so nothing is reproduced; the JSON
    has the promised shape, and the files are written."""
    code = main(["judge", str(pair / "base.pt"), str(pair / "base.pt"), "--envs", str(pair / "envs"),
                 "--limit", "4", "--analysis-limit", "4", "--tasks", "2048", "--controls", "2", "--max-turns", "2",
                 "--max-new-tokens", "48", "--out", str(tmp_path / "j"), "--json"])  # fmt: skip
    assert code == 0
    document = json.loads((tmp_path / "j" / "judge.json").read_text())
    verdicts = document["verdicts"]
    assert set(verdicts) == {"tool_use", "general", "context", "lower_mlp"}
    for claim, found in verdicts.items():
        assert found["verdict"] in (NOT_REPRODUCED, INCONCLUSIVE), (claim, found)
        assert found["evidence"] and found["rule"]
    assert verdicts["tool_use"]["verdict"] == NOT_REPRODUCED  # a gain of exactly 0 excludes 0.02
    assert "no gain whose cost" in verdicts["general"]["evidence"]
    assert verdicts["lower_mlp"]["verdict"] == INCONCLUSIVE  # no change to take a fraction of
    assert (tmp_path / "j" / "items.csv").is_file() and (
        tmp_path / "j" / "lower_mlp" / "ablation.json"
    ).is_file()


class RoleBias(torch.nn.Module):
    """The base, plus a fixed logit bias at the positions that predict tokens of one role (known per
    conversation by its ids): only there do the two models differ."""

    def __init__(self, base, bias, positions):
        super().__init__()
        self.base, self.bias, self.positions, self.config = base, bias, positions, base.config

    def forward(self, input_ids, attention_mask):
        logits = self.base(input_ids=input_ids, attention_mask=attention_mask).logits.clone()
        for row in range(len(input_ids)):
            ids = tuple(input_ids[row, : int(attention_mask[row].sum())].tolist())
            for p in self.positions.get(ids, ()):
                logits[row, p - 1] += self.bias
        return type("Out", (), {"logits": logits})()


def test_a_logit_bias_at_one_role_has_the_closed_form_kl(pair):
    from toolrl_analysis.analysis.judge.outputs import compare_tokens
    from toolrl_analysis.context_meter import oracle_meter_set
    from toolrl_analysis.envs.sandbox import Sandbox
    from toolrl_analysis.envs.schema import read_envs
    from toolrl_analysis.models.checkpoint import load_policy

    base, tokenizer = load_policy(pair / "base.pt")
    with Sandbox(workers=1) as sandbox:
        meter, _ = oracle_meter_set(tokenizer, read_envs(pair / "envs" / "analysis.jsonl"), sandbox)
    role = "arg_key"
    positions = {tuple(e.ids): [p for p, r in e.targets if r == role and p > 0] for e in meter.real}
    bias = torch.randn(base.config.vocab_size, generator=torch.Generator().manual_seed(1))
    compared = compare_tokens(base, RoleBias(base, bias, positions), meter.real).tokens
    other = compared[compared["role"] != role]
    assert (
        len(other)
        and other["kl_base_trained"].abs().max() < 1e-5
        and other["kl_trained_base"].abs().max() < 1e-5
    )
    mine = compared[compared["role"] == role]
    assert len(mine) > 5
    with torch.no_grad():
        for row in mine.head(8).itertuples():
            ids = torch.tensor([meter.real[row.example].ids])
            log_p = base(input_ids=ids).logits[0, row.position - 1].double().log_softmax(-1)
            b = bias.double()
            closed = float(torch.logsumexp(log_p + b, -1) - (log_p.exp() * b).sum())  # log E_p[e^b] - E_p[b]
            assert row.kl_base_trained == pytest.approx(closed, rel=1e-3, abs=1e-5)


@pytest.mark.parametrize(
    ("p_more", "p_equivalent", "verdict"),
    [
        ({"nll": (0.001, 0.001), "top1": (0.5, 0.5)}, {"nll": (0.9, 0.9), "top1": (0.9, 0.9)}, REPRODUCED),
        # beats the base but not the sharpened base: a gain of confidence only
        (
            {"nll": (0.001, 0.2), "top1": (0.5, 0.5)},
            {"nll": (0.9, 0.001), "top1": (0.001, 0.001)},
            NOT_REPRODUCED,
        ),
        ({"nll": (0.03, 0.03), "top1": (0.5, 0.5)}, {"nll": (0.5, 0.5), "top1": (0.5, 0.5)}, INCONCLUSIVE),
        # 0.03 < 0.05 but not < 0.025: the two metrics are a family of two
        (
            {"nll": (0.2, 0.2), "top1": (0.2, 0.2)},
            {"nll": (0.03, 0.03), "top1": (0.001, 0.001)},
            INCONCLUSIVE,
        ),
    ],
)
def test_context_rule(p_more, p_equivalent, verdict):
    tests = {
        metric: {name: {"p_more": p_more[metric][i], "p_equivalent": p_equivalent[metric][i], "mde": 0.01}
                 for i, name in enumerate(("base", "sharpened"))}
        for metric in ("nll", "top1")
    }  # fmt: skip
    assert context_rule(tests)[0] == verdict


def test_general_rule():
    kept, flat = (
        {"value": 1.0, "low": 0.95, "high": 1.05},
        {"tool_use": {"value": 0.0, "low": -0.01, "high": 0.01}},
    )
    assert general_rule(kept, flat)[0] == REPRODUCED
    assert general_rule(kept, flat, REPRODUCED)[0] == REPRODUCED
    assert general_rule(kept, flat, NOT_REPRODUCED)[0] == INCONCLUSIVE  # kept, but no gain to have cost it
    assert general_rule({"value": 0.5, "low": 0.3, "high": 0.7}, flat)[0] == NOT_REPRODUCED
    assert general_rule(kept, {"text": {"value": 0.05, "low": 0.03, "high": 0.07}})[0] == NOT_REPRODUCED
    assert general_rule({"value": 1.0, "low": 0.7, "high": 1.3}, flat)[0] == INCONCLUSIVE
    assert (
        general_rule({"value": math.nan, "low": math.nan, "high": math.nan, "reason": "none"}, flat)[0]
        == INCONCLUSIVE
    )


def test_exact_match_interval_keeps_its_width_when_nothing_flips():
    from toolrl_analysis.analysis.judge.retention import exact_match_kept

    solved = np.r_[np.ones(200), np.zeros(3896)]
    same = exact_match_kept(solved, solved)
    assert same["value"] == 1.0 and 0.95 < same["low"] < 1.0 < same["high"] < 1.05
    lost = solved.copy()
    lost[:60] = 0  # 60 of 200 lost: 0.70 kept
    found = exact_match_kept(solved, lost)
    assert found["value"] == pytest.approx(0.7) and found["low"] < 0.7 < found["high"] < 0.9
    assert found["lost"] == 60 and found["gained"] == 0
    assert math.isnan(exact_match_kept(np.zeros(10), np.ones(10))["low"])


def test_divergence_writes_its_tables(pair, tmp_path):
    out = tmp_path / "d"
    code = main(["divergence", str(pair / "base.pt"), str(pair / "damaged.pt"), "--envs", str(pair / "envs"),
                 "--limit", "4", "--max-turns", "2", "--max-new-tokens", "48", "--top", "5", "--out", str(out)])  # fmt: skip
    assert code == 0
    roles = pd.read_csv(out / "by_role.csv")
    deciles = pd.read_csv(out / "by_entropy.csv")
    assert set(roles["source"]) == {"base", "trained"} and (roles["kl_base_trained"] >= 0).all()
    assert deciles["decile"].tolist() == list(range(1, 11))
    assert deciles["kl_share"].sum() == pytest.approx(1.0)
    contexts = [json.loads(line) for line in (out / "top_contexts.jsonl").read_text().splitlines()]
    assert len(contexts) == 5 and contexts[0]["kl_base_trained"] >= contexts[-1]["kl_base_trained"]
    assert (out / "divergence.png").stat().st_size > 0


def test_bad_claims_and_mismatched_tokenizers_are_one_line(pair, capsys, tmp_path):
    assert (
        main(["judge", "embedded", "embedded", "--envs", str(pair / "envs"), "--claims", "tool_use,vibes"])
        == 2
    )
    error = capsys.readouterr().err.strip()
    assert error.count("\n") == 0 and "vibes" in error and "lower_mlp" in error
    from conftest import tiny_chain_base

    other = tiny_chain_base(tmp_path)  # a tokenizer trained on another build
    assert main(["judge", "embedded", str(other), "--envs", str(pair / "envs"), "--claims", "general"]) == 2
    error = capsys.readouterr().err.strip()
    assert error.count("\n") == 0 and "different tokenizers" in error
