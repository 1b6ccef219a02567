"""Stage 1-2: compose a question in one of FTRL's four scenarios and decompose it into sub-questions.

Each sub-question asks one relation of one entity; its answer is a short string that its tool prints
verbatim. In a chain, the answer of hop k is the subject of hop k+1 and is never named in the question,
so a chain can only be answered hop by hop. All entities of one environment are distinct, so one
sub-question's answer never turns up as another one's subject.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field

from toolrl_analysis.envs.world import KINDS, RELATIONS_BY_KIND, Relation, World

FTRL_PROMPT = (
    "Please call given tools to answer the question. Please note that all your information must be "
    "obtained by calling tools and not by answering the question directly.\n"
    "If the call fails, you need to try to correct it and continue until you arrive at an answer.\n"
    "Question: "
)


@dataclass
class SubQuestion:
    id: int
    kind: str  # subject kind
    relation: str  # relation key
    subject: str
    answer: str
    chain: int
    hop: int
    depends_on: int | None
    question: str


@dataclass
class ScenarioShape:
    """How big each scenario's questions are (from the build config)."""

    parallel_single_min: int = 2
    parallel_single_max: int = 3
    multi_hop_min: int = 2
    multi_hop_max: int = 6
    parallel_multi_chains_min: int = 2
    parallel_multi_chains_max: int = 3
    parallel_multi_min: int = 4
    parallel_multi_max: int = 10
    parallel_aggregate_prob: float = 0.5


@dataclass
class Decomposition:
    scenario: str
    question: str
    answer: str
    aggregate: str  # single | chain | join | sum | difference | gap
    subquestions: list[SubQuestion] = field(default_factory=list)

    @property
    def chains(self) -> list[list[SubQuestion]]:
        out: dict[int, list[SubQuestion]] = {}
        for sq in self.subquestions:
            out.setdefault(sq.chain, []).append(sq)
        return [sorted(c, key=lambda s: s.hop) for _, c in sorted(out.items())]

    @property
    def golden_turns(self) -> list[list[int]]:
        """Turn t calls hop t of every chain still running: parallel sub-questions share a turn."""
        depth = max(sq.hop for sq in self.subquestions) + 1
        return [[sq.id for sq in self.subquestions if sq.hop == t] for t in range(depth)]

    @property
    def key(self) -> tuple:
        """What makes two questions the same instance, whatever the wording."""
        chains = tuple(sorted((c[0].subject,) + tuple(s.relation for s in c) for c in self.chains))
        return (self.scenario, self.aggregate, chains)

    @property
    def entities(self) -> list[str]:
        names = [sq.subject for sq in self.subquestions]
        return names + [sq.answer for sq in self.subquestions if sq.answer not in names]


class ComposeError(RuntimeError):
    """No question fits the constraints with this random draw; the caller retries with another draw."""


# -- wording ---------------------------------------------------------------------------------------
def display(kind: str, name: str) -> str:
    """How a name reads inside a sentence: artefacts take an article ("the Zuva Harp")."""
    return f"the {name}" if kind == "artefact" else name


def _wh(rel: Relation) -> str:
    return "Who" if rel.obj == "person" else "What"


def _phrase(chain: list[tuple[Relation, str]]) -> str:
    """'the population of the birthplace of the founder of Bufu Works' for a chain of (relation, subject)."""
    first_rel, first_subject = chain[0]
    text = display(first_rel.subject, first_subject)
    for rel, _ in chain:
        text = f"the {rel.noun} of {text}"
    return text


def _ask(rel: Relation, phrase: str, rng: random.Random) -> str:
    template = rng.choice(("{wh} is {p}?", "Can you tell me {p}?", "Do you know {p}?"))
    return template.format(wh=_wh(rel), p=phrase)


def _listing(items: list[str]) -> str:
    return items[0] if len(items) == 1 else ", ".join(items[:-1]) + " and " + items[-1]


def _clauses(finals: list[Relation], phrases: list[str]) -> str:
    """'What is A, who is B, and what is C?' — one clause per independent sub-question or chain."""
    parts = [f"{_wh(r).lower()} is {p}" for r, p in zip(finals, phrases, strict=True)]
    text = parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + ", and " + parts[-1]
    return text[0].upper() + text[1:] + "?"


