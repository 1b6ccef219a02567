"""Base-relative geometry of an update, on planted ground truth: principal-energy share, principal angles,
spectral drift, and the bf16 precision columns; and `compare --spectral --json` emitting them."""

from __future__ import annotations

import json
import math

import pytest
import torch
from test_compare_support import planted_qwen2_pair

from toolrl_analysis.analysis.diff import (
    PRECISION_COLUMNS,
    SPECTRAL_COLUMNS,
    bf16_half_ulp,
    compare_checkpoints,
    spectral_memory_bytes,
    spectral_metrics,
    tensor_metrics,
)
from toolrl_analysis.analysis.diff import metrics as diff_metrics
from toolrl_analysis.cli import main

NEW_SPECTRAL = (
    "spectral_drift",
    "principal_angle_max",
    "principal_energy_share",
    "principal_energy_chance",
    "k",
)


def planted_svd(rows: int, cols: int, seed: int = 0):
    """W = U diag(s) V^T with known orthonormal U, V and a decaying, well-separated spectrum."""
    generator = torch.Generator().manual_seed(seed)
    u, _ = torch.linalg.qr(torch.randn(rows, rows, generator=generator, dtype=torch.float64))
    v, _ = torch.linalg.qr(torch.randn(cols, cols, generator=generator, dtype=torch.float64))
    s = torch.logspace(1, -2, min(rows, cols), dtype=torch.float64)
    r = len(s)
    return u[:, :r], s, v[:, :r]


def compose(u, s, v) -> torch.Tensor:
    return ((u * s) @ v.T).float()


def rotate(basis: torch.Tensor, k: int, theta: float) -> torch.Tensor:
    """Columns 0..k-1 turned by theta towards columns k..2k-1 (Givens pairs): still orthonormal, and the
    span of the first k makes principal angles of exactly theta with the old one."""
    out = basis.clone()
    c, s = math.cos(theta), math.sin(theta)
    out[:, :k] = c * basis[:, :k] + s * basis[:, k : 2 * k]
    out[:, k : 2 * k] = -s * basis[:, :k] + c * basis[:, k : 2 * k]
    return out


@pytest.fixture
def lowrank(monkeypatch):
    """Force the randomised path (the matrices here are small enough for exact SVDs)."""
    monkeypatch.setattr(diff_metrics, "EXACT_SVD_MAX_ELEMENTS", 0)


@pytest.mark.parametrize("path", ["exact", "lowrank"])
def test_principal_energy_share_of_planted_directions(path, request):
    if path == "lowrank":
        request.getfixturevalue("lowrank")
    k, (rows, cols) = 4, (72, 60)
    u, s, v = planted_svd(rows, cols)
    base = compose(u, s, v)
    outside = (0.05 * torch.outer(u[:, k], v[:, k])).float()  # u_{k+1} v_{k+1}^T: nothing in the top k
    inside = (0.05 * torch.outer(u[:, 0], v[:, 0])).float()  # u_1 v_1^T: all of it
    row_out, _ = spectral_metrics(base, outside, top_k=k)
    row_in, _ = spectral_metrics(base, inside, top_k=k)
    assert row_out["spectral_method"].startswith(path)
    assert row_out["principal_energy_share"] == pytest.approx(0.0, abs=1e-6)
    assert row_in["principal_energy_share"] == pytest.approx(1.0, abs=1e-5)
    for row in (row_out, row_in):
        assert row["k"] == k
        assert row["principal_energy_chance"] == pytest.approx(k * k / (rows * cols))


def test_principal_energy_share_of_random_updates_is_at_chance():
    # For dW with i.i.d. entries, U_k^T dW V_k holds k^2 i.i.d. entries of the m n: rho_k = chi2(k^2) / (m n)
    # roughly, relative sd sqrt(2 / k^2) = 0.18 for k = 8; the mean of 20 draws has sd 0.04, tested at 0.15.
    k, (rows, cols) = 8, (64, 48)
    u, s, v = planted_svd(rows, cols, seed=1)
    base = compose(u, s, v)
    generator = torch.Generator().manual_seed(2)
    shares = [
        spectral_metrics(base, torch.randn(rows, cols, generator=generator) * 1e-3, top_k=k)[0][
            "principal_energy_share"
        ]
        for _ in range(20)
    ]
    chance = k * k / (rows * cols)
    assert sum(shares) / len(shares) == pytest.approx(chance, rel=0.15)


