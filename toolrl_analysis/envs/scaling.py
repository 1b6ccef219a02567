"""Stage 5: complexity scaling. Four separate operations, each applied to an environment with its own
probability, so that the tools a policy sees are broader and noisier than one-relation look-ups:

- functional generalisation: a tool answers a broader family of queries (more `field` values; a
  one-relation tool becomes the family's `<kind>_info`);
- parameter expansion: extra optional parameters, validated by the tool;
- parameter type generalisation: the subject parameter becomes a list of names or an object;
- toolset extension: plausible distractor tools for relations the question does not ask.

A widened tool never takes over a relation that another golden tool answers, so every sub-question
keeps exactly one right tool.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field

from toolrl_analysis.envs.documents import EXTRA_PARAMS, ToolSpec, document
from toolrl_analysis.envs.integrate import family_tool_name, relation_order
from toolrl_analysis.envs.world import KINDS, RELATIONS_BY_KIND

OPERATIONS = (
    "functional_generalisation",
    "parameter_expansion",
    "parameter_type_generalisation",
    "toolset_extension",
)


@dataclass
class ScalingSettings:
    functional_generalisation: float = 0.5
    parameter_expansion: float = 0.5
    parameter_type_generalisation: float = 0.25
    toolset_extension: float = 1.0
    distractors_min: int = 2
    distractors_max: int = 3
    max_tools: int = 6


@dataclass
class Scaled:
    tools: list[ToolSpec]  # golden tools first, then distractors
    renames: dict[str, str] = field(default_factory=dict)  # old golden name -> new name
    applied: list[str] = field(default_factory=list)  # operation names, in OPERATIONS order
    details: dict[str, dict[str, object]] = field(default_factory=dict)

    @property
    def distractors(self) -> list[str]:
        return [t.name for t in self.tools if t.role == "distractor"]


def _some(items: list[ToolSpec], rng: random.Random) -> list[ToolSpec]:
    """Each item with probability 1/2, but at least one."""
    chosen = [t for t in items if rng.random() < 0.5]
    return chosen or [rng.choice(items)]


def _covered(tools: list[ToolSpec]) -> set[tuple[str, str]]:
    return {(t.kind, key) for t in tools for key in t.relations}


def functional_generalisation(golden: list[ToolSpec], rng: random.Random) -> dict[str, object]:
    done: dict[str, object] = {}
    for tool in _some(golden, rng):
        covered = _covered(golden)
        siblings = [r.key for r in RELATIONS_BY_KIND[tool.kind] if (tool.kind, r.key) not in covered]
        if not siblings:
            continue
        if not tool.selector:
            new_name = family_tool_name(tool.kind)
            if any(t.name == new_name for t in golden):
                continue
            tool.name, tool.selector = new_name, True
        added = rng.sample(siblings, rng.randint(1, min(2, len(siblings))))
        tool.relations = relation_order(tool.kind, tool.relations + added)
        done[tool.name] = relation_order(tool.kind, added)
    return done


def parameter_type_generalisation(golden: list[ToolSpec], rng: random.Random) -> dict[str, object]:
    tool = rng.choice(golden)
    tool.subject_type = rng.choice(("list", "object"))
    return {tool.name: tool.subject_type}


def toolset_extension(
    golden: list[ToolSpec], rng: random.Random, settings: ScalingSettings
) -> list[ToolSpec]:
    """Distractors for relations nobody asks, preferring near misses (the question's own kinds)."""
    wanted = rng.randint(settings.distractors_min, settings.distractors_max)
    wanted = min(wanted, max(1, settings.max_tools - len(golden)))
    covered = _covered(golden)
    taken = {t.name for t in golden}
    free = [
        (kind, r.key)
        for kind in KINDS
        for r in RELATIONS_BY_KIND[kind]
        if (kind, r.key) not in covered and f"{kind}_{r.key}" not in taken
    ]
    golden_kinds = {t.kind for t in golden}
    near = [c for c in free if c[0] in golden_kinds]
    far = [c for c in free if c[0] not in golden_kinds]
    out: list[ToolSpec] = []
    while len(out) < wanted and (near or far):
        pool = near if near and (not far or rng.random() < 0.6) else far
        kind, key = pool.pop(rng.randrange(len(pool)))
        out.append(document(kind, key, role="distractor"))
    return out


def parameter_expansion(tools: list[ToolSpec], rng: random.Random) -> dict[str, object]:
    golden = [t for t in tools if t.role == "golden"]
    chosen = _some(golden, rng) + [t for t in tools if t.role == "distractor" and rng.random() < 0.5]
    done: dict[str, object] = {}
    for tool in chosen:
        extras = rng.sample(list(EXTRA_PARAMS), rng.randint(1, 2))
        tool.extras = [e for e in EXTRA_PARAMS if e in extras]
        done[tool.name] = [e.name for e in tool.extras]
    return done


def scale(golden: list[ToolSpec], rng: random.Random, settings: ScalingSettings) -> Scaled:
    """Apply the four operations in place on `golden`; return golden + distractor tools."""
    before = [t.name for t in golden]
    result = Scaled(tools=list(golden))
    if rng.random() < settings.functional_generalisation:
        done = functional_generalisation(golden, rng)
        if done:
            result.details["functional_generalisation"] = done
    if rng.random() < settings.parameter_type_generalisation:
        result.details["parameter_type_generalisation"] = parameter_type_generalisation(golden, rng)
    if rng.random() < settings.toolset_extension:
        distractors = toolset_extension(golden, rng, settings)
        if distractors:
            result.tools = list(golden) + distractors
            result.details["toolset_extension"] = {t.name: t.relations[0] for t in distractors}
    if rng.random() < settings.parameter_expansion:
        result.details["parameter_expansion"] = parameter_expansion(result.tools, rng)
    result.renames = {old: t.name for old, t in zip(before, golden, strict=True) if old != t.name}
    result.applied = [op for op in OPERATIONS if op in result.details]
    return result
