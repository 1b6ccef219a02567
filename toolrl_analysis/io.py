"""Reading files safely: checkpoints (shared by the policy loader in models/ and the diff readers in
analysis/), JSON objects, and content hashes.

`torch.load(weights_only=True)` never unpickles code; every failure a user can cause becomes a one-line
`CheckpointError` naming the file.
"""

from __future__ import annotations

import pickle
from pathlib import Path
from typing import Any

from toolrl_analysis.errors import CheckpointError, first_line


def torch_load_safely(path: str | Path) -> Any:
    """`torch.load(weights_only=True)`, memory-mapped when the file allows; never runs pickled code."""
    import torch

    path = Path(path)
    _check_checkpoint_header(path)
    try:
        try:
            return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError as exc:
            if "mmap" not in str(exc):
                raise
            # Legacy (non-zip) serialization cannot be memory-mapped; it is still unpickled safely.
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        if "GLOBAL" not in str(exc):  # junk bytes, not a pickle that names a callable
            raise CheckpointError(f"{path} is not a PyTorch checkpoint ({first_line(exc)})") from None
        raise CheckpointError(f"refusing to load {path}: {_unsafe_pickle_reason(exc)}") from None
    except Exception as exc:  # arbitrary bytes fail in arbitrary ways inside torch.load
        if _header(path).startswith(ZIP_MAGIC):  # torch's zip reader explains itself in a paragraph
            raise CheckpointError(
                f"{path} is a damaged or truncated PyTorch checkpoint (its zip archive cannot be read)"
            ) from None
        raise CheckpointError(f"{path} is not a PyTorch checkpoint ({first_line(exc)[:120]})") from None


ZIP_MAGIC = b"PK\x03\x04"  # torch.save's format since 1.6
PICKLE_PROTOCOL = b"\x80"  # the legacy format: a pickle with a protocol header


def _header(path: Path) -> bytes:
    try:
        with open(path, "rb") as handle:
            return handle.read(4)
    except OSError as exc:
        raise CheckpointError(f"cannot read {path}: {exc.strerror or exc}") from None


def _check_checkpoint_header(path: Path) -> None:
    """A file that is neither a zip archive nor a pickle is rejected by what it is, before torch reads it."""
    header = _header(path)
    if not header.startswith(ZIP_MAGIC) and not header.startswith(PICKLE_PROTOCOL):
        size = path.stat().st_size
        raise CheckpointError(
            f"{path} is not a PyTorch checkpoint ({size} bytes, neither torch.save's zip archive nor a pickle)"
        )


def _unsafe_pickle_reason(exc: Exception) -> str:
    """torch's weights-only message is a paragraph; keep the line that names the offending global."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    detail = next((line for line in lines if "GLOBAL" in line or "Unsupported" in line), None)
    if detail is None:
        detail = next(
            (line for line in lines if "weights_only" not in line.lower()), "it is not a plain state dict"
        )
    return f"its pickle asks to run code or build non-tensor objects ({detail.rstrip('.')})"


def read_json_object(path: str | Path, error: type[Exception] = CheckpointError) -> dict:
    """A JSON object from a file; unreadable, invalid or non-object content raises `error` in one line."""
    import json

    path = Path(path)
    try:
        document = json.loads(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise error(f"cannot read {path}: {exc.strerror or exc}") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise error(f"{path} is not valid JSON ({exc})") from None
    if not isinstance(document, dict):
        raise error(f"{path} is not a JSON object")
    return document


def file_sha256(path: str | Path) -> str:
    """SHA-256 of a file's bytes, read in 1 MiB blocks (checkpoints can be large)."""
    import hashlib

    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()
