"""Save and load a policy (model + tokenizer): our self-contained .pt, or a Hugging Face directory.

The .pt holds only tensors, strings, numbers, lists and dicts, so `torch.load(..., weights_only=True)` reads it
and a file that would run code when unpickled is refused. Loading never reaches for a hub.
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any

from toolrl_analysis.errors import CheckpointError, first_line
from toolrl_analysis.io import torch_load_safely
from toolrl_analysis.models.embedded import resolve_model
from toolrl_analysis.models.placement import CPU, Placement, ResolvedPlacement

POLICY_FORMAT = "toolrl-analysis.policy/1"


def _tokenizer_files(tokenizer: Any) -> dict[str, Any]:
    """Every file save_pretrained writes: text as str; a binary file (a sentencepiece model) as a uint8 tensor."""
    import torch

    files: dict[str, Any] = {}
    with tempfile.TemporaryDirectory() as tmp:
        tokenizer.save_pretrained(tmp)
        for file in sorted(Path(tmp).rglob("*")):
            if not file.is_file():
                continue
            data = file.read_bytes()
            name = file.relative_to(tmp).as_posix()
            try:
                files[name] = data.decode("utf-8")
            except UnicodeDecodeError:
                files[name] = torch.frombuffer(bytearray(data), dtype=torch.uint8).clone()
    return files


def _cloned_state_dict(model: Any) -> dict[str, Any]:
    """Detached contiguous CPU copies; tied tensors (embedding and lm_head) stay one shared copy in the file."""
    clones: dict[tuple, Any] = {}
    state_dict = {}
    for name, tensor in model.state_dict().items():
        key = (tensor.data_ptr(), tuple(tensor.shape), tuple(tensor.stride()), tensor.dtype, tensor.device)
        if key not in clones:
            clones[key] = tensor.detach().to("cpu").contiguous().clone()
        state_dict[name] = clones[key]
    return state_dict


def policy_payload(model: Any, tokenizer: Any) -> dict[str, Any]:
    """The dict save_policy writes."""
    return {
        "format": POLICY_FORMAT,
        "state_dict": _cloned_state_dict(model),
        # Through JSON so that every value (dtypes included) is a plain type weights_only accepts.
        "config": json.loads(model.config.to_json_string(use_diff=False)),
        "tokenizer": _tokenizer_files(tokenizer),
    }


def save_policy(model: Any, tokenizer: Any, path: str | Path, extra: dict[str, Any] | None = None) -> Path:
    """Write a self-contained .pt atomically (a reader never sees a half-written file).

    `extra` adds keys of the caller's own (a training step, a run config) next to the standard ones; values
    must be tensors or plain data so that weights_only loading still works.
    """
    import torch

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = policy_payload(model, tokenizer)
    clashes = sorted(set(extra or {}) & set(payload))
    if clashes:
        raise ValueError(f"extra keys {clashes} would overwrite the policy format's own keys")
    payload.update(extra or {})
    fd, tmp_name = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        torch.save(payload, tmp_name)
        os.chmod(tmp_name, 0o644)  # mkstemp makes it private; a checkpoint is an ordinary file
        os.replace(tmp_name, path)
    finally:
        if os.path.exists(tmp_name):
            os.unlink(tmp_name)
    return path


def save_hf_dir(model: Any, tokenizer: Any, directory: str | Path) -> Path:
    """A Hugging Face model directory: safetensors weights, config, generation config, tokenizer files."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    with _no_progress_bars():
        model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


def load_policy(
    path: str | Path, attn_implementation: str | None = None, placement: Placement | None = None
) -> tuple[Any, Any]:
    """(model in eval mode, tokenizer) from a save_policy .pt, an HF directory, or a .safetensors inside one;
    `embedded` is the shipped base. `placement` (--device, --dtype) says where it runs: the CPU in its stored
    dtype when None."""
    where = (placement or CPU).resolve()
    path = resolve_model(path)
    if not path.exists():
        raise CheckpointError(f"no such checkpoint: {path}")
    if path.is_dir():
        return _load_hf_dir(path, attn_implementation, where)
    if path.suffix == ".safetensors":
        if (path.parent / "config.json").is_file():
            return _load_hf_dir(path.parent, attn_implementation, where)
        raise CheckpointError(
            f"{path} is a bare .safetensors file without config.json beside it; name a model directory"
        )
    model, tokenizer = _load_policy_file(path, attn_implementation)
    return where.apply(model), tokenizer


def load_pair(
    base: str | Path,
    trained: str | Path,
    purpose: str,
    attn_implementation: str | None = None,
    placement: Placement | None = None,
) -> tuple[tuple[Any, Any], Any]:
    """((base model, trained model), tokenizer), both where `placement` says. A pair whose tokenizers differ
    is refused: `purpose` (e.g. "judging") compares the two token by token."""
    base_model, base_tokenizer = load_policy(base, attn_implementation, placement)
    trained_model, trained_tokenizer = load_policy(trained, attn_implementation, placement)
    if base_tokenizer.get_vocab() != trained_tokenizer.get_vocab():
        raise CheckpointError(f"base and trained have different tokenizers: {purpose} needs one tokenization")
    return (base_model, trained_model), base_tokenizer


