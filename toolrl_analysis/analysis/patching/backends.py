"""Activation patching in the three capture backends, each with its own mechanism: hf forward hooks on
`model.layers[L]` / `.self_attn` / `.mlp`, transformer-lens hook points (`blocks.L.hook_resid_post`,
`hook_attn_out`, `hook_mlp_out`), nnsight interventions (assigning a module's `.output` inside a trace).

A runner captures a model's activations at every position (through the probe's capture backends, so the
sites mean what they mean there) and scores a batch with one site of one block replaced at chosen
positions. Sites, for block L: `resid`, the residual stream after block L; `attn_out` and `mlp_out`, what
block L's attention and MLP add to it. Sequences are right-padded and run without an attention mask, as in
`probe.activations`: with causal attention a token never sees the padding after it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from toolrl_analysis.analysis.probe.activations import (
    BACKENDS,
    SITES,
    CaptureRequest,
    Collector,
    HFBackend,
    NNsightBackend,
    TransformerLensBackend,
    check_backend,
    decoder_layers,
)
from toolrl_analysis.errors import UserError
from toolrl_analysis.models.placement import input_device

_TL_HOOKS = {"resid": "hook_resid_post", "attn_out": "hook_attn_out", "mlp_out": "hook_mlp_out"}


def check_sites(sites: Sequence[str], backend: str) -> tuple[str, ...]:
    """The sites asked for, or a one-line UserError naming the first one the backend cannot hook."""
    check_backend(backend)
    for site in sites:
        if site not in SITES:
            raise UserError(
                f"the {backend} backend cannot patch site {site!r}: it patches {', '.join(SITES)}"
            )
    if not sites:
        raise UserError(f"no site to patch: choose among {', '.join(SITES)}")
    return tuple(dict.fromkeys(sites))


@dataclass
class Patch:
    """Replace `site` of block `layer` at the positions of `mask` [B, T] with `source` [B, T, d]."""

    site: str
    layer: int
    mask: torch.Tensor
    source: torch.Tensor

    def apply(self, value: torch.Tensor) -> torch.Tensor:
        source = self.source.to(device=value.device, dtype=value.dtype)
        return torch.where(self.mask.to(value.device)[..., None], source, value)

    def on_output(self, output: Any) -> Any:
        """A module's output with the patch applied (an attention module returns (output, weights))."""
        if isinstance(output, tuple):
            return (self.apply(output[0]), *output[1:])
        return self.apply(output)


def _prediction_rows(targets: Sequence[Sequence[int]]) -> torch.Tensor:
    """(row, position) pairs whose logits predict the target tokens: token p is predicted at p - 1."""
    pairs = [(b, p - 1) for b, positions in enumerate(targets) for p in positions]
    return torch.tensor(pairs, dtype=torch.long).reshape(-1, 2)