@pytest.mark.parametrize("degrees", [20.0, 1e-4])
def test_planted_rotation_of_the_top_subspace_is_recovered(degrees):
    k = 4
    u, s, v = planted_svd(40, 32, seed=3)
    base = compose(u, s, v)
    trained = compose(rotate(u, k, math.radians(degrees)), s, v)
    row, _ = spectral_metrics(base, trained - base, top_k=k)
    # Float32 weights carry ~1e-7 relative error, ~1e-5 degrees at most in these angles.
    assert row["principal_angle_max"] == pytest.approx(degrees, abs=5e-5)
    assert row["spectral_drift"] == pytest.approx(0.0, abs=1e-6)  # a rotation keeps the singular values


def test_principal_angle_is_the_larger_of_left_and_right(lowrank):
    k = 3
    u, s, v = planted_svd(90, 70, seed=4)
    base = compose(u, s, v)
    trained = compose(rotate(u, k, math.radians(5.0)), s, rotate(v, k, math.radians(12.0)))
    row, _ = spectral_metrics(base, trained - base, top_k=k)
    assert row["spectral_method"].startswith("lowrank")
    assert row["principal_angle_max"] == pytest.approx(12.0, abs=0.01)


@pytest.mark.parametrize("path", ["exact", "lowrank"])
@pytest.mark.parametrize("scale", [1.3, 0.7])
def test_spectral_drift_of_a_pure_scaling(scale, path, request):
    if path == "lowrank":
        request.getfixturevalue("lowrank")
    u, s, v = planted_svd(60, 50, seed=5)
    base = compose(u, s, v)
    row, values = spectral_metrics(base, base * (scale - 1.0), top_k=4)
    assert row["spectral_method"].startswith(path)
    assert row["spectral_drift"] == pytest.approx(abs(scale - 1.0), rel=1e-5)
    assert row["principal_angle_max"] == pytest.approx(0.0, abs=1e-3)
    assert values["change"].to_numpy() == pytest.approx((values["base"] * (scale - 1.0)).to_numpy(), rel=1e-5)


def test_no_update_has_no_geometry():
    base = compose(*planted_svd(30, 20, seed=6))
    row, _ = spectral_metrics(base, torch.zeros_like(base), top_k=4)
    assert row["spectral_drift"] == 0 and row["principal_angle_max"] == pytest.approx(0.0, abs=1e-6)
    assert math.isnan(row["principal_energy_share"])


def bf16_weights(n: int, seed: int = 7) -> torch.Tensor:
    """bf16-representable weights of both signs over several binades, none zero."""
    generator = torch.Generator().manual_seed(seed)
    values = torch.randn(n, generator=generator) * torch.logspace(-3, 1, n)
    return values.to(torch.bfloat16).float()


@pytest.mark.parametrize("fraction, vanishes", [(0.4, True), (0.6, False)])
def test_bf16_vanishing_and_half_ulp_sparsity(fraction, vanishes):
    base = bf16_weights(4096)
    ulp = 2 * bf16_half_ulp(base.clone())
    # Away from zero, so that no entry steps down across a binade, where the ULP below is half as wide.
    trained = base + torch.sign(base) * fraction * ulp
    row = tensor_metrics(base, trained, precision=True)
    assert row["update_sparsity_0"] == 0
    assert row["bf16_vanishing_share"] == (1.0 if vanishes else 0.0)
    assert row["update_sparsity_bf16_half_ulp"] == (1.0 if vanishes else 0.0)
    assert set(PRECISION_COLUMNS) <= set(row)


def test_bf16_half_ulp_matches_frexp():
    weights = torch.tensor([1.0, 1.5, -1.99, 2.0, 3e-3, -7e4, 1e-30])
    _, exponent = torch.frexp(weights)  # |w| in [2**(e-1), 2**e): bf16 ULP 2**(e-8), half 2**(e-9)
    assert torch.equal(bf16_half_ulp(weights.clone()), torch.pow(2.0, (exponent - 9).float()))
    assert bf16_half_ulp(torch.zeros(1)).item() == 2.0**-134  # bf16's subnormal spacing, halved


