"""Planning and streaming on their own (what ablation builds on): matched tensors, read whole or in chunks."""

from __future__ import annotations

import pytest
import torch
from test_compare_support import planted_qwen2_pair, write_checkpoint

from toolrl_analysis.analysis.checkpoints import open_checkpoint
from toolrl_analysis.analysis.diff import iter_pairs, plan_pairs
from toolrl_analysis.errors import CheckpointError


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    base, trained, base_path, trained_path = planted_qwen2_pair(
        tmp_path_factory.mktemp("pairs"), "safetensors", "pt"
    )
    return base, trained, (base_path, trained_path)


def test_plan_pairs_matches_selected_tensors_in_base_storage_order(pair):
    base_state, _, (base_path, trained_path) = pair
    with open_checkpoint(base_path) as base, open_checkpoint(trained_path) as trained:
        plan = plan_pairs(base, trained, select="mlp@1")
        storage_order = [name for name in base.names() if name in {m.name for m in plan.matched}]
    assert [m.name for m in plan.matched] == storage_order
    assert {m.name for m in plan.matched} == {
        f"model.layers.1.mlp.{proj}_proj.weight" for proj in ("gate", "up", "down")
    }
    for matched in plan.matched:
        assert matched.base.shape == matched.trained.shape == tuple(base_state[matched.name].shape)
        assert [(p.layer, p.component.split(".")[0]) for p in matched.parts] == [(1, "mlp")]
    assert plan.only_in_base == plan.only_in_trained == [] and plan.selector == "mlp@1"


@pytest.mark.parametrize("chunk_elements", [None, 40])
def test_iter_pairs_yields_both_sides_whole_or_in_row_chunks(pair, chunk_elements):
    base_state, trained_state, (base_path, trained_path) = pair
    with open_checkpoint(base_path) as base, open_checkpoint(trained_path) as trained:
        plan = plan_pairs(base, trained)
        pieces: dict[str, list] = {}
        for tensor_pair in iter_pairs(base, trained, plan.matched, chunk_elements=chunk_elements):
            name = tensor_pair.matched.name
            rows = tensor_pair.stop - tensor_pair.start
            assert tensor_pair.base.shape[:1] == tensor_pair.trained.shape[:1] == (rows,)
            pieces.setdefault(name, []).append(tensor_pair)
    assert list(pieces) == [m.name for m in plan.matched]
    down = "model.layers.1.mlp.down_proj.weight"  # 32 x 64: 40 entries is one row per chunk
    assert len(pieces[down]) == (1 if chunk_elements is None else 32)
    for name, chunks in pieces.items():
        assert [c.start for c in chunks] == sorted(c.start for c in chunks)
        assert torch.equal(torch.cat([c.base for c in chunks]), base_state[name])
        assert torch.equal(torch.cat([c.trained for c in chunks]), trained_state[name])


def test_plan_pairs_names_what_does_not_match(pair, tmp_path):
    base_state, _, (base_path, _) = pair
    missing = "model.layers.3.mlp.down_proj.weight"
    other = write_checkpoint(
        {k: v for k, v in base_state.items() if k != missing}, "pt", tmp_path / "other.pt"
    )
    with open_checkpoint(base_path) as base, open_checkpoint(other) as trained:
        with pytest.raises(CheckpointError, match=f"trained lacks 1 tensors of base: {missing}"):
            plan_pairs(base, trained)
        plan = plan_pairs(base, trained, allow_missing=True)
    assert plan.only_in_base == [missing] and missing not in {m.name for m in plan.matched}
    assert len(plan.matched) == len(base_state) - 1
