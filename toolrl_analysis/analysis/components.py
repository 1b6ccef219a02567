"""Parameter name -> (layer, component), and the selectors that name sets of parameters
(docs/architecture.md, "Components and selectors").

Canonical components inside a block: attn.q attn.k attn.v attn.o mlp.gate mlp.up mlp.down norm.attn
norm.mlp (plus norm.q / norm.k for Qwen3's per-head norms, and attn.qkv / mlp.gate_up for fused
projections we cannot split); outside the blocks: embed (embed.pos for learned positions), lm_head,
norm.final. A parameter we cannot place is reported with component `other` and layer None, never dropped.

One table per architecture family (llama-like: Llama, Mistral, Qwen2, Qwen3; GPT-2) and a word-based
fallback for the rest. GPT-2's fused `c_attn` is split into q/k/v parts (its Conv1D weight is
[in, out], so the split is along dim 1).

Selectors (`mlp@0-2`, `attn.*@lower`, `mlp.down@-4:`, `embed`, `all`, comma-separated unions) are parsed
once by `parse_selector` and shared by compare, ablate and probe.
"""

from __future__ import annotations

import fnmatch
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field

import pandas as pd

from toolrl_analysis.errors import SelectorError

BLOCK_COMPONENTS = (
    "attn.q",
    "attn.k",
    "attn.v",
    "attn.o",
    "mlp.gate",
    "mlp.up",
    "mlp.down",
    "norm.attn",
    "norm.mlp",
)
EXTRA_BLOCK_COMPONENTS = ("norm.q", "norm.k", "attn.qkv", "mlp.gate_up")
OUTSIDE_COMPONENTS = ("embed", "embed.pos", "lm_head", "norm.final")
OTHER = "other"
# Display order for tables and heatmaps.
COMPONENTS = (*BLOCK_COMPONENTS, *EXTRA_BLOCK_COMPONENTS, *OUTSIDE_COMPONENTS, OTHER)
FAMILIES = ("attn", "mlp", "norm")

FAMILY_LABELS = {
    "llama": "llama-like (Llama, Mistral, Qwen2, Qwen3)",
    "gpt2": "GPT-2",
    "generic": "unrecognised architecture (generic name rules)",
}


def component_family(component: str) -> str:
    """attn / mlp / norm / embed / lm_head / other: the word before the first dot."""
    return component.split(".", 1)[0]


@dataclass(frozen=True)
class ParameterPart:
    """A parameter, or a slice of a fused one, with its place in the model.

    `dim`/`start`/`stop` select the part of the tensor (None: the whole tensor). Ablation reverts exactly
    `tensor[part.index(tensor.dim())]`.
    """

    name: str
    layer: int | None
    component: str
    role: str  # the tensor's leaf name: "weight", "bias", or e.g. "inv_freq" for a buffer
    part: str = ""  # "" for a whole tensor, "q"/"k"/"v" for a slice of a fused projection
    dim: int | None = None
    start: int = 0
    stop: int | None = None

    @property
    def label(self) -> str:
        return f"{self.name}[{self.part}]" if self.part else self.name

    def index(self, ndim: int) -> tuple[slice, ...]:
        """Index tuple selecting this part of a tensor with `ndim` dimensions."""
        if self.dim is None:
            return (slice(None),) * ndim
        return tuple(slice(self.start, self.stop) if d == self.dim else slice(None) for d in range(ndim))

    def take(self, tensor):
        """This part of `tensor` (a view)."""
        return tensor if self.dim is None else tensor[self.index(tensor.dim())]


