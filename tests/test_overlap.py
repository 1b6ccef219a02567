"""`overlap`: update masks of several runs of one base, on planted masks with known overlaps; and the CLI."""

from __future__ import annotations

import json
import math

import pandas as pd
import pytest
import torch
from test_compare_support import random_state_dict, tiny_model, write_checkpoint

from toolrl_analysis.analysis.components import map_parameters
from toolrl_analysis.analysis.diff import bf16_half_ulp, overlap_runs
from toolrl_analysis.cli import main
from toolrl_analysis.errors import CheckpointError, UserError

STEP = 0.01  # far above float32 rounding next to weights of ~0.05, so every planted change survives


@pytest.fixture(scope="module")
def base_state():
    return random_state_dict(tiny_model("qwen2"))


def random_masks(state, density: float, generator, exclude=None) -> dict[str, torch.Tensor]:
    masks = {}
    for name, tensor in state.items():
        mask = torch.rand(tensor.shape, generator=generator) < density
        masks[name] = mask & ~exclude[name] if exclude is not None else mask
    return masks


def random_signs(state, generator) -> dict[str, torch.Tensor]:
    return {n: torch.randint(0, 2, t.shape, generator=generator).float() * 2 - 1 for n, t in state.items()}


def apply(state, masks, signs, step=STEP) -> dict[str, torch.Tensor]:
    return {n: t + masks[n].float() * signs[n] * step for n, t in state.items()}


def save(state, path):
    return write_checkpoint(state, "pt", path)


def reference_counts(state, mask_a, mask_b, sign_a, sign_b) -> dict[tuple, dict[str, int]]:
    """Counts per (layer, component) straight from the planted masks, grouped by the components table."""
    mapping = map_parameters({n: t.shape for n, t in state.items()})
    out: dict[tuple, dict[str, int]] = {}
    for part in mapping.parts:
        a, b = mask_a[part.name], mask_b[part.name]
        both = a & b
        counts = out.setdefault(
            (part.layer, part.component), dict.fromkeys(("numel", "a", "b", "both", "agree"), 0)
        )
        counts["numel"] += a.numel()
        counts["a"] += int(a.sum())
        counts["b"] += int(b.sum())
        counts["both"] += int(both.sum())
        counts["agree"] += int((both & (sign_a[part.name] == sign_b[part.name])).sum())
    return out


@pytest.fixture(scope="module")
def planted(base_state, tmp_path_factory):
    """Runs A and B share a planted set S (a random 5% of every tensor, same signs) and add independent
    extras of density d = 0.1 each (outside S, random signs)."""
    root = tmp_path_factory.mktemp("overlap")
    generator = torch.Generator().manual_seed(11)
    shared = random_masks(base_state, 0.05, generator)
    extra_a = random_masks(base_state, 0.1, generator, exclude=shared)
    extra_b = random_masks(base_state, 0.1, generator, exclude=shared)
    shared_signs = random_signs(base_state, generator)
    signs_a = {
        n: torch.where(shared[n], shared_signs[n], s) for n, s in random_signs(base_state, generator).items()
    }
    signs_b = {
        n: torch.where(shared[n], shared_signs[n], s) for n, s in random_signs(base_state, generator).items()
    }
    mask_a = {n: shared[n] | extra_a[n] for n in base_state}
    mask_b = {n: shared[n] | extra_b[n] for n in base_state}
    paths = {
        "base": save(base_state, root / "base.pt"),
        "a": save(apply(base_state, mask_a, signs_a), root / "a.pt"),
        "b": save(apply(base_state, mask_b, signs_b), root / "b.pt"),
    }
    masks = {
        "shared": shared,
        "extra_a": extra_a,
        "a": mask_a,
        "b": mask_b,
        "signs_a": signs_a,
        "signs_b": signs_b,
    }
    return paths, masks, root


def test_counts_match_the_planted_masks_per_layer_and_component(base_state, planted):
    paths, masks, _ = planted
    overlap = overlap_runs(paths["base"], [paths["a"], paths["b"]], chunk_elements=700)
    want = reference_counts(base_state, masks["a"], masks["b"], masks["signs_a"], masks["signs_b"])
    rows = overlap.pairs
    assert len(rows) == len(want)
    for row in rows.itertuples():
        counts = want[(None if pd.isna(row.layer) else int(row.layer), row.component)]
        got = (row.numel, row.changed_a, row.changed_b, row.intersection, row.agree)
        assert got == (counts["numel"], counts["a"], counts["b"], counts["both"], counts["agree"]), row
        assert row.jaccard == pytest.approx(counts["both"] / (counts["a"] + counts["b"] - counts["both"]))
        assert row.overlap_ab_chance == pytest.approx(counts["b"] / counts["numel"])


