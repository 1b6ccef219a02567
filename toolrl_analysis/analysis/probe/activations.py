"""Activation capture: one interface, three backends (hf, transformer-lens, nnsight) that return the same tensors.

Per requested position it captures the residual stream after the embeddings and after every block (`resid`,
[rows, n_blocks + 1, d]: index 0 is the embeddings, index k the output of block k - 1), optionally what each
block's attention and MLP add to the residual stream (`attn_out`, `mlp_out`, [rows, n_blocks, d]), and for
query positions the attention mass of every head onto labelled regions of the context (`attention_mass`,
[queries, n_blocks, n_heads, n_regions]).

Sequences are right-padded and run without an attention mask: with causal attention a token never sees the
padding after it, so every backend computes exactly what an unpadded run would, with default positions.
No gradients. Nothing reaches for a hub: every backend is handed the loaded module and tokenizer.

Supported models: Llama-style decoders (`model.layers[i].self_attn / .mlp`: Qwen2, Qwen3, Llama, Mistral);
transformer-lens additionally needs an adapter for the architecture (4.3 has Qwen2, Qwen3 and Llama).
Anything else is refused with one line naming the backend and the model type.
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from toolrl_analysis.errors import UserError
from toolrl_analysis.models.placement import input_device

BACKENDS = ("hf", "transformer-lens", "nnsight")
SITES = ("resid", "attn_out", "mlp_out")


class UnsupportedModelError(UserError):
    """A backend that cannot run this model (or is not installed)."""


@dataclass
class CaptureRequest:
    """One sequence and where to read it."""

    input_ids: Sequence[int]
    positions: Sequence[int] = ()  # read resid / attn_out / mlp_out at these token indices
    attention_positions: Sequence[int] = ()  # query tokens whose attention mass per region is wanted
    token_regions: Sequence[int] | None = None  # a region index per token (needed with attention_positions)


@dataclass
class Activations:
    """Captured tensors (float32, CPU); rows follow the requests, then their positions, in order."""

    backend: str
    resid: torch.Tensor  # [rows, n_blocks + 1, d]
    attn_out: torch.Tensor | None = None  # [rows, n_blocks, d]
    mlp_out: torch.Tensor | None = None  # [rows, n_blocks, d]
    attention_mass: torch.Tensor | None = None  # [queries, n_blocks, n_heads, n_regions]

    def site(self, name: str) -> torch.Tensor:
        """resid as is; attn_out / mlp_out padded with a zero row in front, so index k is the block that
        writes hidden state k (the same layer axis as resid)."""
        if name == "resid":
            return self.resid
        tensor = getattr(self, name)
        if tensor is None:
            raise ValueError(f"site {name!r} was not captured")
        return torch.cat([torch.zeros_like(tensor[:, :1]), tensor], dim=1)


# ---------------------------------------------------------------------------------------------
# Model layout and support
# ---------------------------------------------------------------------------------------------
def model_type(model: Any) -> str:
    return str(getattr(getattr(model, "config", None), "model_type", type(model).__name__))


def decoder_layers(model: Any, backend: str = "hf") -> torch.nn.ModuleList:
    """The blocks of a Llama-style decoder, or UnsupportedModelError naming the backend and model type."""
    layers = getattr(getattr(model, "model", None), "layers", None)
    if isinstance(layers, torch.nn.ModuleList) and all(
        hasattr(layer, "self_attn") and hasattr(layer, "mlp") for layer in layers
    ):
        return layers
    raise UnsupportedModelError(
        f"the {backend} backend does not support model type {model_type(model)!r}: it reads Llama-style "
        "decoders (model.layers[i].self_attn / .mlp: Qwen2, Qwen3, Llama, Mistral)"
    )


def backend_versions() -> dict[str, str | None]:
    """Installed versions of the optional backends (None: not installed)."""
    from importlib.metadata import PackageNotFoundError, version

    found: dict[str, str | None] = {}
    for package in ("transformer-lens", "nnsight"):
        try:
            found[package] = version(package)
        except PackageNotFoundError:
            found[package] = None
    return found


@contextlib.contextmanager
def attention_implementation(model: Any, name: str | None) -> Iterator[None]:
    """Run with attention implementation `name` ("eager", "sdpa"), then switch back; None leaves it alone.
    Attention weights exist only in "eager"; "sdpa" is several times faster where they are not needed."""
    before = getattr(model.config, "_attn_implementation", None)
    if name is None or before == name:
        yield
        return
    try:
        model.set_attn_implementation(name)
    except ValueError:  # this architecture lacks it: only "sdpa" (a speed-up) can be refused
        if name == "eager":
            raise
        yield
        return
    try:
        yield
    finally:
        model.set_attn_implementation(before)


# ---------------------------------------------------------------------------------------------
# Collecting one batch: backends hand over whole [B, T, ...] tensors, the collector keeps the rows
# ---------------------------------------------------------------------------------------------
@dataclass
class Collector:
    batch: Sequence[CaptureRequest]
    width: int
    n_regions: int
    store: dict[tuple[str, int], torch.Tensor] = field(default_factory=dict)

    def __post_init__(self) -> None:
        pairs = [(b, p) for b, r in enumerate(self.batch) for p in r.positions]
        self.rows = torch.tensor(pairs, dtype=torch.long).reshape(-1, 2)
        queries = [(b, q) for b, r in enumerate(self.batch) for q in r.attention_positions]
        self.queries = torch.tensor(queries, dtype=torch.long).reshape(-1, 2)
        # One-hot regions per query [Q, T, R + 1]; padding goes to an extra bucket that is dropped.
        onehot = torch.zeros(len(queries), self.width, self.n_regions + 1)
        for row, (b, _) in enumerate(queries):
            regions = torch.full((self.width,), self.n_regions, dtype=torch.long)
            given = self.batch[b].token_regions
            regions[: len(given)] = torch.as_tensor(list(given), dtype=torch.long)
            onehot[row, torch.arange(self.width), regions] = 1.0
        self.region_onehot = onehot

    def hidden(self, site: str, index: int, tensor: Any) -> None:
        tensor = tensor[0] if isinstance(tensor, tuple) else tensor
        picked = tensor[self.rows[:, 0], self.rows[:, 1]]  # [rows, d]
        self.store[(site, index)] = picked.detach().float().cpu()

    def pattern(self, block: int, weights: torch.Tensor) -> None:
        if weights is None:
            raise RuntimeError("the model returned no attention weights (not eager attention?)")
        rows = weights[self.queries[:, 0], :, self.queries[:, 1], :].detach().float().cpu()  # [Q, H, T]
        mass = torch.einsum("qht,qtr->qhr", rows, self.region_onehot)[..., : self.n_regions]
        self.store[("attention_mass", block)] = mass


# ---------------------------------------------------------------------------------------------
# Backends: each runs one right-padded batch and feeds the collector
# ---------------------------------------------------------------------------------------------
class HFBackend:
    """`output_hidden_states` for the embeddings and blocks 0..n-2, forward hooks for the rest: HF reports the
    last hidden state after the final norm, so the last block's own output comes from a hook."""

    def __init__(self, model: Any, tokenizer: Any, sites: Sequence[str], attention: bool):
        self.model, self.sites, self.attention = model, sites, attention
        self.layers = decoder_layers(model, "hf")

    def run(self, input_ids: torch.Tensor, collector: Collector) -> None:
        n_blocks = len(self.layers)
        hooks = [
            self.layers[-1].register_forward_hook(lambda m, i, o: collector.hidden("resid", n_blocks, o))
        ]
        for block, layer in enumerate(self.layers):
            if "attn_out" in self.sites or self.attention:
                hooks.append(layer.self_attn.register_forward_hook(self._attention_hook(collector, block)))
            if "mlp_out" in self.sites:
                hooks.append(
                    layer.mlp.register_forward_hook(
                        lambda m, i, o, b=block: collector.hidden("mlp_out", b, o)
                    )
                )
        try:
            with attention_implementation(self.model, "eager" if self.attention else None):
                out = self.model(input_ids=input_ids, output_hidden_states=True, use_cache=False)
        finally:
            for hook in hooks:
                hook.remove()
        for index in range(n_blocks):
            collector.hidden("resid", index, out.hidden_states[index])

    def _attention_hook(self, collector: Collector, block: int) -> Callable:
        def hook(module, inputs, output):
            if "attn_out" in self.sites:
                collector.hidden("attn_out", block, output[0])
            if self.attention:
                collector.pattern(block, output[1])

        return hook


