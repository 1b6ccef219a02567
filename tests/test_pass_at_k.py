"""pass@k and coverage: the estimator against brute force, a scripted policy of known success rate against the
closed form, the embedded model sampled through `evaluate --samples`, coverage and the kind of a gain."""

from __future__ import annotations

import itertools
import json
import math
import random

import numpy as np
import pandas as pd
import pytest

from toolrl_analysis.cli import main
from toolrl_analysis.envs.pipeline import EnvBuildConfig, build_envsets
from toolrl_analysis.envs.schema import balanced_slice, write_envs
from toolrl_analysis.pass_at_k import (
    coverage,
    gain_kind,
    paired_gain,
    pass_at_k,
    pass_at_k_table,
    success_counts,
)


def test_the_estimator_is_the_chance_that_some_k_subset_holds_a_success():
    for n, c in [(5, 0), (5, 1), (5, 3), (6, 6), (8, 2)]:
        outcomes = [1] * c + [0] * (n - c)
        for k in range(1, n + 1):
            subsets = list(itertools.combinations(outcomes, k))
            brute = sum(any(s) for s in subsets) / len(subsets)
            assert pass_at_k(n, c, k) == pytest.approx(brute)
    assert pass_at_k(8, 3, 1) == pytest.approx(3 / 8)  # pass@1 is the success rate
    with pytest.raises(ValueError):
        pass_at_k(4, 5, 1)


def counts(rows):
    return pd.DataFrame(rows, columns=["env_id", "scenario", "n", "c"])


def test_table_is_monotone_in_k_with_a_macro_overall():
    rng = random.Random(0)
    rows = [(f"e{i}", ["single_hop", "multi_hop"][i % 2], 8, rng.randint(0, 8)) for i in range(20)]
    table = pass_at_k_table(counts(rows))
    for _, frame in table.groupby("scenario"):
        values = frame.sort_values("k")["pass_at_k"].to_numpy()
        assert np.all(np.diff(values) >= -1e-12) and len(values) == 8
        assert (frame["low"] <= frame["pass_at_k"]).all() and (frame["pass_at_k"] <= frame["high"]).all()
    at_1 = table[table["k"] == 1].set_index("scenario")["pass_at_k"]
    assert at_1["overall"] == pytest.approx((at_1["single_hop"] + at_1["multi_hop"]) / 2)


@pytest.fixture(scope="module")
def single_hop_envs():
    records = build_envsets(EnvBuildConfig(seed=4, train_size=0, test_per_scenario=12, validation_per_scenario=0,
                                           same_world_test_per_scenario=0, train_worlds=1)).test  # fmt: skip
    return [r for r in records if r.scenario == "single_hop"]


def test_a_policy_that_succeeds_with_known_odds_gets_the_closed_form(single_hop_envs):
    """Each sample calls the golden tool with the right argument with probability p (else a wrong one), then
    stops: success has probability p, so pass@k must be 1 - (1 - p)^k, within noise."""
    from toolrl_analysis.envs.check import golden_calls
    from toolrl_analysis.envs.sandbox import Sandbox
    from toolrl_analysis.evaluate import sampled_episodes
    from toolrl_analysis.models.checkpoint import load_policy
    from toolrl_analysis.models.embedded import resolve_model
    from toolrl_analysis.rollout import ScriptedPolicy
    from toolrl_analysis.training.step_samples import oracle_scripts

    _, tokenizer = load_policy(resolve_model("embedded"))
    records, p, samples = single_hop_envs, 0.3, 16
    scripts = {r.env_id: oracle_scripts([r])[0] for r in records}
    rng = random.Random(1)

    def respond(request):
        record = repeated[request.episode_index]
        if request.turn_index > 0:
            return "Done."
        if rng.random() < p:
            return scripts[record.env_id][0]
        ((_, name, args),) = golden_calls(record)[0]
        return scripts[record.env_id][0].replace(
            json.dumps(args)[:-1], json.dumps({k: "Nobody" for k in args})[:-1]
        )

    repeated = [r for r in records for _ in range(samples)]
    with Sandbox(workers=1) as sandbox:
        frame = sampled_episodes(ScriptedPolicy(tokenizer, respond), records, samples, sandbox, max_turns=3)
    assert len(frame) == len(records) * samples and set(frame["sample"]) == set(range(samples))
    assert set(frame["solve_f1"]) <= {0.0, 1.0}
    table = pass_at_k_table(success_counts(frame)).query("scenario == 'overall'").set_index("k")
    n_envs = len(records)
    for k in (1, 2, 4, 8):
        expected = 1 - (1 - p) ** k
        se = math.sqrt(expected * (1 - expected) / n_envs) + 0.02
        assert abs(table.loc[k, "pass_at_k"] - expected) < 4 * se, k
    assert table.loc[1, "pass_at_k"] == pytest.approx((frame["solve_f1"] >= 1).mean())