# ---------------------------------------------------------------------------------------------
# Architecture tables
# ---------------------------------------------------------------------------------------------
_LLAMA_BLOCK = {
    "self_attn.q_proj": "attn.q",
    "self_attn.k_proj": "attn.k",
    "self_attn.v_proj": "attn.v",
    "self_attn.o_proj": "attn.o",
    "self_attn.q_norm": "norm.q",
    "self_attn.k_norm": "norm.k",
    "mlp.gate_proj": "mlp.gate",
    "mlp.up_proj": "mlp.up",
    "mlp.down_proj": "mlp.down",
    "input_layernorm": "norm.attn",
    "post_attention_layernorm": "norm.mlp",
}
_LLAMA_OUTSIDE = {"embed_tokens": "embed", "norm": "norm.final", "lm_head": "lm_head"}
_GPT2_BLOCK = {
    "ln_1": "norm.attn",
    "attn.c_attn": "attn.qkv",  # split into q/k/v by _split_gpt2_qkv
    "attn.c_proj": "attn.o",
    "ln_2": "norm.mlp",
    "mlp.c_fc": "mlp.up",
    "mlp.c_proj": "mlp.down",
}
_GPT2_OUTSIDE = {"wte": "embed", "wpe": "embed.pos", "ln_f": "norm.final", "lm_head": "lm_head"}

# `<prefix>.layers.N.<module>.<leaf>`; the first `layers.N` names the block (non-greedy prefix).
_LLAMA_NAME = re.compile(r"^(?:(?P<prefix>.*?)\.)?layers\.(?P<layer>\d+)\.(?P<module>.+)\.(?P<leaf>[^.]+)$")
_GPT2_NAME = re.compile(r"^(?:(?P<prefix>.*?)\.)?h\.(?P<layer>\d+)\.(?P<module>.+)\.(?P<leaf>[^.]+)$")
_GENERIC_NAME = re.compile(
    r"^(?:(?P<prefix>.*?)\.)?(?:layers|layer|h|blocks|block)\.(?P<layer>\d+)\.(?P<module>.+)\.(?P<leaf>[^.]+)$"
)
_LLAMA_SIGNATURE = re.compile(r"(?:^|\.)layers\.\d+\.(?:self_attn\.[qkvo]_proj|mlp\.(?:gate|up|down)_proj)\.")
_GPT2_SIGNATURE = re.compile(r"(?:^|\.)h\.\d+\.(?:attn\.c_attn|mlp\.c_fc)\.")


def detect_family(names: Iterable[str]) -> str:
    """'llama' (Llama/Mistral/Qwen2/Qwen3 naming), 'gpt2', or 'generic'."""
    names = list(names)
    if any(_LLAMA_SIGNATURE.search(n) for n in names):
        return "llama"
    if any(_GPT2_SIGNATURE.search(n) for n in names):
        return "gpt2"
    return "generic"


def map_parameter(
    name: str, shape: Sequence[int] | None = None, family: str | None = None
) -> list[ParameterPart]:
    """The (layer, component) parts of one parameter: one part, or three for GPT-2's fused c_attn."""
    family = family or detect_family([name])
    if family == "llama":
        part = _map_with_table(name, _LLAMA_NAME, _LLAMA_BLOCK, _LLAMA_OUTSIDE)
    elif family == "gpt2":
        part = _map_with_table(name, _GPT2_NAME, _GPT2_BLOCK, _GPT2_OUTSIDE)
        if part is not None and part.component == "attn.qkv" and shape is not None:
            return _split_gpt2_qkv(part, shape)
    else:
        part = None
    if part is None:
        part = _map_generic(name)
    if part is None:  # reported as (None, 'other'), never dropped
        part = ParameterPart(name, None, OTHER, name.rsplit(".", 1)[-1])
    return [part]


def _map_with_table(name: str, pattern: re.Pattern, block: Mapping, outside: Mapping) -> ParameterPart | None:
    match = pattern.match(name)
    if match:
        component = block.get(match["module"])
        return (
            None if component is None else ParameterPart(name, int(match["layer"]), component, match["leaf"])
        )
    if "." not in name:
        return None
    module, leaf = name.rsplit(".", 1)
    component = outside.get(module.rsplit(".", 1)[-1])
    return None if component is None else ParameterPart(name, None, component, leaf)