class TransformerLensBackend:
    """TransformerLens 4's `TransformerBridge` around a copy of the model (the bridge rewires the module it is
    given and switches it to eager attention), read with `run_with_cache`."""

    def __init__(self, model: Any, tokenizer: Any, sites: Sequence[str], attention: bool):
        try:
            from transformer_lens.model_bridge import TransformerBridge
            from transformer_lens.model_bridge.sources.transformers import (
                determine_architecture_from_hf_config,
            )
        except ImportError:
            raise UnsupportedModelError(
                "the transformer-lens backend needs transformer-lens>=4.3 (pip install 'toolrl-analysis[interp]')"
            ) from None
        self.sites, self.attention = sites, attention
        version = backend_versions()["transformer-lens"]
        try:
            determine_architecture_from_hf_config(model.config)
        except ValueError:
            raise UnsupportedModelError(
                f"transformer-lens {version} does not support model type {model_type(model)!r}"
            ) from None
        self.n_blocks = len(decoder_layers(model, f"transformer-lens {version}"))
        bridge_tokenizer = copy.deepcopy(tokenizer)
        # With add_bos_token set, the bridge keeps this tokenizer instead of reloading one by name (a hub
        # lookup); we feed token ids, so its BOS behaviour never applies.
        bridge_tokenizer.init_kwargs["add_bos_token"] = True
        device = input_device(model)
        self.bridge = TransformerBridge.boot_transformers(
            f"local/{model_type(model)}",
            hf_model=copy.deepcopy(model),
            tokenizer=bridge_tokenizer,
            device=device,
            dtype=next(model.parameters()).dtype,
        )

    def run(self, input_ids: torch.Tensor, collector: Collector) -> None:
        names = {"blocks.0.hook_resid_pre": ("resid", 0)}
        for block in range(self.n_blocks):
            names[f"blocks.{block}.hook_resid_post"] = ("resid", block + 1)
            if "attn_out" in self.sites:
                names[f"blocks.{block}.hook_attn_out"] = ("attn_out", block)
            if "mlp_out" in self.sites:
                names[f"blocks.{block}.hook_mlp_out"] = ("mlp_out", block)
            if self.attention:
                names[f"blocks.{block}.attn.hook_pattern"] = ("pattern", block)
        _, cache = self.bridge.run_with_cache(input_ids, names_filter=list(names))
        for name, (site, index) in names.items():
            if site == "pattern":
                collector.pattern(index, cache[name])
            else:
                collector.hidden(site, index, cache[name])


