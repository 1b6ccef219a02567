"""Checkpoint writers that take one tensor's rows at a time, and atomic placement of what they write.

Both formats know every tensor's name, dtype and shape before any data exists, so the layout is fixed
first and the bytes follow chunk by chunk; memory holds one chunk, never a model.

- safetensors: the header (names, dtypes, shapes, byte offsets) is written first, then the data in header
  order; an HF shard set is several such files and `model.safetensors.index.json`.
- `.pt`: torch writes the pickle and reserves each storage's bytes (`torch.serialization.skip_data`) from
  placeholder tensors that are never touched (so never resident); the bytes are then written in place at
  each storage record's offset in the zip.

`staged(path, force)` gives a temporary sibling to write into and renames it over `path` only when
everything is written: a failure or Ctrl-C leaves no half-written checkpoint behind.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
import zipfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from toolrl_analysis.analysis.checkpoints import SAFETENSORS_DTYPES
from toolrl_analysis.errors import CheckpointError

SAFETENSORS_NAMES = {dtype: name for name, dtype in SAFETENSORS_DTYPES.items()}


@dataclass(frozen=True)
class OutputTensor:
    """A tensor to be written: its name, dtype and shape."""

    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        return int(torch.Size(self.shape).numel()) * torch.empty((), dtype=self.dtype).element_size()


def tensor_bytes(rows: torch.Tensor) -> memoryview:
    """The raw bytes of a tensor (any dtype, bf16 included), without a copy when it is contiguous."""
    flat = rows.contiguous().reshape(-1)
    return memoryview(flat.view(torch.uint8).numpy()).cast("B")


@dataclass(frozen=True)
class FileSlice:
    """Bytes to copy as they are from an input file (`Checkpoint.byte_range`): the kernel copies them
    file to file (`os.copy_file_range`), never through our memory."""

    path: Path
    offset: int
    nbytes: int


class SourceFiles:
    """Open input files for FileSlice copies, one descriptor per file, closed together."""

    def __init__(self):
        self._fds: dict[Path, int] = {}

    def copy(self, piece: FileSlice, fd: int, position: int | None) -> int:
        """Copy `piece` into `fd` at `position` (None: the descriptor's own position); bytes copied."""
        source = self._fds.get(piece.path)
        if source is None:
            source = self._fds[piece.path] = os.open(piece.path, os.O_RDONLY)
        done = 0
        while done < piece.nbytes:
            target = None if position is None else position + done
            try:
                count = os.copy_file_range(source, fd, piece.nbytes - done, piece.offset + done, target)
            except OSError:  # no in-kernel copy here (old kernel, some filesystems): read and write instead
                data = os.pread(source, min(piece.nbytes - done, 64 << 20), piece.offset + done)
                write_all(fd, memoryview(data), target)
                count = len(data)
            if count <= 0:
                raise CheckpointError(f"{piece.path} is truncated: copied {done} of {piece.nbytes} bytes")
            done += count
        return done

    def close(self) -> None:
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()


def write_all(fd: int, data: memoryview, position: int | None = None) -> None:
    """All of `data` to `fd`, at `position` or (None) at the descriptor's position; a write may be partial."""
    done = 0
    while done < len(data):
        if position is None:
            done += os.write(fd, data[done:])
        else:
            done += os.pwrite(fd, data[done:], position + done)


# ---------------------------------------------------------------------------------------------
# safetensors
# ---------------------------------------------------------------------------------------------
class SafetensorsWriter:
    """One safetensors file written front to back: `write(name, rows)` in layout order, then `close()`."""

    def __init__(self, path: Path, tensors: Sequence[OutputTensor], metadata: dict[str, str] | None = None):
        header: dict[str, Any] = {"__metadata__": metadata or {"format": "pt"}}
        offset = 0
        self.expected: list[tuple[str, int]] = []
        for tensor in tensors:
            if tensor.dtype not in SAFETENSORS_NAMES:
                raise CheckpointError(f"safetensors cannot hold {tensor.name} ({tensor.dtype})")
            header[tensor.name] = {
                "dtype": SAFETENSORS_NAMES[tensor.dtype],
                "shape": list(tensor.shape),
                "data_offsets": [offset, offset + tensor.nbytes],
            }
            offset += tensor.nbytes
            self.expected.append((tensor.name, tensor.nbytes))
        text = json.dumps(header, separators=(",", ":")).encode("utf-8")
        text += b" " * (-len(text) % 8)  # data starts 8-byte aligned, as the safetensors library writes
        self.path = path
        self.fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        write_all(self.fd, memoryview(len(text).to_bytes(8, "little") + text))
        self.position, self.written = 0, 0  # index into expected, bytes of the current tensor so far

    def write(self, name: str, rows: torch.Tensor | FileSlice, sources: SourceFiles | None = None) -> None:
        """The next rows of tensor `name`: a tensor, or a FileSlice that `sources` copies from an input."""
        expected_name, nbytes = self.expected[self.position]
        if name != expected_name:  # pragma: no cover - a bug in the caller's order
            raise AssertionError(f"writing {name}, the layout expects {expected_name}")
        if isinstance(rows, FileSlice):
            self.written += sources.copy(rows, self.fd, None)
        else:
            data = tensor_bytes(rows)
            write_all(self.fd, data)
            self.written += len(data)
        if self.written == nbytes:
            self.position, self.written = self.position + 1, 0

    def close(self) -> None:
        complete = self.position == len(self.expected) and not self.written
        os.close(self.fd)
        if not complete:  # pragma: no cover - a bug: the layout promised more bytes than were written
            raise AssertionError(f"{self.path}: stopped at tensor {self.position} of {len(self.expected)}")


def shard_layout(tensors: Sequence[OutputTensor], shard_bytes: int) -> list[list[OutputTensor]]:
    """Tensors in order, cut into shards of at most `shard_bytes` (a larger tensor gets a shard of its own)."""
    shards: list[list[OutputTensor]] = [[]]
    size = 0
    for tensor in tensors:
        if shards[-1] and size + tensor.nbytes > shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(tensor)
        size += tensor.nbytes
    return shards


def shard_names(count: int) -> list[str]:
    if count == 1:
        return ["model.safetensors"]
    return [f"model-{i:05d}-of-{count:05d}.safetensors" for i in range(1, count + 1)]


def write_shard_index(directory: Path, shards: Sequence[Sequence[OutputTensor]]) -> Path:
    names = shard_names(len(shards))
    weight_map = {t.name: file for file, shard in zip(names, shards, strict=True) for t in shard}
    total = sum(t.nbytes for shard in shards for t in shard)
    path = directory / "model.safetensors.index.json"
    path.write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2) + "\n"
    )
    return path


