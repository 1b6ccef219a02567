"""PEFT LoRA adapter directories applied to a base checkpoint: reads give base + scale * B @ A."""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from pathlib import Path

import torch

from toolrl_analysis.analysis.checkpoints.base import Checkpoint, TensorInfo, as_view, row_range
from toolrl_analysis.analysis.checkpoints.safetensors_files import SafetensorsCheckpoint
from toolrl_analysis.analysis.checkpoints.torch_files import TorchCheckpoint
from toolrl_analysis.errors import CheckpointError, first_names
from toolrl_analysis.io import read_json_object

PEFT_PREFIX = "base_model.model."


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
        self.adapter_config = read_json_object(path / "adapter_config.json")
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
        start, stop = row_range(info, start, stop)
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
        result = as_view(out, rows.numel() * rows.element_size(), rows.dtype, tuple(rows.shape))
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
