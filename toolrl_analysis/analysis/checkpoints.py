"""Lazy, tensor-at-a-time readers for every checkpoint format the toolkit accepts (DESIGN §7).

Formats: a `.pt` state dict (plain, or wrapped under `state_dict` / `model`, e.g. our trainer's
`toolrl-analysis.policy/1` file), a `.safetensors` file, a Hugging Face model directory (single
`model.safetensors`, sharded with `model.safetensors.index.json`, or `pytorch_model.bin[.index.json]`),
and a PEFT LoRA adapter directory applied to a base checkpoint.

Following mergekit's lazy loader, a checkpoint is an index of tensor -> shard; a read touches one shard,
and only one shard per checkpoint is held open. Safetensors files are read with `preadv` into buffers we
own rather than memory-mapped, so resident memory stays at the chunk being processed, not the shard.
`.pt` files go through `torch.load(weights_only=True, mmap=True)`: never unpickle code.

Every user-caused failure (missing path, not a checkpoint, truncated file, unsafe pickle) raises
`CheckpointError` with a one-line message naming the file.
"""

from __future__ import annotations

import functools
import json
import math
import os
import re
import struct
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from toolrl_analysis.errors import CheckpointError, first_names
from toolrl_analysis.io import torch_load_safely
from toolrl_analysis.models.checkpoint import POLICY_FORMAT

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
# Prefixes that wrappers add to every key (DDP, torch.compile); stripped so checkpoints line up.
WRAPPER_PREFIXES = ("module.", "_orig_mod.")
PEFT_PREFIX = "base_model.model."
_MAX_SAFETENSORS_HEADER = 256 * 1024 * 1024
_MAX_READ = 1 << 30  # Linux caps one read at ~2 GiB; stay well under it


@dataclass(frozen=True)
class TensorInfo:
    """What the index knows about a tensor without reading it."""

    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def nbytes(self) -> int:
        return self.numel * _itemsize(self.dtype)

    @property
    def rows(self) -> int:
        """Length of the first dimension: reads are ranges of rows (1 for a scalar)."""
        return self.shape[0] if self.shape else 1


