"""Probes: a planted signal is found where it was planted, the control task catches memorisation, the fit is
scikit-learn's logistic regression, and base-vs-trained differences are located by layer."""

import math

import numpy as np
import pytest
import torch

from toolrl_analysis.analysis.probe.fit import (
    ProbeSettings,
    compare_probes,
    control_labels,
    fit_softmax_probes,
    group_split,
    probe_layers,
    summarise_probes,
)
from toolrl_analysis.analysis.stats import holm_reject, mean_ci, paired_difference

N_ROWS, N_LAYERS, DIM, PLANTED = 600, 6, 24, 3


def planted_dataset(seed: int = 0, strength: float = 1.5, layer: int | None = PLANTED):
    """Binary labels written along one direction of one layer's features; every other layer is noise.
    120 environments of 5 rows; 25 control types, independent of both."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 2, N_ROWS)
    features = rng.normal(size=(N_ROWS, N_LAYERS, DIM))
    if layer is not None:
        direction = rng.normal(size=DIM)
        features[:, layer] += np.outer(2 * labels - 1, direction / np.linalg.norm(direction)) * strength
    groups = np.repeat(np.arange(N_ROWS // 5), 5)
    types = rng.integers(0, 25, N_ROWS)
    return features, labels, groups, types


def _summary(results, model="m"):
    return summarise_probes(results.assign(model=model, task="t", site="resid")).set_index("layer")


def test_the_probe_finds_a_planted_signal_at_its_layer_only():
    features, labels, groups, types = planted_dataset()
    summary = _summary(probe_layers(features, labels, groups, types, range(N_LAYERS))[0])
    assert summary.loc[PLANTED, "accuracy_mean"] > 0.85
    assert summary.loc[PLANTED, "selectivity_ci_low"] > 0.25
    assert abs(summary.loc[PLANTED, "control_accuracy_mean"] - 0.5) < 0.1
    elsewhere = summary.drop(index=PLANTED)
    assert (elsewhere["accuracy_mean"] < 0.62).all()
    assert (elsewhere["selectivity_mean"].abs() < 0.08).all(), elsewhere["selectivity_mean"]


def test_the_control_is_never_easier_than_the_task_when_types_are_salient():
    """Features encode the types, and the labels depend on the types alone: the task is as easy as reading
    the type, and so is the control (the labels permuted within type), so selectivity is 0, not negative (a
    random label per type made the control the easier one here) and not positive (nothing beyond the type)."""
    features, labels, groups, types = planted_dataset(layer=None)
    types = types % 20
    labels = (types % 2).astype(int)
    features[:, :, :20] += 8.0 * np.eye(20)[types][:, None, :]
    summary = _summary(probe_layers(features, labels, groups, types, [0, 1])[0])
    assert (summary["accuracy_mean"] > 0.95).all() and (summary["control_accuracy_mean"] > 0.95).all()
    assert (summary["selectivity_mean"].abs() < 0.03).all()


def test_splits_keep_environments_apart_and_differ_by_seed():
    groups = np.repeat(np.arange(40), 3)
    masks = [group_split(groups, seed, 0.3) for seed in range(3)]
    for test in masks:
        assert not set(groups[test]) & set(groups[~test])
        assert len(set(groups[test])) == 12
    assert len({tuple(np.flatnonzero(m)) for m in masks}) == 3
    assert (group_split(groups, 1, 0.3) == masks[1]).all()


def test_control_labels_permute_the_labels_within_each_type():
    rng = np.random.default_rng(1)
    labels = rng.choice(np.array(["call", "answer"]), size=400, p=[0.7, 0.3])
    types = rng.integers(0, 40, 400).astype(str)
    control = control_labels(labels, types, seed=2)
    for kind in np.unique(types):  # the same labels in each type, in another order
        assert sorted(control[types == kind]) == sorted(labels[types == kind])
    assert (control != labels).sum() > 50
    assert not (control == control_labels(labels, types, seed=3)).all()
    assert (control == control_labels(labels, types, seed=2)).all()


@pytest.mark.parametrize("n_classes, C", [(2, 0.01), (2, 1.0), (4, 0.05)])
def test_batched_fit_is_scikit_learns_logistic_regression(n_classes, C):
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    rng = np.random.default_rng(n_classes)
    x = rng.normal(size=(300, 16)) * rng.uniform(0.5, 3, 16) + rng.normal(size=16)
    y = (x @ rng.normal(size=(16, n_classes)) + 3 * rng.gumbel(size=(300, n_classes))).argmax(1)
    train = rng.random(300) < 0.7
    reference = make_pipeline(StandardScaler(), LogisticRegression(C=C, max_iter=5000, tol=1e-10))
    theirs = reference.fit(x[train], y[train]).predict(x)

    def ours(strength):
        tensors = (torch.as_tensor(x[None]), torch.as_tensor(y[None]), torch.as_tensor(train[None]))
        return fit_softmax_probes(*tensors, n_classes, strength, 500)[0, 0].numpy()

    assert (ours(C) == theirs).all()
    if C < 0.1:  # where the penalty matters, half or twice its strength (a lost factor of 2) shows
        assert (ours(2 * C) == theirs).mean() < 0.99 and (ours(C / 2) == theirs).mean() < 0.99


def test_comparison_locates_the_layer_where_trained_differs():
    """Paired over the 120 environments: the planted layer differs, with an interval that excludes 0.25;
    elsewhere nothing differs, and the minimum detectable change is printed beside every row."""
    features, labels, groups, types = planted_dataset(strength=1.5)
    base_features, *_ = planted_dataset(seed=0, layer=None)
    settings = ProbeSettings(seeds=5)
    counts = [
        probe_layers(f, labels, groups, types, range(N_LAYERS), settings)[1].assign(
            model=m, task="t", site="resid"
        )
        for m, f in (("base", base_features), ("trained", features))
    ]
    import pandas as pd

    comparison = compare_probes(pd.concat(counts)).set_index(["metric", "layer"])
    assert comparison.loc[("accuracy", PLANTED), "significant"]
    assert comparison.loc[("accuracy", PLANTED), "diff_ci_low"] > 0.25
    assert (comparison["n"] > 100).all()  # environments, not seeds
    others = comparison.drop(index=PLANTED, level="layer")
    assert not others["significant"].any()
    assert 0 < comparison.loc[("accuracy", PLANTED), "mde"] < 0.2
    assert (others["diff_mean"] == 0).all()  # those layers' features are the same in both models
    # identical models: no change, and the data exclude a change of 0.05
    same = compare_probes(pd.concat([counts[0], counts[0].assign(model="trained")]))
    assert (
        (same["diff_mean"] == 0).all()
        and not same["significant"].any()
        and (same["p_equivalent"] < 0.05).all()
    )


def test_interval_and_tests_match_hand_computed_values():
    mean, low, high = mean_ci([1.0, 2.0, 3.0, 4.0])
    half = 3.182446305284263 * math.sqrt(5 / 3) / 2  # t(0.975, 3) * sd / sqrt(n)
    assert (mean, low, high) == pytest.approx((2.5, 2.5 - half, 2.5 + half))
    assert mean_ci([0.7]) == (0.7, 0.7, 0.7)
    diff = paired_difference([0.5, 0.6, 0.7], [0.6, 0.8, 0.7])
    assert diff["diff_mean"] == pytest.approx(0.1) and diff["n"] == 3
    assert diff["effect_size"] == pytest.approx(0.1 / 0.1)  # differences 0.1, 0.2, 0.0: sd 0.1
    assert diff["mde"] == pytest.approx((4.302652729749462 + 1.0606601717798214) * 0.1 / math.sqrt(3))
    assert diff["p_value"] == pytest.approx(
        0.2254033307585166
    )  # scipy.stats.ttest_rel by hand: t = 1.732, df 2
    # Holm: sorted p 0.001 <= .05/4, 0.01 <= .05/3, 0.03 > .05/2 stops
    assert holm_reject([0.03, 0.001, 0.5, 0.01]) == [False, True, False, True]


def test_large_problems_are_fitted_in_chunks_of_layers_with_the_same_result(monkeypatch):
    import toolrl_analysis.analysis.probe.fit as probe_module

    features, labels, groups, types = planted_dataset()
    settings = ProbeSettings(seeds=2)
    whole = probe_layers(features, labels, groups, types, range(N_LAYERS), settings)[0]
    monkeypatch.setattr(probe_module, "MAX_PARAMETERS_PER_FIT", 2 * 2 * DIM * 2)  # two layers per fit
    chunked = probe_layers(features, labels, groups, types, range(N_LAYERS), settings)[0]
    # separate fits of independent problems converge to the joint fit's optimum (up to L-BFGS tolerance)
    assert (chunked[["layer", "seed"]] == whole[["layer", "seed"]]).all().all()
    assert (chunked["accuracy"] - whole["accuracy"]).abs().max() <= 0.01
