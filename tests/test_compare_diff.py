"""Planted-change tests: the diff finds exactly the updates we put in, in every checkpoint format."""

from __future__ import annotations

import math

import pytest
import torch
from test_compare_support import (
    ARCHITECTURES,
    FORMATS,
    LAYERS,
    expected_metrics,
    plant_update,
    planted_expectations,
    random_state_dict,
    suffix,
    tiny_model,
    write_checkpoint,
)

from toolrl_analysis.analysis.diff import (
    SPARSITY_COLUMNS,
    compare_checkpoints,
    effective_rank,
    spectral_metrics,
    tensor_metrics,
)

CHANGE_COLUMNS = ("update_norm", "relative_frobenius_change", "mean_abs_update", "max_abs_update")


def close(got: float, want: float, tolerance: float = 1e-6) -> bool:
    return abs(got - want) <= tolerance * max(1.0, abs(want))


@pytest.fixture(scope="module")
def models():
    return {arch: tiny_model(arch) for arch in ARCHITECTURES}


@pytest.fixture(scope="module")
def pairs(models):
    out = {}
    for arch, model in models.items():
        base = random_state_dict(model)
        out[arch] = (base, plant_update(arch, base))
    return out


@pytest.fixture(scope="module")
def written(models, pairs, tmp_path_factory):
    """{(arch, fmt): (base_path, trained_path)} for every architecture and format."""
    root = tmp_path_factory.mktemp("checkpoints")
    paths = {}
    for arch, (base, trained) in pairs.items():
        for fmt in FORMATS:
            base_path = write_checkpoint(base, fmt, root / f"{arch}-{fmt}-base{suffix(fmt)}", models[arch])
            trained_path = write_checkpoint(
                trained, fmt, root / f"{arch}-{fmt}-trained{suffix(fmt)}", models[arch]
            )
            paths[(arch, fmt)] = (base_path, trained_path)
    return paths


def assert_planted(comparison, arch, pairs):
    base, trained = pairs[arch]
    expected = planted_expectations(arch, base, trained)
    rows = comparison.parameters
    for (name, part), want in expected.items():
        row = rows[(rows["name"] == name) & (rows["part"] == part)]
        assert len(row) == 1, (name, part)
        row = row.iloc[0]
        for column, value in want.items():
            assert close(float(row[column]), value), (name, part, column, float(row[column]), value)
    others = rows[[(n, p) not in expected for n, p in zip(rows["name"], rows["part"], strict=True)]]
    assert len(others) == len(rows) - len(expected)
    for column in CHANGE_COLUMNS:
        assert (others[column] == 0).all(), others.loc[others[column] != 0, ["name", "part", column]]
    for column in SPARSITY_COLUMNS:
        assert (others[column] == 1).all()
    assert (others["cosine_similarity"] == 1).all()


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_planted_changes_in_every_format(arch, fmt, written, pairs):
    base_path, trained_path = written[(arch, fmt)]
    comparison = compare_checkpoints(base_path, trained_path)
    assert_planted(comparison, arch, pairs)
    assert comparison.summary["n_layers"] == LAYERS
    assert comparison.summary["n_changed_rows"] == 2
    assert comparison.summary["unmapped"] == []


@pytest.mark.parametrize(
    "base_fmt, trained_fmt",
    [
        ("pt", "safetensors"),
        ("safetensors", "hf-sharded"),
        ("pt-policy", "hf-single"),
        ("hf-bin", "pt-wrapped"),
    ],
)
@pytest.mark.parametrize("arch", ["qwen2", "gpt2"])
def test_compare_across_formats(arch, base_fmt, trained_fmt, written, pairs):
    comparison = compare_checkpoints(written[(arch, base_fmt)][0], written[(arch, trained_fmt)][1])
    assert_planted(comparison, arch, pairs)


def test_gpt2_fused_qkv_is_split_into_q_k_v(written):
    comparison = compare_checkpoints(*written[("gpt2", "safetensors")])
    rows = comparison.parameters
    fused = rows[(rows["name"] == "transformer.h.3.attn.c_attn.weight")]
    assert list(fused["part"]) == ["q", "k", "v"]
    assert list(fused["component"]) == ["attn.q", "attn.k", "attn.v"]
    assert list(fused["shape"]) == ["32x32"] * 3
    assert fused.set_index("part").loc["k", "update_norm"] == 0
    bias = rows[rows["name"] == "transformer.h.3.attn.c_attn.bias"]
    assert list(bias["component"]) == ["attn.q", "attn.k", "attn.v"] and set(bias["role"]) == {"bias"}