def subquestion_text(rel: Relation, subject: str) -> str:
    return f"{_wh(rel)} is the {rel.noun} of {display(rel.subject, subject)}?"


# -- sampling --------------------------------------------------------------------------------------
def _walk(
    world: World,
    rng: random.Random,
    length: int,
    used: set[str],
    final: str = "any",
    start_kinds: tuple[str, ...] = KINDS,
) -> list[tuple[Relation, str, str]]:
    """A chain of `length` hops (relation, subject, answer) over unused entities.

    Every hop but the last follows an entity-valued relation; `final` is 'any' or an object type
    ('year', 'quantity', 'person', ...) that the last relation must have.
    """
    for _ in range(50):
        kind = rng.choice(start_kinds)
        subject = rng.choice(world.entities[kind])
        if subject in used:
            continue
        seen = {subject}
        chain: list[tuple[Relation, str, str]] = []
        for hop in range(length):
            last = hop == length - 1
            options = [
                r
                for r in RELATIONS_BY_KIND[kind]
                if (not last and r.entity_valued) or (last and final in ("any", r.obj))
            ]
            rng.shuffle(options)
            for rel in options:
                answer = world.value(kind, rel.key, subject)
                if rel.entity_valued and (answer in seen or answer in used):
                    continue
                chain.append((rel, subject, answer))
                if rel.entity_valued:
                    seen.add(answer)
                    kind, subject = rel.obj, answer
                break
            else:
                break
        if len(chain) == length:
            used.update(seen)
            return chain
    raise ComposeError(f"no chain of length {length} ending in a {final} relation")


def _subquestions(chains: list[list[tuple[Relation, str, str]]]) -> list[SubQuestion]:
    out: list[SubQuestion] = []
    for c, chain in enumerate(chains):
        previous = None
        for hop, (rel, subject, answer) in enumerate(chain):
            sq = SubQuestion(
                id=len(out),
                kind=rel.subject,
                relation=rel.key,
                subject=subject,
                answer=answer,
                chain=c,
                hop=hop,
                depends_on=previous,
                question=subquestion_text(rel, subject),
            )
            out.append(sq)
            previous = sq.id
    return out


def _parallel_lengths(shape: ScenarioShape, rng: random.Random) -> list[int]:
    """Chain lengths (each >= 2) whose total lies in [parallel_multi_min, parallel_multi_max]."""
    for _ in range(100):
        n_chains = rng.randint(shape.parallel_multi_chains_min, shape.parallel_multi_chains_max)
        lengths = [rng.randint(2, shape.multi_hop_max) for _ in range(n_chains)]
        if shape.parallel_multi_min <= sum(lengths) <= shape.parallel_multi_max:
            return lengths
    raise ComposeError("no chain lengths fit parallel_multi_min/max")


def compose(world: World, scenario: str, rng: random.Random, shape: ScenarioShape) -> Decomposition:
    """One question of `scenario` with its golden decomposition. Raises ComposeError on a dead-end draw."""
    used: set[str] = set()
    if scenario == "single_hop":
        ((rel, subject, answer),) = _walk(world, rng, 1, used)
        question = _ask(rel, _phrase([(rel, subject)]), rng)
        return Decomposition(scenario, question, answer, "single", _subquestions([[(rel, subject, answer)]]))

    if scenario == "multi_hop":
        length = rng.randint(shape.multi_hop_min, shape.multi_hop_max)
        chain = _walk(world, rng, length, used)
        question = _ask(chain[-1][0], _phrase([(r, s) for r, s, _ in chain]), rng)
        return Decomposition(scenario, question, chain[-1][2], "chain", _subquestions([chain]))

    aggregate = rng.random() < shape.parallel_aggregate_prob
    if scenario == "parallel_single_hop":
        k = rng.randint(shape.parallel_single_min, shape.parallel_single_max)
        if aggregate:
            return _aggregate_single(world, rng, k)
        chains = [_walk(world, rng, 1, used) for _ in range(k)]
        return _joined(scenario, chains)

    if scenario == "parallel_multi_hop":
        lengths = _parallel_lengths(shape, rng)
        if aggregate:
            return _aggregate_chains(world, rng, lengths, used)
        return _joined(scenario, [_walk(world, rng, n, used) for n in lengths])
    raise ComposeError(f"unknown scenario {scenario!r}")