# ---------------------------------------------------------------------------------------------
# .pt (torch zip)
# ---------------------------------------------------------------------------------------------
class TorchFileWriter:
    """A `.pt` whose storages are filled after the pickle is written.

    `document` is the object to save, with placeholder tensors (`placeholder(tensor)`) where the data goes;
    tensors that share a placeholder share one storage in the file (a tied embedding stays tied). Then
    `write(placeholder, start_row, rows)` puts rows in place.
    """

    def __init__(self, path: Path, document: Any):
        self.path = path
        with torch.serialization.skip_data():
            torch.save(document, path)
        offsets = _storage_offsets(path)
        storages = _storages_in_pickle_order(document)
        if len(storages) != len(offsets):  # pragma: no cover - torch changed how it numbers storages
            raise AssertionError(f"{path}: {len(offsets)} storage records for {len(storages)} tensors")
        self.offsets: dict[int, int] = {}
        for key, tensor in enumerate(storages):
            offset, size = offsets[str(key)]
            if size != tensor.untyped_storage().nbytes():  # pragma: no cover - same
                raise AssertionError(f"{path}: storage record {key} has {size} bytes, expected another size")
            self.offsets[id(tensor)] = offset
        self.fd = os.open(path, os.O_WRONLY)

    def write(
        self,
        placeholder: torch.Tensor,
        start_row: int,
        rows: torch.Tensor | FileSlice,
        sources: SourceFiles | None = None,
    ) -> None:
        row_bytes = placeholder.element_size() * (placeholder[0].numel() if placeholder.dim() else 1)
        position = self.offsets[id(placeholder)] + start_row * row_bytes
        if isinstance(rows, FileSlice):
            sources.copy(rows, self.fd, position)
        else:
            write_all(self.fd, tensor_bytes(rows), position)

    def close(self) -> None:
        os.close(self.fd)