def _split_gpt2_qkv(part: ParameterPart, shape: Sequence[int]) -> list[ParameterPart]:
    # Conv1D stores weight as [in, 3*hidden]; the bias is [3*hidden]. q, k, v are consecutive thirds.
    dim = len(shape) - 1
    width = shape[dim] // 3
    if shape[dim] % 3:
        return [part]
    return [
        ParameterPart(
            part.name, part.layer, f"attn.{which}", part.role, which, dim, i * width, (i + 1) * width
        )
        for i, which in enumerate("qkv")
    ]


# Word rules for architectures without a table. Checked in order; the first hit wins.
_GENERIC_BLOCK_RULES: tuple[tuple[str, str], ...] = (
    (r"(^|\.)(q_norm|q_layernorm|query_layernorm)$", "norm.q"),
    (r"(^|\.)(k_norm|k_layernorm|key_layernorm)$", "norm.k"),
    (
        r"(^|\.)(input_layernorm|ln_1|attention_norm|norm1|ln_attn|attn_norm|pre_attention_layernorm)$",
        "norm.attn",
    ),
    (
        r"(^|\.)(post_attention_layernorm|ln_2|ffn_norm|norm2|ln_mlp|mlp_norm|pre_feedforward_layernorm"
        r"|post_feedforward_layernorm)$",
        "norm.mlp",
    ),
    (r"(^|\.)(qkv_proj|query_key_value|c_attn|wqkv|Wqkv|qkv|in_proj)$", "attn.qkv"),
    (r"(attn|attention)(\.self)?\.(q_proj|query|wq|q)$", "attn.q"),
    (r"(attn|attention)(\.self)?\.(k_proj|key|wk|k)$", "attn.k"),
    (r"(attn|attention)(\.self)?\.(v_proj|value|wv|v)$", "attn.v"),
    (r"(attn|attention).*\.(o_proj|out_proj|dense|wo|c_proj|o|proj)$", "attn.o"),
    (r"(^|\.)gate_up_proj$", "mlp.gate_up"),
    (r"(^|\.)(gate_proj|w1)$", "mlp.gate"),
    (r"(^|\.)(up_proj|w3|fc1|c_fc|dense_h_to_4h|fc_in|intermediate\.dense)$", "mlp.up"),
    (r"(^|\.)(down_proj|w2|fc2|dense_4h_to_h|fc_out|output\.dense)$", "mlp.down"),
    (r"(mlp|ffn|feed_forward)\.c_proj$", "mlp.down"),
)
_GENERIC_OUTSIDE_RULES: tuple[tuple[str, str], ...] = (
    (r"(^|\.)(embed_tokens|wte|word_embeddings|tok_embeddings|embed_in)$", "embed"),
    (r"(^|\.)(wpe|position_embeddings|embed_positions)$", "embed.pos"),
    (r"^(lm_head|embed_out|output)$|(^|\.)lm_head$", "lm_head"),
    (r"(^|\.)(norm|ln_f|final_layernorm|final_layer_norm|norm_f|final_norm)$", "norm.final"),
)


def _map_generic(name: str) -> ParameterPart | None:
    if "." not in name:
        return None
    match = _GENERIC_NAME.match(name)
    if match:
        for pattern, component in _GENERIC_BLOCK_RULES:
            if re.search(pattern, match["module"]):
                return ParameterPart(name, int(match["layer"]), component, match["leaf"])
        return None
    module, leaf = name.rsplit(".", 1)
    for pattern, component in _GENERIC_OUTSIDE_RULES:
        if re.search(pattern, module):
            return ParameterPart(name, None, component, leaf)
    return None


