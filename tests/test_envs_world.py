"""The procedural world and scenario decomposition: determinism, substring safety, scenario shapes."""

import random

import pytest

from toolrl_analysis.envs.decompose import ComposeError, ScenarioShape, compose
from toolrl_analysis.envs.world import KINDS, RELATIONS, build_world


def compose_retrying(world, scenario, stream, shape):
    """As the pipeline does: a dead-end draw is retried with the next random stream."""
    for attempt in range(50):
        try:
            return compose(world, scenario, random.Random(f"{stream}/{attempt}"), shape)
        except ComposeError:
            continue
    raise AssertionError("no question composed")


@pytest.fixture(scope="module")
def world():
    return build_world(7)


def test_same_seed_same_world_and_different_seed_different_world(world):
    again = build_world(7)
    assert again.entities == world.entities and again.facts == world.facts
    assert build_world(8).entities != world.entities


def test_names_are_short_and_never_inside_one_another(world):
    names = [n.lower() for kind in KINDS for n in world.entities[kind]]
    assert len(set(names)) == len(names)
    joined = "\n".join(names)
    # Each name occurs exactly once in the joined list: it is no part of any other name.
    assert all(joined.count(n) == 1 for n in names)
    assert max(len(n) for n in names) <= 20
    assert all(1 <= len(n.split()) <= 2 for n in names)


def test_every_entity_has_every_relation_and_numbers_have_four_digits(world):
    for rel in RELATIONS:
        table = world.facts[(rel.subject, rel.key)]
        assert set(table) == set(world.entities[rel.subject])
        for subject, value in table.items():
            if rel.numeric:
                assert value.isdigit() and len(value) == 4
            else:
                assert value in world.entities[rel.obj] and value != subject


@pytest.mark.parametrize("scenario", ["single_hop", "parallel_single_hop", "multi_hop", "parallel_multi_hop"])
def test_compose_respects_scenario_shapes(world, scenario):
    shape = ScenarioShape()
    for i in range(60):
        d = compose_retrying(world, scenario, f"{scenario}/{i}", shape)
        n = len(d.subquestions)
        chains = d.chains
        if scenario == "single_hop":
            assert n == 1
        elif scenario == "parallel_single_hop":
            assert 2 <= n <= 3 and all(len(c) == 1 for c in chains)
            assert d.golden_turns == [[sq.id for sq in d.subquestions]]
        elif scenario == "multi_hop":
            assert 2 <= n <= 6 and len(chains) == 1
            assert d.answer == chains[0][-1].answer
        else:
            assert 4 <= n <= 10 and len(chains) >= 2 and all(len(c) >= 2 for c in chains)
        for chain in chains:
            for previous, current in zip(chain, chain[1:], strict=False):
                # Hop by hop: each answer is the next subject and is never named in the question.
                assert current.subject == previous.answer and current.depends_on == previous.id
                assert previous.answer not in d.question
        for sq in d.subquestions:
            assert world.value(sq.kind, sq.relation, sq.subject) == sq.answer
        if d.aggregate == "join":
            assert d.answer == ", ".join(c[-1].answer for c in chains)
        entities = d.entities
        assert len(entities) == len(set(entities))


def test_aggregates_compute_the_answer_from_the_sub_answers(world):
    shape = ScenarioShape(parallel_aggregate_prob=1.0)
    seen = set()
    for i in range(80):
        for scenario in ("parallel_single_hop", "parallel_multi_hop"):
            d = compose_retrying(world, scenario, f"agg/{scenario}/{i}", shape)
            finals = [int(c[-1].answer) for c in d.chains]
            seen.add(d.aggregate)
            if d.aggregate == "sum":
                assert d.answer == str(sum(finals))
            else:
                assert d.aggregate in ("difference", "gap") and d.answer == str(abs(finals[0] - finals[1]))
            assert d.answer not in d.question and len(d.answer) >= 2
    assert seen == {"sum", "difference", "gap"}