class _Scoring:
    """What the three runners share: full-position capture, and summing log-probs of target tokens."""

    model: Any
    n_blocks: int

    @torch.no_grad()
    def capture(self, input_ids: torch.Tensor, lengths: Sequence[int]) -> dict[tuple[str, int], torch.Tensor]:
        """{(site, block): [B, T, d]} at every position (zeros over the padding), float32 on the CPU; resid
        of block L is the hidden state after it (the capture backends' index L + 1)."""
        requests = [CaptureRequest(list(range(n)), list(range(n))) for n in lengths]
        collector = Collector(requests, input_ids.shape[1], 0)
        self.run(input_ids.to(input_device(self.model)), collector)  # type: ignore[attr-defined]
        rows = collector.rows
        out = {}
        for (site, index), values in collector.store.items():
            block = index - 1 if site == "resid" else index
            if block < 0:  # the embeddings: not a block's output
                continue
            full = torch.zeros(*input_ids.shape, values.shape[-1])
            full[rows[:, 0], rows[:, 1]] = values
            out[(site, block)] = full
        return out

    @torch.no_grad()
    def target_logprobs(
        self,
        input_ids: torch.Tensor,
        targets: Sequence[Sequence[int]],
        patch: Patch | None = None,
        entering: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """[B]: the summed log-prob of each row's target tokens, with `patch` applied (None: a clean run).
        `entering`: this model's clean residual stream entering the patched block, [B, T, d], which a
        runner may start from instead of recomputing the blocks below."""
        rows = _prediction_rows(targets)
        at = input_ids.to(input_device(self.model))  # type: ignore[attr-defined]
        logits = self.logits_at(at, rows, patch, entering).float()  # type: ignore[attr-defined]
        picked = input_ids[rows[:, 0], rows[:, 1] + 1].to(logits.device)
        # summed in float64: a few hundred float32 log-probs lose ~1e-4 nats, the backends' tolerance
        values = logits.log_softmax(-1).gather(1, picked[:, None])[:, 0].cpu().double()
        return torch.zeros(len(targets), dtype=torch.float64).index_add_(0, rows[:, 0], values)


def _head_at(model: Any, hidden: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """Logits at `rows` from the final (normed) hidden states: the vocabulary projection only where scored."""
    return model.get_output_embeddings()(hidden[rows[:, 0], rows[:, 1]])


class _HFRunner(_Scoring, HFBackend):
    """A forward hook that returns the patched output of the block, its attention or its MLP.

    The blocks below the patched one compute what the clean run computed, so a patch of block L starts at
    block L from the clean residual stream entering it (`entering`): the decoder runs on that stream as its
    `inputs_embeds` with only blocks L.. in place. Checked once against a full run, and used only where
    every block attends alike (one `layer_types`); elsewhere every block runs."""

    def __init__(self, model: Any, tokenizer: Any, sites: Sequence[str]):
        HFBackend.__init__(self, model, tokenizer, sites, attention=False)
        self.n_blocks = len(self.layers)
        kinds = set(getattr(model.config, "layer_types", None) or ["full_attention"])
        self.skips: bool | None = None if len(kinds) == 1 else False  # None: not checked yet

    def _module(self, patch: Patch) -> torch.nn.Module:
        layer = self.layers[patch.layer]
        return {"resid": layer, "attn_out": layer.self_attn, "mlp_out": layer.mlp}[patch.site]

    def _hidden(self, input_ids: torch.Tensor, start: int = 0, entering: torch.Tensor | None = None):
        decoder = self.model.get_decoder()
        if not start or entering is None:
            return decoder(input_ids=input_ids, use_cache=False).last_hidden_state
        layers = decoder.layers
        decoder.layers = torch.nn.ModuleList(list(layers)[start:])
        try:
            embeds = entering.to(device=input_ids.device, dtype=self.model.dtype)
            return decoder(inputs_embeds=embeds, use_cache=False).last_hidden_state
        finally:
            decoder.layers = layers

    def _check_skip(self, input_ids: torch.Tensor, entering: torch.Tensor, start: int) -> bool:
        full = self._hidden(input_ids)
        skipped = self._hidden(input_ids, start, entering)
        self.skips = bool((full - skipped).abs().max().item() <= 1e-4 * max(1.0, full.abs().max().item()))
        return self.skips

    def logits_at(
        self,
        input_ids: torch.Tensor,
        rows: torch.Tensor,
        patch: Patch | None,
        entering: torch.Tensor | None = None,
    ) -> torch.Tensor:
        start = patch.layer if patch is not None and entering is not None else 0
        if start and self.skips is None:
            self._check_skip(input_ids, entering, start)
        if not self.skips:
            start = 0
        hook = None
        if patch is not None:
            hook = self._module(patch).register_forward_hook(lambda m, i, o: patch.on_output(o))
        try:
            hidden = self._hidden(input_ids, start, entering)
        finally:
            if hook is not None:
                hook.remove()
        return _head_at(self.model, hidden, rows.to(hidden.device))


class _TransformerLensRunner(_Scoring, TransformerLensBackend):
    """`run_with_hooks` with a hook on the site's hook point that returns the patched value."""

    def __init__(self, model: Any, tokenizer: Any, sites: Sequence[str]):
        TransformerLensBackend.__init__(self, model, tokenizer, sites, attention=False)
        self.model = model  # where inputs go; the bridge runs a copy on the same device
        known = self.bridge.hook_dict
        for site in sites:
            for block in range(self.n_blocks):
                if f"blocks.{block}.{_TL_HOOKS[site]}" not in known:
                    raise UserError(
                        f"the transformer-lens backend cannot patch site {site!r} of {type(model).__name__}: "
                        f"it has no hook point blocks.{block}.{_TL_HOOKS[site]}"
                    )

    def logits_at(self, input_ids: torch.Tensor, rows: torch.Tensor, patch: Patch | None, entering=None):
        hooks = []
        if patch is not None:
            name = f"blocks.{patch.layer}.{_TL_HOOKS[patch.site]}"
            hooks.append((name, lambda value, hook: patch.on_output(value)))
        logits = self.bridge.run_with_hooks(input_ids, fwd_hooks=hooks, return_type="logits")
        return logits[rows[:, 0], rows[:, 1]]


class _NNsightRunner(_Scoring, NNsightBackend):
    """One `.trace` per batch; the patched module's `.output` is assigned as the trace reaches it."""

    def __init__(self, model: Any, tokenizer: Any, sites: Sequence[str]):
        NNsightBackend.__init__(self, model, tokenizer, sites, attention=False)
        self.n_blocks = len(decoder_layers(model, "nnsight"))

    def logits_at(self, input_ids: torch.Tensor, rows: torch.Tensor, patch: Patch | None, entering=None):
        wrapped, box = self.wrapped, {}
        with wrapped.trace({"input_ids": input_ids}):
            if patch is not None:
                layer = wrapped.model.layers[patch.layer]
                envoy = {"resid": layer, "attn_out": layer.self_attn, "mlp_out": layer.mlp}[patch.site]
                envoy.output = patch.on_output(envoy.output)
            box["hidden"] = wrapped.model.norm.output
        return _head_at(self.model, box["hidden"], rows.to(box["hidden"].device))


_RUNNERS = {"hf": _HFRunner, "transformer-lens": _TransformerLensRunner, "nnsight": _NNsightRunner}
assert set(_RUNNERS) == set(BACKENDS)


def patch_runner(model: Any, tokenizer: Any, backend: str, sites: Sequence[str]) -> _Scoring:
    """A runner of `model` in `backend` that captures and patches `sites` (UserError for a site it cannot
    hook, UnsupportedModelError for a model it cannot run)."""
    sites = check_sites(sites, backend)
    return _RUNNERS[backend](model, tokenizer, ("resid", *[s for s in sites if s != "resid"]))