@dataclass
class ParameterMap:
    """Every parameter of a checkpoint placed at (layer, component)."""

    family: str
    n_layers: int
    parts: list[ParameterPart]

    @property
    def names(self) -> list[str]:
        return list(dict.fromkeys(part.name for part in self.parts))

    def parse(self, text: str) -> Selector:
        """`parse_selector` against this model; a SelectorError also names what the model has."""
        try:
            return parse_selector(text, self.n_layers)
        except SelectorError as exc:
            raise SelectorError(f"{exc}; {self.describe()}") from None

    def select(self, selector: Selector | str) -> list[ParameterPart]:
        """The parts a selector names; SelectorError when it names none. The message names this model's
        components and layer range, so a user can fix the selector from one line."""
        if isinstance(selector, str):
            selector = self.parse(selector)
        chosen = [p for p in self.parts if selector.matches(p.layer, p.component)]
        if not chosen:
            raise SelectorError(
                f"selector {selector.text!r} selects no parameters of this model; {self.describe()}"
            )
        return chosen

    def describe(self) -> str:
        """What a selector can name in this model: its components and its blocks."""
        present = {p.component for p in self.parts}
        components = ", ".join(c for c in COMPONENTS if c in present)
        if self.n_layers <= 0:
            return f"this model has components {components} and no numbered blocks"
        top = self.n_layers - 1
        named = ", ".join(
            f"{band} = {_span(layers)}" for band, layers in band_layers(self.n_layers).items() if layers
        )
        return f"this model has components {components} and blocks 0-{top} ({named})"

    def to_frame(self) -> pd.DataFrame:
        return pd.DataFrame(
            {
                "name": [p.name for p in self.parts],
                "part": [p.part for p in self.parts],
                "layer": pd.array([p.layer for p in self.parts], dtype="Int64"),
                "component": [p.component for p in self.parts],
                "role": [p.role for p in self.parts],
            }
        )


def map_parameters(
    shapes: Mapping[str, Sequence[int]] | Iterable[str], family: str | None = None
) -> ParameterMap:
    """Map every name (with its shape when known, needed to split fused tensors) to its parts."""
    shapes = dict(shapes) if isinstance(shapes, Mapping) else dict.fromkeys(shapes)
    family = family or detect_family(shapes)
    parts = [part for name, shape in shapes.items() for part in map_parameter(name, shape, family)]
    layers = [p.layer for p in parts if p.layer is not None]
    return ParameterMap(family, max(layers) + 1 if layers else 0, parts)


# ---------------------------------------------------------------------------------------------
# Selectors
# ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class SelectorTerm:
    component: str  # a pattern: "*", a family ("mlp"), a component ("mlp.down") or a glob ("attn.*")
    layers: frozenset[int] | None  # None: any layer, including parameters outside the blocks

    def matches(self, layer: int | None, component: str) -> bool:
        if self.layers is not None and layer not in self.layers:
            return False
        return component_matches(self.component, component)


@dataclass(frozen=True)
class Selector:
    """A union of terms; `matches(layer, component)` says whether a parameter part is selected."""

    text: str
    n_layers: int
    terms: tuple[SelectorTerm, ...] = field(default_factory=tuple)

    def matches(self, layer: int | None, component: str) -> bool:
        return any(term.matches(layer, component) for term in self.terms)

    def __str__(self) -> str:
        return self.text


def component_matches(pattern: str, component: str) -> bool:
    if pattern in ("*", "all", ""):
        return True
    if any(ch in pattern for ch in "*?["):
        return fnmatch.fnmatchcase(component, pattern)
    return component == pattern or component.startswith(pattern + ".")


def parse_selector(text: str, n_layers: int) -> Selector:
    """Parse `mlp@0-2`, `attn.*@lower`, `mlp.down@-4:`, `embed`, `all`, or a comma-separated union.

    Layer specs: N, a-b (inclusive), a:b / a: / :b / -4: (python slices), lower / middle / upper (the
    thirds of `band_layers`), all. Negative indices count from the top block.
    """
    if not isinstance(text, str) or not text.strip():
        raise SelectorError("empty selector: name components and layers, e.g. 'mlp@0-2' or 'all'")
    terms = []
    for raw in text.split(","):
        term_text = raw.strip()
        if not term_text:
            raise SelectorError(f"empty term in selector {text!r} (stray comma?)")
        terms.append(_parse_term(term_text, text, n_layers))
    return Selector(text.strip(), n_layers, tuple(terms))