def test_embedded_evaluate_samples_gives_pass_at_k_per_scenario(tmp_path, capsys):
    """`evaluate embedded --samples N --json`: pass@1..N per scenario, never decreasing in k, and pass@1
    equal (within noise) to the success rate of single samples drawn with other seeds."""
    records = balanced_slice(
        build_envsets(EnvBuildConfig(seed=9, train_size=0, test_per_scenario=2, validation_per_scenario=0,
                                     same_world_test_per_scenario=0, train_worlds=1)).test, 8,
    )  # fmt: skip
    envs = write_envs(records, tmp_path / "envs.jsonl")
    common = ["--envs", str(envs), "--no-general", "--max-turns", "4", "--max-new-tokens", "64",
              "--success-threshold", "0.5", "--json"]  # fmt: skip
    assert main(["evaluate", "embedded", *common, "--samples", "6", "--out", str(tmp_path / "out")]) == 0
    document = json.loads(capsys.readouterr().out)
    table = pd.DataFrame(document["pass_at_k"])
    assert set(table["scenario"]) == {"single_hop", "parallel_single_hop", "multi_hop", "parallel_multi_hop",
                                      "overall"}  # fmt: skip
    for _, frame in table.groupby("scenario"):
        assert frame.sort_values("k")["k"].tolist() == list(range(1, 7))
        assert np.all(np.diff(frame.sort_values("k")["pass_at_k"].to_numpy()) >= -1e-12)
    assert (tmp_path / "out" / "pass_at_k.csv").is_file() and (tmp_path / "out" / "samples.csv").is_file()
    samples = pd.read_csv(tmp_path / "out" / "samples.csv")
    pass_1 = float((samples["solve_f1"] >= 0.5).mean())  # pass@1 over all sampled episodes, pooled
    singles = []
    for seed in (1, 2, 3):
        assert main(["evaluate", "embedded", *common, "--samples", "2", "--seed", str(seed)]) == 0
        singles += [c["c"] / c["n"] for c in json.loads(capsys.readouterr().out)["success_counts"]]
    assert 0 < pass_1 < 1  # both outcomes occur, so the comparison says something
    assert abs(pass_1 - float(np.mean(singles))) < 0.25  # 48 episodes each side: ~0.1 standard error


@pytest.mark.parametrize(
    "argv", [["--samples", "0"], ["--samples", "-2"], ["--samples", "2", "--temperature", "-1"]]
)
def test_bad_sampling_flags_are_one_line_and_exit_2(argv, tmp_path, capsys):
    write_envs([], tmp_path / "none.jsonl")
    assert main(["evaluate", "embedded", "--envs", str(tmp_path / "none.jsonl"), *argv]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and argv[-2] in err and "Traceback" not in err


def test_coverage_crossover_and_the_kind_of_gain():
    # base: solves 6 of 12 environments once in 8; trained: solves 4 of them almost always, none else
    base = counts([(f"e{i}", "single_hop", 8, 1 if i < 6 else 0) for i in range(12)])
    trained = counts([(f"e{i}", "single_hop", 8, 7 if i < 4 else 0) for i in range(12)])
    gains = paired_gain(base, trained)
    overall = gains[gains["scenario"] == "overall"].set_index("k")
    assert overall.loc[1, "gain"] > 0 and overall.loc[8, "gain"] < 0
    assert overall.loc[1, "differ"] == 6 and overall.loc[1, "environments"] == 12  # e0-e5 differ, e6-e11 not
    found = coverage(base, trained, gains)
    assert found["only_base"] == ["e4", "e5"] and found["only_trained"] == [] and found["both"] == 4
    assert found["neither"] == 6 and 1 < found["crossover_k"] <= 8
    assert gain_kind(gains)["kind"] in ("sharpening", "loss")
    # a trained policy that also solves environments the base never did: new capability
    wider = counts([(f"e{i}", "single_hop", 8, 8) for i in range(12)])
    assert gain_kind(paired_gain(base, wider))["kind"] == "new capability"
    assert coverage(base, wider)["crossover_k"] is None
    # the same policy against itself: no detectable change, crossover at k = 1
    assert gain_kind(paired_gain(base, base))["kind"] == "no detectable change"
    assert coverage(base, base)["crossover_k"] == 1
