"""`toolrl-analyze probe` end to end on a pair of tiny checkpoints (a .pt and an HF directory)."""

import json

import pytest
from conftest import FTRL_TEST_SET, tiny_random_qwen2

from toolrl_analysis.analysis.probe.decision_points import REGIONS, TASKS
from toolrl_analysis.analysis.probe.run import ProbeConfig, run_probe
from toolrl_analysis.cli import main
from toolrl_analysis.envs.pipeline import EnvBuildConfig, build_envsets
from toolrl_analysis.envs.schema import write_envs
from toolrl_analysis.models.checkpoint import save_hf_dir, save_policy
from toolrl_analysis.models.tokenizer import build_policy_tokenizer

SMALL = ["--seeds", "2", "--set", "min_class_count=2"]


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    root = tmp_path_factory.mktemp("probe")
    build = build_envsets(EnvBuildConfig(seed=7, train_size=24, test_per_scenario=3))
    envs = write_envs(build.test, root / "test.jsonl")
    tokenizer = build_policy_tokenizer(build.train, vocab_size=700)
    # 2 blocks of width 32: the probe's work, not the model's, is what these tests exercise
    base = save_policy(tiny_random_qwen2(tokenizer, seed=0, max_positions=4096), tokenizer, root / "base.pt")
    trained = save_hf_dir(
        tiny_random_qwen2(tokenizer, seed=1, max_positions=4096), tokenizer, root / "trained"
    )
    return str(base), str(trained), str(envs)


def test_probe_writes_curves_attention_and_one_json_document(pair, tmp_path, capsys):
    base, trained, envs = pair
    out = tmp_path / "out"
    rollouts = [
        "--set",
        "rollout_envs=2",
        "--set",
        "rollout_max_new_tokens=8",
        "--set",
        "rollout_max_turns=2",
    ]
    code = main(["probe", base, trained, "--envs", envs, "--out", str(out), "--json", *SMALL, *rollouts])
    assert code == 0
    document = json.loads(capsys.readouterr().out)
    assert document["backend"] == "hf" and document["layers"] == [0, 1, 2]
    assert document["conversations"] == 12 + 2 * 2  # oracle trajectories + each model's rollouts
    summary = document["probe_summary"]
    assert {(r["model"], r["task"], r["layer"]) for r in summary} == {
        (m, t, layer) for m in ("base", "trained") for t in TASKS for layer in range(3)
    }
    assert all(0 <= r["accuracy_mean"] <= 1 and r["seeds"] == 2 for r in summary)
    assert {r["task"] for r in document["probe_comparison"]} == set(TASKS)
    # the attention from each decision token spreads over the regions and nowhere else
    by_block = document["attention_by_block"]
    for model in ("base", "trained"):
        for block in range(2):
            total = sum(r["mean"] for r in by_block if r["model"] == model and r["block"] == block)
            assert total == pytest.approx(1.0, abs=1e-4)
    assert {r["region"] for r in by_block} == set(REGIONS)
    assert len(document["head_comparison"]) == 2 * 4 * len(REGIONS)
    for name in ("probe_summary.csv", "head_comparison.csv", "probe_curves_resid.png", "attention_mass.png",
                 "attention_difference.png", "probe.json"):  # fmt: skip
        assert (out / name).stat().st_size > 0


def test_backends_give_the_same_probe_accuracies(pair):
    base, trained, envs = pair
    config = ProbeConfig(
        tasks=["call_or_answer", "response_useful"], seeds=2, min_class_count=2, limit=8, rollout_envs=0,
        layers="0-2", sites=["resid", "mlp_out"],
    )  # fmt: skip
    backends = ("hf", "transformer-lens", "nnsight")
    reports = {
        backend: run_probe(base, trained, envs, backend=backend, config=config) for backend in backends
    }
    reference = reports["hf"].probe_summary.set_index(["model", "task", "site", "layer"])
    for backend in ("transformer-lens", "nnsight"):
        other = reports[backend].probe_summary.set_index(["model", "task", "site", "layer"])
        gap = (other["accuracy_mean"] - reference["accuracy_mean"]).abs().max()
        assert gap <= 0.02, (backend, gap)
        attention_gap = (reports[backend].attention["mean"] - reports["hf"].attention["mean"]).abs().max()
        assert attention_gap <= 1e-5


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--backend", "tl"], "unknown backend 'tl' (known: hf, transformer-lens, nnsight)"),
        (["--tasks", "next_token"], "config key 'tasks' must be among"),
        (["--layers", "9"], "layer 9 is out of range: the model has hidden states 0 (embeddings) to 2"),
        (["--layers", "2-1"], "is empty (it runs backwards)"),
        (["--envs", str(FTRL_TEST_SET)], "cannot label task 'next_tool'"),
    ],
)
def test_bad_input_is_one_line_and_exit_2(pair, extra, message, capsys):
    base, trained, envs = pair
    arguments = ["probe", base, trained, "--envs", envs, "--set", "rollout_envs=0", *extra]
    assert main(arguments) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("toolrl-analyze: error: ") and message in err
