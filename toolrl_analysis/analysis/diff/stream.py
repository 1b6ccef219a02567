"""Streaming: read matched tensors chunk by chunk and turn them into update statistics.

Tensors stream through in row chunks small enough to stay in cache, read into buffers we own and converted to
float32 (bf16 updates vanish in bf16 arithmetic), so memory stays near one chunk whatever the model size.
`iter_pairs` hands the matched tensors themselves to other walkers (ablation); `stream_tensor` and
`ChunkPipeline` compute the diff's statistics, the latter with worker threads.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass

import torch

from toolrl_analysis.analysis.checkpoints import Checkpoint, LoraCheckpoint, TensorInfo
from toolrl_analysis.analysis.components import ParameterPart
from toolrl_analysis.analysis.diff.buffers import ScratchBuffers
from toolrl_analysis.analysis.diff.metrics import UpdateStats
from toolrl_analysis.analysis.diff.plan import MatchedTensor

# 2**19 float32 elements = 2 MiB per operand: the chunk's raw bytes, float32 copies and scratch stay in
# L3 cache while the dozen passes over them run (measured on a 32 MiB-L3 EPYC: 2**20 costs 25% more per
# element, 2**17 20% more from per-call overhead).
DEFAULT_CHUNK_ELEMENTS = 1 << 19


def part_rows(part: ParameterPart, tensor: torch.Tensor, start: int, stop: int) -> torch.Tensor | None:
    """This part's entries within rows start:stop of the tensor (a view), or None if it has none there."""
    if part.dim is None:
        return tensor
    if part.dim == 0:
        low, high = max(part.start, start), min(part.stop if part.stop is not None else stop, stop)
        return tensor[low - start : high - start] if low < high else None
    return tensor[part.index(tensor.dim())]