def read_checkpoint_file(path: str | Path) -> Any:
    """torch.load with weights_only=True (memory-mapped where possible); failures are one-line CheckpointErrors."""
    return torch_load_safely(Path(path))


def _load_policy_file(path: Path, attn_implementation: str | None) -> tuple[Any, Any]:
    payload = read_checkpoint_file(path)
    if not isinstance(payload, dict):
        raise CheckpointError(f"{path} is not a policy checkpoint (it holds a {type(payload).__name__})")
    if "format" not in payload:
        if "config" not in payload:
            raise CheckpointError(
                f"{path} is a plain state dict without a model config; "
                "a policy needs a save_policy .pt or a Hugging Face directory"
            )
        raise CheckpointError(f"{path} has no 'format' key; it was not written by save_policy")
    if payload["format"] != POLICY_FORMAT:
        raise CheckpointError(
            f"{path} has format {payload['format']!r}; this version reads {POLICY_FORMAT!r}"
        )
    for key in ("state_dict", "config", "tokenizer"):
        if not isinstance(payload.get(key), dict):
            raise CheckpointError(f"{path} is a damaged policy checkpoint: '{key}' is missing or not a dict")
    model = _model_from_config(path, payload["config"], payload["state_dict"], attn_implementation)
    tokenizer = _tokenizer_from_files(path, payload["tokenizer"])
    return model, tokenizer


def _model_from_config(
    path: Path, config_dict: dict, state_dict: dict, attn_implementation: str | None
) -> Any:
    import torch
    from transformers import AutoModelForCausalLM
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    model_type = config_dict.get("model_type")
    if model_type not in CONFIG_MAPPING:
        raise CheckpointError(f"{path}: unknown model_type {model_type!r} in its config")
    config = CONFIG_MAPPING[model_type].from_dict(config_dict)
    kwargs = {"attn_implementation": attn_implementation} if attn_implementation else {}
    model = AutoModelForCausalLM.from_config(config, **kwargs)
    float_dtypes = [
        t.dtype for t in state_dict.values() if isinstance(t, torch.Tensor) and t.is_floating_point()
    ]
    if float_dtypes:
        model.to(float_dtypes[0])
    result = model.load_state_dict(state_dict, strict=False)
    missing = [k for k in result.missing_keys if not _is_tied_key(model, k)]
    if missing or result.unexpected_keys:
        problems = [f"missing {', '.join(missing[:3])}" if missing else "",
                    f"unexpected {', '.join(result.unexpected_keys[:3])}" if result.unexpected_keys else ""]  # fmt: skip
        raise CheckpointError(
            f"{path}: weights do not match its config ({'; '.join(p for p in problems if p)})"
        )
    return model.eval()


def _is_tied_key(model: Any, key: str) -> bool:
    """lm_head.weight may be absent from a state dict when it is the embedding (tie_word_embeddings)."""
    return key.endswith("lm_head.weight") and bool(getattr(model.config, "tie_word_embeddings", False))


def _tokenizer_from_files(path: Path, files: dict[str, Any]) -> Any:
    from transformers import AutoTokenizer

    if not files:
        raise CheckpointError(f"{path} holds no tokenizer files")
    with tempfile.TemporaryDirectory() as tmp:
        for name, content in files.items():
            target = Path(tmp, name)
            if Path(name).is_absolute() or ".." in Path(name).parts:
                raise CheckpointError(f"{path}: tokenizer file name {name!r} points outside its directory")
            target.parent.mkdir(parents=True, exist_ok=True)
            if isinstance(content, str):
                target.write_text(content, encoding="utf-8")
            else:
                target.write_bytes(bytes(content.numpy().tobytes()))
        try:
            return AutoTokenizer.from_pretrained(tmp, local_files_only=True)
        except (OSError, ValueError, KeyError) as exc:
            raise CheckpointError(f"{path}: its tokenizer files do not load ({first_line(exc)})") from None


def _load_hf_dir(
    directory: Path, attn_implementation: str | None, where: ResolvedPlacement
) -> tuple[Any, Any]:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if not (directory / "config.json").is_file():
        if (directory / "adapter_config.json").is_file():
            raise CheckpointError(
                f"{directory} is a PEFT adapter directory; load its base model and merge it first"
            )
        raise CheckpointError(f"{directory} is not a Hugging Face model directory (no config.json)")
    kwargs = {"attn_implementation": attn_implementation} if attn_implementation else {}
    kwargs |= where.load_kwargs()
    try:
        with _no_progress_bars():
            model = AutoModelForCausalLM.from_pretrained(directory, local_files_only=True, **kwargs)
    except (OSError, ValueError, KeyError) as exc:
        raise CheckpointError(f"{directory}: the model does not load ({first_line(exc)})") from None
    try:
        tokenizer = AutoTokenizer.from_pretrained(directory, local_files_only=True)
    except (OSError, ValueError, KeyError) as exc:
        raise CheckpointError(f"{directory}: the tokenizer does not load ({first_line(exc)})") from None
    return model.eval(), tokenizer


@contextlib.contextmanager
def _no_progress_bars():
    """transformers draws shard progress bars on stderr; a tiny model's save/load should stay silent."""
    from transformers.utils import logging as hf_logging

    enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if enabled:
            hf_logging.enable_progress_bar()