@functools.cache
def _itemsize(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


def _as_view(
    out: torch.Tensor | None, nbytes: int, dtype: torch.dtype, shape: tuple[int, ...]
) -> torch.Tensor:
    """A tensor of `shape`/`dtype` backed by the byte buffer `out` (or a fresh one)."""
    if out is None:
        buffer = torch.empty(nbytes, dtype=torch.uint8)
    else:
        if out.dtype != torch.uint8 or out.numel() < nbytes:
            raise ValueError(f"out buffer too small: {out.numel()} bytes for {nbytes}")
        buffer = out[:nbytes]
    return buffer.view(dtype).view(shape)


def _rows_shape(info: TensorInfo, start: int, stop: int) -> tuple[int, ...]:
    return (stop - start, *info.shape[1:]) if info.shape else ()


def _row_range(info: TensorInfo, start: int, stop: int | None) -> tuple[int, int]:
    stop = info.rows if stop is None else min(stop, info.rows)
    if not 0 <= start <= stop:
        raise ValueError(f"bad row range {start}:{stop} for {info.name} with {info.rows} rows")
    return start, stop


class Checkpoint:
    """A named set of tensors read lazily. Subclasses implement `_read`.

    `read(name, start, stop, out=...)` returns rows `start:stop` of a tensor in its stored dtype; with a
    uint8 `out` buffer the result is a view into it (the caller owns it and may modify it), otherwise a
    fresh tensor. Use as a context manager, or call `close()`, to release open shards.
    """

    format: str = "checkpoint"

    def __init__(self, path: Path, infos: Mapping[str, TensorInfo], config: dict | None = None):
        self.path = Path(path)
        self._infos = dict(infos)
        self.config = config
        # name -> the earlier name whose storage it shares (tied embeddings in a torch state dict).
        self.tied: dict[str, str] = {}

    # -- index ----------------------------------------------------------------------------------
    def names(self) -> list[str]:
        """Tensor names in storage order (shard by shard), the cheapest order to stream them."""
        return list(self._infos)

    def info(self, name: str) -> TensorInfo:
        try:
            return self._infos[name]
        except KeyError:
            raise CheckpointError(f"{self.path}: no tensor named {name}") from None

    def infos(self) -> dict[str, TensorInfo]:
        return dict(self._infos)

    def __contains__(self, name: object) -> bool:
        return name in self._infos

    def __len__(self) -> int:
        return len(self._infos)

    @property
    def model_type(self) -> str | None:
        return (self.config or {}).get("model_type")

    @property
    def nbytes(self) -> int:
        return sum(info.nbytes for info in self._infos.values())

    # -- data -----------------------------------------------------------------------------------
    def read(self, name: str, start: int = 0, stop: int | None = None, out: torch.Tensor | None = None):
        info = self.info(name)
        start, stop = _row_range(info, start, stop)
        return self._read(info, start, stop, out)

    def get(self, name: str) -> torch.Tensor:
        """The whole tensor, freshly allocated, in its stored dtype."""
        return self.read(name)

    def iter_tensors(self, names: Iterable[str] | None = None) -> Iterator[tuple[str, torch.Tensor]]:
        """Yield (name, tensor) one at a time in storage order; memory holds one tensor at a time."""
        wanted = None if names is None else set(names)
        for name in self.names():
            if wanted is None or name in wanted:
                yield name, self.get(name)

    def state_dict(self, names: Iterable[str] | None = None, dtype: torch.dtype | None = None) -> dict:
        """Everything in memory at once: for small models only (the tiny policy, tests)."""
        return {n: (t if dtype is None else t.to(dtype)) for n, t in self.iter_tensors(names)}

    def _read(self, info: TensorInfo, start: int, stop: int, out: torch.Tensor | None) -> torch.Tensor:
        raise NotImplementedError

    def close(self) -> None:
        """Release open shards; reading again reopens them."""

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"{type(self).__name__}({str(self.path)!r}, {len(self)} tensors)"


# ---------------------------------------------------------------------------------------------
# safetensors
# ---------------------------------------------------------------------------------------------
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
        entries = _strip_wrapper_prefixes(entries)
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

    def _read(self, info, start, stop, out):
        entry = self._entries[info.name]
        row_bytes = info.nbytes // info.rows if info.rows else 0
        nbytes = (stop - start) * row_bytes
        result = _as_view(out, nbytes, info.dtype, _rows_shape(info, start, stop))
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


# ---------------------------------------------------------------------------------------------
# torch pickles (.pt, pytorch_model.bin)
# ---------------------------------------------------------------------------------------------
def extract_state_dict(obj: Any, path: Path) -> tuple[dict[str, torch.Tensor], dict | None]:
    """The tensors of a loaded `.pt`: a plain state dict or one wrapped under `state_dict` / `model`."""
    config = None
    if isinstance(obj, Mapping):
        if obj.get("format") == POLICY_FORMAT or not _is_state_dict(obj):
            for key in ("state_dict", "model"):
                inner = obj.get(key)
                if isinstance(inner, Mapping) and _is_state_dict(inner):
                    config = obj.get("config") if isinstance(obj.get("config"), dict) else None
                    obj = inner
                    break
        tensors = {str(k): v for k, v in obj.items() if isinstance(v, torch.Tensor)}
        if tensors:  # a state dict, perhaps with a few bookkeeping entries beside the tensors
            return tensors, config
        keys = ", ".join(sorted(map(str, obj))[:8])
        raise CheckpointError(f"{path} holds a dict but no state dict (keys: {keys})")
    raise CheckpointError(f"{path} does not hold a state dict (found {type(obj).__name__})")


def _is_state_dict(obj: Mapping) -> bool:
    return bool(obj) and all(isinstance(v, torch.Tensor) for k, v in obj.items() if k != "_metadata")


class TorchCheckpoint(Checkpoint):
    """`.pt` / `pytorch_model.bin` files, one shard loaded (memory-mapped) at a time."""

    format = "pt"

    def __init__(self, path: Path, files: list[Path], config: dict | None = None, format: str | None = None):
        self._files = list(files)
        self._shard_of: dict[str, int] = {}
        self._original_name: dict[str, str] = {}
        infos: dict[str, TensorInfo] = {}
        shared: dict[str, str] = {}
        first_with_storage: dict[tuple, str] = {}
        self._loaded: tuple[int, dict[str, torch.Tensor]] | None = None
        for index, file in enumerate(self._files):
            tensors, file_config = extract_state_dict(torch_load_safely(file), file)
            config = config or file_config
            for name, renamed in _strip_wrapper_prefixes({n: n for n in tensors}).items():
                if name in infos:
                    raise CheckpointError(f"{path}: tensor {name} appears in two shards")
                tensor = tensors[renamed]
                infos[name] = TensorInfo(name, tuple(tensor.shape), tensor.dtype)
                storage_key = (
                    index,
                    tensor.untyped_storage().data_ptr(),
                    tensor.storage_offset(),
                    tuple(tensor.shape),
                    tuple(tensor.stride()),
                    tensor.dtype,
                )
                if tensor.numel() and storage_key in first_with_storage:
                    shared[name] = first_with_storage[storage_key]
                first_with_storage.setdefault(storage_key, name)
                self._shard_of[name] = index
                self._original_name[name] = renamed
            if len(self._files) == 1:
                self._loaded = (0, tensors)  # keep the single mmap'd file instead of loading it twice
        super().__init__(path, infos, config)
        self.tied = shared
        if format:
            self.format = format

    def _tensors(self, index: int) -> dict[str, torch.Tensor]:
        if self._loaded is None or self._loaded[0] != index:
            self._loaded = None  # drop the previous shard before mapping the next one
            tensors, _ = extract_state_dict(torch_load_safely(self._files[index]), self._files[index])
            self._loaded = (index, tensors)
        return self._loaded[1]

    def _read(self, info, start, stop, out):
        tensor = self._tensors(self._shard_of[info.name])[self._original_name[info.name]]
        rows = tensor[start:stop] if tensor.dim() else tensor
        if out is None:
            return rows.clone()  # never hand out views of the memory map: writes would reach the file
        result = _as_view(out, rows.numel() * rows.element_size(), rows.dtype, tuple(rows.shape))
        result.copy_(rows)
        return result

    def close(self) -> None:
        self._loaded = None


def _strip_wrapper_prefixes(mapping: dict) -> dict:
    for prefix in WRAPPER_PREFIXES:
        if mapping and all(str(k).startswith(prefix) for k in mapping):
            mapping = {str(k)[len(prefix) :]: v for k, v in mapping.items()}
    return mapping


# ---------------------------------------------------------------------------------------------
# PEFT LoRA adapters
# ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class LoraModule:
    """One adapted module: its update is `scale * B @ A` (transposed for fan-in-fan-out / embeddings)."""

    target: str  # the base tensor it updates, e.g. model.layers.0.self_attn.q_proj.weight
    lora_a: str  # adapter tensor names
    lora_b: str
    scale: float
    transpose: bool  # GPT-2 Conv1D (fan_in_fan_out) and embeddings store the update transposed
    bias: str | None = None  # lora_B.bias (lora_bias=True) adds scale * bias to the module's bias


class LoraCheckpoint(Checkpoint):
    """A PEFT LoRA adapter directory applied to base weights: reads give base + scale * B @ A in float32.

    `delta(name, start, stop)` gives the update alone (exact, without the rounding of a merged weight),
    or None where the adapter leaves a tensor as the base has it.
    """

    format = "peft-lora"

    def __init__(self, path: Path, base: Checkpoint):
        path = Path(path)
        self.base = base
        self.adapter_config = _read_json(path / "adapter_config.json")
        peft_type = str(self.adapter_config.get("peft_type", "LORA")).upper()
        if peft_type != "LORA":
            raise CheckpointError(f"{path}: PEFT adapter type {peft_type} is not supported (only LoRA)")
        if self.adapter_config.get("use_dora"):
            raise CheckpointError(f"{path}: DoRA adapters are not supported (only plain LoRA)")
        self.adapter = _open_adapter_weights(path)
        adapter_names = set(self.adapter.names())
        self.modules: dict[str, LoraModule] = {}
        self.replaced: dict[str, str] = {}  # base tensor -> adapter tensor holding its full new value
        for name in self.adapter.names():
            self._index_adapter_tensor(path, name, adapter_names)
        infos = {}
        for name, info in base.infos().items():
            changed = name in self.modules or name in self.replaced or self._bias_module(name) is not None
            infos[name] = TensorInfo(name, info.shape, torch.float32) if changed else info
            if name in self.replaced:
                replacement = self.adapter.info(self.replaced[name])
                if replacement.shape != info.shape:
                    raise CheckpointError(
                        f"{path}: adapter tensor {replacement.name} has shape {list(replacement.shape)}, "
                        f"base {name} has {list(info.shape)}"
                    )
        unknown = sorted(({m.target for m in self.modules.values()} | set(self.replaced)) - set(infos))
        if unknown:
            raise CheckpointError(
                f"{path}: the adapter updates tensors the base lacks: {first_names(unknown)} (wrong base checkpoint?)"
            )
        for module in self.modules.values():
            self._check_shapes(path, module, infos[module.target].shape)
        super().__init__(path, infos, base.config)

    # -- index --------------------------------------------------------------------------------------
    def _index_adapter_tensor(self, path: Path, name: str, adapter_names: set[str]) -> None:
        key = name[len(PEFT_PREFIX) :] if name.startswith(PEFT_PREFIX) else name
        if "lora_magnitude_vector" in key:
            raise CheckpointError(f"{path}: DoRA adapters are not supported (only plain LoRA)")
        match = _LORA_KEY.fullmatch(key)
        if match is None:
            # A full tensor saved with the adapter: modules_to_save, or an embedding's base_layer.
            for wrapper in (
                ".modules_to_save.default.",
                ".modules_to_save.",
                ".base_layer.",
                ".original_module.",
            ):
                key = key.replace(wrapper, ".")
            self.replaced[key] = name
            return
        if match["kind"] not in ("A", "embedding_A"):
            return  # B tensors are indexed from their A partner
        embedding = match["kind"] == "embedding_A"
        stem = name[: len(name) - len(key) + match.start("kind")]  # "...q_proj.lora_"
        b_name = stem + ("embedding_B" if embedding else "B.weight")
        if b_name not in adapter_names:
            raise CheckpointError(f"{path}: adapter tensor {name} has no lora_B partner")
        module = match["module"].removesuffix(".base_layer")
        target = module + ".weight"
        rank = self.adapter.info(name).shape[0]
        self.modules[target] = LoraModule(
            target=target,
            lora_a=name,
            lora_b=b_name,
            scale=self._scale(module, rank),
            transpose=embedding or bool(self.adapter_config.get("fan_in_fan_out")),
            bias=stem + "B.bias" if stem + "B.bias" in adapter_names else None,
        )

    def _scale(self, module: str, rank: int) -> float:
        # PEFT's alpha_pattern keys match a suffix of the module name (peft's get_pattern_key).
        alpha = self.adapter_config.get("lora_alpha", 8)
        for pattern, value in (self.adapter_config.get("alpha_pattern") or {}).items():
            if re.match(rf"(.*\.)?({pattern})$", module):
                alpha = value
                break
        if rank <= 0:
            return 0.0
        return float(alpha) / (math.sqrt(rank) if self.adapter_config.get("use_rslora") else rank)

    def _check_shapes(self, path: Path, module: LoraModule, shape: tuple[int, ...]) -> None:
        a, b = self.adapter.info(module.lora_a).shape, self.adapter.info(module.lora_b).shape
        update = (a[1], b[0]) if module.transpose else (b[0], a[1])
        if len(shape) != 2 or tuple(shape) != update or a[0] != b[1]:
            raise CheckpointError(
                f"{path}: LoRA update for {module.target} has shape {list(update)}, the base tensor {list(shape)}"
            )

    def _bias_module(self, name: str) -> LoraModule | None:
        if not name.endswith(".bias"):
            return None
        module = self.modules.get(name[: -len(".bias")] + ".weight")
        return module if module is not None and module.bias is not None else None

    # -- data ---------------------------------------------------------------------------------------
    def delta(self, name: str, start: int = 0, stop: int | None = None) -> torch.Tensor | None:
        """Rows start:stop of the adapter's update of `name` in float32; None where the adapter leaves the
        tensor as the base has it, or replaces it outright (then only `read` minus base tells the change)."""
        info = self.info(name)
        start, stop = _row_range(info, start, stop)
        return None if name in self.replaced else self._low_rank_update(name, start, stop)

    def _low_rank_update(self, name: str, start: int, stop: int) -> torch.Tensor | None:
        module = self.modules.get(name)
        if module is not None:
            a = self.adapter.get(module.lora_a).float()
            b = self.adapter.get(module.lora_b).float()
            if module.transpose:  # rows of (B @ A)^T are columns of A
                return (a[:, start:stop].T @ b.T) * module.scale
            return (b[start:stop] @ a) * module.scale
        bias_module = self._bias_module(name)
        if bias_module is not None:
            return self.adapter.get(bias_module.bias).float()[start:stop] * bias_module.scale
        return None

    def _read(self, info, start, stop, out):
        if info.name in self.replaced:
            rows = self.adapter.read(self.replaced[info.name], start, stop)
        else:
            rows = self.base.read(info.name, start, stop)
        update = self._low_rank_update(info.name, start, stop)
        if update is not None or info.dtype == torch.float32:
            rows = rows.float() if update is None else rows.float() + update
        if out is None:
            return rows
        result = _as_view(out, rows.numel() * rows.element_size(), rows.dtype, tuple(rows.shape))
        result.copy_(rows)
        return result

    def close(self) -> None:
        self.adapter.close()
        self.base.close()


_LORA_KEY = re.compile(r"(?P<module>.+)\.lora_(?P<kind>A|B|embedding_A|embedding_B)(?:\.(?:weight|bias))?")


def _open_adapter_weights(path: Path) -> Checkpoint:
    safetensors_file = path / "adapter_model.safetensors"
    if safetensors_file.is_file():
        return SafetensorsCheckpoint(path, [safetensors_file])
    bin_file = path / "adapter_model.bin"
    if bin_file.is_file():
        return TorchCheckpoint(path, [bin_file])
    raise CheckpointError(
        f"{path} has adapter_config.json but no adapter_model.safetensors or adapter_model.bin"
    )


# ---------------------------------------------------------------------------------------------
# Opening any path
# ---------------------------------------------------------------------------------------------
def is_lora_adapter(path: str | os.PathLike) -> bool:
    return (Path(path) / "adapter_config.json").is_file()


def detect_format(path: str | os.PathLike) -> str:
    """One of: pt, safetensors, hf-safetensors, hf-sharded, hf-bin, hf-bin-sharded, peft-lora.

    Files are recognised by content, not by extension, so a mislabelled file still gets a clear error.
    """
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"no such checkpoint: {path}")
    if path.is_dir():
        if is_lora_adapter(path):
            return "peft-lora"
        for marker, kind in (
            ("model.safetensors.index.json", "hf-sharded"),
            ("model.safetensors", "hf-safetensors"),
            ("pytorch_model.bin.index.json", "hf-bin-sharded"),
            ("pytorch_model.bin", "hf-bin"),
        ):
            if (path / marker).is_file():
                return kind
        raise CheckpointError(
            f"{path} is not a checkpoint directory (no model.safetensors, model.safetensors.index.json, "
            "pytorch_model.bin or adapter_config.json)"
        )
    try:
        with open(path, "rb") as handle:
            head = handle.read(16)
    except OSError as exc:
        raise CheckpointError(f"cannot read {path}: {exc.strerror or exc}") from None
    if head[:4] == b"PK\x03\x04" or head[:1] == b"\x80":  # zip (torch.save) or a raw pickle
        return "pt"
    if len(head) >= 9 and head[8:9] == b"{":
        return "safetensors"
    raise CheckpointError(
        f"{path} is not a checkpoint (expected a .pt state dict, a .safetensors file or a model directory)"
    )


