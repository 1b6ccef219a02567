"""Stage 3: one tool document (an OpenAI-style function schema) per sub-question.

A `ToolSpec` is the single description of a tool that every later stage edits: integration merges
specs, complexity scaling widens them, deployment writes their code, and `schema()` renders the
JSON schema the policy sees. Names and enum values reuse the relation's own words, so "birthplace"
in a question points at `person_birthplace` or at `person_info(field="birthplace")`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from toolrl_analysis.envs.world import Relation, relation

# What the tool returns, by the relation's object type (quantities by relation).
_RETURNS = {
    "person": "the full name of the person",
    "place": "the name of the place",
    "organisation": "the name of the organisation",
    "year": "a four-digit year",
    "population": "the number of residents",
    "staff_count": "the number of employees",
    "weight": "the weight in grams",
}
_SUBJECT_WORDS = {
    "person": "full name of the person",
    "place": "name of the place",
    "organisation": "name of the organisation",
    "artefact": "name of the artefact",
}


@dataclass(frozen=True)
class ExtraParam:
    """An optional parameter added by parameter expansion; validated by the tool, never required."""

    name: str
    type: str  # string | boolean | integer
    description: str
    default: Any
    enum: tuple[str, ...] | None = None
    minimum: int | None = None
    maximum: int | None = None

    def schema(self) -> dict[str, Any]:
        out: dict[str, Any] = {"type": self.type, "description": self.description}
        if self.enum is not None:
            out["enum"] = list(self.enum)
        if self.minimum is not None:
            out["minimum"] = self.minimum
            out["maximum"] = self.maximum
        out["default"] = self.default
        return out


EXTRA_PARAMS: tuple[ExtraParam, ...] = (
    ExtraParam("language", "string", "Language of the answer.", "en", enum=("en", "fr", "de", "es")),
    ExtraParam("detail", "string", "How much detail to return.", "short", enum=("short", "full")),
    ExtraParam("include_source", "boolean", "Whether to name the registry the fact comes from.", False),
    ExtraParam("max_results", "integer", "Maximum number of records to return.", 1, minimum=1, maximum=5),
)


@dataclass
class ToolSpec:
    name: str
    kind: str  # subject kind; also the name of the subject parameter
    relations: list[str]  # relation keys the tool answers
    selector: bool = False  # has a required `field` parameter choosing the relation
    subject_type: str = "string"  # string | list | object (parameter type generalisation)
    extras: list[ExtraParam] = field(default_factory=list)
    role: str = "golden"  # golden | distractor

    @property
    def subject_param(self) -> str:
        return self.kind

    @property
    def relation_objects(self) -> list[Relation]:
        return [relation(self.kind, key) for key in self.relations]

    @property
    def parameter_names(self) -> list[str]:
        return [self.subject_param] + (["field"] if self.selector else []) + [e.name for e in self.extras]

    def description(self) -> str:
        rels = self.relation_objects
        if not self.selector:
            rel = rels[0]
            returns = _RETURNS.get(rel.key, _RETURNS.get(rel.obj, "the value"))
            return f"Look up the {rel.noun} of {_article(self.kind)} {self.kind}. Returns {returns}."
        nouns = [r.noun for r in rels]
        listed = nouns[0] if len(nouns) == 1 else ", ".join(nouns[:-1]) + " or " + nouns[-1]
        return (
            f"Look up facts about {_article(self.kind)} {self.kind}: {listed}. Choose the fact with 'field'."
        )

    def subject_schema(self) -> dict[str, Any]:
        words = _SUBJECT_WORDS[self.kind]
        if self.subject_type == "list":
            return {
                "type": "array",
                "description": f"One or more names; each is the {words}.",
                "items": {"type": "string"},
            }
        if self.subject_type == "object":
            return {
                "type": "object",
                "description": f"The {self.kind} to look up.",
                "properties": {"name": {"type": "string", "description": f"The {words}."}},
                "required": ["name"],
            }
        return {"type": "string", "description": f"The {words}."}

    def schema(self) -> dict[str, Any]:
        properties: dict[str, Any] = {self.subject_param: self.subject_schema()}
        required = [self.subject_param]
        if self.selector:
            properties["field"] = {
                "type": "string",
                "description": "Which fact to return.",
                "enum": self.relations,
            }
            required.append("field")
        for extra in self.extras:
            properties[extra.name] = extra.schema()
        return {
            "type": "function",
            "function": {
                "name": self.name,
                "description": self.description(),
                "parameters": {"type": "object", "properties": properties, "required": required},
            },
        }

    def subject_argument(self, subject: str) -> Any:
        if self.subject_type == "list":
            return [subject]
        if self.subject_type == "object":
            return {"name": subject}
        return subject

    def golden_arguments(self, subject: str, relation_key: str) -> dict[str, Any]:
        """The call that answers `relation_key` of `subject` (optional parameters left out)."""
        args: dict[str, Any] = {self.subject_param: self.subject_argument(subject)}
        if self.selector:
            args["field"] = relation_key
        return args


def _article(kind: str) -> str:
    return "an" if kind[0] in "aeiou" else "a"


def document(kind: str, relation_key: str, role: str = "golden") -> ToolSpec:
    """The document for one relation: `person_birthplace(person)`."""
    return ToolSpec(name=f"{kind}_{relation_key}", kind=kind, relations=[relation_key], role=role)
