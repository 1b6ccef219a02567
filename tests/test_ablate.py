"""Ablation's splice operations, size-matched controls, streamed --save and bootstrap: bitwise exactness
on tiny real-architecture models with a planted update, and the numbers by hand."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch
from test_compare_support import planted_qwen2_pair, random_state_dict, tiny_model, write_checkpoint

from toolrl_analysis.analysis.ablate import (
    Operation,
    Region,
    Splice,
    Step,
    compile_operations,
    draw_controls,
    gain_retained,
    save_spliced,
    splice_in_memory,
    stratified_resamples,
    update_energies,
)
from toolrl_analysis.analysis.ablate.bootstrap import Estimate
from toolrl_analysis.analysis.ablate.control import energy_pairs_in_memory, energy_ratio_text
from toolrl_analysis.analysis.ablate.variants import pairs_in_memory
from toolrl_analysis.analysis.checkpoints import open_checkpoint, open_pair
from toolrl_analysis.analysis.diff import plan_pairs
from toolrl_analysis.errors import CheckpointError, SelectorError


class Pair:
    """A planted pair opened lazily, planned, and read into memory once."""

    def __init__(self, base_path, trained_path, base_state, trained_state):
        self.base_path, self.trained_path = base_path, trained_path
        self.base_state, self.trained_state = base_state, trained_state
        self.base, self.trained = open_pair(base_path, trained_path)
        self.plan = plan_pairs(self.base, self.trained)
        self.pairs = pairs_in_memory(self.base, self.trained, self.plan)

    def splice(self, *operations: Operation) -> dict[str, torch.Tensor]:
        return splice_in_memory(compile_operations(self.plan, operations), self.pairs)[0]


def spread_update(base: dict[str, torch.Tensor], seed: int = 3) -> dict[str, torch.Tensor]:
    """An update on every tensor, each at its own scale (log-uniform over two decades), as after training;
    a few entries take unrelated values of any magnitude, where base + (trained - base) is not
    trained in floating point, so only a copy is bitwise exact."""
    generator = torch.Generator().manual_seed(seed)
    trained = {}
    for name, tensor in base.items():
        scale = 10 ** float(torch.empty(()).uniform_(-3, -1, generator=generator))
        trained[name] = tensor + scale * torch.randn(tensor.shape, generator=generator)
        wild = torch.rand(tensor.shape, generator=generator) < 0.05
        magnitude = 10 ** (8 * torch.rand(int(wild.sum()), generator=generator) - 4)
        trained[name][wild] = magnitude * torch.randn(int(wild.sum()), generator=generator)
    return trained


@pytest.fixture(scope="module")
def planted(tmp_path_factory):
    root = tmp_path_factory.mktemp("planted")
    base, trained, base_path, trained_path = planted_qwen2_pair(root, "pt", "safetensors")
    return Pair(base_path, trained_path, base, trained)


@pytest.fixture(scope="module")
def spread(tmp_path_factory):
    root = tmp_path_factory.mktemp("spread")
    model = tiny_model("qwen2")
    base = random_state_dict(model)
    trained = spread_update(base)
    base_path = write_checkpoint(base, "safetensors", root / "base.safetensors")
    trained_path = write_checkpoint(trained, "safetensors", root / "trained.safetensors")
    return Pair(base_path, trained_path, base, trained)


def assert_bitwise(found: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]) -> None:
    assert set(found) == set(expected)
    for name, tensor in found.items():
        assert tensor.dtype == expected[name].dtype, name
        assert torch.equal(tensor, expected[name]), name


# ---------------------------------------------------------------------------------------------
# Splicing: bitwise identities
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("fixture", ["planted", "spread"])
def test_revert_all_is_base_and_transplant_all_is_trained(fixture, request):
    pair = request.getfixturevalue(fixture)
    assert_bitwise(pair.splice(Operation("revert", "all")), pair.base_state)
    assert_bitwise(pair.splice(Operation("transplant", "all")), pair.trained_state)


@pytest.mark.parametrize("subset", ["mlp@lower", "attn.q@3", "mlp.down@1,embed", "norm"])
def test_revert_then_transplant_is_trained_and_scale_one_is_transplant(spread, subset):
    assert_bitwise(
        spread.splice(Operation("revert", subset), Operation("transplant", subset)), spread.trained_state
    )
    assert_bitwise(
        spread.splice(Operation("scale", subset, 1.0)), spread.splice(Operation("transplant", subset))
    )
    assert_bitwise(spread.splice(Operation("scale", subset, 0.0)), spread.base_state)


def test_a_revert_takes_exactly_the_subset_from_the_base(spread):
    found = spread.splice(Operation("revert", "mlp@lower"))
    for name, tensor in found.items():
        lower_mlp = ".mlp." in name and int(name.split(".")[2]) == 0  # block 0: the lower third of 4
        source = spread.base_state if lower_mlp else spread.trained_state
        assert torch.equal(tensor, source[name]), name


def test_scale_is_base_plus_alpha_times_the_update(spread):
    found = spread.splice(Operation("scale", "attn.v@2", 0.25), Operation("revert", "attn.v@2,norm@0"))
    name = "model.layers.2.self_attn.v_proj.weight"
    assert torch.equal(found[name], spread.base_state[name])  # a later operation overwrites an earlier one
    found = spread.splice(Operation("scale", "attn.v@2", -0.5))
    expected = spread.base_state[name] - 0.5 * (spread.trained_state[name] - spread.base_state[name])
    assert torch.allclose(found[name], expected, rtol=1e-6, atol=1e-7)
    other = "model.layers.1.self_attn.v_proj.weight"
    assert torch.equal(found[other], spread.base_state[other])  # a first scale starts from the base


def test_gpt2_fused_qkv_reverts_only_its_query_third(tmp_path):
    model = tiny_model("gpt2")
    base = random_state_dict(model)
    trained = spread_update(base)
    pair = Pair(
        write_checkpoint(base, "pt", tmp_path / "base.pt"),
        write_checkpoint(trained, "pt", tmp_path / "trained.pt"),
        base,
        trained,
    )
    found = pair.splice(Operation("revert", "attn.q@1"))
    weight, bias = "transformer.h.1.attn.c_attn.weight", "transformer.h.1.attn.c_attn.bias"
    assert torch.equal(found[weight][:, :32], base[weight][:, :32])
    assert torch.equal(found[weight][:, 32:], trained[weight][:, 32:])
    assert torch.equal(found[bias][:32], base[bias][:32])
    assert torch.equal(found[bias][32:], trained[bias][32:])


def test_bf16_splices_stay_bitwise(tmp_path):
    model = tiny_model("llama")
    base = random_state_dict(model, dtype=torch.bfloat16)
    trained = {
        k: v.to(torch.bfloat16) for k, v in spread_update({k: v.float() for k, v in base.items()}).items()
    }
    pair = Pair(
        write_checkpoint(base, "safetensors", tmp_path / "b.safetensors"),
        write_checkpoint(trained, "pt", tmp_path / "t.pt"),
        base,
        trained,
    )
    assert_bitwise(pair.splice(Operation("revert", "all")), base)
    assert_bitwise(pair.splice(Operation("revert", "mlp"), Operation("transplant", "mlp")), trained)


def test_selector_that_matches_nothing_names_the_components_and_blocks(planted):
    with pytest.raises(SelectorError) as info:
        compile_operations(planted.plan, [Operation("revert", "norm.q")])
    message = str(info.value)
    assert "selects no parameters" in message and "mlp.down" in message and "blocks 0-3" in message
    with pytest.raises(SelectorError, match=r"out of range.*this model has components attn\.q"):
        compile_operations(planted.plan, [Operation("revert", "mlp@7")])


# ---------------------------------------------------------------------------------------------
# Matched controls
# ---------------------------------------------------------------------------------------------
def _like(pair: Pair, part) -> tuple[str, tuple[int, ...]]:
    return part.component.split(".")[0], tuple(part.take(pair.base_state[part.name]).shape)


@pytest.mark.parametrize("subset", ["mlp@lower", "attn@upper", "attn.k@1", "mlp.up@0,mlp.down@3"])
def test_controls_match_family_shape_and_count_in_other_layers_and_differ_across_draws(spread, subset):
    energies = update_energies(energy_pairs_in_memory(spread.pairs))
    parts = spread.plan.mapping.select(subset)
    target = sum(p.take(spread.base_state[p.name]).numel() for p in parts)
    found = draw_controls(subset, parts, energies, draws=20, seed=0)
    assert found.valid and len(found.controls) >= 2
    layers = {p.layer for p in parts}
    signatures = set()
    for control in found.controls:
        drawn = [r.part for rs in control.regions.values() for r in rs]
        assert control.parameters == target
        assert sorted(_like(spread, p) for p in drawn) == sorted(_like(spread, p) for p in parts)
        assert not {p.layer for p in drawn} & layers  # never from the subset's own blocks
        assert all(r.rows is None and r.partial_row is None for rs in control.regions.values() for r in rs)
        splice = Splice("control", "trained", [Step("revert control", 0.0, control.regions)])
        assert splice_in_memory(splice, spread.pairs)[1].parameters == target
        signatures.add(frozenset((p.name, p.part) for p in drawn))
    assert len(signatures) == len(found.controls)  # every draw is a different set of parts
    again = draw_controls(subset, parts, energies, draws=20, seed=0)
    other = draw_controls(subset, parts, energies, draws=20, seed=1)
    assert [c.regions.keys() for c in again.controls] == [c.regions.keys() for c in found.controls]
    assert [c.regions.keys() for c in other.controls] != [c.regions.keys() for c in found.controls]


@pytest.mark.parametrize(
    ("subset", "reason"),
    [
        (
            "mlp@middle",
            "its complement",
        ),  # blocks 1-2 of 4: the like parts outside are exactly blocks 0 and 3
        ("mlp@0-2", "the blocks outside it hold"),  # needs 3 blocks' MLPs, one block is left
        ("embed", "outside the blocks"),
        ("norm", "outside the blocks"),  # the final norm has no like part
    ],
)
def test_a_subset_without_a_valid_control_says_why_and_never_takes_the_whole_pool(spread, subset, reason):
    energies = update_energies(energy_pairs_in_memory(spread.pairs))
    found = draw_controls(subset, spread.plan.mapping.select(subset), energies, draws=20)
    assert not found.valid and found.controls == [] and reason in found.reason


def test_energy_ratio_text_reads_nan_and_null_alike():
    assert energy_ratio_text(1.234) == "1.23x the subset's"
    # a subset the run never moved: the ratio is NaN in memory and null once read back from ablation.json
    assert (
        energy_ratio_text(float("nan")) == energy_ratio_text(None) == "undefined (the subset did not change)"
    )


def test_update_energies_stream_in_chunks_like_whole_tensors(spread):
    from toolrl_analysis.analysis.diff import iter_pairs

    whole = update_energies(energy_pairs_in_memory(spread.pairs))
    chunked = update_energies(
        iter_pairs(spread.base, spread.trained, spread.plan.matched, chunk_elements=100)
    )
    assert whole.keys() == chunked.keys()
    for key, energy in whole.items():
        assert chunked[key].numel == energy.numel
        assert chunked[key].energy == pytest.approx(energy.energy, rel=1e-12)
        if energy.row_energy is not None:
            np.testing.assert_allclose(chunked[key].row_energy, energy.row_energy, rtol=1e-12)


# ---------------------------------------------------------------------------------------------
# Streamed --save
# ---------------------------------------------------------------------------------------------
def control_splice(pair: Pair, subset: str) -> Splice:
    """Rows of the subset's matrices, every third one, and the first entries of one more row: the row masks
    and the row cut mid-way that the splice machinery supports."""
    regions: dict[str, list[Region]] = {}
    for part in pair.plan.mapping.select(subset):
        tensor = pair.base_state[part.name]
        if tensor.dim() != 2:
            continue
        rows = np.arange(0, tensor.shape[0] - 1, 3)
        regions.setdefault(part.name, []).append(
            Region(part, rows=rows, partial_row=tensor.shape[0] - 1, partial_count=tensor.shape[1] // 2)
        )
    return Splice(f"revert rows({subset})", "trained", [Step("revert rows", 0.0, regions)])


def mixed_splice(pair: Pair) -> Splice:
    """base + 0.3 * update on every MLP, then the trained values on a control's rows (some inside MLPs):
    whole tensors hold two coefficients, some of their chunks only one."""
    scaled = compile_operations(pair.plan, [Operation("scale", "mlp", 0.3)])
    rows = control_splice(pair, "attn.k@1").steps[0].regions
    return Splice("mixed", "base", [*scaled.steps, Step("transplant rows", 1.0, rows)])


@pytest.mark.parametrize("destination", ["hybrid.pt", "hybrid.safetensors", "hf-sharded"])
def test_streamed_save_equals_the_in_memory_splice(spread, tmp_path, destination):
    splices = [
        compile_operations(spread.plan, [Operation("revert", "mlp@lower")]),
        compile_operations(spread.plan, [Operation("scale", "attn", 0.5), Operation("revert", "attn.q@0")]),
        control_splice(spread, "mlp@upper"),  # row masks
        control_splice(spread, "attn.k@1"),  # and a row cut mid-way
        mixed_splice(spread),  # blended chunks beside chunks holding two coefficients
    ]
    for index, splice in enumerate(splices):
        path = tmp_path / f"{index}-{destination}"
        summary = save_spliced(
            spread.base, spread.trained, spread.plan, splice, path, shard_bytes=40_000, chunk_elements=300
        )
        expected, account = splice_in_memory(splice, spread.pairs)
        assert summary["parameters_changed"] == account.parameters
        with open_checkpoint(path) as saved:
            assert_bitwise(saved.state_dict(), expected)
        if destination == "hf-sharded":
            shards = sorted(p.name for p in path.glob("*.safetensors"))
            assert len(shards) > 3 and (path / "model.safetensors.index.json").is_file()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary left behind


def test_save_falls_back_to_read_and_write_without_an_in_kernel_copy(spread, tmp_path, monkeypatch):
    import errno

    def refuse(*args):
        raise OSError(errno.EXDEV, "cross-device")

    monkeypatch.setattr(os, "copy_file_range", refuse)
    splice = compile_operations(spread.plan, [Operation("revert", "attn@upper")])
    save_spliced(spread.base, spread.trained, spread.plan, splice, tmp_path / "out", chunk_elements=500)
    with open_checkpoint(tmp_path / "out") as saved:
        assert_bitwise(saved.state_dict(), splice_in_memory(splice, spread.pairs)[0])


def test_saved_policy_keeps_its_tie_config_and_tokenizer(tmp_path):
    """From our policy .pt (tied head): a .pt keeps the tie and the policy keys; a directory drops the
    duplicate head as Hugging Face does and carries config and tokenizer files."""
    model = tiny_model("qwen2")
    base = random_state_dict(model)
    trained = spread_update(base)
    for state in (base, trained):
        state["lm_head.weight"] = state["model.embed_tokens.weight"]
    write_checkpoint(base, "pt-policy", tmp_path / "base.pt", model)
    write_checkpoint(trained, "pt-policy", tmp_path / "trained.pt", model)
    pair = Pair(tmp_path / "base.pt", tmp_path / "trained.pt", base, trained)
    splice = compile_operations(pair.plan, [Operation("revert", "embed,mlp@0")])
    expected, _ = splice_in_memory(splice, pair.pairs)
    save_spliced(pair.base, pair.trained, pair.plan, splice, tmp_path / "out.pt")
    document = torch.load(tmp_path / "out.pt", weights_only=True)
    assert document["format"] == "toolrl-analysis.policy/1" and document["tokenizer"] == {
        "tokenizer.json": "{}"
    }
    state = document["state_dict"]
    assert state["lm_head.weight"].data_ptr() == state["model.embed_tokens.weight"].data_ptr()
    assert_bitwise({k: v for k, v in state.items() if k != "lm_head.weight"}, expected)
    save_spliced(pair.base, pair.trained, pair.plan, splice, tmp_path / "out-hf")
    assert {"config.json", "tokenizer.json", "model.safetensors"} <= {
        p.name for p in (tmp_path / "out-hf").iterdir()
    }
    with open_checkpoint(tmp_path / "out-hf") as saved:
        assert "lm_head.weight" not in saved.names()
        assert_bitwise(saved.state_dict(), expected)


def test_save_never_overwrites_without_force_nor_leaves_a_partial_checkpoint(planted, tmp_path, monkeypatch):
    splice = compile_operations(planted.plan, [Operation("revert", "mlp@lower")])
    target = tmp_path / "hybrid"
    target.mkdir()
    (target / "keep.txt").write_text("mine")
    with pytest.raises(CheckpointError, match="exists; pass --force"):
        save_spliced(planted.base, planted.trained, planted.plan, splice, target)
    assert (target / "keep.txt").read_text() == "mine"
    with pytest.raises(CheckpointError, match="would overwrite the checkpoint it reads"):
        save_spliced(planted.base, planted.trained, planted.plan, splice, planted.base_path, force=True)

    import toolrl_analysis.analysis.ablate.save as save_module

    calls = []
    real = save_module._one_side  # every chunk wholly from one side passes here

    def failing(*args):
        calls.append(1)
        if len(calls) > 3:
            raise KeyboardInterrupt  # an interruption half way through the tensors
        return real(*args)

    monkeypatch.setattr(save_module, "_one_side", failing)
    for path in (target, tmp_path / "new.pt", tmp_path / "new.safetensors"):
        calls.clear()
        with pytest.raises(KeyboardInterrupt):
            save_spliced(planted.base, planted.trained, planted.plan, splice, path, force=True)
        assert len(calls) == 4
    assert (target / "keep.txt").read_text() == "mine"  # the old checkpoint is untouched
    assert sorted(os.listdir(tmp_path)) == ["hybrid"]  # nothing half-written, no temporaries
    monkeypatch.undo()
    save_spliced(planted.base, planted.trained, planted.plan, splice, target, force=True)
    assert not (target / "keep.txt").exists() and (target / "model.safetensors").is_file()


# ---------------------------------------------------------------------------------------------
# Bootstrap and the fraction of the gain retained
# ---------------------------------------------------------------------------------------------
def test_resamples_keep_each_scenario_size():
    scenarios = ["a"] * 5 + ["b"] * 3
    resamples = stratified_resamples(scenarios, replicates=200, seed=0)
    assert resamples.weights.shape == (200, 8)
    np.testing.assert_array_equal(resamples.weights[:, :5].sum(axis=1), 5)
    np.testing.assert_array_equal(resamples.weights[:, 5:].sum(axis=1), 3)
    again = stratified_resamples(scenarios, replicates=200, seed=0)
    np.testing.assert_array_equal(resamples.weights, again.weights)


def test_gain_retained_is_a_paired_ratio_and_nan_within_noise():
    from toolrl_analysis.analysis.ablate.bootstrap import group_means

    rng = np.random.default_rng(0)
    n = 40
    resamples = stratified_resamples(["s"] * n, replicates=500, seed=1)

    def estimate(values):
        return group_means(np.asarray(values, float), resamples)["s"]

    noise = rng.normal(0, 0.2, n)
    base, trained = estimate(0.2 + noise), estimate(0.6 + noise)  # a clear gain, shared noise (paired)
    half = estimate(0.4 + noise)
    found = gain_retained(half, base, trained, "solve_f1", n)
    assert found.value == pytest.approx(0.5) and found.low == pytest.approx(0.5) and not found.reason
    lost = gain_retained(estimate(0.2 + noise + rng.normal(0, 0.05, n)), base, trained, "solve_f1", n)
    assert lost.low < lost.value < lost.high and abs(lost.value) < 0.1
    flat = estimate(rng.normal(0.3, 0.2, n))
    flat_trained = estimate(rng.normal(0.3, 0.2, n))  # no real gain: within the noise
    found = gain_retained(half, flat, flat_trained, "solve_f1", n)
    assert np.isnan(found.value) and "within its noise" in found.reason and "40 environments" in found.reason
    zero = Estimate(0.0, np.zeros(10))
    assert np.isnan(gain_retained(zero, zero, zero, "solve_f1", 10).value)