def test_component_table_and_bands(written, pairs):
    comparison = compare_checkpoints(*written[("qwen2", "safetensors")])
    components = comparison.components.set_index(["layer", "component"])
    # attn.q at layer 3 aggregates weight and bias: the weight's update over the norm of both.
    base, trained = pairs["qwen2"]
    w = torch.cat(
        [
            base["model.layers.3.self_attn.q_proj.weight"].reshape(-1),
            base["model.layers.3.self_attn.q_proj.bias"],
        ]
    )
    t = torch.cat(
        [
            trained["model.layers.3.self_attn.q_proj.weight"].reshape(-1),
            trained["model.layers.3.self_attn.q_proj.bias"],
        ]
    )
    want = expected_metrics(w, t)
    row = components.loc[(3, "attn.q")]
    assert row["n_parameters"] == 2
    for column in ("relative_frobenius_change", "mean_abs_update", "cosine_similarity", "update_sparsity_0"):
        assert close(row[column], want[column]), column
    assert close(components["update_norm_share"].sum(), 1.0)
    # 4 blocks: thirds are {0}, {1, 2}, {3}. The mlp update is in the middle, the attn update on top.
    bands = comparison.bands.set_index(["family", "band"])
    assert bands.loc[("mlp", "middle"), "share_of_family"] == pytest.approx(1.0)
    assert bands.loc[("attn", "upper"), "share_of_family"] == pytest.approx(1.0)
    assert bands.loc[("norm", "lower"), "share_of_family"] == 0
    down, query = (
        expected_metrics(base[n], trained[n])["update_norm"] ** 2
        for n in ("model.layers.1.mlp.down_proj.weight", "model.layers.3.self_attn.q_proj.weight")
    )
    assert bands.loc[("all", "middle"), "share_of_total"] == pytest.approx(down / (down + query), rel=1e-6)
    assert list(bands.loc["all", "layers"]) == ["0-0", "1-2", "3-3"]


def test_selector_restricts_the_rows(written):
    comparison = compare_checkpoints(*written[("llama", "pt")], select="mlp@lower, embed")
    rows = comparison.parameters
    assert set(rows["component"]) == {"mlp.gate", "mlp.up", "mlp.down", "embed"}
    assert set(rows["layer"].dropna()) == {0}  # the lower third of 4 blocks


def test_chunking_and_threads_do_not_change_results(written):
    paths = written[("gpt2", "hf-sharded")]
    reference = compare_checkpoints(*paths, chunk_elements=1 << 20, workers=1).parameters
    for chunk, workers in ((7, 3), (100, 2), (64, 0)):
        other = compare_checkpoints(*paths, chunk_elements=chunk, workers=workers).parameters
        assert list(other["name"]) == list(reference["name"])
        for column in ("update_norm", "base_norm", "mean_abs_update", "max_abs_update", *SPARSITY_COLUMNS):
            assert other[column].to_numpy() == pytest.approx(
                reference[column].to_numpy(), rel=1e-6, abs=1e-12
            )


def test_bf16_updates_are_computed_in_float32(tmp_path):
    from safetensors.torch import save_file

    generator = torch.Generator().manual_seed(0)
    base = (torch.randn(64, 48, generator=generator) * 0.02).to(torch.bfloat16)
    # Updates far below bf16's resolution relative to 1.0, but representable next to the small weights.
    trained = (base.float() + torch.randn(64, 48, generator=generator) * 1e-4).to(torch.bfloat16)
    name = "model.layers.0.mlp.up_proj.weight"
    save_file({name: base}, str(tmp_path / "a.safetensors"))
    save_file({name: trained}, str(tmp_path / "b.safetensors"))
    row = compare_checkpoints(tmp_path / "a.safetensors", tmp_path / "b.safetensors").parameters.iloc[0]
    want = expected_metrics(base, trained)
    assert row["dtype"] == "bfloat16"
    assert want["update_norm"] > 0
    for column, value in want.items():
        assert close(float(row[column]), value), column


def test_tensor_metrics_of_identical_and_scaled_tensors():
    weight = torch.randn(10, 10)
    same = tensor_metrics(weight, weight.clone())
    assert same["relative_frobenius_change"] == 0 and same["cosine_similarity"] == 1
    assert same["update_sparsity_0"] == 1
    scaled = tensor_metrics(weight, -weight)
    assert scaled["relative_frobenius_change"] == pytest.approx(2.0)
    assert scaled["cosine_similarity"] == pytest.approx(-1.0)
    zero = tensor_metrics(torch.zeros(3), torch.ones(3))
    assert math.isinf(zero["relative_frobenius_change"]) and math.isnan(zero["cosine_similarity"])