def open_checkpoint(
    path: str | os.PathLike, *, lora_base: str | os.PathLike | Checkpoint | None = None
) -> Checkpoint:
    """Open any accepted checkpoint lazily. A PEFT adapter directory needs `lora_base` (path or checkpoint)."""
    path = Path(path)
    kind = detect_format(path)
    if kind == "pt":
        return TorchCheckpoint(path, [path])
    if kind == "safetensors":
        return SafetensorsCheckpoint(path, [path])
    if kind == "peft-lora":
        if lora_base is None:
            raise CheckpointError(f"{path} is a PEFT LoRA adapter: name its base weights (--lora-base PATH)")
        base = lora_base if isinstance(lora_base, Checkpoint) else open_checkpoint(lora_base)
        if isinstance(base, LoraCheckpoint):
            raise CheckpointError(f"the base of adapter {path} is itself an adapter ({base.path})")
        return LoraCheckpoint(path, base)
    config = _read_json(path / "config.json") if (path / "config.json").is_file() else None
    if kind == "hf-safetensors":
        return SafetensorsCheckpoint(path, [path / "model.safetensors"], config, format=kind)
    if kind == "hf-sharded":
        files = _shard_files(path, "model.safetensors.index.json")
        return SafetensorsCheckpoint(path, files, config, format=kind)
    if kind == "hf-bin-sharded":
        return TorchCheckpoint(path, _shard_files(path, "pytorch_model.bin.index.json"), config, format=kind)
    return TorchCheckpoint(path, [path / "pytorch_model.bin"], config, format=kind)