def _parse_term(term: str, text: str, n_layers: int) -> SelectorTerm:
    component, at, layer_spec = term.partition("@")
    component = component.strip()
    if component and not any(component_matches(component, known) for known in COMPONENTS):
        raise SelectorError(
            f"unknown component {component!r} in selector {text!r} "
            f"(known: all, attn, mlp, norm, {', '.join(COMPONENTS)})"
        )
    if not at:
        return SelectorTerm(component or "*", None)
    layers = parse_layers(layer_spec.strip(), n_layers, text)
    return SelectorTerm(component or "*", layers)


def parse_layers(spec: str, n_layers: int, text: str | None = None) -> frozenset[int] | None:
    """The block indices a layer spec names (None for 'all' / '*': every layer, even outside blocks)."""
    context = f" in selector {text!r}" if text else ""
    if spec in ("all", "*"):
        return None
    if n_layers <= 0:
        raise SelectorError(f"layer spec {spec!r}{context}, but the model has no numbered blocks")
    top = n_layers - 1

    def index(value: str) -> int:
        number = int(value)
        resolved = number + n_layers if number < 0 else number
        if not 0 <= resolved <= top:
            raise SelectorError(
                f"layer {number}{context} is out of range: the model has {n_layers} blocks (0-{top})"
            )
        return resolved

    named = band_layers(n_layers)
    if spec in named:
        layers = frozenset(named[spec])
    elif re.fullmatch(r"-?\d+", spec):
        layers = frozenset({index(spec)})
    elif match := re.fullmatch(r"(-?\d+)-(-?\d+)", spec):
        first, last = index(match[1]), index(match[2])
        if first > last:
            raise SelectorError(f"layer range {spec!r}{context} is empty (it runs backwards)")
        layers = frozenset(range(first, last + 1))
    elif match := re.fullmatch(r"(-?\d+)?:(-?\d+)?", spec):
        try:
            start = None if match[1] is None else int(match[1])
            stop = None if match[2] is None else int(match[2])
        except ValueError:  # pragma: no cover - the regex only lets integers through
            raise SelectorError(f"bad layer slice {spec!r}{context}") from None
        layers = frozenset(range(n_layers)[slice(start, stop)])
    else:
        raise SelectorError(
            f"bad layer spec {spec!r}{context}: use N, a-b, a:b, -4:, lower, middle, upper or all"
        )
    if not layers:
        raise SelectorError(
            f"layer spec {spec!r}{context} selects no layers of the model's {n_layers} blocks"
        )
    return layers


def select_parameters(
    selector: Selector | str, shapes: Mapping[str, Sequence[int]] | Iterable[str] | ParameterMap
) -> list[ParameterPart]:
    """Parts of the named parameters that a selector picks (SelectorError if none)."""
    mapping = shapes if isinstance(shapes, ParameterMap) else map_parameters(shapes)
    return mapping.select(selector)


def selected_names(
    selector: Selector | str, shapes: Mapping[str, Sequence[int]] | Iterable[str] | ParameterMap
) -> list[str]:
    """Names of the tensors with at least one selected part, in checkpoint order."""
    return list(dict.fromkeys(part.name for part in select_parameters(selector, shapes)))


def band_layers(n_layers: int) -> dict[str, range]:
    """The one definition of lower / middle / upper: the thirds of the blocks, rounded to whole blocks.

    Selectors (`mlp@lower`), the band table of `compare`, the ablation grid and the report all use it. Thirds,
    not halves: the paper's "lower layers" were blocks 0-2 of 28, the bottom tenth, and half a model is not
    "lower" in that sense; and a third leaves two thirds of the blocks outside a band, from which matched
    controls are drawn. 28 blocks: 0-8, 9-18, 19-27; 4 blocks (the embedded model): 0, 1-2, 3."""
    first, second = round(n_layers / 3), round(2 * n_layers / 3)
    return {"lower": range(0, first), "middle": range(first, second), "upper": range(second, n_layers)}


def band_of_layer(layer: int, n_layers: int) -> str:
    """The band ('lower', 'middle' or 'upper') a block lies in (`band_layers`)."""
    return next(band for band, layers in band_layers(n_layers).items() if layer in layers)


def _span(layers: range) -> str:
    return str(layers[0]) if len(layers) == 1 else f"{layers[0]}-{layers[-1]}"
