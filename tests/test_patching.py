"""Cross-model activation patching on planted pairs: a trained model that is the base plus a constant added
to one block's MLP output (recovery is then exactly 1 or 0 by site and block), the base against itself (no
change: every recovery undefined), the three backends agreeing, and the command's files and refusals."""

from __future__ import annotations

import copy
import json
import math

import numpy as np
import pandas as pd
import pytest
import torch

from toolrl_analysis.analysis.patching.run import PatchConfig, patch_models
from toolrl_analysis.analysis.patching.summary import recovery_table
from toolrl_analysis.analysis.patching.texts import build_texts
from toolrl_analysis.analysis.probe.activations import BACKENDS
from toolrl_analysis.cli import main
from toolrl_analysis.errors import UserError

PLANTED = 1  # the block whose MLP output the trained model shifts (of 3)


@pytest.fixture(scope="module")
def setup():
    """(tokenizer, texts): oracle conversations of one environment per scenario, cut into PatchTexts."""
    from toolrl_analysis.analysis.probe.decision_points import oracle_conversations_for
    from toolrl_analysis.envs.pipeline import EnvBuildConfig, build_envsets
    from toolrl_analysis.envs.sandbox import Sandbox
    from toolrl_analysis.models.tokenizer import build_policy_tokenizer

    build = build_envsets(EnvBuildConfig(seed=5, train_size=16, test_per_scenario=1))
    tokenizer = build_policy_tokenizer(build.train, vocab_size=700)
    with Sandbox(workers=1) as sandbox:
        conversations = oracle_conversations_for(build.test, sandbox, seed=0, correction_prob=0.0)
    texts, dropped = build_texts(conversations, tokenizer, max_tokens=4096)
    assert len(texts) == 4 and dropped == {"too_long": 0, "no_tool_call": 0}
    return tokenizer, texts