def placeholder(tensor: OutputTensor) -> torch.Tensor:
    """An uninitialised tensor standing in for the data: its pages are never touched, so never resident."""
    return torch.empty(tensor.shape, dtype=tensor.dtype)


def _storages_in_pickle_order(document: Any) -> list[torch.Tensor]:
    """Tensors with distinct storages in the order torch's pickler meets them (depth first, dicts in
    insertion order): the order in which torch.save numbers its storage records."""
    seen: set[int] = set()
    found: list[torch.Tensor] = []

    def walk(value: Any) -> None:
        if isinstance(value, torch.Tensor):
            key = value.untyped_storage()._cdata
            if key not in seen:
                seen.add(key)
                found.append(value)
        elif isinstance(value, dict):
            for k, v in value.items():
                walk(k)
                walk(v)
        elif isinstance(value, list | tuple):
            for v in value:
                walk(v)

    walk(document)
    return found


def _storage_offsets(path: Path) -> dict[str, tuple[int, int]]:
    """Storage key -> (byte offset of its data in the file, size) from the zip's own records."""
    reader = torch._C.PyTorchFileReader(str(path))
    with zipfile.ZipFile(path) as archive:
        sizes = {info.filename.split("/", 1)[1]: info.file_size for info in archive.infolist()}
    return {
        record.removeprefix("data/"): (reader.get_record_offset(record), sizes[record])
        for record in reader.get_all_records()
        if record.startswith("data/")
    }


# ---------------------------------------------------------------------------------------------
# Atomic placement
# ---------------------------------------------------------------------------------------------
def check_destination(path: Path, force: bool, inputs: Sequence[Path]) -> None:
    """Refuse to write over an existing path without --force, and ever over (or inside) an input."""
    target = path.resolve()
    for source in inputs:
        source = source.resolve()
        if target == source or source in target.parents or target in source.parents:
            raise CheckpointError(f"--save {path} would overwrite the checkpoint it reads ({source})")
    if path.exists() and not force:
        raise CheckpointError(f"{path} exists; pass --force to replace it")
    if not path.parent.is_dir():
        raise CheckpointError(f"cannot write {path}: {path.parent} is not a directory")


@contextlib.contextmanager
def staged(path: Path, force: bool, directory: bool) -> Iterator[Path]:
    """A temporary sibling of `path` (a file or a directory) that replaces `path` only on success."""
    parent = path.parent
    if directory:
        temporary = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".partial", dir=parent))
    else:
        fd, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".partial", dir=parent)
        os.close(fd)
        temporary = Path(name)
    try:
        yield temporary
        if directory:
            os.chmod(temporary, 0o755)  # mkdtemp makes it private; a checkpoint is an ordinary directory
        else:
            os.chmod(temporary, 0o644)
        _replace(temporary, path, force)
    finally:
        if temporary.is_dir():
            shutil.rmtree(temporary, ignore_errors=True)
        elif temporary.exists():
            temporary.unlink()


def _replace(temporary: Path, path: Path, force: bool) -> None:
    if not path.exists() and not path.is_symlink():
        os.rename(temporary, path)
        return
    if not force:  # appeared while we were writing
        raise CheckpointError(f"{path} exists; pass --force to replace it")
    if path.is_file() and temporary.is_file():
        os.replace(temporary, path)
        return
    # A directory cannot be swapped in one step: move the old one aside, the new one in, then delete.
    old = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".old", dir=path.parent))
    os.rename(path, old / path.name)
    os.rename(temporary, path)
    shutil.rmtree(old, ignore_errors=True)