def test_precision_columns_streamed_in_chunks_match_a_reference(tmp_path):
    """fp32 weights (not bf16 values) with updates around one bf16 ULP: compare --spectral's streamed
    columns equal a float64 reference taken from frexp and torch's own bf16 rounding."""
    from safetensors.torch import save_file

    generator = torch.Generator().manual_seed(8)
    base = torch.randn(96, 80, generator=generator) * 0.05
    _, exponent = torch.frexp(base)
    half_ulp = torch.pow(2.0, (exponent - 9).float())
    update = torch.randn(96, 80, generator=generator) * half_ulp
    update[:10] = 0.0
    trained = base + update
    name = "model.layers.0.mlp.up_proj.weight"
    save_file({name: base}, str(tmp_path / "a.safetensors"))
    save_file({name: trained}, str(tmp_path / "b.safetensors"))
    comparison = compare_checkpoints(
        tmp_path / "a.safetensors", tmp_path / "b.safetensors", spectral=True, chunk_elements=500
    )
    row = comparison.parameters.iloc[0]
    delta = (trained - base).double()
    vanished = trained.to(torch.bfloat16) == base.to(torch.bfloat16)
    assert row["update_sparsity_bf16_half_ulp"] == pytest.approx(
        float((delta.abs() <= half_ulp).double().mean())
    )
    want = float((delta**2)[vanished].sum() / (delta**2).sum())
    assert 0.05 < want < 0.95  # both kinds present, so the test can fail either way
    assert row["bf16_vanishing_share"] == pytest.approx(want, rel=1e-6)
    component = comparison.components.iloc[0]
    assert component["bf16_vanishing_share"] == pytest.approx(want, rel=1e-6)


def test_spectral_memory_estimate_names_the_largest_matrix(tmp_path):
    *_, base_path, trained_path = planted_qwen2_pair(tmp_path, "pt", "safetensors")
    summary = compare_checkpoints(base_path, trained_path).summary  # stated without --spectral too
    assert summary["spectral_memory_matrix"] in ("model.embed_tokens.weight", "lm_head.weight")
    assert summary["spectral_memory_shape"] == [100, 32]
    assert summary["spectral_memory_bytes"] == spectral_memory_bytes(100, 32, 4, 8)
    # A 7B-sized bf16 matrix goes the randomised way: float32 W, dW and W + dW (12 bytes an entry) and
    # sketches, not the (m n) r of an exact SVD.
    big = spectral_memory_bytes(152064, 3584, 2, 8)
    assert 12 * 152064 * 3584 < big < 13 * 152064 * 3584


def test_cli_compare_spectral_json_emits_the_new_columns(tmp_path, capsys):
    *_, base_path, trained_path = planted_qwen2_pair(tmp_path, "pt", "safetensors")
    status = main(["compare", str(base_path), str(trained_path), "--spectral", "--json", "--top-k", "4"])
    captured = capsys.readouterr()
    assert status == 0, captured.err
    document = json.loads(captured.out)
    rows = {r["name"]: r for r in document["rows"]}
    assert set(SPECTRAL_COLUMNS) | set(PRECISION_COLUMNS) <= set(rows["model.norm.weight"])
    scaled = rows["model.layers.1.mlp.down_proj.weight"]  # W' = 1.1 W (test_compare_support)
    for column in (*NEW_SPECTRAL, *PRECISION_COLUMNS):
        assert scaled[column] is not None, column
    assert scaled["k"] == 4
    assert scaled["spectral_drift"] == pytest.approx(0.1, rel=1e-5)
    assert scaled["principal_angle_max"] == pytest.approx(0.0, abs=1e-2)
    assert scaled["principal_energy_chance"] == pytest.approx(16 / (32 * 64))
    assert rows["model.norm.weight"]["principal_angle_max"] is None  # a vector has no subspaces
    untouched = rows["model.layers.0.mlp.up_proj.weight"]
    assert untouched["principal_energy_share"] is None and untouched["bf16_vanishing_share"] is None
    assert untouched["update_sparsity_bf16_half_ulp"] == 1.0
    summary = document["summary"]
    assert summary["spectral"] is True and summary["spectral_memory_bytes"] > 0

    status = main(["compare", str(base_path), str(trained_path), "--json"])
    plain = json.loads(capsys.readouterr().out)
    assert status == 0 and not set(NEW_SPECTRAL) & set(plain["rows"][0])
    assert plain["summary"]["spectral_memory_bytes"] == summary["spectral_memory_bytes"]