def chunk_ranges(info: TensorInfo, chunk_elements: int) -> list[tuple[int, int]]:
    """Row ranges of about chunk_elements entries (whole rows; at least one row)."""
    rows = info.rows
    row_elements = max(1, info.numel // rows) if rows else 1
    step = max(1, chunk_elements // row_elements)
    return [(start, min(rows, start + step)) for start in range(0, rows, step)] or [(0, 0)]


def uses_lora_delta(base: Checkpoint, trained: Checkpoint, item: MatchedTensor) -> bool:
    # The adapter's own update is exact; subtracting a merged weight would add rounding.
    # Tensors the adapter replaces outright (modules_to_save) are read like any other.
    return (
        isinstance(trained, LoraCheckpoint)
        and trained.base is base
        and item.trained_name == item.name
        and item.name not in trained.replaced
    )


@dataclass
class Chunk:
    """Rows start:stop of one tensor, read and ready for the arithmetic."""

    item: MatchedTensor
    start: int
    stop: int
    base: torch.Tensor  # stored dtype, owned by us
    trained: torch.Tensor | None  # stored dtype, or None when `update` is given
    update: torch.Tensor | None  # the LoRA update (float32), if that is how trained is known


def read_chunk(
    base: Checkpoint,
    trained: Checkpoint,
    item: MatchedTensor,
    start: int,
    stop: int,
    buffers: ScratchBuffers | None,
) -> Chunk:
    """Read rows of both sides (into `buffers`, or fresh tensors when None)."""
    elements = (stop - start) * max(1, item.base.numel // item.base.rows if item.base.rows else 1)
    out_base = None if buffers is None else buffers.get("base", elements * 8)
    base_rows = base.read(item.base_name, start, stop, out=out_base)
    if uses_lora_delta(base, trained, item):
        update = trained.delta(item.name, start, stop)
        if update is None:  # the adapter leaves this tensor alone
            update = torch.zeros(base_rows.shape, dtype=torch.float32)
        return Chunk(item, start, stop, base_rows, None, update)
    out_trained = None if buffers is None else buffers.get("trained", elements * 8)
    return Chunk(
        item, start, stop, base_rows, trained.read(item.trained_name, start, stop, out=out_trained), None
    )


def chunk_stats(chunk: Chunk, scratch: ScratchBuffers, precision: bool = False) -> list[UpdateStats]:
    """The arithmetic for one chunk: UpdateStats per part of the tensor (`precision`: see UpdateStats)."""
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
        part_stats = UpdateStats(precision=precision)
        part_base = part_rows(part, base_rows, chunk.start, chunk.stop)
        if part_base is not None:
            part_update = None if update is None else part_rows(part, update, chunk.start, chunk.stop)
            part_trained = part_rows(part, trained_rows, chunk.start, chunk.stop)
            part_stats.add(part_base, part_trained, part_update, scratch)
        stats.append(part_stats)
    return stats


@dataclass
class TensorPair:
    """Rows start:stop of one matched tensor on both sides, in their stored dtypes (fresh tensors: the
    caller's to keep or modify)."""

    matched: MatchedTensor
    start: int
    stop: int
    base: torch.Tensor
    trained: torch.Tensor  # a LoRA side reads as base + scale * B @ A, in float32


def iter_pairs(
    base: Checkpoint,
    trained: Checkpoint,
    matched: Iterable[MatchedTensor],
    *,
    chunk_elements: int | None = None,
) -> Iterator[TensorPair]:
    """Both sides of each matched tensor (`plan_pairs(...).matched`), in the order given: whole tensors, or
    with `chunk_elements` row chunks of about that many entries. Memory holds one pair at a time; plan
    order is base storage order, the cheapest to read; a tied lm_head is read from its embedding."""
    for item in matched:
        ranges = [(0, item.base.rows)] if chunk_elements is None else chunk_ranges(item.base, chunk_elements)
        for start, stop in ranges:
            yield TensorPair(
                item,
                start,
                stop,
                base.read(item.base_name, start, stop),
                trained.read(item.trained_name, start, stop),
            )


def stream_tensor(
    base: Checkpoint,
    trained: Checkpoint,
    item: MatchedTensor,
    *,
    chunk_elements: int = DEFAULT_CHUNK_ELEMENTS,
    buffers: ScratchBuffers | None = None,
    precision: bool = False,
) -> list[UpdateStats]:
    """Update statistics of one tensor's parts, chunk by chunk, in the calling thread."""
    buffers = buffers or ScratchBuffers()
    totals = [UpdateStats(precision=precision) for _ in item.parts]
    for start, stop in chunk_ranges(item.base, chunk_elements):
        chunk = read_chunk(base, trained, item, start, stop, buffers)
        for total, stats in zip(totals, chunk_stats(chunk, buffers, precision), strict=True):
            total.merge(stats)
    return totals


def whole_tensor_stats(
    base: Checkpoint,
    trained: Checkpoint,
    item: MatchedTensor,
    on_part: Callable[[ParameterPart, torch.Tensor, torch.Tensor], None],
    *,
    chunk_elements: int = DEFAULT_CHUNK_ELEMENTS,
    precision: bool = False,
) -> list[UpdateStats]:
    """Read one tensor whole, as float32 base and update (freed afterwards), accumulate its statistics in
    cache-sized row blocks, and call `on_part(part, base, update)` with each part's whole matrices (for
    the spectral metrics). Memory: two float32 copies of the tensor (three for a LoRA adapter), plus what
    on_part allocates (`metrics.spectral_memory_bytes`)."""
    chunk = read_chunk(base, trained, item, 0, item.base.rows, None)
    base_rows = chunk.base.float()  # read without `out` returns fresh memory: ours to overwrite
    update = chunk.update
    trained_rows = base_rows + update if update is not None else chunk.trained.float()
    del chunk
    if base_rows.dim() == 0:
        base_rows, trained_rows = base_rows.reshape(1), trained_rows.reshape(1)
        update = None if update is None else update.reshape(1)
    scratch, totals = ScratchBuffers(), []
    for part in item.parts:
        part_base = part_rows(part, base_rows, 0, base_rows.shape[0])
        part_trained = part_rows(part, trained_rows, 0, base_rows.shape[0])
        part_update = None if update is None else part_rows(part, update, 0, base_rows.shape[0])
        stats = UpdateStats(precision=precision)
        step = max(1, chunk_elements // max(1, part_base[0].numel()))
        with torch_threads(1):
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


class ChunkPipeline:
    """One reader (the calling thread: one shard open at a time, reads in storage order) feeding
    `workers` threads that do the arithmetic. Torch runs single-threaded inside each worker: OpenMP's
    per-operation barriers cost more than they gain on small chunks, badly so on a busy machine.
    Partial results are merged in chunk order, so results do not depend on thread timing."""

    def __init__(self, base: Checkpoint, trained: Checkpoint, workers: int, chunk_elements: int):
        self.base, self.trained = base, trained
        self.workers, self.chunk_elements = workers, chunk_elements

    def run(
        self, items: Sequence[MatchedTensor], on_tensor: Callable[[MatchedTensor, list[UpdateStats]], None]
    ):
        import queue
        from collections import deque
        from concurrent.futures import ThreadPoolExecutor

        free: queue.Queue[ScratchBuffers] = queue.Queue()
        for _ in range(2 * self.workers):  # double-buffered: reading runs ahead of the arithmetic
            free.put(ScratchBuffers())

        def work(chunk: Chunk, buffers: ScratchBuffers) -> list[UpdateStats]:
            try:
                return chunk_stats(chunk, buffers)
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

        with torch_threads(1), ThreadPoolExecutor(self.workers, thread_name_prefix="compare") as pool:
            for item in items:
                futures = []
                for start, stop in chunk_ranges(item.base, self.chunk_elements):
                    buffers = free.get()
                    try:
                        chunk = read_chunk(self.base, self.trained, item, start, stop, buffers)
                    except BaseException:
                        free.put(buffers)
                        raise
                    futures.append(pool.submit(work, chunk, buffers))
                pending.append((item, futures))
                finish_ready(block=False)
            finish_ready(block=True)


class torch_threads:
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
