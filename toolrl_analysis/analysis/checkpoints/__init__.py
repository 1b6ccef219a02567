"""Lazy, tensor-at-a-time readers for every accepted checkpoint format (docs/architecture.md, "Checkpoints").

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

One module per format beside a small common interface: `base` (`TensorInfo`, `Checkpoint`), `safetensors_files`,
`torch_files`, `lora`, and `opening` (`detect_format`, `open_checkpoint`, `open_pair`).
"""

from toolrl_analysis.analysis.checkpoints.base import WRAPPER_PREFIXES, Checkpoint, TensorInfo
from toolrl_analysis.analysis.checkpoints.lora import PEFT_PREFIX, LoraCheckpoint, LoraModule
from toolrl_analysis.analysis.checkpoints.opening import (
    detect_format,
    is_lora_adapter,
    open_checkpoint,
    open_pair,
)
from toolrl_analysis.analysis.checkpoints.safetensors_files import (
    SAFETENSORS_DTYPES,
    SafetensorsCheckpoint,
    read_safetensors_header,
)
from toolrl_analysis.analysis.checkpoints.torch_files import TorchCheckpoint, extract_state_dict

__all__ = [
    "PEFT_PREFIX",
    "SAFETENSORS_DTYPES",
    "WRAPPER_PREFIXES",
    "Checkpoint",
    "LoraCheckpoint",
    "LoraModule",
    "SafetensorsCheckpoint",
    "TensorInfo",
    "TorchCheckpoint",
    "detect_format",
    "extract_state_dict",
    "is_lora_adapter",
    "open_checkpoint",
    "open_pair",
    "read_safetensors_header",
]
