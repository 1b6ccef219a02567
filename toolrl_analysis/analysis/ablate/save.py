"""`--save`: stream a hybrid checkpoint to disk one row chunk at a time, never loading either model whole.

The output is the starting model's layout (its tensors, order, dtypes and ties) with the spliced values:
an HF directory (config, tokenizer and other files beside the safetensors, sharded above `shard_bytes`), a
single `.safetensors` file, or our `.pt` (a policy file when a config and tokenizer are at hand, else a
plain state dict). Rows wholly from one side come from that side alone, copied file to file by the kernel
(`os.copy_file_range`) where it stores them as the output does; only blended rows read both sides. A head the
starting model ties to its embedding stays tied.
"""

from __future__ import annotations

import json
import re
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from toolrl_analysis.analysis.ablate.splice import Splice, splice_rows
from toolrl_analysis.analysis.ablate.writers import (
    FileSlice,
    OutputTensor,
    SafetensorsWriter,
    SourceFiles,
    TorchFileWriter,
    check_destination,
    placeholder,
    shard_layout,
    shard_names,
    staged,
    write_shard_index,
)
from toolrl_analysis.analysis.checkpoints import Checkpoint
from toolrl_analysis.analysis.diff import MatchedTensor, PairPlan, ScratchBuffers
from toolrl_analysis.analysis.diff.stream import DEFAULT_CHUNK_ELEMENTS, chunk_ranges, torch_threads
from toolrl_analysis.errors import CheckpointError
from toolrl_analysis.io import torch_load_safely
from toolrl_analysis.models.checkpoint import POLICY_FORMAT

DEFAULT_SHARD_BYTES = 5 * 10**9  # Hugging Face's default max_shard_size
COPY_CHUNK_ELEMENTS = 1 << 22  # 4M entries: 8-16 MiB reads, few system calls, far below the memory budget
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth")


@dataclass
class _Entry:
    """One tensor of the output: where its values come from."""

    out: OutputTensor
    item: MatchedTensor | None  # None: copied from the starting model (not shared, or not spliced)
    tied_to: str | None = None  # the output tensor it shares storage with (kept tied in a .pt)


def output_format(path: Path) -> str:
    """What `--save PATH` writes: FILE.pt, FILE.safetensors, or an HF directory (a path without a suffix, or an
    existing directory). Any other suffix is a mistake, not a directory name."""
    if path.suffix == ".pt":
        return "pt"
    if path.suffix == ".safetensors":
        return "safetensors"
    if re.fullmatch(r"\.[A-Za-z]{1,12}", path.suffix) and not path.is_dir():  # a file type, not "Qwen2.5-7B"
        raise CheckpointError(
            f"--save {path}: write DIR (a Hugging Face directory), FILE.safetensors or FILE.pt, not {path.suffix}"
        )
    return "hf-directory"


def save_spliced(
    base: Checkpoint,
    trained: Checkpoint,
    plan: PairPlan,
    splice: Splice,
    path: str | Path,
    *,
    force: bool = False,
    shard_bytes: int = DEFAULT_SHARD_BYTES,
    chunk_elements: int = COPY_CHUNK_ELEMENTS,
    progress: Callable[[str, int, int], None] | None = None,
) -> dict[str, Any]:
    """Write the hybrid `splice` of the planned pair to `path` (see the module docstring); returns a summary."""
    path = Path(path)
    check_destination(path, force, [base.path, trained.path])
    start_side = trained if splice.start == "trained" else base
    kind = output_format(path)
    entries = _layout(start_side, plan, splice, drop_ties=kind != "pt")
    started = time.perf_counter()
    counts = {"parameters": 0}
    stream = _chunks(base, trained, start_side, entries, splice, chunk_elements, counts, progress)
    sources = SourceFiles()
    # One torch thread, as compare's loop on small machines: per-chunk work is short, and OpenMP's
    # barriers cost more than they gain on it.
    with torch_threads(1), staged(path, force, directory=kind == "hf-directory") as temporary:
        try:
            if kind == "pt":
                _write_pt(temporary, entries, stream, _metadata_source(start_side, base, trained), sources)
            elif kind == "safetensors":
                writer = SafetensorsWriter(temporary, [e.out for e in entries])
                for entry, _, rows in stream:
                    writer.write(entry.out.name, rows, sources)
                writer.close()
            else:
                source = _metadata_source(start_side, base, trained)
                _write_hf_directory(temporary, entries, stream, shard_bytes, source, sources)
        finally:
            sources.close()
    written = sum(e.out.nbytes for e in entries if e.tied_to is None)
    seconds = time.perf_counter() - started
    return {
        "path": str(path),
        "format": kind,
        "splice": splice.label,
        "start": splice.start,
        "tensors": len(entries),
        "bytes": written,
        "parameters_changed": counts["parameters"],
        "seconds": seconds,
        "gb_per_s": written / seconds / 1e9 if seconds > 0 else float("nan"),
    }