def test_shared_set_gives_overlap_s_plus_rest_times_d(planted):
    """|A n B| / |A| = s + (1 - s) |E_A n E_B| / |E_A| with s = |S| / |A| the shared share of A; each
    extra of A lands in E_B with probability d, so the ratio is s + (1 - s) d up to the binomial spread
    of |E_A n E_B| ~ Bin(|E_A|, d): sd = (1 - s) sqrt(d (1 - d) / |E_A|), tested at 4 sd."""
    paths, masks, _ = planted
    total = overlap_runs(paths["base"], [paths["a"], paths["b"]]).totals.iloc[0]
    d = 0.1
    shared = sum(int(m.sum()) for m in masks["shared"].values())
    extras = sum(int(m.sum()) for m in masks["extra_a"].values())
    s = shared / (shared + extras)
    sd = (1 - s) * math.sqrt(d * (1 - d) / extras)
    assert total["overlap_ab"] == pytest.approx(s + (1 - s) * d, abs=4 * sd)
    assert total["overlap_ab"] > total["overlap_ab_chance"] + 20 * sd  # far above chance, as planted
    assert total["jaccard"] > 2 * total["jaccard_chance"]


def test_identical_runs_overlap_fully_and_agree_in_sign(planted):
    paths, _, _ = planted
    overlap = overlap_runs(paths["base"], [paths["a"], paths["a"]])
    assert overlap.totals["run_a"].iloc[0] != overlap.totals["run_b"].iloc[0]  # labels kept apart
    rows = overlap.pairs[overlap.pairs["changed_a"] > 0]
    assert len(rows) == len(overlap.pairs)
    for column in ("overlap_ab", "overlap_ba", "jaccard", "sign_agreement"):
        assert (rows[column] == 1.0).all(), column


def test_identical_runs_of_a_fused_gpt2_model(tmp_path):
    model = tiny_model("gpt2")
    base = random_state_dict(model)
    generator = torch.Generator().manual_seed(3)
    trained = apply(base, random_masks(base, 0.2, generator), random_signs(base, generator))
    base_path, run = save(base, tmp_path / "base.pt"), save(trained, tmp_path / "run.pt")
    overlap = overlap_runs(base_path, [run, run], chunk_elements=50)
    assert {"attn.q", "attn.k", "attn.v"} <= set(overlap.pairs["component"])  # c_attn split as in compare
    assert (overlap.pairs["jaccard"] == 1.0).all() and (overlap.pairs["sign_agreement"] == 1.0).all()


def test_independent_masks_overlap_at_chance(base_state, tmp_path):
    generator = torch.Generator().manual_seed(5)
    mask_a, mask_b = random_masks(base_state, 0.2, generator), random_masks(base_state, 0.3, generator)
    a = save(apply(base_state, mask_a, random_signs(base_state, generator)), tmp_path / "a.pt")
    b = save(apply(base_state, mask_b, random_signs(base_state, generator)), tmp_path / "b.pt")
    base = save(base_state, tmp_path / "base.pt")
    total = overlap_runs(base, [a, b]).totals.iloc[0]
    # Given the masks' sizes, |A n B| / |A| is a share of |A| draws that land in B w.p. d_B: 4 sd.
    for ratio, size, chance in (
        ("overlap_ab", "changed_a", "overlap_ab_chance"),
        ("overlap_ba", "changed_b", "overlap_ba_chance"),
    ):
        p = total[chance]
        assert total[ratio] == pytest.approx(p, abs=4 * math.sqrt(p * (1 - p) / total[size])), ratio
    assert total["sign_agreement"] == pytest.approx(0.5, abs=4 * math.sqrt(0.25 / total["intersection"]))
    assert total["jaccard"] == pytest.approx(total["jaccard_chance"], rel=0.1)


def test_bf16_tolerance_ignores_changes_below_half_an_ulp(base_state, tmp_path):
    generator = torch.Generator().manual_seed(6)
    small, large = random_masks(base_state, 0.3, generator), random_masks(base_state, 0.2, generator)
    large = {n: m & ~small[n] for n, m in large.items()}
    trained = {}
    for name, weight in base_state.items():
        ulp = 2 * bf16_half_ulp(weight.clone())
        trained[name] = weight + small[name] * 0.25 * ulp + large[name] * 2.0 * ulp
    base, run = save(base_state, tmp_path / "base.pt"), save(trained, tmp_path / "run.pt")
    n_small = sum(int(m.sum()) for m in small.values())
    n_large = sum(int(m.sum()) for m in large.values())
    exact = overlap_runs(base, [run, run]).totals.iloc[0]
    bf16 = overlap_runs(base, [run, run], tolerance="bf16").totals.iloc[0]
    assert exact["changed_a"] == n_small + n_large
    assert bf16["changed_a"] == n_large
    assert overlap_runs(base, [run, run], tolerance=1.0).totals.iloc[0]["changed_a"] == 0


