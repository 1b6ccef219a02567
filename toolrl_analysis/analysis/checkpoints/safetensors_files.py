"""Safetensors files (one, or an HF shard set), read with `preadv` into buffers we own rather than
memory-mapped, so resident memory stays at the chunk being processed, not the shard."""

from __future__ import annotations

import json
import os
import struct
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import torch

from toolrl_analysis.analysis.checkpoints.base import (
    Checkpoint,
    TensorInfo,
    as_view,
    row_range,
    rows_shape,
    strip_wrapper_prefixes,
)
from toolrl_analysis.errors import CheckpointError

SAFETENSORS_DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
    "U16": torch.uint16,
    "U32": torch.uint32,
    "U64": torch.uint64,
}
_MAX_SAFETENSORS_HEADER = 256 * 1024 * 1024
_MAX_READ = 1 << 30  # Linux caps one read at ~2 GiB; stay well under it


@dataclass(frozen=True)
class _SafetensorsEntry:
    info: TensorInfo
    file: Path
    offset: int  # absolute byte offset of the tensor's data in `file`


def read_safetensors_header(path: Path) -> tuple[dict[str, _SafetensorsEntry], dict[str, str]]:
    """Parse and validate a safetensors header (8-byte little-endian length, then JSON).

    Checks that every tensor's byte range matches its shape and dtype and lies inside the file, so a
    truncated download is reported here rather than as garbage later.
    """
    path = Path(path)
    try:
        size = path.stat().st_size
        with open(path, "rb") as handle:
            prefix = handle.read(8)
            if len(prefix) < 8:
                raise CheckpointError(f"{path} is not a safetensors file (only {size} bytes)")
            (header_len,) = struct.unpack("<Q", prefix)
            if header_len > min(size - 8, _MAX_SAFETENSORS_HEADER):
                raise CheckpointError(
                    f"{path} is not a safetensors file, or is truncated (bad header length)"
                )
            raw = handle.read(header_len)
    except OSError as exc:
        raise CheckpointError(f"cannot read {path}: {exc.strerror or exc}") from None
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise CheckpointError(f"{path} is not a safetensors file (header is not JSON)") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{path} is not a safetensors file (header is not a JSON object)")
    metadata = header.pop("__metadata__", None) or {}
    data_start = 8 + header_len
    entries: dict[str, _SafetensorsEntry] = {}
    data_end = 0
    for name, spec in header.items():
        try:
            dtype = SAFETENSORS_DTYPES[spec["dtype"]]
            shape = tuple(int(d) for d in spec["shape"])
            begin, end = (int(x) for x in spec["data_offsets"])
        except (KeyError, TypeError, ValueError):
            raise CheckpointError(f"{path}: malformed safetensors entry for tensor {name}") from None
        info = TensorInfo(name, shape, dtype)
        if end - begin != info.nbytes or begin < 0:
            raise CheckpointError(
                f"{path}: tensor {name} has {end - begin} bytes, its shape needs {info.nbytes}"
            )
        entries[name] = _SafetensorsEntry(info, path, data_start + begin)
        data_end = max(data_end, end)
    if data_start + data_end > size:
        raise CheckpointError(
            f"{path} is truncated: the header promises {data_start + data_end} bytes, the file has {size}"
        )
    # Storage order, so that streaming reads move forward through the file.
    ordered = dict(sorted(entries.items(), key=lambda item: item[1].offset))
    return ordered, {str(k): str(v) for k, v in metadata.items()} if isinstance(metadata, dict) else {}


class SafetensorsCheckpoint(Checkpoint):
    """One or several safetensors files (an HF shard set) behind one tensor -> shard index."""

    format = "safetensors"

    def __init__(
        self, path: Path, files: Iterable[Path], config: dict | None = None, format: str | None = None
    ):
        entries: dict[str, _SafetensorsEntry] = {}
        for file in files:
            file_entries, _ = read_safetensors_header(file)
            for name, entry in file_entries.items():
                if name in entries:
                    raise CheckpointError(f"{path}: tensor {name} appears in two shards")
                entries[name] = entry
        entries = strip_wrapper_prefixes(entries)
        entries = {
            n: _SafetensorsEntry(TensorInfo(n, e.info.shape, e.info.dtype), e.file, e.offset)
            for n, e in entries.items()
        }
        super().__init__(path, {name: e.info for name, e in entries.items()}, config)
        self._entries = entries
        self._open_file: Path | None = None
        self._fd: int | None = None
        if format:
            self.format = format

    def _descriptor(self, file: Path) -> int:
        # One shard open at a time.
        if self._open_file != file:
            self.close()
            try:
                self._fd = os.open(file, os.O_RDONLY)
            except OSError as exc:
                raise CheckpointError(f"cannot open {file}: {exc.strerror or exc}") from None
            self._open_file = file
        assert self._fd is not None
        return self._fd

    def byte_range(self, name, start=0, stop=None):
        info = self.info(name)
        start, stop = row_range(info, start, stop)
        entry = self._entries[name]
        row_bytes = info.nbytes // info.rows if info.rows else 0
        return entry.file, entry.offset + start * row_bytes, (stop - start) * row_bytes

    def _read(self, info, start, stop, out):
        entry = self._entries[info.name]
        row_bytes = info.nbytes // info.rows if info.rows else 0
        nbytes = (stop - start) * row_bytes
        result = as_view(out, nbytes, info.dtype, rows_shape(info, start, stop))
        if nbytes == 0:
            return result
        buffer = memoryview(result.view(-1).view(torch.uint8).numpy()).cast("B")
        fd = self._descriptor(entry.file)
        offset = entry.offset + start * row_bytes
        done = 0
        while done < nbytes:
            count = os.preadv(fd, [buffer[done : min(nbytes, done + _MAX_READ)]], offset + done)
            if count <= 0:
                raise CheckpointError(f"{entry.file} is truncated: could not read tensor {info.name}")
            done += count
        return result

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
        self._fd = None
        self._open_file = None