@pytest.fixture(scope="module")
def pair(setup):
    """A random 3-block Qwen2 and its copy whose block-1 MLP adds a constant vector (a bias on down_proj)
    pointing at the tool-call tokens' output embeddings, so training raises their log-probs everywhere."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    tokenizer, texts = setup
    config = Qwen2Config(
        vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=3,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096, pad_token_id=0,
    )  # fmt: skip
    torch.manual_seed(0)
    base = Qwen2ForCausalLM(config).eval()
    trained = copy.deepcopy(base)
    targets = torch.tensor([t.input_ids[p] for t in texts for p in t.targets])
    direction = base.get_output_embeddings().weight[targets].mean(0).detach()
    shift = 2.0 * direction / direction.norm()
    trained.model.layers[PLANTED].mlp.down_proj.bias = torch.nn.Parameter(shift)
    return base, trained


def _cells(found, positions="all"):
    table = found.recovery[found.recovery["positions"] == positions]
    return table.set_index(["direction", "site", "layer"])


def test_position_sets_and_controls(setup):
    tokenizer, texts = setup
    for text in texts:
        targets = set(text.targets)
        assert text.input_ids and max(targets) == len(text.input_ids) - 1  # ends at the last call token
        decisions = text.positions["decision"]
        assert decisions and all(any(d < t for t in targets) for d in decisions)
        # the decision token is the end of "<|im_start|>assistant\n"; a call follows it
        assert all(tokenizer.decode(text.input_ids[d - 2 : d + 1]).endswith("assistant\n") for d in decisions)
        assert not targets & set(text.positions["context"]) and text.positions["context"]
        for name in ("decision", "context"):
            draws = text.controls(name, 3, seed=0)
            assert draws == text.controls(name, 3, seed=0) and draws != text.controls(name, 3, seed=1)
            for drawn in draws:
                assert len(drawn) == len(set(drawn)) == len(text.positions[name])
                assert not set(drawn) & (set(text.positions[name]) | targets | {t - 1 for t in targets})
                assert max(drawn) < max(targets)


def test_a_planted_mlp_shift_is_recovered_where_it_was_planted(setup, pair):
    """Patched at every position: the MLP of the planted block and the residual stream after it recover the
    whole change (1) in both directions; everything before it recovers nothing (0); so does attention in
    the planted block (it reads the stream before the MLP)."""
    tokenizer, texts = setup
    config = PatchConfig(positions=["all", "decision"], controls=2)
    found = patch_models(*pair, tokenizer, texts, config=config)
    assert (found.environments["change"] > 0.5).all()
    cells = _cells(found)
    for direction in ("sufficiency", "necessity"):
        for site, layer in [("mlp_out", PLANTED), ("resid", PLANTED), ("resid", PLANTED + 1)]:
            row = cells.loc[(direction, site, layer)]
            assert row["recovery"] == pytest.approx(1.0, abs=1e-4), (direction, site, layer)
        for site, layer in [("mlp_out", 0), ("resid", 0), ("attn_out", 0), ("attn_out", PLANTED)]:
            assert cells.loc[(direction, site, layer), "recovery"] == pytest.approx(0.0, abs=1e-4)
    # per environment too, not only in the ratio of sums
    patches = found.patches
    whole = patches[
        (patches["positions"] == "all") & (patches["site"] == "mlp_out") & (patches["layer"] == PLANTED)
    ]
    merged = whole.merge(found.environments, on="environment", suffixes=("", "_env"))
    assert np.allclose(merged["change"], merged["change_env"], atol=1e-4)
    # decision tokens: the controls are paired draws of as many positions, and the contrast has a p-value
    decision = _cells(found, "decision").loc[("sufficiency", "mlp_out", PLANTED)]
    assert decision["control_count"] == pytest.approx(decision["count"])
    assert math.isfinite(decision["control_recovery"]) and math.isfinite(decision["p_value"])
    assert decision["difference"] == pytest.approx(
        decision["recovery"] - decision["control_recovery"], abs=1e-9
    )
    assert set(patches["draw"]) == {0, 1, 2}
    assert set(patches.loc[patches["positions"] == "all", "draw"]) == {0}  # no room for a control


def test_the_three_backends_agree(setup, pair):
    tokenizer, texts = setup
    config = PatchConfig(positions=["decision", "all"], controls=1)
    found = {backend: patch_models(*pair, tokenizer, texts[:2], backend=backend, config=config)
             for backend in BACKENDS}  # fmt: skip
    reference = found["hf"]
    for backend in ("transformer-lens", "nnsight"):
        mine = found[backend]
        for frame, column in ((mine.patches, "lp_patched"), (mine.environments, "lp_base")):
            other = reference.patches if frame is mine.patches else reference.environments
            assert np.abs(frame[column].to_numpy() - other[column].to_numpy()).max() <= 1e-4, backend
        assert np.allclose(
            mine.recovery["recovery"], reference.recovery["recovery"], atol=1e-4, equal_nan=True
        )


def test_the_base_against_itself_is_undefined_not_a_crash(setup, pair, tmp_path):
    tokenizer, texts = setup
    base = pair[0]
    found = patch_models(base, base, tokenizer, texts, config=PatchConfig(sites=["mlp_out"], controls=2))
    assert (found.environments["change"] == 0).all()
    assert found.recovery["recovery"].isna().all() and found.recovery["low"].isna().all()
    assert (found.recovery["reason"].str.len() > 0).all()
    written = found.write(tmp_path / "self")
    document = json.loads((tmp_path / "self" / "patch.json").read_text())
    assert document["headline"][0]["recovery"] is None and document["headline"][0]["reason"]
    assert {p.name for p in written} >= {"recovery.csv", "patches.csv", "environments.csv", "recovery.png"}


def test_a_ratio_of_sums_is_not_blown_up_by_a_small_denominator():
    """One environment the training barely moved would dominate a mean of per-environment ratios."""
    change = [1e-9, 4.0, 5.0, 6.0, 4.0, 5.0, 6.0, 5.0]
    environments = pd.DataFrame({"environment": range(8), "change": change})
    patches = pd.DataFrame({
        "environment": range(8), "direction": "sufficiency", "positions": "all", "draw": 0, "site": "resid",
        "layer": 0, "count": 10, "change": [1.0, 2.0, 2.5, 3.0, 2.0, 2.5, 3.0, 2.5],
    })  # fmt: skip
    row = recovery_table(environments, patches).iloc[0]
    assert row["recovery"] == pytest.approx(18.5 / 35.0)  # a mean of per-environment ratios: ~1.25e8
    assert row["low"] < row["recovery"] < row["high"]


def test_a_site_the_backend_cannot_hook_is_named(setup, pair):
    tokenizer, texts = setup
    with pytest.raises(UserError, match=r"cannot patch site 'mlp_in'"):
        patch_models(*pair, tokenizer, texts, config=PatchConfig(sites=["resid", "mlp_in"]))
    with pytest.raises(UserError, match=r"unknown position set 'middle'"):
        patch_models(*pair, tokenizer, texts, config=PatchConfig(positions=["middle"]))


@pytest.fixture(scope="module")
def embedded_pair(tmp_path_factory):
    """The shipped embedded base (it writes tool calls), a copy with noise in block 2's MLP, a model with
    another tokenizer, and a small environment set."""
    from conftest import tiny_random_qwen2

    from toolrl_analysis.envs.pipeline import EnvBuildConfig, build_envsets, write_envset
    from toolrl_analysis.models.checkpoint import load_policy, save_policy
    from toolrl_analysis.models.tokenizer import build_policy_tokenizer

    root = tmp_path_factory.mktemp("patch")
    build = build_envsets(EnvBuildConfig(seed=3, train_size=8, test_per_scenario=1, validation_per_scenario=0,
                                         same_world_test_per_scenario=0))  # fmt: skip
    write_envset(build, root / "envs")
    model, tokenizer = load_policy("embedded")
    save_policy(model, tokenizer, root / "base.pt")
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for parameter in model.model.layers[2].mlp.parameters():
            parameter.add_(torch.randn(parameter.shape, generator=generator) * parameter.std())
    save_policy(model, tokenizer, root / "trained.pt")
    other = build_policy_tokenizer(build.train, vocab_size=600)
    save_policy(tiny_random_qwen2(other), other, root / "other.pt")
    return root


def test_the_command_writes_its_tables(embedded_pair, tmp_path, capsys):
    root = embedded_pair
    code = main(["patch", str(root / "base.pt"), str(root / "trained.pt"), "--envs", str(root / "envs"),
                 "--limit", "2", "--controls", "2", "--sites", "mlp_out", "--positions", "decision,all",
                 "--max-turns", "3", "--max-new-tokens", "64", "--out", str(tmp_path / "p"), "--json"])  # fmt: skip
    assert code == 0
    document = json.loads(capsys.readouterr().out)
    out = tmp_path / "p"
    recovery = pd.read_csv(out / "recovery.csv")
    assert list(recovery.columns[:4]) == ["direction", "positions", "site", "layer"]
    assert len(recovery) == 2 * 2 * 4  # directions x sets x blocks
    assert set(pd.read_csv(out / "patches.csv")["draw"]) == {0, 1, 2}
    assert (out / "recovery.png").is_file() and (out / "environments.csv").is_file()
    assert document["summary"]["environments"] >= 1 and document["summary"]["backend"] == "hf"
    # blocks 0 and 1 are untouched: their MLP outputs are the base's, and patching them changes nothing
    at = recovery.set_index(["direction", "positions", "layer"])
    assert abs(at.loc[("sufficiency", "all", 0), "recovery"]) < 1e-4
    for direction in ("sufficiency", "necessity"):  # block 2's MLP output is the whole change
        assert at.loc[(direction, "all", 2), "recovery"] == pytest.approx(1.0, abs=1e-4)


def test_the_command_refuses_bad_input_in_one_line(embedded_pair, capsys):
    root = embedded_pair
    base, trained, envs = str(root / "base.pt"), str(root / "trained.pt"), str(root / "envs")
    assert main(["patch", base, trained, "--envs", envs, "--sites", "resid,mlp_in"]) == 2
    error = capsys.readouterr().err
    assert "cannot patch site 'mlp_in'" in error and len(error.strip().splitlines()) == 1
    assert main(["patch", base, str(root / "other.pt"), "--envs", envs, "--limit", "1"]) == 2
    error = capsys.readouterr().err
    assert "different tokenizers" in error and len(error.strip().splitlines()) == 1
    assert main(["patch", base, trained, "--envs", envs, "--backend", "pyvene"]) == 2
    assert "unknown backend 'pyvene'" in capsys.readouterr().err
