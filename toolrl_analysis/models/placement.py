"""Where a loaded model runs and in which dtype: `--device` and `--dtype`, the same on every command.

`--device auto` takes the GPU when torch sees one and the CPU otherwise; `cuda` and `cuda:N` name a GPU and
are refused on a machine without one. `--dtype auto` keeps the checkpoint's stored dtype; the others cast
the weights after loading (a policy file) or while loading (a Hugging Face directory). A Hugging Face
directory loaded with `--device auto` on a GPU machine goes through accelerate's `device_map="sequential"`:
the first GPU takes the whole model when it fits, and only a model larger than one GPU is spread over the
next ones ("auto" would balance even a small model over every GPU). The inputs then go to the device of
the embedding, which `input_device` names.

Nothing here moves tensors that are not the model's: each caller puts its inputs on `input_device(model)`.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from toolrl_analysis.errors import UserError

DEVICES = ("auto", "cpu", "cuda", "cuda:N")
DTYPES = ("auto", "float32", "bfloat16", "float16")


@dataclass(frozen=True)
class Placement:
    """A device and a dtype as the user wrote them (checked by `resolve`, at the start of a command)."""

    device: str = "auto"  # auto, cpu, cuda or cuda:N
    dtype: str = "auto"  # auto (the checkpoint's own), float32, bfloat16 or float16

    def resolve(self) -> ResolvedPlacement:
        device = resolve_device(self.device)
        return ResolvedPlacement(
            device, resolve_dtype(self.dtype, device), spread=_spreads(self.device, device)
        )

    def record(self) -> dict[str, str]:
        """What a stage record keeps: nothing at the defaults, so runs made before these flags stay current;
        otherwise the values normalised (`CPU` is `cpu`, `cuda` is `cuda:0`), and no device where it names
        what `auto` takes on this machine, so spelling a default out reruns nothing."""
        device, dtype = _word(self.device), _word(self.dtype)
        if device != "auto":
            device = resolve_device(device)
            device = "auto" if device == resolve_device("auto") else device
        return {k: v for k, v in (("device", device), ("dtype", dtype)) if v != "auto"}


CPU = Placement("cpu", "auto")


@dataclass(frozen=True)
class ResolvedPlacement:
    device: str  # "cpu" or "cuda:N"
    dtype: Any  # a torch.dtype, or None for the stored one
    spread: bool  # device_map="sequential" for a Hugging Face directory

    def load_kwargs(self) -> dict[str, Any]:
        """from_pretrained keywords: the dtype ("auto": the stored one, never float32 by default) and where
        the weights go as they are read."""
        kwargs: dict[str, Any] = {"dtype": self.dtype if self.dtype is not None else "auto"}
        if self.spread:
            kwargs["device_map"] = "sequential"
        elif self.device != "cpu":
            kwargs["device_map"] = {"": self.device}
        return kwargs

    def apply(self, model: Any) -> Any:
        """Cast and move a model built on the CPU (a policy file, or a model made in this process)."""
        if self.dtype is not None:
            model.to(self.dtype)
        if self.device != "cpu":
            model.to(self.device)
        return model


def resolve_device(name: str) -> str:
    """ "cpu" or "cuda:N" for a --device value; a GPU that is not there is one line, naming the flag."""
    import torch

    text = _word(name)
    if text == "auto":
        return "cuda:0" if torch.cuda.is_available() else "cpu"
    if text == "cpu":
        return "cpu"
    match = re.fullmatch(r"cuda(?::(\d+))?", text)
    if not match:
        raise UserError(f"--device {name!r}: use one of {', '.join(DEVICES)}")
    if not torch.cuda.is_available():
        raise UserError(f"--device {name}: torch sees no CUDA GPU on this machine (use --device cpu or auto)")
    index = int(match[1] or 0)
    count = torch.cuda.device_count()
    if index >= count:
        raise UserError(f"--device {name}: this machine has {count} CUDA GPU(s), numbered from 0")
    return f"cuda:{index}"


def resolve_dtype(name: str, device: str) -> Any:
    """The torch dtype of a --dtype value (None: the checkpoint's own), refused where `device` lacks it."""
    import torch

    text = _word(name)
    if text == "auto":
        return None
    dtypes = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
    if text not in dtypes:
        raise UserError(f"--dtype {name!r}: use one of {', '.join(DTYPES)}")
    if text == "bfloat16" and device.startswith("cuda") and not _cuda_bf16(device):
        raise UserError(
            f"--dtype bfloat16: {device} ({_cuda_name(device)}) has no bfloat16 support; use float16 or float32"
        )
    return dtypes[text]


def input_device(model: Any) -> Any:
    """Where a model's inputs go: its input embedding's device (the first GPU under a device map)."""
    embedding = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    if embedding is not None:
        return embedding.weight.device
    return next(model.parameters()).device


def describe(model: Any) -> dict[str, str]:
    """Where a loaded model runs, for a result's provenance: {"device": "cpu", "dtype": "bfloat16"}."""
    weight = next(model.parameters())
    return {"device": str(input_device(model)), "dtype": str(weight.dtype).removeprefix("torch.")}


def _word(value: str | None) -> str:
    """A flag's value as compared: trimmed, lower case, `auto` when empty."""
    return (value or "auto").strip().lower()


def _spreads(asked: str, device: str) -> bool:
    # Only "auto" may spread a model: a named device means that device, and a CPU run never needs to.
    return _word(asked) == "auto" and device != "cpu"


def _cuda_bf16(device: str) -> bool:
    import torch

    with torch.cuda.device(device):
        return bool(torch.cuda.is_bf16_supported())


def _cuda_name(device: str) -> str:
    import torch

    return torch.cuda.get_device_name(device)
