"""What training changed, parameter by parameter: a streaming checkpoint diff (DESIGN §7, §8).

For each parameter (or part of a fused one) the update dW = W_trained - W_base is summarised by
relative_frobenius_change = ||dW||_F / ||W_base||_F, mean and max |dW|, the cosine similarity of base and
trained, and update sparsity (fraction of entries with |dW| <= tol) at a few tolerances; with
`spectral=True` also dW's spectral norm, stable rank and effective rank and the change in W's top-k
singular values. Rows aggregate to (layer, component) and to thirds of the depth ("bands").

Tensors stream through in row chunks small enough to stay in cache, read into buffers we own and
converted to float32 (bf16 updates vanish in bf16 arithmetic), so memory stays near one chunk whatever
the model size; only `spectral=True` holds one whole matrix at a time.
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd
import torch

from toolrl_analysis.analysis.checkpoints import Checkpoint, LoraCheckpoint, TensorInfo, open_pair
from toolrl_analysis.analysis.components import (
    COMPONENTS,
    FAMILIES,
    FAMILY_LABELS,
    ParameterMap,
    ParameterPart,
    band_of_layer,
    component_family,
    map_parameters,
    parse_selector,
)
from toolrl_analysis.errors import CheckpointError, first_names

SPARSITY_TOLERANCES = (0.0, 1e-6, 1e-5)  # increasing: UpdateStats.add relies on it
# 2**19 float32 elements = 2 MiB per operand: the chunk's raw bytes, float32 copies and scratch stay in
# L3 cache while the dozen passes over them run (measured on a 32 MiB-L3 EPYC: 2**20 costs 25% more per
# element, 2**17 20% more from per-call overhead).
DEFAULT_CHUNK_ELEMENTS = 1 << 19
EXACT_SVD_MAX_ELEMENTS = 1 << 22
BANDS = ("lower", "middle", "upper")


def sparsity_column(tolerance: float) -> str:
    """update_sparsity_0, update_sparsity_1e-6, update_sparsity_1e-5."""
    if tolerance == 0:
        return "update_sparsity_0"
    mantissa, exponent = f"{tolerance:.0e}".split("e")
    return f"update_sparsity_{mantissa}e{int(exponent)}"


SPARSITY_COLUMNS = tuple(sparsity_column(t) for t in SPARSITY_TOLERANCES)
# A power of two no larger than the smallest positive tolerance (see UpdateStats.add).
COUNT_UNIT = 2.0 ** math.floor(math.log2(min(t for t in SPARSITY_TOLERANCES if t > 0)))
METRIC_COLUMNS = (
    "base_norm",
    "trained_norm",
    "update_norm",
    "relative_frobenius_change",
    "mean_abs_update",
    "max_abs_update",
    "cosine_similarity",
    *SPARSITY_COLUMNS,
)
SPECTRAL_COLUMNS = (
    "update_spectral_norm",
    "update_stable_rank",
    "update_effective_rank",
    "sigma1_relative_change",
    "topk_singular_values_relative_change",
    "spectral_method",
)


# ---------------------------------------------------------------------------------------------
# Metrics
# ---------------------------------------------------------------------------------------------
@dataclass
class UpdateStats:
    """Running float64 sums over the chunks of one parameter part; `metrics()` turns them into a row."""

    numel: int = 0
    base_sq: float = 0.0
    trained_sq: float = 0.0
    update_sq: float = 0.0
    update_abs_sum: float = 0.0
    update_abs_max: float = 0.0
    changed: list[int] = field(default_factory=lambda: [0] * len(SPARSITY_TOLERANCES))

    def add(
        self,
        base: torch.Tensor,
        trained: torch.Tensor,
        update: torch.Tensor | None = None,
        scratch: _Buffers | None = None,
    ) -> None:
        """Accumulate one chunk (float32). Without `update`, trained is overwritten with trained - base.

        Counting |dW| > tol with comparisons and integer sums costs several times a float pass on CPU,
        so the counts are taken as sums of sign(threshold(|dW|)), thresholds applied in increasing order
        to one |dW| buffer.
        """
        numel = base.numel()
        self.numel += numel
        if numel == 0:
            return
        scratch = scratch or _Buffers()
        self.base_sq += _squared_norm(base)
        self.trained_sq += _squared_norm(trained)
        if update is None:
            update = trained.sub_(base)
        self.update_sq += _squared_norm(update)
        magnitude = torch.abs(update, out=scratch.float32_view("magnitude", update.shape))
        # float32 sums of ones are exact below 2**24; past that sum in float64.
        sum_dtype = torch.float64 if numel >= 1 << 24 else None
        self.update_abs_sum += float(magnitude.sum(dtype=sum_dtype))
        self.update_abs_max = max(self.update_abs_max, float(magnitude.max()))
        indicator = scratch.float32_view("indicator", update.shape)
        for i, tolerance in enumerate(SPARSITY_TOLERANCES):
            if tolerance == 0:  # survivors may be denormal: count them with sign()
                self.changed[i] += int(torch.sign(magnitude, out=indicator).sum(dtype=sum_dtype))
                continue
            torch.nn.functional.threshold_(magnitude, tolerance, 0.0)  # keeps entries > tolerance
            # Every survivor exceeds COUNT_UNIT, a power of two: clamped to it they sum exactly to
            # count * COUNT_UNIT (cheaper than sign(), and exact below 2**24 entries per chunk).
            total = torch.clamp(magnitude, max=COUNT_UNIT, out=indicator).sum(dtype=sum_dtype)
            self.changed[i] += round(float(total) / COUNT_UNIT)

    def merge(self, other: UpdateStats) -> UpdateStats:
        """Combine the sums of two disjoint sets of entries (chunks computed separately)."""
        self.numel += other.numel
        self.base_sq += other.base_sq
        self.trained_sq += other.trained_sq
        self.update_sq += other.update_sq
        self.update_abs_sum += other.update_abs_sum
        self.update_abs_max = max(self.update_abs_max, other.update_abs_max)
        self.changed = [a + b for a, b in zip(self.changed, other.changed, strict=True)]
        return self

    def metrics(self) -> dict[str, float]:
        base_norm, trained_norm = math.sqrt(self.base_sq), math.sqrt(self.trained_sq)
        update_norm = math.sqrt(self.update_sq)
        row = {
            "base_norm": base_norm,
            "trained_norm": trained_norm,
            "update_norm": update_norm,
            "relative_frobenius_change": _ratio(update_norm, base_norm),
            "mean_abs_update": self.update_abs_sum / self.numel if self.numel else 0.0,
            "max_abs_update": self.update_abs_max,
            "cosine_similarity": cosine_from_norms(base_norm, trained_norm, update_norm),
        }
        for column, changed in zip(SPARSITY_COLUMNS, self.changed, strict=True):
            row[column] = 1.0 - changed / self.numel if self.numel else 1.0
        return row


def _squared_norm(tensor: torch.Tensor) -> float:
    return float(torch.linalg.vector_norm(tensor)) ** 2


def _ratio(numerator: float, denominator: float) -> float:
    if denominator > 0:
        return numerator / denominator
    return 0.0 if numerator == 0 else math.inf


def cosine_from_norms(base_norm: float, trained_norm: float, update_norm: float) -> float:
    """cos(W, W') from ||W||, ||W'|| and ||W' - W||.

    Written as 1 - (||dW||^2 - (||W|| - ||W'||)^2) / (2 ||W|| ||W'||) so that a small update is not lost to
    cancellation in a float32 dot product; identical tensors give exactly 1.
    """
    if base_norm == 0 or trained_norm == 0:
        return math.nan
    cosine = 1.0 - (update_norm**2 - (base_norm - trained_norm) ** 2) / (2.0 * base_norm * trained_norm)
    return min(1.0, max(-1.0, cosine))


def tensor_metrics(base: torch.Tensor, trained: torch.Tensor) -> dict[str, float]:
    """The per-parameter metrics of one pair of in-memory tensors (any dtype; computed in float32)."""
    if base.shape != trained.shape:
        raise ValueError(f"shape mismatch: {list(base.shape)} vs {list(trained.shape)}")
    stats = UpdateStats()
    stats.add(base.detach().float().reshape(-1), trained.detach().float().reshape(-1).clone())
    return stats.metrics()


def spectral_metrics(
    base: torch.Tensor, update: torch.Tensor, top_k: int = 8, *, niter: int = 6, seed: int = 0
) -> tuple[dict[str, Any], pd.DataFrame]:
    """Spectral summary of an update dW of the matrix W (both float32, same shape, >= 2-D).

    Exact singular values for small matrices; for large ones a randomised range finder (torch.svd_lowrank,
    q = top_k + 10 columns, `niter` power iterations) so the cost stays O(m n q). W and W + dW are
    sketched with the same random matrix, so their estimation errors largely cancel in the difference.
    Effective rank (Roy & Vetterli: exp of the entropy of the normalised singular values) is then taken
    over the q computed values, which the `spectral_method` column records.
    """
    base = base.reshape(base.shape[0], -1) if base.dim() != 2 else base
    update = update.reshape(update.shape[0], -1) if update.dim() != 2 else update
    trained = base + update
    rows, cols = base.shape
    full = min(rows, cols)
    exact = base.numel() <= EXACT_SVD_MAX_ELEMENTS or full <= top_k + 10
    if exact:
        method = "exact"
        values = [torch.linalg.svdvals(m.double()) for m in (update, base, trained)]
    else:
        q = min(full, top_k + 10)
        method = f"lowrank(q={q},niter={niter})"
        values = [_lowrank_singular_values(m, q, niter, seed) for m in (update, base, trained)]
    update_values, base_values, trained_values = (v.double() for v in values)
    update_sq = float(torch.linalg.vector_norm(update.double())) ** 2
    spectral_norm = float(update_values[0]) if update_values.numel() else 0.0
    k = min(top_k, base_values.numel())
    base_top, trained_top = base_values[:k], trained_values[:k]
    row = {
        "update_spectral_norm": spectral_norm,
        "update_stable_rank": update_sq / spectral_norm**2 if spectral_norm > 0 else 0.0,
        "update_effective_rank": effective_rank(update_values),
        "sigma1_relative_change": _ratio(float(trained_top[0] - base_top[0]), float(base_top[0]))
        if k
        else 0.0,
        "topk_singular_values_relative_change": _ratio(
            float(torch.linalg.vector_norm(trained_top - base_top)), float(torch.linalg.vector_norm(base_top))
        ),
        "spectral_method": method,
    }
    singular_values = pd.DataFrame(
        {
            "index": range(1, k + 1),
            "base": base_top.tolist(),
            "trained": trained_top.tolist(),
            "change": (trained_top - base_top).tolist(),
        }
    )
    return row, singular_values


def _lowrank_singular_values(matrix: torch.Tensor, q: int, niter: int, seed: int) -> torch.Tensor:
    # A fixed seed gives every matrix the same sketch: runs are reproducible and W, W + dW share errors.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        _, values, _ = torch.svd_lowrank(matrix, q=q, niter=niter, M=None)
    return values


def effective_rank(singular_values: torch.Tensor) -> float:
    """exp(H(p)) with p = s / sum(s) (Roy & Vetterli 2007); 0 for a zero matrix."""
    values = singular_values.double()
    values = values[values > 0]
    if values.numel() == 0:
        return 0.0
    p = values / values.sum()
    return float(torch.exp(-(p * torch.log(p)).sum()))


# ---------------------------------------------------------------------------------------------
# Planning: line the two checkpoints up, report mismatches by name
# ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class PlannedTensor:
    name: str
    base_name: str  # differs from name only for a tied lm_head read from the embedding
    trained_name: str
    base: TensorInfo
    trained: TensorInfo
    parts: tuple[ParameterPart, ...]


@dataclass
class ComparisonPlan:
    tensors: list[PlannedTensor]
    mapping: ParameterMap
    only_in_base: list[str]
    only_in_trained: list[str]
    tied: dict[str, dict[str, str]]  # side -> {lm_head name: the embedding it is read from}
    selector: str | None
    tied_both: dict[str, str] = field(default_factory=dict)  # left out: tied to this tensor on both sides


def plan_comparison(
    base: Checkpoint, trained: Checkpoint, *, select: str | None = None, allow_missing: bool = False
) -> ComparisonPlan:
    """Check that two checkpoints can be compared and list what to compare, in base storage order.

    Raises CheckpointError naming the tensors for different architectures, missing keys (unless
    `allow_missing`), or mismatched shapes; SelectorError for a bad selector.
    """
    base_infos, trained_infos = base.infos(), trained.infos()
    base_map = map_parameters({n: i.shape for n, i in base_infos.items()})
    trained_map = map_parameters({n: i.shape for n, i in trained_infos.items()})
    if base_map.family != trained_map.family:
        raise CheckpointError(
            f"different architectures: base {base.path} has {_describe(base, base_map)} names, "
            f"trained {trained.path} has {_describe(trained, trained_map)} names"
        )
    aliases = _tied_heads(base, trained, base_map, trained_map)
    # A tensor tied to the same tensor on both sides is one parameter, already compared under the other
    # name: leave it out instead of counting its update twice.
    ties = {
        side: {**checkpoint.tied, **aliases[side]}
        for side, checkpoint in (("base", base), ("trained", trained))
    }
    tied_both = {n: s for n, s in ties["base"].items() if ties["trained"].get(n) == s}
    base_names = [n for n in [*base_infos, *aliases["base"]] if n not in tied_both]
    trained_names = {*trained_infos, *aliases["trained"]} - tied_both.keys()

    def source(side: str, name: str) -> str:
        return aliases[side].get(name, name)

    mapping = map_parameters({n: base_infos[source("base", n)].shape for n in base_names}, base_map.family)

    selector = parse_selector(select, mapping.n_layers) if select else None
    chosen = mapping.select(selector) if selector else mapping.parts
    chosen_names = list(dict.fromkeys(p.name for p in chosen))
    parts_by_name: dict[str, list[ParameterPart]] = {}
    for part in chosen:
        parts_by_name.setdefault(part.name, []).append(part)
    if selector:
        trained_chosen = {
            p.name
            for p in map_parameters(
                {n: trained_infos[source("trained", n)].shape for n in trained_names}, base_map.family
            ).parts
            if selector.matches(p.layer, p.component)
        }
    else:
        trained_chosen = trained_names

    only_in_base = [n for n in chosen_names if n not in trained_names]
    only_in_trained = sorted(trained_chosen - set(chosen_names))
    if (only_in_base or only_in_trained) and not allow_missing:
        if base_map.n_layers != trained_map.n_layers:
            raise CheckpointError(
                f"different architectures: base {base.path} has {base_map.n_layers} blocks, "
                f"trained {trained.path} has {trained_map.n_layers}"
            )
        if base.model_type and trained.model_type and base.model_type != trained.model_type:
            raise CheckpointError(
                f"different architectures: base {base.path} is {base.model_type}, "
                f"trained {trained.path} is {trained.model_type}"
            )
        problems = []
        if only_in_base:
            problems.append(f"trained lacks {len(only_in_base)} tensors of base: {first_names(only_in_base)}")
        if only_in_trained:
            problems.append(
                f"base lacks {len(only_in_trained)} tensors of trained: {first_names(only_in_trained)}"
            )
        raise CheckpointError("; ".join(problems) + " (--allow-missing compares the tensors they share)")

    tensors, mismatched = [], []
    for name in chosen_names:
        if name not in trained_names:
            continue
        base_info = base_infos[source("base", name)]
        trained_info = trained_infos[source("trained", name)]
        if base_info.shape != trained_info.shape:
            mismatched.append(f"{name} (base {list(base_info.shape)}, trained {list(trained_info.shape)})")
            continue
        if base_info.dtype.is_floating_point != trained_info.dtype.is_floating_point:
            raise CheckpointError(
                f"dtype mismatch for {name}: base {base_info.dtype}, trained {trained_info.dtype}"
            )
        tensors.append(
            PlannedTensor(
                name,
                source("base", name),
                source("trained", name),
                base_info,
                trained_info,
                tuple(parts_by_name[name]),
            )
        )
    if mismatched:
        raise CheckpointError(f"shape mismatch for {len(mismatched)} tensors: {first_names(mismatched, 4)}")
    if not tensors:
        raise CheckpointError(f"{base.path} and {trained.path} share no tensors to compare")
    return ComparisonPlan(tensors, mapping, only_in_base, only_in_trained, aliases, select, tied_both)


def _describe(checkpoint: Checkpoint, mapping: ParameterMap) -> str:
    label = FAMILY_LABELS.get(mapping.family, mapping.family)
    model_type = f", model_type {checkpoint.model_type}" if checkpoint.model_type else ""
    return f"{label}{model_type}"


def _tied_heads(
    base: Checkpoint, trained: Checkpoint, base_map: ParameterMap, trained_map: ParameterMap
) -> dict[str, dict[str, str]]:
    """HF drops a tied lm_head from safetensors while a torch state dict keeps it: on the side that lacks
    it, read it from the embedding of the same shape, so the two checkpoints still line up."""
    aliases: dict[str, dict[str, str]] = {"base": {}, "trained": {}}
    sides = (
        ("base", base, base_map, trained, trained_map),
        ("trained", trained, trained_map, base, base_map),
    )
    for side, checkpoint, own, other_checkpoint, other in sides:
        if (checkpoint.config or {}).get("tie_word_embeddings") is False:
            continue
        own_names = {p.name for p in own.parts}
        embeddings = [p.name for p in own.parts if p.component == "embed"]
        for head in (p.name for p in other.parts if p.component == "lm_head" and p.name not in own_names):
            shape = other_checkpoint.info(head).shape
            source = next((e for e in embeddings if checkpoint.info(e).shape == shape), None)
            if source is not None:
                aliases[side][head] = source
    return aliases


# ---------------------------------------------------------------------------------------------
# Streaming
# ---------------------------------------------------------------------------------------------
class _Buffers:
    """Reusable scratch tensors, grown on demand: raw bytes and float32 views, one set per worker."""

    def __init__(self):
        self._store: dict[str, torch.Tensor] = {}

    def get(self, key: str, nbytes: int) -> torch.Tensor:
        buffer = self._store.get(key)
        if buffer is None or buffer.numel() < nbytes:
            buffer = torch.empty(max(nbytes, 8), dtype=torch.uint8)
            self._store[key] = buffer
        return buffer

    def float32_view(self, key: str, shape: Sequence[int]) -> torch.Tensor:
        numel = math.prod(shape)
        return self.get(key, numel * 4)[: numel * 4].view(torch.float32).view(tuple(shape))

    def float32(self, key: str, raw: torch.Tensor) -> torch.Tensor:
        """raw as float32: itself when already float32 (we own it), else a converted copy in scratch."""
        if raw.dtype == torch.float32:
            return raw
        return self.float32_view(key, raw.shape).copy_(raw)


def _part_rows(part: ParameterPart, tensor: torch.Tensor, start: int, stop: int) -> torch.Tensor | None:
    """This part's entries within rows start:stop of the tensor (a view), or None if it has none there."""
    if part.dim is None:
        return tensor
    if part.dim == 0:
        low, high = max(part.start, start), min(part.stop if part.stop is not None else stop, stop)
        return tensor[low - start : high - start] if low < high else None
    return tensor[part.index(tensor.dim())]


def _chunk_ranges(info: TensorInfo, chunk_elements: int) -> list[tuple[int, int]]:
    """Row ranges of about chunk_elements entries (whole rows; at least one row)."""
    rows = info.rows
    row_elements = max(1, info.numel // rows) if rows else 1
    step = max(1, chunk_elements // row_elements)
    return [(start, min(rows, start + step)) for start in range(0, rows, step)] or [(0, 0)]


def _uses_lora_delta(base: Checkpoint, trained: Checkpoint, item: PlannedTensor) -> bool:
    # The adapter's own update is exact; subtracting a merged weight would add rounding.
    # Tensors the adapter replaces outright (modules_to_save) are read like any other.
    return (
        isinstance(trained, LoraCheckpoint)
        and trained.base is base
        and item.trained_name == item.name
        and item.name not in trained.replaced
    )


@dataclass
class _Chunk:
    """Rows start:stop of one tensor, read and ready for the arithmetic."""

    item: PlannedTensor
    start: int
    stop: int
    base: torch.Tensor  # stored dtype, owned by us
    trained: torch.Tensor | None  # stored dtype, or None when `update` is given
    update: torch.Tensor | None  # the LoRA update (float32), if that is how trained is known


def _read_chunk(
    base: Checkpoint,
    trained: Checkpoint,
    item: PlannedTensor,
    start: int,
    stop: int,
    buffers: _Buffers | None,
) -> _Chunk:
    """Read rows of both sides (into `buffers`, or fresh tensors when None)."""
    elements = (stop - start) * max(1, item.base.numel // item.base.rows if item.base.rows else 1)
    out_base = None if buffers is None else buffers.get("base", elements * 8)
    base_rows = base.read(item.base_name, start, stop, out=out_base)
    if _uses_lora_delta(base, trained, item):
        update = trained.delta(item.name, start, stop)
        if update is None:  # the adapter leaves this tensor alone
            update = torch.zeros(base_rows.shape, dtype=torch.float32)
        return _Chunk(item, start, stop, base_rows, None, update)
    out_trained = None if buffers is None else buffers.get("trained", elements * 8)
    return _Chunk(
        item, start, stop, base_rows, trained.read(item.trained_name, start, stop, out=out_trained), None
    )


def _chunk_stats(chunk: _Chunk, scratch: _Buffers) -> list[UpdateStats]:
    """The arithmetic for one chunk: UpdateStats per part of the tensor."""
    base_rows = scratch.float32("base32", chunk.base)
    if chunk.update is not None:
        update = chunk.update
        trained_rows = torch.add(base_rows, update, out=scratch.float32_view("trained32", base_rows.shape))
    else:
        update = None
        trained_rows = scratch.float32("trained32", chunk.trained)
    if base_rows.dim() == 0:
        base_rows, trained_rows = base_rows.reshape(1), trained_rows.reshape(1)
        update = None if update is None else update.reshape(1)
    stats = []
    for part in chunk.item.parts:
        part_stats = UpdateStats()
        part_base = _part_rows(part, base_rows, chunk.start, chunk.stop)
        if part_base is not None:
            part_update = None if update is None else _part_rows(part, update, chunk.start, chunk.stop)
            part_trained = _part_rows(part, trained_rows, chunk.start, chunk.stop)
            part_stats.add(part_base, part_trained, part_update, scratch)
        stats.append(part_stats)
    return stats


def stream_tensor(
    base: Checkpoint,
    trained: Checkpoint,
    item: PlannedTensor,
    *,
    chunk_elements: int = DEFAULT_CHUNK_ELEMENTS,
    buffers: _Buffers | None = None,
) -> list[UpdateStats]:
    """Update statistics of one tensor's parts, chunk by chunk, in the calling thread."""
    buffers = buffers or _Buffers()
    totals = [UpdateStats() for _ in item.parts]
    for start, stop in _chunk_ranges(item.base, chunk_elements):
        chunk = _read_chunk(base, trained, item, start, stop, buffers)
        for total, stats in zip(totals, _chunk_stats(chunk, buffers), strict=True):
            total.merge(stats)
    return totals


def whole_tensor_stats(
    base: Checkpoint,
    trained: Checkpoint,
    item: PlannedTensor,
    on_part: Callable[[ParameterPart, torch.Tensor, torch.Tensor], None],
    *,
    chunk_elements: int = DEFAULT_CHUNK_ELEMENTS,
) -> list[UpdateStats]:
    """Read one tensor whole, as float32 base and update (freed afterwards), accumulate its statistics in
    cache-sized row blocks, and call `on_part(part, base, update)` with each part's whole matrices (for
    the spectral metrics). Memory: about three float32 copies of the tensor."""
    chunk = _read_chunk(base, trained, item, 0, item.base.rows, None)
    base_rows = chunk.base.float()  # read without `out` returns fresh memory: ours to overwrite
    update = chunk.update
    trained_rows = base_rows + update if update is not None else chunk.trained.float()
    del chunk
    if base_rows.dim() == 0:
        base_rows, trained_rows = base_rows.reshape(1), trained_rows.reshape(1)
        update = None if update is None else update.reshape(1)
    scratch, totals = _Buffers(), []
    for part in item.parts:
        part_base = _part_rows(part, base_rows, 0, base_rows.shape[0])
        part_trained = _part_rows(part, trained_rows, 0, base_rows.shape[0])
        part_update = None if update is None else _part_rows(part, update, 0, base_rows.shape[0])
        stats = UpdateStats()
        step = max(1, chunk_elements // max(1, part_base[0].numel()))
        with _torch_threads(1):
            for start in range(0, part_base.shape[0], step):
                rows = slice(start, start + step)
                stats.add(
                    part_base[rows],
                    part_trained[rows],
                    None if part_update is None else part_update[rows],
                    scratch,
                )
        totals.append(stats)
        # Without a given update, add() left trained - base in part_trained.
        on_part(part, part_base, part_update if part_update is not None else part_trained)
    return totals


class _Pipeline:
    """One reader (the calling thread: one shard open at a time, reads in storage order) feeding
    `workers` threads that do the arithmetic. Torch runs single-threaded inside each worker: OpenMP's
    per-operation barriers cost more than they gain on small chunks, badly so on a busy machine.
    Partial results are merged in chunk order, so results do not depend on thread timing."""

    def __init__(self, base: Checkpoint, trained: Checkpoint, workers: int, chunk_elements: int):
        self.base, self.trained = base, trained
        self.workers, self.chunk_elements = workers, chunk_elements

    def run(
        self, items: Sequence[PlannedTensor], on_tensor: Callable[[PlannedTensor, list[UpdateStats]], None]
    ):
        import queue
        from collections import deque
        from concurrent.futures import ThreadPoolExecutor

        free: queue.Queue[_Buffers] = queue.Queue()
        for _ in range(2 * self.workers):  # double-buffered: reading runs ahead of the arithmetic
            free.put(_Buffers())

        def work(chunk: _Chunk, buffers: _Buffers) -> list[UpdateStats]:
            try:
                return _chunk_stats(chunk, buffers)
            finally:
                free.put(buffers)

        pending: deque = deque()  # (item, [futures]) in order

        def finish_ready(block: bool) -> None:
            while pending and (block or all(f.done() for f in pending[0][1])):
                item, futures = pending.popleft()
                totals = [UpdateStats() for _ in item.parts]
                for future in futures:
                    for total, stats in zip(totals, future.result(), strict=True):
                        total.merge(stats)
                on_tensor(item, totals)

        with _torch_threads(1), ThreadPoolExecutor(self.workers, thread_name_prefix="compare") as pool:
            for item in items:
                futures = []
                for start, stop in _chunk_ranges(item.base, self.chunk_elements):
                    buffers = free.get()
                    try:
                        chunk = _read_chunk(self.base, self.trained, item, start, stop, buffers)
                    except BaseException:
                        free.put(buffers)
                        raise
                    futures.append(pool.submit(work, chunk, buffers))
                pending.append((item, futures))
                finish_ready(block=False)
            finish_ready(block=True)


class _torch_threads:
    """Temporarily set torch's intra-op thread count (a process-wide setting, restored on exit)."""

    def __init__(self, threads: int):
        self.threads = threads

    def __enter__(self):
        self.previous = torch.get_num_threads()
        torch.set_num_threads(self.threads)

    def __exit__(self, *exc):
        torch.set_num_threads(self.previous)


def default_workers() -> int:
    """Arithmetic threads for the pipeline; 0 means all work in the calling thread.

    Each chunk takes ~20 small torch calls, and every call hands the GIL over between threads. On two
    cores that hand-off cost more than the overlap gained (measured: 40-60% more CPU per byte than the
    single-threaded loop), so small machines stay in one thread; larger ones leave a core to the reader.
    """
    cpus = os.cpu_count() or 1
    return 0 if cpus <= 2 else min(cpus - 1, 8)


@dataclass
class Comparison:
    """Everything `compare` found: tidy frames plus a JSON-able summary."""

    parameters: pd.DataFrame  # one row per parameter (part)
    components: pd.DataFrame  # one row per (layer, component)
    bands: pd.DataFrame  # share of the update norm per family and third of the depth
    singular_values: pd.DataFrame | None
    summary: dict[str, Any]

    def most_changed(self, n: int = 15, metric: str = "relative_frobenius_change") -> pd.DataFrame:
        return self.components.sort_values(metric, ascending=False, kind="stable").head(n)

    def to_document(self) -> dict[str, Any]:
        """{"rows": [...], "summary": {...}} with non-finite numbers as null (valid JSON)."""
        return {"rows": _records(self.parameters), "summary": _json_clean(self.summary)}

    def write(self, out_dir: str | Path) -> list[Path]:
        """CSV + parquet of the frames, summary.json, heatmap.png, layers.png and bands.png under out_dir."""
        import json

        from toolrl_analysis.analysis import plots

        out = Path(out_dir)
        try:
            out.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise CheckpointError(f"cannot create output directory {out}: {exc.strerror or exc}") from None
        written = []
        frames = {"parameters": self.parameters, "components": self.components, "bands": self.bands}
        if self.singular_values is not None:
            frames["singular_values"] = self.singular_values
        for stem, frame in frames.items():
            frame.to_csv(out / f"{stem}.csv", index=False)
            frame.to_parquet(out / f"{stem}.parquet", index=False)
            written += [out / f"{stem}.csv", out / f"{stem}.parquet"]
        (out / "summary.json").write_text(json.dumps(_json_clean(self.summary), indent=2) + "\n")
        written.append(out / "summary.json")
        figures = {
            "heatmap.png": plots.plot_component_heatmap(self.components),
            "layers.png": plots.plot_layer_profile(self.components),
        }
        if not self.bands.empty:
            figures["bands.png"] = plots.plot_band_summary(self.bands)
        for filename, figure in figures.items():
            figure.savefig(out / filename, dpi=120, bbox_inches="tight")
            written.append(out / filename)
        return written


def compare_checkpoints(
    base: str | Path | Checkpoint,
    trained: str | Path | Checkpoint,
    *,
    select: str | None = None,
    spectral: bool = False,
    allow_missing: bool = False,
    lora_base: str | Path | None = None,
    top_k: int = 8,
    chunk_elements: int = DEFAULT_CHUNK_ELEMENTS,
    workers: int | None = None,
    progress: Callable[[str, int, int], None] | None = None,
) -> Comparison:
    """Diff two checkpoints (any accepted format, e.g. base.pt vs trained.safetensors or a LoRA adapter).

    Paths are opened (and closed) here; Checkpoint objects are used as given. `progress(name, done, total)`
    is called after each tensor. `workers` threads do the arithmetic while the calling thread reads;
    0 does everything in the calling thread (default: `default_workers()`). `spectral=True` reads each
    matrix whole (about three float32 copies of the largest tensor in memory) and runs in this thread.
    """
    opened = not isinstance(base, Checkpoint) or not isinstance(trained, Checkpoint)
    if opened:
        base, trained = open_pair(str(base), str(trained), lora_base=lora_base)
    started = time.perf_counter()
    rows: list[dict] = []
    singular_rows: list[pd.DataFrame] = []
    try:
        plan = plan_comparison(base, trained, select=select, allow_missing=allow_missing)
        total, done = len(plan.tensors), [0]

        def record(item: PlannedTensor, stats: list[UpdateStats], spectral_rows: dict | None = None) -> None:
            for part, part_stats in zip(item.parts, stats, strict=True):
                row = _identity_row(item, part)
                row.update(part_stats.metrics())
                if spectral:
                    row.update((spectral_rows or {}).get(part, _no_spectral()))
                rows.append(row)
            done[0] += 1
            if progress is not None:
                progress(item.name, done[0], total)

        if spectral:
            for item in plan.tensors:
                spectral_rows: dict[ParameterPart, dict] = {}

                def on_part(part, part_base, part_update, _rows=spectral_rows):
                    if part_base.dim() >= 2:
                        row, values = spectral_metrics(part_base, part_update, top_k)
                        _rows[part] = row
                        identity = dict(
                            name=part.name, part=part.part, layer=part.layer, component=part.component
                        )
                        singular_rows.append(values.assign(**identity))

                if len(item.base.shape) >= 2:
                    stats = whole_tensor_stats(base, trained, item, on_part, chunk_elements=chunk_elements)
                else:
                    with _torch_threads(1):
                        stats = stream_tensor(base, trained, item, chunk_elements=chunk_elements)
                record(item, stats, spectral_rows)
        elif (workers := default_workers() if workers is None else workers) == 0:
            buffers = _Buffers()
            with _torch_threads(1):
                for item in plan.tensors:
                    record(
                        item,
                        stream_tensor(base, trained, item, chunk_elements=chunk_elements, buffers=buffers),
                    )
        else:
            _Pipeline(base, trained, workers, chunk_elements).run(plan.tensors, record)
        elapsed = time.perf_counter() - started
    finally:
        if opened:
            base.close()
            trained.close()
    bytes_read = sum(item.base.nbytes + item.trained.nbytes for item in plan.tensors)
    parameters = _parameters_frame(rows)
    components = component_table(parameters)
    bands = band_summary(parameters, plan.mapping.n_layers)
    singular_values = None
    if spectral:
        columns = ["name", "part", "layer", "component", "index", "base", "trained", "change"]
        singular_values = (
            pd.concat(singular_rows, ignore_index=True)[columns]
            if singular_rows
            else pd.DataFrame(columns=columns)
        )
    summary = _summary(base, trained, plan, parameters, components, bands, elapsed, bytes_read, spectral)
    return Comparison(parameters, components, bands, singular_values, summary)


def _identity_row(item: PlannedTensor, part: ParameterPart) -> dict[str, Any]:
    shape = list(item.base.shape)
    if part.dim is not None:
        shape[part.dim] = (part.stop if part.stop is not None else shape[part.dim]) - part.start
    return {
        "name": item.name,
        "part": part.part,
        "layer": part.layer,
        "component": part.component,
        "role": part.role,
        "numel": math.prod(shape),
        "dtype": str(item.base.dtype).removeprefix("torch."),
        "trained_dtype": str(item.trained.dtype).removeprefix("torch."),
        "shape": "x".join(map(str, shape)) if shape else "scalar",
    }


def _no_spectral() -> dict[str, Any]:
    return {column: (None if column == "spectral_method" else math.nan) for column in SPECTRAL_COLUMNS}


def _parameters_frame(rows: list[dict]) -> pd.DataFrame:
    frame = pd.DataFrame(rows)
    frame["layer"] = pd.array(frame["layer"].tolist(), dtype="Int64")
    frame["numel"] = frame["numel"].astype("int64")
    return frame


# ---------------------------------------------------------------------------------------------
# Aggregation
# ---------------------------------------------------------------------------------------------
def component_table(parameters: pd.DataFrame) -> pd.DataFrame:
    """Aggregate parameter rows to one row per (layer, component), from the underlying sums:
    norms add in squares, sparsity and mean |dW| weight by numel, the cosine is that of the
    concatenated tensors."""
    frame = parameters.assign(
        base_sq=parameters["base_norm"] ** 2,
        trained_sq=parameters["trained_norm"] ** 2,
        update_sq=parameters["update_norm"] ** 2,
        abs_sum=parameters["mean_abs_update"] * parameters["numel"],
        **{f"{c}_count": parameters[c] * parameters["numel"] for c in SPARSITY_COLUMNS},
    )
    sums = [
        "numel",
        "base_sq",
        "trained_sq",
        "update_sq",
        "abs_sum",
        *(f"{c}_count" for c in SPARSITY_COLUMNS),
    ]
    grouped = frame.groupby(["layer", "component"], dropna=False, sort=False)
    table = grouped[sums].sum()
    table["n_parameters"] = grouped.size()
    table["max_abs_update"] = grouped["max_abs_update"].max()
    table = table.reset_index()
    base_norm, trained_norm = table["base_sq"] ** 0.5, table["trained_sq"] ** 0.5
    update_norm = table["update_sq"] ** 0.5
    total_update_sq = table["update_sq"].sum()
    out = pd.DataFrame(
        {
            "layer": pd.array(table["layer"].tolist(), dtype="Int64"),
            "component": table["component"],
            "n_parameters": table["n_parameters"].astype("int64"),
            "numel": table["numel"].astype("int64"),
            "base_norm": base_norm,
            "update_norm": update_norm,
            "relative_frobenius_change": [_ratio(u, b) for u, b in zip(update_norm, base_norm, strict=True)],
            "mean_abs_update": table["abs_sum"] / table["numel"].where(table["numel"] > 0),
            "max_abs_update": table["max_abs_update"],
            "cosine_similarity": [
                cosine_from_norms(b, t, u)
                for b, t, u in zip(base_norm, trained_norm, update_norm, strict=True)
            ],
            **{c: table[f"{c}_count"] / table["numel"].where(table["numel"] > 0) for c in SPARSITY_COLUMNS},
            "update_norm_share": table["update_sq"] / total_update_sq if total_update_sq > 0 else 0.0,
        }
    )
    order = {c: i for i, c in enumerate(COMPONENTS)}
    out["_block"] = out["layer"].isna()
    out["_order"] = out["component"].map(order).fillna(len(order))
    out = out.sort_values(["_block", "layer", "_order"], kind="stable").drop(columns=["_block", "_order"])
    return out.reset_index(drop=True)


def band_summary(parameters: pd.DataFrame, n_layers: int) -> pd.DataFrame:
    """Share of the update norm (sum of ||dW||_F^2) in the lower / middle / upper third of the blocks,
    per component family (attn, mlp, norm, and all block parameters together).

    share_of_family sums to 1 over the three bands of a family; share_of_total divides by the update of
    the whole checkpoint (embeddings and head included); relative_frobenius_change is the band's
    sqrt(sum ||dW||^2 / sum ||W||^2).
    """
    in_blocks = parameters[parameters["layer"].notna()].copy()
    total_update_sq = float((parameters["update_norm"] ** 2).sum())
    in_blocks["family"] = in_blocks["component"].map(component_family)
    in_blocks["band"] = [band_of_layer(int(layer), n_layers) for layer in in_blocks["layer"]]
    in_blocks["update_sq"] = in_blocks["update_norm"] ** 2
    in_blocks["base_sq"] = in_blocks["base_norm"] ** 2
    band_layers = {
        band: [layer for layer in range(n_layers) if band_of_layer(layer, n_layers) == band] for band in BANDS
    }
    records = []
    for family in (*FAMILIES, "all"):
        rows = in_blocks if family == "all" else in_blocks[in_blocks["family"] == family]
        if rows.empty:
            continue
        family_update_sq = float(rows["update_sq"].sum())
        for band in BANDS:
            selected = rows[rows["band"] == band]
            update_sq, base_sq = float(selected["update_sq"].sum()), float(selected["base_sq"].sum())
            layers = band_layers[band]
            records.append(
                {
                    "family": family,
                    "band": band,
                    "layers": f"{layers[0]}-{layers[-1]}" if layers else "",
                    "n_blocks": len(layers),
                    "update_norm_sq": update_sq,
                    "share_of_family": update_sq / family_update_sq if family_update_sq > 0 else 0.0,
                    "share_of_total": update_sq / total_update_sq if total_update_sq > 0 else 0.0,
                    "relative_frobenius_change": _ratio(math.sqrt(update_sq), math.sqrt(base_sq)),
                }
            )
    return pd.DataFrame(
        records,
        columns=[
            "family",
            "band",
            "layers",
            "n_blocks",
            "update_norm_sq",
            "share_of_family",
            "share_of_total",
            "relative_frobenius_change",
        ],
    )


def _summary(base, trained, plan, parameters, components, bands, elapsed, bytes_read, spectral) -> dict:
    base_sq = float((parameters["base_norm"] ** 2).sum())
    update_sq = float((parameters["update_norm"] ** 2).sum())
    top = components.sort_values("relative_frobenius_change", ascending=False, kind="stable").head(10)
    return {
        "base": {"path": str(base.path), "format": base.format, "model_type": base.model_type},
        "trained": {"path": str(trained.path), "format": trained.format, "model_type": trained.model_type},
        "architecture": FAMILY_LABELS.get(plan.mapping.family, plan.mapping.family),
        "n_layers": plan.mapping.n_layers,
        "selector": plan.selector,
        "n_tensors": len(plan.tensors),
        "n_rows": len(parameters),
        "n_parameters": int(parameters["numel"].sum()),
        "n_changed_rows": int((parameters["update_norm"] > 0).sum()),
        "update_norm": math.sqrt(update_sq),
        "relative_frobenius_change": _ratio(math.sqrt(update_sq), math.sqrt(base_sq)),
        "most_changed": [
            {
                "layer": None if pd.isna(r.layer) else int(r.layer),
                "component": r.component,
                "relative_frobenius_change": float(r.relative_frobenius_change),
                "update_norm_share": float(r.update_norm_share),
            }
            for r in top.itertuples()
        ],
        "bands": bands.to_dict(orient="records"),
        "only_in_base": plan.only_in_base,
        "only_in_trained": plan.only_in_trained,
        "tied": {side: dict(names) for side, names in plan.tied.items() if names},
        "tied_both_sides": dict(plan.tied_both),
        "unmapped": sorted(set(parameters.loc[parameters["component"] == "other", "name"])),
        "spectral": spectral,
        "bytes_read": bytes_read,
        "seconds": elapsed,
    }


def _records(frame: pd.DataFrame) -> list[dict[str, Any]]:
    return [_json_clean(record) for record in frame.astype(object).to_dict(orient="records")]


def _json_clean(value: Any) -> Any:
    """NaN/inf -> None, numpy/pandas scalars -> Python: json.dump then writes valid JSON."""
    if isinstance(value, dict):
        return {str(k): _json_clean(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_json_clean(v) for v in value]
    if value is None or value is pd.NA:
        return None
    if hasattr(value, "item") and not isinstance(value, str | bytes):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


# ---------------------------------------------------------------------------------------------
# Terminal summary
# ---------------------------------------------------------------------------------------------
def render_comparison(comparison: Comparison, console, top: int = 15) -> None:
    """Rich tables: the most-changed (layer, component) rows and the band summary."""
    from rich.table import Table

    summary = comparison.summary
    console.print(
        f"[bold]{summary['base']['path']}[/] -> [bold]{summary['trained']['path']}[/]: "
        f"{summary['n_tensors']} tensors, {summary['n_parameters']:,} parameters, {summary['n_layers']} blocks "
        f"({summary['architecture']}); {summary['n_changed_rows']} of {summary['n_rows']} rows changed, "
        f"overall relative change {summary['relative_frobenius_change']:.3g}"
    )
    for key, label in (("only_in_base", "only in base"), ("only_in_trained", "only in trained")):
        if summary[key]:
            console.print(
                f"[yellow]skipped {len(summary[key])} tensors {label}:[/] {first_names(summary[key])}"
            )
    if summary["unmapped"]:
        console.print(f"unmapped (component 'other'): {first_names(summary['unmapped'])}")

    table = Table(title=f"most-changed components (top {top})")
    for column in ("layer", "component", "numel", "rel.change", "share", "mean|dW|", "max|dW|", "cosine"):
        table.add_column(column, justify="left" if column == "component" else "right", no_wrap=True)
    for row in comparison.most_changed(top).itertuples():
        table.add_row(
            "-" if pd.isna(row.layer) else str(row.layer),
            row.component,
            f"{row.numel:,}",
            _fmt(row.relative_frobenius_change),
            _fmt(row.update_norm_share),
            _fmt(row.mean_abs_update),
            _fmt(row.max_abs_update),
            _fmt(row.cosine_similarity, digits=6),
        )
    console.print(table)

    if not comparison.bands.empty:
        bands = Table(title="update share by depth third (sum ||dW||^2)")
        bands.add_column("family")
        for band in BANDS:
            layers = comparison.bands.loc[comparison.bands["band"] == band, "layers"].iloc[0]
            bands.add_column(f"{band} ({layers})", justify="right")
        for family, frame in comparison.bands.groupby("family", sort=False):
            shares = dict(zip(frame["band"], frame["share_of_family"], strict=True))
            bands.add_row(family, *(f"{shares.get(band, 0.0):.1%}" for band in BANDS))
        console.print(bands)


def _fmt(value: float, digits: int = 3) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    return f"{value:.{digits}g}"