def _layout(start_side: Checkpoint, plan: PairPlan, splice: Splice, drop_ties: bool) -> list[_Entry]:
    """The starting model's tensors in its storage order, each with its source."""
    own_name = "trained_name" if splice.start == "trained" else "base_name"
    items = {item.name: item for item in plan.matched if getattr(item, own_name) == item.name}
    entries = []
    for name in start_side.names():
        info = start_side.info(name)
        tied_to = start_side.tied.get(name)
        if tied_to is not None and drop_ties:
            continue  # safetensors refuses shared storage; loaders re-tie the head from the config
        entries.append(_Entry(OutputTensor(name, info.dtype, info.shape), items.get(name), tied_to))
    return entries


def _chunks(
    base: Checkpoint,
    trained: Checkpoint,
    start_side: Checkpoint,
    entries: list[_Entry],
    splice: Splice,
    chunk_elements: int,
    counts: dict[str, int],
    progress: Callable[[str, int, int], None] | None,
) -> Iterator[tuple[_Entry, int, torch.Tensor | FileSlice]]:
    """(entry, first row, rows) of every stored tensor in output order. Rows wholly from one side are a
    FileSlice of its file where it stores them as the output does, else read into buffers reused from chunk
    to chunk (each chunk is written before the next is read); blended rows are computed in cache-sized
    chunks (the diff's size) so that the arithmetic's passes stay in cache."""
    buffers = ScratchBuffers()
    stored = [e for e in entries if e.tied_to is None]
    for done, entry in enumerate(stored, 1):
        info, item, dtype = start_side.info(entry.out.name), entry.item, entry.out.dtype
        touched = item is not None and splice.touches(item.name)
        size = min(chunk_elements, DEFAULT_CHUNK_ELEMENTS) if touched else chunk_elements
        for start, stop in chunk_ranges(info, size):
            coefficients = splice.coefficients(item, start, stop) if touched else splice.start_coefficient
            if not isinstance(coefficients, torch.Tensor) and coefficients == splice.start_coefficient:
                yield entry, start, _one_side(start_side, entry.out.name, start, stop, dtype, buffers)
                continue
            if isinstance(coefficients, torch.Tensor):
                counts["parameters"] += int((coefficients != splice.start_coefficient).sum())
            else:
                counts["parameters"] += (stop - start) * max(1, info.numel // max(1, info.rows))
            if not isinstance(coefficients, torch.Tensor) and coefficients in (0.0, 1.0):
                side, name = (base, item.base_name) if coefficients == 0.0 else (trained, item.trained_name)
                yield entry, start, _one_side(side, name, start, stop, dtype, buffers)
                continue
            base_rows = _read_rows(base, item.base_name, start, stop, buffers, "base")
            trained_rows = _read_rows(trained, item.trained_name, start, stop, buffers, "trained")
            yield entry, start, splice_rows(coefficients, base_rows, trained_rows, dtype, buffers)
        if progress is not None:
            progress(entry.out.name, done, len(stored))


def _read_rows(checkpoint: Checkpoint, name: str, start: int, stop: int, buffers: ScratchBuffers, key: str):
    info = checkpoint.info(name)
    nbytes = (stop - start) * max(1, info.nbytes // max(1, info.rows))
    return checkpoint.read(name, start, stop, out=buffers.get(key, nbytes))


def _one_side(
    checkpoint: Checkpoint, name: str, start: int, stop: int, dtype: torch.dtype, buffers: ScratchBuffers
) -> torch.Tensor | FileSlice:
    """Rows of one side as the output stores them: a FileSlice of its file when it holds them in `dtype`
    in a plain layout (copied by the kernel), else read and converted."""
    if checkpoint.info(name).dtype == dtype and (found := checkpoint.byte_range(name, start, stop)):
        return FileSlice(*found)
    return _read_rows(checkpoint, name, start, stop, buffers, "copy").to(dtype)


def _write_pt(path: Path, entries: list[_Entry], stream, source: Checkpoint, sources: SourceFiles) -> None:
    placeholders: dict[str, torch.Tensor] = {}
    for entry in entries:
        if entry.tied_to is None:
            placeholders[entry.out.name] = placeholder(entry.out)
    state = {e.out.name: placeholders[e.tied_to or e.out.name] for e in entries}
    config, files = source.config, _tokenizer_and_other_files(source)
    binaries = [v for v in files.values() if isinstance(v, torch.Tensor)]
    if config is not None and files:
        document: dict[str, Any] = {
            "format": POLICY_FORMAT,
            "state_dict": state,
            "config": config,
            "tokenizer": files,
        }
    else:
        document = state
    writer = TorchFileWriter(path, document)
    try:
        for tensor in binaries:  # real data in the document: torch reserved their bytes too
            writer.write(tensor, 0, tensor)
        for entry, start, rows in stream:
            writer.write(placeholders[entry.out.name], start, rows, sources)
    finally:
        writer.close()


def _write_hf_directory(
    directory: Path, entries: list[_Entry], stream, shard_bytes: int, source: Checkpoint, sources: SourceFiles
) -> None:
    shards = shard_layout([e.out for e in entries], shard_bytes)
    names = shard_names(len(shards))
    shard_of = {t.name: i for i, shard in enumerate(shards) for t in shard}
    writers: list[SafetensorsWriter | None] = [None] * len(shards)
    for entry, _, rows in stream:
        index = shard_of[entry.out.name]
        if writers[index] is None:
            writers[index] = SafetensorsWriter(directory / names[index], shards[index])
        writers[index].write(entry.out.name, rows, sources)
    for index, writer in enumerate(writers):
        (writer or SafetensorsWriter(directory / names[index], shards[index])).close()
    if len(shards) > 1:
        write_shard_index(directory, shards)
    if source.config is not None:
        (directory / "config.json").write_text(json.dumps(source.config, indent=2, default=str) + "\n")
    for name, content in _tokenizer_and_other_files(source).items():
        target = directory / name
        target.parent.mkdir(parents=True, exist_ok=True)
        if isinstance(content, str):
            target.write_text(content, encoding="utf-8")
        else:
            target.write_bytes(content.numpy().tobytes())


def _metadata_source(start_side: Checkpoint, base: Checkpoint, trained: Checkpoint) -> Checkpoint:
    """Where the config and tokenizer come from: the starting model, or the other side if it has none."""
    if start_side.config is not None:
        return start_side
    other = base if start_side is trained else trained
    return other if other.config is not None else start_side


def _tokenizer_and_other_files(source: Checkpoint) -> dict[str, str | torch.Tensor]:
    """Non-weight files that travel with a model: the tokenizer's and, for a directory, the rest beside the
    weights (generation config, chat template). Text as str, binary as a uint8 tensor (the policy format)."""
    files: dict[str, str | torch.Tensor] = {}
    if source.path.is_dir():
        for file in sorted(source.path.rglob("*")):
            name = file.relative_to(source.path).as_posix()
            if not file.is_file() or name == "config.json" or name.endswith(_WEIGHT_SUFFIXES):
                continue
            if name.endswith(".index.json"):
                continue
            data = file.read_bytes()
            try:
                files[name] = data.decode("utf-8")
            except UnicodeDecodeError:
                files[name] = torch.frombuffer(bytearray(data), dtype=torch.uint8).clone()
        return files
    if source.format == "pt" and source.config is not None:
        payload = torch_load_safely(source.path)
        tokenizer = payload.get("tokenizer") if isinstance(payload, dict) else None
        if isinstance(tokenizer, dict):
            files.update({str(k): v for k, v in tokenizer.items() if isinstance(v, str | torch.Tensor)})
    return files