def open_pair(
    base: str | os.PathLike, trained: str | os.PathLike, *, lora_base: str | os.PathLike | None = None
) -> tuple[Checkpoint, Checkpoint]:
    """Open the two sides of a comparison. An adapter directory on either side is applied to `lora_base`
    when given, otherwise to the other side (the usual `compare BASE ADAPTER_DIR`)."""
    base_is_adapter, trained_is_adapter = is_lora_adapter(base), is_lora_adapter(trained)
    if base_is_adapter and trained_is_adapter and lora_base is None:
        raise CheckpointError(
            "both checkpoints are LoRA adapters: name their base weights with --lora-base PATH"
        )
    if base_is_adapter and lora_base is None:
        raise CheckpointError(f"{base} is a LoRA adapter: name its base weights with --lora-base PATH")
    base_ckpt = open_checkpoint(base, lora_base=lora_base)
    if trained_is_adapter:
        adapter_base = base_ckpt if lora_base is None else open_checkpoint(lora_base)
        return base_ckpt, open_checkpoint(trained, lora_base=adapter_base)
    return base_ckpt, open_checkpoint(trained)


def _shard_files(path: Path, index_name: str) -> list[Path]:
    index = _read_json(path / index_name)
    weight_map = index.get("weight_map")
    if not isinstance(weight_map, dict) or not weight_map:
        raise CheckpointError(f"{path / index_name} has no weight_map")
    files = [path / name for name in dict.fromkeys(weight_map.values())]
    missing = [f.name for f in files if not f.is_file()]
    if missing:
        raise CheckpointError(f"{path}: shards named in {index_name} are missing: {first_names(missing)}")
    return files


def _read_json(path: Path) -> dict:
    try:
        document = json.loads(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise CheckpointError(f"cannot read {path}: {exc.strerror or exc}") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"{path} is not valid JSON ({exc})") from None
    if not isinstance(document, dict):
        raise CheckpointError(f"{path} is not a JSON object")
    return document
