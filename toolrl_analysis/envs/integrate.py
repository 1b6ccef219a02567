"""Stage 4: function integration. Documents of one relation family merge into one tool with a selector.

n documents (one per sub-question) become m <= n tools: identical documents collapse, and a family
(all relations of one subject kind) with two or more distinct relations becomes `<kind>_info` with a
required `field` parameter whose enum lists the merged relations.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field

from toolrl_analysis.envs.documents import ToolSpec
from toolrl_analysis.envs.world import RELATIONS_BY_KIND


@dataclass
class Integration:
    tools: list[ToolSpec]
    tool_of_document: dict[str, str]  # document name -> tool name
    merges: dict[str, list[str]] = field(default_factory=dict)  # merged tool -> document names


def family_tool_name(kind: str) -> str:
    return f"{kind}_info"


def relation_order(kind: str, keys: list[str]) -> list[str]:
    """Enum order follows the fixed relation catalogue, not the question, so it gives no hint."""
    order = [r.key for r in RELATIONS_BY_KIND[kind]]
    return sorted(set(keys), key=order.index)


def integrate(documents: list[ToolSpec], rng: random.Random, merge_prob: float = 1.0) -> Integration:
    families: dict[str, list[ToolSpec]] = {}
    for doc in documents:
        families.setdefault(doc.kind, []).append(doc)
    tools: list[ToolSpec] = []
    tool_of: dict[str, str] = {}
    merges: dict[str, list[str]] = {}
    for kind, docs in families.items():
        distinct = {doc.name: doc for doc in docs}
        if len(distinct) >= 2 and rng.random() < merge_prob:
            name = family_tool_name(kind)
            keys = relation_order(kind, [k for doc in distinct.values() for k in doc.relations])
            tools.append(ToolSpec(name=name, kind=kind, relations=keys, selector=True))
            merges[name] = sorted(distinct)
            tool_of.update({doc_name: name for doc_name in distinct})
        else:
            for doc_name, doc in distinct.items():
                tools.append(doc)
                tool_of[doc_name] = doc_name
    return Integration(tools=tools, tool_of_document=tool_of, merges=merges)
