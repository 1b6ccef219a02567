"""The figures say what the numbers say: intervals where the numbers have them, the embedding in the heatmap,
a share per block in the band chart, whole layers on the axis, and the learning curve from iteration 0."""

from __future__ import annotations

import pandas as pd
import pytest
from matplotlib.container import ErrorbarContainer

from toolrl_analysis.analysis import plots


def components() -> pd.DataFrame:
    rows = [
        {"layer": layer, "component": component, "relative_frobenius_change": 0.01, "update_norm_share": 0.02}
        for layer in range(3)
        for component in ("attn.q", "mlp.down")
    ]
    rows.append(
        {"layer": None, "component": "embed", "relative_frobenius_change": 0.001, "update_norm_share": 0.88}
    )
    return pd.DataFrame(rows)


def test_the_heatmap_shows_the_embedding_and_its_share_of_the_update():
    figure = plots.plot_component_heatmap(components())
    left, right = [ax for ax in figure.axes if ax.get_title()]  # two panels (the colour bars have no title)
    assert [t.get_text() for t in left.get_yticklabels()] == ["2", "1", "0", plots.OUTSIDE]
    assert "embed" in [t.get_text() for t in right.get_xticklabels()]
    assert "0.88" in [t.get_text() for t in right.texts]  # the embedding's share, written in its cell


def test_band_bars_are_a_share_per_block():
    bands = pd.DataFrame(
        {"family": ["mlp"] * 3, "band": ["lower", "middle", "upper"], "layers": ["0-0", "1-2", "3-3"],
         "n_blocks": [1, 2, 1], "share_of_family": [0.25, 0.5, 0.25]}
    )  # fmt: skip
    (ax,) = plots.plot_band_summary(bands).axes
    assert [bar.get_height() for bar in ax.patches] == pytest.approx([0.25, 0.25, 0.25])  # evenly spread
    assert "middle third (blocks 1-2)" in [t.get_text() for t in ax.get_legend().get_texts()]


def test_layers_are_whole_numbers_on_the_profile():
    (ax,) = plots.plot_layer_profile(components()).axes
    ticks = [t for t in ax.get_xticks() if ax.get_xlim()[0] <= t <= ax.get_xlim()[1]]
    assert ticks and all(float(t).is_integer() for t in ticks)


def test_scores_carry_their_intervals():
    table = pd.DataFrame(
        {"policy": ["base", "GRPO"], "scenario": ["overall"] * 2, "solve_f1": [0.26, 0.31],
         "low": [0.22, 0.27], "high": [0.30, 0.35]}
    )  # fmt: skip
    (ax,) = plots.plot_policy_scores(table).axes
    bars = [c for c in ax.containers if isinstance(c, ErrorbarContainer)]
    assert len(bars) == 2 and ax.get_ylim() == (0.0, 1.0)  # one interval per policy


def test_the_learning_curve_starts_before_training_with_its_error_bars():
    metrics = pd.DataFrame({"policy": "GRPO", "iteration": [1, 2], "reward_mean": [0.1, 0.2]})
    validation = pd.DataFrame(
        {
            "policy": "GRPO",
            "iteration": [0, 2],
            "val_f1_overall": [0.28, 0.26],
            "val_f1_overall_se": [0.02, 0.02],
        }
    )
    _, right = plots.plot_training_curves(metrics, validation).axes
    (errorbars,) = [c for c in right.containers if isinstance(c, ErrorbarContainer)]
    assert list(errorbars.lines[0].get_xdata()) == [0, 2]  # iteration 0: the policy before training
    assert right.get_ylim()[0] == 0.0  # the axis starts at 0, so a drop of 0.02 looks like one