def _joined(scenario: str, chains: list[list[tuple[Relation, str, str]]]) -> Decomposition:
    """Independent questions asked together; the answer lists the sub-answers, joined with ', '."""
    finals = [c[-1][0] for c in chains]
    phrases = [_phrase([(r, s) for r, s, _ in c]) for c in chains]
    answer = ", ".join(c[-1][2] for c in chains)
    return Decomposition(scenario, _clauses(finals, phrases), answer, "join", _subquestions(chains))


def _numeric(obj: str) -> list[Relation]:
    return [r for kind in KINDS for r in RELATIONS_BY_KIND[kind] if r.obj == obj]


def _aggregate_single(world: World, rng: random.Random, k: int) -> Decomposition:
    """FTRL-style arithmetic over independent sub-answers: a total, a difference, or the years between
    two dates. The answer is a number the question never names, so echoing the question earns nothing."""
    mode = rng.choice(["sum"] + (["difference", "gap"] if k == 2 else []))
    if mode == "gap":
        rels = [rng.choice(_numeric("year")) for _ in range(2)]
    else:
        rels = [rng.choice(_numeric("quantity"))] * k
    for _ in range(50):
        subjects = [rng.choice(world.entities[r.subject]) for r in rels]
        values = [int(world.value(r.subject, r.key, s)) for r, s in zip(rels, subjects, strict=True)]
        # Distinct values, and differences of two digits or more: a one-digit answer occurs in too much text.
        if len(set(subjects)) == k and len(set(values)) == k and (k > 2 or abs(values[0] - values[1]) >= 10):
            break
    else:
        raise ComposeError("no subjects with distinct values")
    if mode == "difference" and values[0] < values[1]:
        rels, subjects, values = rels[::-1], subjects[::-1], values[::-1]
    names = [display(r.subject, s) for r, s in zip(rels, subjects, strict=True)]
    noun = rels[0].noun
    if mode == "sum":
        question = f"What is the combined {noun} of {_listing(names)}?"
        answer = sum(values)
    elif mode == "difference":
        question = f"How much larger is the {noun} of {names[0]} than the {noun} of {names[1]}?"
        answer = values[0] - values[1]
    else:
        question = f"How many years passed between the {rels[0].noun} of {names[0]} and the {rels[1].noun} of {names[1]}?"
        answer = abs(values[0] - values[1])
    chains = [[(r, s, str(v))] for r, s, v in zip(rels, subjects, values, strict=True)]
    return Decomposition("parallel_single_hop", question, str(answer), mode, _subquestions(chains))


def _aggregate_chains(world: World, rng: random.Random, lengths: list[int], used: set[str]) -> Decomposition:
    """FTRL's 'What is the sum of <chain a> and <chain b>?', or the difference / years between two chains."""
    mode = rng.choice(["sum", "difference", "gap"]) if len(lengths) == 2 else "sum"
    final = "year" if mode == "gap" else "quantity"
    chains = [_walk(world, rng, n, used, final=final) for n in lengths]
    phrases = [_phrase([(r, s) for r, s, _ in c]) for c in chains]
    values = [int(c[-1][2]) for c in chains]
    if mode != "sum" and abs(values[0] - values[1]) < 10:
        raise ComposeError("a one-digit difference")
    if mode == "sum":
        question, answer = f"What is the sum of {_listing(phrases)}?", sum(values)
    elif mode == "difference":
        question, answer = (
            f"What is the difference between {phrases[0]} and {phrases[1]}?",
            abs(values[0] - values[1]),
        )
    else:
        question, answer = (
            f"How many years passed between {phrases[0]} and {phrases[1]}?",
            abs(values[0] - values[1]),
        )
    return Decomposition("parallel_multi_hop", question, str(answer), mode, _subquestions(chains))