def test_bad_inputs_are_user_errors(base_state, planted):
    paths, _, root = planted
    with pytest.raises(UserError, match="at least two"):
        overlap_runs(paths["base"], [paths["a"]])
    with pytest.raises(UserError, match="tolerance"):
        overlap_runs(paths["base"], [paths["a"], paths["b"]], tolerance="-1")
    other = dict(base_state)
    other["model.embed_tokens.weight"] = torch.randn(120, 32)  # another vocabulary
    with pytest.raises(CheckpointError, match="shape mismatch"):
        overlap_runs(paths["base"], [paths["a"], save(other, root / "vocab.pt")])


def run_cli(capsys, *argv) -> tuple[int, str, str]:
    status = main(["overlap", *map(str, argv)])
    captured = capsys.readouterr()
    return status, captured.out, captured.err


def assert_one_line_error(status: int, err: str, *fragments: str) -> None:
    assert status == 2 and "Traceback" not in err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    for fragment in fragments:
        assert fragment in lines[0], (fragment, lines[0])


def test_cli_json_and_files(planted, capsys, tmp_path):
    paths, _, _ = planted
    out = tmp_path / "out"
    status, stdout, err = run_cli(capsys, paths["base"], paths["a"], paths["b"], "--json", "--out", out)
    assert status == 0, err
    document = json.loads(stdout)
    row = document["rows"][0]
    for column in ("layer", "component", "run_a", "run_b", "overlap_ab", "overlap_ab_chance", "overlap_ba",
                   "overlap_ba_chance", "jaccard", "jaccard_chance", "sign_agreement", "sign_agreement_chance"):  # fmt: skip
        assert column in row, column
    assert document["summary"]["tolerance"] == 0.0 and len(document["summary"]["totals"]) == 1
    for name in ("overlap.csv", "overlap_totals.csv", "overlap.json", "overlap.png"):
        assert (out / name).is_file(), name
    status, stdout, err = run_cli(capsys, paths["base"], paths["a"], paths["b"], "--select", "mlp@lower")
    assert status == 0, err
    assert "update overlap" in stdout and "sign agree" in stdout
    status, stdout, err = run_cli(
        capsys, paths["base"], paths["a"], paths["b"], "--select", "mlp@lower", "--json"
    )
    rows = json.loads(stdout)["rows"]
    assert {r["component"] for r in rows} == {"mlp.gate", "mlp.up", "mlp.down"} and {
        r["layer"] for r in rows
    } == {0}


def test_cli_different_bases_is_one_line(base_state, planted, capsys):
    paths, _, root = planted
    other = dict(base_state)
    other["model.embed_tokens.weight"] = torch.randn(120, 32)
    vocab = save(other, root / "vocab-cli.pt")
    status, _, err = run_cli(capsys, paths["base"], paths["a"], vocab)
    assert_one_line_error(status, err, "vocab-cli.pt", "shape mismatch", "model.embed_tokens.weight")
    gpt2 = save(random_state_dict(tiny_model("gpt2")), root / "gpt2.pt")
    assert_one_line_error(*run_cli(capsys, paths["base"], paths["a"], gpt2)[::2], "different architectures")


@pytest.mark.parametrize("runs", [0, 1])
def test_cli_fewer_than_two_runs_is_one_line(planted, capsys, runs):
    paths, _, _ = planted
    argv = [paths["base"], paths["a"]][: 1 + runs]
    assert_one_line_error(*run_cli(capsys, *argv)[::2], "at least two trained runs")


def test_cli_bad_tolerance_is_one_line(planted, capsys):
    paths, _, _ = planted
    status, _, err = run_cli(capsys, paths["base"], paths["a"], paths["b"], "--tolerance", "tiny")
    assert_one_line_error(status, err, "--tolerance", "bf16")


def test_summed_rows_keep_the_chance_level_of_tensors_with_different_densities():
    """Two tensors in one band, independent masks in each, one dense (0.9) and one sparse (0.1): the band's
    overlap is what independence gives, (0.81 + 0.01) / (0.9 + 0.1) = 0.82, and its chance level says so.
    Pooled densities (0.5) would have called it far above chance."""
    from toolrl_analysis.analysis.diff.overlap import COUNT_COLUMNS, overlap_ratios

    generator = torch.Generator().manual_seed(0)
    rows = []
    for density in (0.9, 0.1):
        a, b = (torch.rand(200_000, generator=generator) < density for _ in range(2))
        changed_a, changed_b, both = int(a.sum()), int(b.sum()), int((a & b).sum())
        rows.append({"numel": 200_000, "changed_a": changed_a, "changed_b": changed_b, "intersection": both,
                     "agree": both, "expected": changed_a * changed_b / 200_000})  # fmt: skip
    band = overlap_ratios(pd.DataFrame(rows)[list(COUNT_COLUMNS)].sum().to_frame().T).iloc[0]
    assert band["overlap_ab"] == pytest.approx(0.82, abs=0.005)
    assert band["overlap_ab_chance"] == pytest.approx(band["overlap_ab"], abs=0.005)
    assert band["jaccard_chance"] == pytest.approx(band["jaccard"], abs=0.005)
    assert band["density_b"] == pytest.approx(0.5, abs=0.005)  # what a pooled-density chance would have used
