"""Planning: line two checkpoints up tensor by tensor, and report every mismatch by name.

`plan_pairs` is the entry point for anything that walks two checkpoints side by side (compare, ablation): it
returns the matched tensors in base storage order, each with the parameter parts (layer, component) it holds.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from toolrl_analysis.analysis.checkpoints import Checkpoint, TensorInfo
from toolrl_analysis.analysis.components import (
    FAMILY_LABELS,
    ParameterMap,
    ParameterPart,
    map_parameters,
)
from toolrl_analysis.errors import CheckpointError, first_names


@dataclass(frozen=True)
class MatchedTensor:
    """One tensor present on both sides with the same shape, and the parameter parts it holds."""

    name: str
    base_name: str  # differs from name only for a tied lm_head read from the embedding
    trained_name: str
    base: TensorInfo
    trained: TensorInfo
    parts: tuple[ParameterPart, ...]  # one, or several for a fused tensor (GPT-2's c_attn: q, k, v)


@dataclass
class PairPlan:
    """What two checkpoints have in common, and what they do not."""

    matched: list[MatchedTensor]  # in base storage order
    mapping: ParameterMap
    only_in_base: list[str]
    only_in_trained: list[str]
    tied: dict[str, dict[str, str]]  # side -> {lm_head name: the embedding it is read from}
    selector: str | None
    tied_both: dict[str, str] = field(default_factory=dict)  # left out: tied to this tensor on both sides


def plan_pairs(
    base: Checkpoint, trained: Checkpoint, *, select: str | None = None, allow_missing: bool = False
) -> PairPlan:
    """Check that two checkpoints can be compared and list what to compare, in base storage order.

    Raises CheckpointError naming the tensors for different architectures, missing keys (unless
    `allow_missing`), or mismatched shapes; SelectorError for a bad selector.
    """
    base_infos, trained_infos = base.infos(), trained.infos()
    base_map = map_parameters({n: i.shape for n, i in base_infos.items()})
    trained_map = map_parameters({n: i.shape for n, i in trained_infos.items()})
    if base_map.family != trained_map.family:
        raise CheckpointError(
            f"different architectures: base {base.path} has {_describe(base, base_map)} names, "
            f"trained {trained.path} has {_describe(trained, trained_map)} names"
        )
    aliases = _tied_heads(base, trained, base_map, trained_map)
    # A tensor tied to the same tensor on both sides is one parameter, already compared under the other
    # name: leave it out instead of counting its update twice.
    ties = {
        side: {**checkpoint.tied, **aliases[side]}
        for side, checkpoint in (("base", base), ("trained", trained))
    }
    tied_both = {n: s for n, s in ties["base"].items() if ties["trained"].get(n) == s}
    base_names = [n for n in [*base_infos, *aliases["base"]] if n not in tied_both]
    trained_names = {*trained_infos, *aliases["trained"]} - tied_both.keys()

    def source(side: str, name: str) -> str:
        return aliases[side].get(name, name)

    mapping = map_parameters({n: base_infos[source("base", n)].shape for n in base_names}, base_map.family)

    selector = mapping.parse(select) if select else None
    chosen = mapping.select(selector) if selector else mapping.parts
    chosen_names = list(dict.fromkeys(p.name for p in chosen))
    parts_by_name: dict[str, list[ParameterPart]] = {}
    for part in chosen:
        parts_by_name.setdefault(part.name, []).append(part)
    if selector:
        trained_chosen = {
            p.name
            for p in map_parameters(
                {n: trained_infos[source("trained", n)].shape for n in trained_names}, base_map.family
            ).parts
            if selector.matches(p.layer, p.component)
        }
    else:
        trained_chosen = trained_names

    only_in_base = [n for n in chosen_names if n not in trained_names]
    only_in_trained = sorted(trained_chosen - set(chosen_names))
    if (only_in_base or only_in_trained) and not allow_missing:
        if base_map.n_layers != trained_map.n_layers:
            raise CheckpointError(
                f"different architectures: base {base.path} has {base_map.n_layers} blocks, "
                f"trained {trained.path} has {trained_map.n_layers}"
            )
        if base.model_type and trained.model_type and base.model_type != trained.model_type:
            raise CheckpointError(
                f"different architectures: base {base.path} is {base.model_type}, "
                f"trained {trained.path} is {trained.model_type}"
            )
        problems = []
        if only_in_base:
            problems.append(f"trained lacks {len(only_in_base)} tensors of base: {first_names(only_in_base)}")
        if only_in_trained:
            problems.append(
                f"base lacks {len(only_in_trained)} tensors of trained: {first_names(only_in_trained)}"
            )
        raise CheckpointError("; ".join(problems) + " (--allow-missing compares the tensors they share)")

    tensors, mismatched = [], []
    for name in chosen_names:
        if name not in trained_names:
            continue
        base_info = base_infos[source("base", name)]
        trained_info = trained_infos[source("trained", name)]
        if base_info.shape != trained_info.shape:
            mismatched.append(f"{name} (base {list(base_info.shape)}, trained {list(trained_info.shape)})")
            continue
        if base_info.dtype.is_floating_point != trained_info.dtype.is_floating_point:
            raise CheckpointError(
                f"dtype mismatch for {name}: base {base_info.dtype}, trained {trained_info.dtype}"
            )
        tensors.append(
            MatchedTensor(
                name,
                source("base", name),
                source("trained", name),
                base_info,
                trained_info,
                tuple(parts_by_name[name]),
            )
        )
    if mismatched:
        raise CheckpointError(f"shape mismatch for {len(mismatched)} tensors: {first_names(mismatched, 4)}")
    if not tensors:
        raise CheckpointError(f"{base.path} and {trained.path} share no tensors to compare")
    return PairPlan(tensors, mapping, only_in_base, only_in_trained, aliases, select, tied_both)


def _describe(checkpoint: Checkpoint, mapping: ParameterMap) -> str:
    label = FAMILY_LABELS.get(mapping.family, mapping.family)
    model_type = f", model_type {checkpoint.model_type}" if checkpoint.model_type else ""
    return f"{label}{model_type}"


def _tied_heads(
    base: Checkpoint, trained: Checkpoint, base_map: ParameterMap, trained_map: ParameterMap
) -> dict[str, dict[str, str]]:
    """HF drops a tied lm_head from safetensors while a torch state dict keeps it: on the side that lacks
    it, read it from the embedding of the same shape, so the two checkpoints still line up."""
    aliases: dict[str, dict[str, str]] = {"base": {}, "trained": {}}
    sides = (
        ("base", base, base_map, trained, trained_map),
        ("trained", trained, trained_map, base, base_map),
    )
    for side, checkpoint, own, other_checkpoint, other in sides:
        if (checkpoint.config or {}).get("tie_word_embeddings") is False:
            continue
        own_names = {p.name for p in own.parts}
        embeddings = [p.name for p in own.parts if p.component == "embed"]
        for head in (p.name for p in other.parts if p.component == "lm_head" and p.name not in own_names):
            shape = other_checkpoint.info(head).shape
            source = next((e for e in embeddings if checkpoint.info(e).shape == shape), None)
            if source is not None:
                aliases[side][head] = source
    return aliases