class NNsightBackend:
    """nnsight 0.8's `TransformersModel` around the loaded module, read inside one `.trace` per batch (the
    collector runs on the real values as the trace reaches them, in execution order)."""

    def __init__(self, model: Any, tokenizer: Any, sites: Sequence[str], attention: bool):
        try:
            from nnsight import TransformersModel
        except ImportError:
            raise UnsupportedModelError(
                "the nnsight backend needs nnsight>=0.8 (pip install 'toolrl-analysis[interp]')"
            ) from None
        decoder_layers(model, f"nnsight {backend_versions()['nnsight']}")
        self.model, self.sites, self.attention = model, sites, attention
        self.wrapped = TransformersModel(model, tokenizer=tokenizer)

    def run(self, input_ids: torch.Tensor, collector: Collector) -> None:
        wrapped = self.wrapped
        with (
            attention_implementation(self.model, "eager" if self.attention else None),
            wrapped.trace({"input_ids": input_ids}),
        ):
            collector.hidden("resid", 0, wrapped.model.embed_tokens.output)
            for block, layer in enumerate(wrapped.model.layers):
                if "attn_out" in self.sites or self.attention:
                    attention_output = layer.self_attn.output
                    if "attn_out" in self.sites:
                        collector.hidden("attn_out", block, attention_output[0])
                    if self.attention:
                        collector.pattern(block, attention_output[1])
                if "mlp_out" in self.sites:
                    collector.hidden("mlp_out", block, layer.mlp.output)
                collector.hidden("resid", block + 1, layer.output)


