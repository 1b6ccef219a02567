"""A seeded procedural world: fictional entities and the typed relations between them.

Questions are composed from this world (decompose.py) and tools serve its facts (deploy.py).
It is built for a tiny policy trained from scratch, so everything is short and transparent:
names are one or two invented syllable-built tokens, each relation has one plain noun
("birthplace") that the question, the tool name and the tool's `field` enum all share, and every
answer is a short string that the tool prints verbatim and the next hop can copy as its argument.

Substring safety matters because the reward marks a sub-question solved when the gold answer
*occurs* in a tool's output: no entity name occurs inside another name or inside the fixed text of
our tool sentences, and every number has exactly four digits (years < 2000 <= quantities).
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field

KINDS = ("person", "place", "organisation", "artefact")
VALUE_KINDS = ("year", "quantity")


@dataclass(frozen=True)
class Relation:
    """A typed relation `subject --key--> object` of one subject kind."""

    subject: str  # one of KINDS
    key: str  # identifier used in tool names and `field` enums: "birth_year"
    noun: str  # the words a question uses: "birth year"
    obj: str  # one of KINDS or VALUE_KINDS
    sentence: str  # tool output for a correct call, with {subject} and {value}

    @property
    def entity_valued(self) -> bool:
        return self.obj in KINDS

    @property
    def numeric(self) -> bool:
        return self.obj in VALUE_KINDS


RELATIONS: tuple[Relation, ...] = (
    Relation("person", "birthplace", "birthplace", "place", "{subject} was born in {value}."),
    Relation("person", "employer", "employer", "organisation", "{subject} works for {value}."),
    Relation("person", "mentor", "mentor", "person", "The mentor of {subject} is {value}."),
    Relation("person", "birth_year", "birth year", "year", "{subject} was born in the year {value}."),
    Relation("place", "mayor", "mayor", "person", "The mayor of {subject} is {value}."),
    Relation("place", "twin_city", "twin city", "place", "{subject} is twinned with {value}."),
    Relation("place", "population", "population", "quantity", "{subject} has a population of {value}."),
    Relation("place", "founding_year", "founding year", "year", "{subject} was founded in {value}."),
    Relation("organisation", "founder", "founder", "person", "{subject} was founded by {value}."),
    Relation(
        "organisation", "headquarters", "headquarters", "place", "{subject} has its headquarters in {value}."
    ),
    Relation(
        "organisation", "parent_company", "parent company", "organisation", "{subject} is owned by {value}."
    ),
    Relation("organisation", "founding_year", "founding year", "year", "{subject} was founded in {value}."),
    Relation("organisation", "staff_count", "staff count", "quantity", "{subject} has a staff of {value}."),
    Relation("artefact", "creator", "creator", "person", "{subject} was made by {value}."),
    Relation("artefact", "owner", "owner", "organisation", "{subject} is owned by {value}."),
    Relation("artefact", "creation_year", "creation year", "year", "{subject} was made in the year {value}."),
    Relation("artefact", "weight", "weight", "quantity", "{subject} has a weight of {value} grams."),
)

RELATIONS_BY_KIND: dict[str, tuple[Relation, ...]] = {
    kind: tuple(r for r in RELATIONS if r.subject == kind) for kind in KINDS
}


def relation(kind: str, key: str) -> Relation:
    for candidate in RELATIONS_BY_KIND[kind]:
        if candidate.key == key:
            return candidate
    raise KeyError(f"{kind}.{key}")


# Number ranges (all four digits, so one number never occurs inside another).
YEAR_RANGES = {"birth_year": (1600, 1999), "founding_year": (1100, 1899), "creation_year": (1200, 1999)}
QUANTITY_RANGE = (2000, 9999)

_ONSETS = ("b", "d", "f", "g", "k", "l", "m", "n", "p", "r", "s", "t", "v", "z", "br", "st", "tr")
_VOWELS = ("a", "e", "i", "o", "u")
_CODAS = ("", "", "", "n", "r", "s", "l", "x", "nt")
_ORG_SUFFIXES = ("Works", "Guild", "Labs", "Bank", "Press", "Foundry", "Group", "Trust")
_ARTEFACT_NOUNS = ("Lamp", "Harp", "Crown", "Mask", "Vase", "Bell", "Drum", "Clock", "Sword", "Globe")

# Every fixed word our questions, tool sentences and errors use: invented tokens must not occur in it.
_FIXED_TEXT = " ".join(
    [r.sentence + " " + r.noun + " " + r.key for r in RELATIONS]
    + list(KINDS)
    + [
        "what who is the of and which has larger largest earlier earliest combined sum difference how much",
        "than that tell me do you know can error required parameter must be one record found no for name",
        "full names list object string please provide check spelling valid parameters are unknown field",
        "language detail source include registry archive short entry format result results maximum grams",
        "between given tools question call answer correct continue arrive obtained information directly",
        "like non-empty got true false integer spelling this was checked against entry unavailable",
        "choose more persons places organisations artefacts look up facts returns residents employees",
    ]
).lower()


@dataclass
class World:
    """Entities per kind and a dense fact table: facts[(kind, key)][subject] = value (a string)."""

    seed: int
    entities: dict[str, list[str]]
    facts: dict[tuple[str, str], dict[str, str]] = field(default_factory=dict)

    def value(self, kind: str, key: str, subject: str) -> str:
        return self.facts[(kind, key)][subject]

    def __post_init__(self) -> None:
        self._kind_of = {name: kind for kind, names in self.entities.items() for name in names}

    def kind_of(self, name: str) -> str | None:
        return self._kind_of.get(name)

    def stats(self) -> dict[str, int]:
        out = {f"{kind}s": len(names) for kind, names in self.entities.items()}
        out["relations"] = len(RELATIONS)
        out["facts"] = sum(len(table) for table in self.facts.values())
        return out

    def names(self) -> list[str]:
        return [name for kind in KINDS for name in self.entities[kind]]


def _token(rng: random.Random) -> str:
    first = rng.choice(_ONSETS) + rng.choice(_VOWELS)
    second = rng.choice(_ONSETS) + rng.choice(_VOWELS) + rng.choice(_CODAS)
    return (first + second).capitalize()


def _name(kind: str, rng: random.Random) -> str:
    if kind == "person":
        return f"{_token(rng)} {_token(rng)}"
    if kind == "place":
        return _token(rng)
    if kind == "organisation":
        return f"{_token(rng)} {rng.choice(_ORG_SUFFIXES)}"
    return f"{_token(rng)} {rng.choice(_ARTEFACT_NOUNS)}"


class NameGuard:
    """The names taken so far, lower-cased, under one rule: no name occurs inside another. Used within a
    world, and across worlds to keep a held-out world's names out of every training world's text."""

    GRAM = 3  # every name has at least this many characters (a syllable pair)

    def __init__(self, names=()):
        self._names: set[str] = set()
        self._by_gram: dict[str, list[str]] = {}  # a name that contains `low` contains low's first gram
        for name in names:
            self.add(name)

    def clashes(self, low: str) -> bool:
        if any(low in other for other in self._by_gram.get(low[: self.GRAM], ())):
            return True
        # a taken name inside this one: every substring of a short name is cheap to enumerate
        return any(low[i:j] in self._names for i in range(len(low)) for j in range(i + 1, len(low) + 1))

    def add(self, name: str) -> None:
        low = name.lower()
        if low in self._names:
            return
        self._names.add(low)
        for gram in {low[i : i + self.GRAM] for i in range(len(low) - self.GRAM + 1)}:
            self._by_gram.setdefault(gram, []).append(low)


def _distinct_names(
    sizes: dict[str, int], rng: random.Random, exclude: NameGuard | None
) -> dict[str, list[str]]:
    """Names such that no name occurs inside another name, inside our fixed text (case-insensitive), or
    inside or around a name of `exclude`."""
    taken = NameGuard()
    out: dict[str, list[str]] = {kind: [] for kind in KINDS}
    for kind in KINDS:
        while len(out[kind]) < sizes[kind]:
            name = _name(kind, rng)
            low = name.lower()
            if any(t in _FIXED_TEXT for t in low.split() if t not in _SUFFIX_WORDS):
                continue
            if taken.clashes(low) or (exclude is not None and exclude.clashes(low)):
                continue
            taken.add(low)
            out[kind].append(name)
    return out


_SUFFIX_WORDS = {w.lower() for w in _ORG_SUFFIXES + _ARTEFACT_NOUNS}


def build_world(
    seed: int,
    people: int = 400,
    places: int = 120,
    organisations: int = 120,
    artefacts: int = 160,
    exclude: NameGuard | None = None,
) -> World:
    """Build the world for `seed`. Same seed (and `exclude`), same world; every entity has every relation of
    its kind. No name occurs inside or around a name of `exclude` (the names of other worlds that this one
    must share nothing with)."""
    rng = random.Random(f"toolrl-world/{seed}")
    sizes = {"person": people, "place": places, "organisation": organisations, "artefact": artefacts}
    entities = _distinct_names(sizes, rng, exclude)
    world = World(seed=seed, entities=entities)
    for rel in RELATIONS:
        subjects = entities[rel.subject]
        table: dict[str, str] = {}
        if rel.obj == "quantity":
            # Distinct quantities per relation, so a comparison or sum question never ties.
            values = rng.sample(range(QUANTITY_RANGE[0], QUANTITY_RANGE[1] + 1), len(subjects))
            table = {s: str(v) for s, v in zip(subjects, values, strict=True)}
        elif rel.obj == "year":
            low, high = YEAR_RANGES[rel.key]
            table = {s: str(rng.randint(low, high)) for s in subjects}
        else:
            pool = entities[rel.obj]
            for s in subjects:
                value = rng.choice(pool)
                while value == s:  # nobody is their own mentor, no city is its own twin
                    value = rng.choice(pool)
                table[s] = value
        world.facts[(rel.subject, rel.key)] = table
    return world
