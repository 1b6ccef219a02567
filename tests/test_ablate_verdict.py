"""The ablation's statistics and its one rule, on planted ground truth: Fieller intervals and Holm by hand,
three planted grids in both signs of change, and the rank-k operation on a planted rank-1 update."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from toolrl_analysis.analysis.ablate import GridEntry, LowRank, contrast, grid_verdicts, holm, ratio
from toolrl_analysis.analysis.ablate.low_rank import low_rank_in_memory, spectrum_share
from toolrl_analysis.analysis.ablate.verdict import INCONCLUSIVE, MARGIN, NOT_REPRODUCED, REPRODUCED


# ---------------------------------------------------------------------------------------------
# Fieller, contrasts, Holm
# ---------------------------------------------------------------------------------------------
def test_fieller_interval_covers_the_truth_and_is_unbounded_over_a_noisy_denominator():
    rng = np.random.default_rng(0)
    covered = 0
    for _ in range(400):
        b = rng.normal(2.0, 1.0, 60)
        a = 0.3 * b + rng.normal(0.0, 0.5, 60)
        found = ratio(a, b)
        covered += found.low <= 0.3 <= found.high
    assert 0.92 <= covered / 400 <= 0.98  # a 95% interval, by simulation
    noisy = ratio(rng.normal(1, 1, 20), rng.normal(0.0, 1.0, 20))
    assert not noisy.bounded and "within its noise" in noisy.reason


def test_contrast_counts_differing_environments_and_prints_a_detectable_effect():
    b = np.full(50, 2.0) + np.linspace(-0.5, 0.5, 50)
    a = np.zeros(50)
    a[:3] = 0.4  # only 3 environments differ
    found = contrast(a, b, margin=MARGIN)
    assert found.differ == 3 and found.n == 50
    assert found.effect.low < found.effect.value < found.effect.high
    assert found.mde(0.05) > 0 and math.isfinite(found.mde(0.05))


def test_holm_by_hand():
    adjusted = holm([0.01, 0.04, 0.03, float("nan")])
    assert adjusted[0] == pytest.approx(0.03)  # 3 x 0.01
    assert adjusted[2] == pytest.approx(0.06)  # 2 x 0.03
    assert adjusted[1] == pytest.approx(0.06)  # max(1 x 0.04, 0.06): monotone
    assert math.isnan(adjusted[3])


# ---------------------------------------------------------------------------------------------
# The rule on planted grids: per environment, the change and what each variant keeps
# ---------------------------------------------------------------------------------------------
N, K = 120, 20


def planted_grid(where: str, sign: float, seed: int = 0) -> dict[str, np.ndarray]:
    """LL_variant - LL_base per environment for a grid of two subsets (mlp@lower, attn@upper) with K
    controls each. `where`: the change lives in the lower MLPs, in upper attention, or is below detection."""
    rng = np.random.default_rng(seed)
    change = rng.normal(10.0, 3.0, N) if where != "none" else rng.normal(0.0, 3.0, N)
    noise = lambda: rng.normal(0.0, 0.3, N)  # noqa: E731
    holds = {"mlp@lower": where == "mlp", "attn@upper": where == "attn"}
    values = {"base": np.zeros(N), "trained": change}
    for subset, held in holds.items():
        # reverting the subset that holds the change removes it; reverting anything else keeps it
        values[f"revert {subset}"] = (0.05 if held else 1.0) * change + noise()
        values[f"transplant {subset}"] = (0.95 if held else 0.0) * change + noise()
        for k in range(K):
            values[f"revert control({subset})#{k}"] = change + noise()
            values[f"transplant control({subset})#{k}"] = noise()
    return {name: sign * value for name, value in values.items()}


def entries() -> list[GridEntry]:
    return [
        GridEntry(
            s,
            f"revert {s}",
            f"transplant {s}",
            [f"revert control({s})#{k}" for k in range(K)],
            [f"transplant control({s})#{k}" for k in range(K)],
        )  # fmt: skip
        for s in ("mlp@lower", "attn@upper")
    ]


@pytest.mark.parametrize("sign", [1.0, -1.0], ids=["gain", "loss"])
@pytest.mark.parametrize(
    ("where", "lower_mlp"),
    [("mlp", REPRODUCED), ("attn", NOT_REPRODUCED), ("none", INCONCLUSIVE)],
)
def test_planted_grids_give_the_planted_verdict_in_both_signs(where, lower_mlp, sign):
    found = {v["subset"]: v for v in grid_verdicts(entries(), planted_grid(where, sign))}
    assert found["mlp@lower"]["verdict"] == lower_mlp, found["mlp@lower"]["reason"]
    if where == "attn":
        assert found["attn@upper"]["verdict"] == REPRODUCED
    if where == "none":
        assert "within its noise" in found["mlp@lower"]["reason"]
    for verdict in found.values():
        assert verdict["rule"] and verdict["verdict"] in (REPRODUCED, NOT_REPRODUCED, INCONCLUSIVE)


def test_a_subset_between_its_controls_and_the_margin_is_inconclusive_with_its_detectable_effect():
    values = planted_grid("attn", 1.0)
    rng = np.random.default_rng(1)
    # the lower MLPs hold 5% of the change, measured with noise as large as the change itself
    values["revert mlp@lower"] = 0.95 * values["trained"] + rng.normal(0.0, 10.0, N)
    found = {v["subset"]: v for v in grid_verdicts(entries(), values)}["mlp@lower"]
    assert found["verdict"] == INCONCLUSIVE and "minimum detectable effect" in found["reason"]
    assert found["revert"]["mde"] > MARGIN


def test_no_valid_control_is_inconclusive_with_the_reason():
    values = planted_grid("mlp", 1.0)
    entry = GridEntry("mlp@middle", "revert mlp@lower", "transplant mlp@lower", [], [], reason="no room")
    (found,) = grid_verdicts([entry], values)
    assert found["verdict"] == INCONCLUSIVE and found["reason"] == "no room"


def test_the_controls_null_distribution_places_the_subset():
    found = grid_verdicts(entries(), planted_grid("mlp", 1.0))[0]
    controls = found["revert"]["controls"]
    assert controls["draws"] == K and len(controls["values"]) == K
    assert controls["share_below_subset"] == 0.0  # reverting the subset keeps less than every control
    assert found["revert"]["environments_differ"] == N


# ---------------------------------------------------------------------------------------------
# Rank-k on a planted rank-1 update
# ---------------------------------------------------------------------------------------------
def test_rank_one_transplant_recovers_a_planted_rank_one_update_and_the_residual_does_not():
    generator = torch.Generator().manual_seed(0)
    base = torch.randn(64, 48, generator=generator)
    u, v = torch.randn(64, 1, generator=generator), torch.randn(1, 48, generator=generator)
    signal = u @ v
    noise = torch.randn(64, 48, generator=generator)
    noise *= torch.linalg.matrix_norm(signal) / torch.linalg.matrix_norm(noise)  # norm-matched noise
    trained = base + signal + noise
    pairs = {"w": (None, base, trained)}

    def kept(which: str) -> float:
        tensors, account = low_rank_in_memory(LowRank("transplant", which, 1, ["w"]), pairs)
        assert account.parameters == base.numel()
        moved = tensors["w"] - base
        return float((moved * signal).sum() / (signal * signal).sum())  # projection on the planted change

    assert kept("rank") == pytest.approx(math.sqrt(2), rel=0.1)  # all of it, rescaled to ||signal + noise||
    assert abs(kept("residual")) < 0.1
    assert abs(kept("random")) < 0.1
    assert spectrum_share(pairs, ["w"], 1) > 0.5
    reverted, _ = low_rank_in_memory(LowRank("revert", "rank", 1, ["w"]), pairs)
    rank_one, _ = low_rank_in_memory(LowRank("transplant", "rank", 1, ["w"]), pairs)
    torch.testing.assert_close(trained - reverted["w"], rank_one["w"] - base)
    for which in ("rank", "residual", "random"):  # equal Frobenius norms: only the direction differs
        tensors, _ = low_rank_in_memory(LowRank("transplant", which, 1, ["w"]), pairs)
        assert float(torch.linalg.matrix_norm(tensors["w"] - base)) == pytest.approx(
            float(torch.linalg.matrix_norm(trained - base)), rel=1e-4
        )


def test_verdicts_from_saved_files_without_the_references_are_empty():
    import pandas as pd

    from toolrl_analysis.analysis.ablate import verdicts_of

    document = {"summary": {"grid_entries": [{"subset": "mlp@lower", "revert": "revert mlp@lower",
                                              "transplant": None, "revert_controls": [], "transplant_controls": []}]}}  # fmt: skip
    rows = pd.DataFrame(
        [
            {
                "variant": "revert mlp@lower",
                "source": "trained",
                "environment": 0,
                "role": "format",
                "nll_sum": 1.0,
            }
        ]
    )
    assert verdicts_of(document, rows) == []