_BACKEND_CLASSES = {"hf": HFBackend, "transformer-lens": TransformerLensBackend, "nnsight": NNsightBackend}


def check_backend(backend: str) -> str:
    if backend not in _BACKEND_CLASSES:
        raise UserError(f"unknown backend {backend!r} (known: {', '.join(BACKENDS)})")
    return backend


# ---------------------------------------------------------------------------------------------
# The interface
# ---------------------------------------------------------------------------------------------
@torch.no_grad()
def capture_activations(
    model: Any,
    tokenizer: Any,
    requests: Sequence[CaptureRequest],
    *,
    backend: str = "hf",
    sites: Sequence[str] = ("resid",),
    n_regions: int = 0,
    batch_size: int = 4,
    pad_token_id: int = 0,
    progress: Callable[[int], None] | None = None,
) -> Activations:
    """Run every request through `model` with `backend`; see the module docstring for what comes back.

    Requests are batched in order of length (little padding); `progress(n)` is called after each batch.
    """
    check_backend(backend)
    unknown = sorted(set(sites) - set(SITES))
    if unknown or "resid" not in sites:
        raise UserError(f"sites must include resid and be among {', '.join(SITES)} (got {', '.join(sites)})")
    attention = any(r.attention_positions for r in requests)
    if attention and n_regions < 1:
        raise ValueError("attention_positions need n_regions >= 1 and token_regions")
    runner = _BACKEND_CLASSES[backend](model, tokenizer, sites, attention)
    device = input_device(model)
    n_blocks = len(decoder_layers(model, backend))
    order = sorted(range(len(requests)), key=lambda i: len(requests[i].input_ids))
    stores: dict[int, dict] = {}
    for start in range(0, len(order), max(1, batch_size)):
        chunk = order[start : start + batch_size]
        batch = [requests[i] for i in chunk]
        width = max(len(r.input_ids) for r in batch)
        input_ids = torch.full((len(batch), width), pad_token_id, dtype=torch.long)
        for row, request in enumerate(batch):
            input_ids[row, : len(request.input_ids)] = torch.as_tensor(list(request.input_ids))
        collector = Collector(batch, width, n_regions)
        runner.run(input_ids.to(device), collector)
        for local, index in enumerate(chunk):
            stores[index] = _rows_of(collector, local)
        if progress is not None:
            progress(len(chunk))
    return _assemble(backend, [stores[i] for i in range(len(requests))], sites, attention, n_blocks)


def _rows_of(collector: Collector, local: int) -> dict[tuple[str, int], torch.Tensor]:
    """The collector's rows that belong to one request of its batch."""
    row_mask = collector.rows[:, 0] == local
    query_mask = collector.queries[:, 0] == local
    return {
        key: value[query_mask if key[0] == "attention_mass" else row_mask]
        for key, value in collector.store.items()
    }


def _assemble(
    backend: str, per_request: list[dict], sites: Sequence[str], attention: bool, n_blocks: int
) -> Activations:
    def stacked(site: str, count: int) -> torch.Tensor:
        # [rows, count, ...] from per-request {(site, index): [rows_i, ...]}
        return torch.cat(
            [torch.stack([store[(site, i)] for i in range(count)], dim=1) for store in per_request], dim=0
        )

    return Activations(
        backend=backend,
        resid=stacked("resid", n_blocks + 1),
        attn_out=stacked("attn_out", n_blocks) if "attn_out" in sites else None,
        mlp_out=stacked("mlp_out", n_blocks) if "mlp_out" in sites else None,
        attention_mass=stacked("attention_mass", n_blocks) if attention else None,
    )