def test_spectral_metrics_of_a_rank_one_update():
    generator = torch.Generator().manual_seed(0)
    weight = torch.randn(40, 30, generator=generator)
    u, v = torch.randn(40, 1, generator=generator), torch.randn(1, 30, generator=generator)
    update = u @ v
    row, singular_values = spectral_metrics(weight, update, top_k=5)
    assert row["spectral_method"] == "exact"
    assert row["update_spectral_norm"] == pytest.approx(float(u.norm() * v.norm()), rel=1e-5)
    assert row["update_stable_rank"] == pytest.approx(1.0, rel=1e-5)
    assert row["update_effective_rank"] == pytest.approx(1.0, abs=1e-3)
    exact_base = torch.linalg.svdvals(weight.double())[:5]
    exact_trained = torch.linalg.svdvals((weight + update).double())[:5]
    assert singular_values["base"].to_numpy() == pytest.approx(exact_base.numpy(), rel=1e-6)
    assert singular_values["change"].to_numpy() == pytest.approx(
        (exact_trained - exact_base).numpy(), abs=1e-5
    )
    assert row["sigma1_relative_change"] == pytest.approx(
        float((exact_trained[0] - exact_base[0]) / exact_base[0]), rel=1e-5
    )


def test_spectral_lowrank_path_matches_exact(monkeypatch):
    from toolrl_analysis.analysis.diff import metrics

    generator = torch.Generator().manual_seed(0)
    # A weight with a decaying spectrum and a rank-3 update: the randomised path must find both.
    left, _ = torch.linalg.qr(torch.randn(300, 200, generator=generator))
    right, _ = torch.linalg.qr(torch.randn(200, 200, generator=generator))
    weight = (left * torch.logspace(1, -2, 200)) @ right.T
    update = torch.randn(300, 3, generator=generator) @ torch.randn(3, 200, generator=generator) * 0.01
    exact, _ = spectral_metrics(weight, update, top_k=4)
    monkeypatch.setattr(metrics, "EXACT_SVD_MAX_ELEMENTS", 100)
    approximate, values = spectral_metrics(weight, update, top_k=4)
    assert approximate["spectral_method"].startswith("lowrank")
    for key in ("update_spectral_norm", "update_stable_rank", "update_effective_rank"):
        assert approximate[key] == pytest.approx(exact[key], rel=1e-3), key
    assert approximate["sigma1_relative_change"] == pytest.approx(
        exact["sigma1_relative_change"], rel=1e-2, abs=1e-6
    )
    assert len(values) == 4


def test_spectral_columns_in_comparison(written):
    comparison = compare_checkpoints(*written[("gpt2", "pt")], spectral=True, top_k=3)
    rows = comparison.parameters.set_index(["name", "part"])
    scaled = rows.loc[("transformer.h.1.mlp.c_proj.weight", "")]
    # W' = 1.1 W: the update is 0.1 W, so its stable rank is W's and sigma_1 grows by exactly 10%.
    assert scaled["sigma1_relative_change"] == pytest.approx(0.1, rel=1e-5)
    assert scaled["topk_singular_values_relative_change"] == pytest.approx(0.1, rel=1e-5)
    untouched = rows.loc[("transformer.h.3.attn.c_attn.weight", "k")]
    assert untouched["update_spectral_norm"] == 0 and untouched["update_effective_rank"] == 0
    assert math.isnan(rows.loc[("transformer.h.0.ln_1.weight", ""), "update_spectral_norm"])
    assert set(comparison.singular_values["index"]) == {1, 2, 3}


def test_effective_rank_of_known_spectra():
    assert effective_rank(torch.tensor([1.0, 1.0, 1.0, 1.0])) == pytest.approx(4.0)
    assert effective_rank(torch.tensor([2.0, 0.0])) == pytest.approx(1.0)
    assert effective_rank(torch.zeros(3)) == 0.0


def test_outputs_written(written, tmp_path):
    comparison = compare_checkpoints(*written[("qwen2", "pt")])
    files = {p.name for p in comparison.write(tmp_path / "out")}
    for stem in ("parameters", "components", "bands"):
        assert {f"{stem}.csv", f"{stem}.parquet"} <= files
    assert {"heatmap.png", "layers.png", "bands.png", "summary.json"} <= files
    import pandas as pd

    frame = pd.read_parquet(tmp_path / "out" / "parameters.parquet")
    assert len(frame) == len(comparison.parameters)
    assert (tmp_path / "out" / "heatmap.png").stat().st_size > 1000


def test_head_tied_on_both_sides_is_one_parameter(written):
    # GPT-2 ties lm_head to wte: shared storage in the .pt, left out of the HF directory.
    comparison = compare_checkpoints(written[("gpt2", "pt-policy")][0], written[("gpt2", "hf-single")][1])
    assert "lm_head.weight" not in set(comparison.parameters["name"])
    assert comparison.summary["tied_both_sides"] == {"lm_head.weight": "transformer.wte.weight"}
    # Tied on one side only (the safetensors file stores its own copy): compared as a tensor of its own.
    mixed = compare_checkpoints(written[("gpt2", "pt")][0], written[("gpt2", "safetensors")][1])
    assert "lm_head.weight" in set(mixed.parameters["name"])
