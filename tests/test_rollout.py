"""Rollout engine: scripted episodes against hand-computed rewards, token masks, cached vs. uncached decoding."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import tiny_random_qwen2

from toolrl_analysis.envs.sandbox import Sandbox
from toolrl_analysis.envs.schema import EnvRecord
from toolrl_analysis.evaluate import episode_table, hop_breakdown, summarize_tool_use
from toolrl_analysis.rollout import (
    STOP_MAX_TURNS,
    STOP_NO_CALL,
    STOP_PROMPT_TOO_LONG,
    ModelPolicy,
    ScriptedPolicy,
    generate,
    render_prompt,
    run_episodes,
)

CAPITAL_CODE = """
def capital_lookup(country):
    capitals = {"France": "Paris", "Spain": "Madrid"}
    return {"country": country, "capital": capitals.get(country, "unknown")}
"""
WEATHER_CODE = """
def weather_now(city):
    return f"Sunny in {city}"
"""
AUTHOR_CODE = """
def author_of(book):
    return {"1984": "George Orwell", "Emma": "Jane Austen"}.get(book, "no such book")
"""
BIRTH_CODE = """
def birth_year(person):
    return {"George Orwell": 1903, "Jane Austen": 1775}.get(person, "unknown person")
"""


def _tool(name: str, parameter: str) -> dict:
    return {
        "type": "function",
        "function": {
            "name": name,
            "description": f"Look up by {parameter}.",
            "parameters": {
                "type": "object",
                "properties": {parameter: {"type": "string"}},
                "required": [parameter],
            },
        },
    }


def _call(name: str, **arguments) -> str:
    return "<tool_call>\n" + json.dumps({"name": name, "arguments": arguments}) + "\n</tool_call>"


@pytest.fixture(scope="module")
def records() -> list[EnvRecord]:
    capital = EnvRecord(
        messages=[{"role": "user", "content": "What is the capital of France?"}],
        tools=[_tool("capital_lookup", "country"), _tool("weather_now", "city")],
        codes={"capital_lookup": CAPITAL_CODE, "weather_now": WEATHER_CODE},
        unsolved_set={"capital_lookup": ["Paris"]},
        answer="Paris",
        data_source="self/single_hop",
        meta={
            "env_id": "capital",
            "subquestions": [{"id": 0, "tool": "capital_lookup", "answer": "Paris", "hop": 1}],
        },
    )
    orwell = EnvRecord(
        messages=[{"role": "user", "content": "In which year was the author of 1984 born?"}],
        tools=[_tool("author_of", "book"), _tool("birth_year", "person")],
        codes={"author_of": AUTHOR_CODE, "birth_year": BIRTH_CODE},
        unsolved_set={"author_of": ["George Orwell"], "birth_year": ["1903"]},
        answer="1903",
        data_source="self/multi_hop",
        meta={
            "env_id": "orwell",
            "subquestions": [
                {"id": 0, "tool": "author_of", "answer": "George Orwell", "hop": 1},
                {"id": 1, "tool": "birth_year", "answer": "1903", "hop": 2, "depends_on": 0},
            ],
        },
    )
    return [capital, orwell]


@pytest.fixture(scope="module")
def tokenizer(records):
    from toolrl_analysis.models.chat_template import render_chat
    from toolrl_analysis.models.tokenizer import train_tokenizer

    corpus = [render_chat(r.messages, tools=r.tools) for r in records] * 4
    corpus += [CAPITAL_CODE, WEATHER_CODE, AUTHOR_CODE, BIRTH_CODE, _call("capital_lookup", country="France")]
    return train_tokenizer(corpus, vocab_size=600)


@pytest.fixture(scope="module")
def sandbox():
    with Sandbox(workers=2, timeout=10.0) as box:
        yield box


# -- scripted episodes --------------------------------------------------------------------------------------------
SCRIPTS = [
    # capital: one correct call beside a distractor call, then the final answer.
    [
        _call("capital_lookup", country="France") + "\n" + _call("weather_now", city="Paris"),
        "The capital is Paris.",
    ],
    # orwell: a wrong call, the correct first hop, then malformed markup (which ends the episode).
    [
        _call("author_of", book="Emma"),
        _call("author_of", book="1984"),
        '<tool_call>\n{"name": "birth_year", "arguments": {"person": \n</tool_call>',
    ],
]


@pytest.fixture(scope="module")
def scripted_episodes(records, tokenizer, sandbox):
    return run_episodes(ScriptedPolicy(tokenizer, SCRIPTS), records, sandbox)


def test_scripted_rewards_follow_the_hand_computed_values(scripted_episodes):
    capital, orwell = scripted_episodes
    # capital turn 0: p=2 calls, q=1 solved -> f1 = 2q/(p+1) = 2/3; turn 1: answer with t=0 unsolved -> 1/(1+0).
    assert [t.reward.score for t in capital.turns] == pytest.approx([2 / 3, 1.0])
    assert [t.reward.case for t in capital.turns] == ["calls", "answer"]
    # orwell: wrong call 0; correct call 2*1/(1+1) = 1; malformed markup -0.3.
    assert [t.reward.score for t in orwell.turns] == pytest.approx([0.0, 1.0, -0.3])
    assert [t.reward.case for t in orwell.turns] == ["calls", "calls", "malformed"]
    assert [t.format_error for t in orwell.turns] == [False, False, True]
    assert capital.stop_reason == orwell.stop_reason == STOP_NO_CALL


def test_scripted_solve_metrics(scripted_episodes):
    capital, orwell = scripted_episodes
    # capital: p=2, q=1, n=1 -> P=1/2, R=1, F1=2q/(p+n)=2/3.  orwell: p=2, q=1, n=2 -> P=1/2, R=1/2, F1=1/2.
    assert capital.metrics() == pytest.approx({"solve_p": 0.5, "solve_r": 1.0, "solve_f1": 2 / 3})
    assert orwell.metrics() == pytest.approx({"solve_p": 0.5, "solve_r": 0.5, "solve_f1": 0.5})
    assert (capital.n_calls, capital.n_solved, orwell.n_calls, orwell.n_solved) == (2, 1, 2, 1)

    summary = summarize_tool_use(episode_table(scripted_episodes))
    value = summary.set_index(["scenario", "metric"])["value"]
    # overall Solve-F1 = mean of the two scenario means; format errors pooled over the 5 turns.
    assert value["overall", "solve_f1"] == pytest.approx((2 / 3 + 0.5) / 2)
    assert value["overall", "format_error_rate"] == pytest.approx(1 / 5)
    assert value["overall", "calls_per_episode"] == pytest.approx(2.0)
    hops = hop_breakdown(scripted_episodes)
    multi = hops[hops["scenario"] == "multi_hop"].set_index("hop")["solved_fraction"]
    assert multi.to_dict() == {1: 1.0, 2: 0.0}


def test_turn_records_carry_history_unsolved_sets_and_tool_messages(scripted_episodes, records):
    capital, orwell = scripted_episodes
    first, second = capital.turns
    assert first.messages == records[0].messages  # what the policy saw
    assert first.unsolved_set_before == {"capital_lookup": ["Paris"]} and first.unsolved_set_after == {
        "capital_lookup": []
    }
    assert [r.ok for r in first.results] == [True, True]
    assert "Paris" in first.results[0].content and first.results[1].content == "Sunny in Paris"
    assert (first.solve_rate_before, second.solve_rate_before) == (0.0, 1.0)
    # The history the second turn saw: the structured assistant call message and one tool message per call.
    assistant, *tool_messages = second.messages[1:]
    assert assistant["role"] == "assistant"
    assert [c["function"]["name"] for c in assistant["tool_calls"]] == ["capital_lookup", "weather_now"]
    assert assistant["tool_calls"][0]["function"]["arguments"] == {"country": "France"}
    assert [(m["role"], m["name"]) for m in tool_messages] == [
        ("tool", "capital_lookup"),
        ("tool", "weather_now"),
    ]
    # A turn without calls goes into the history as its raw text.
    assert capital.messages[-1] == {"role": "assistant", "content": "The capital is Paris."}
    # orwell's wrong first call left everything unsolved; the second solved hop 1 only.
    assert orwell.turns[0].unsolved_set_after == records[1].unsolved_set
    assert orwell.turns[1].unsolved_set_after == {"author_of": [], "birth_year": ["1903"]}
    assert orwell.turns[2].solve_rate_before == pytest.approx(0.5)
    assert records[1].unsolved_set == {
        "author_of": ["George Orwell"],
        "birth_year": ["1903"],
    }  # input untouched


def test_garbage_is_scored_not_raised(records, tokenizer, sandbox):
    garbage = [
        "",
        "<tool_call>",
        "</tool_call><tool_call>{{{{</tool_call>",
        '<tool_call>\n{"name": 5, "arguments": []}\n</tool_call>',
        '<tool_call>\n{"name": "capital_lookup", "arguments": "not json"}\n</tool_call>',
        _call("no_such_tool", x=1),
        _call("capital_lookup", wrong_argument="France"),
        _call("capital_lookup", country=["France", None]),
        "\x00\ufffd<|im_start|>user\n<tool_response>",
        "The answer is Paris" * 50,
    ]
    policy = ScriptedPolicy(
        tokenizer, lambda request: garbage[(request.episode_index + request.turn_index) % 10]
    )
    episodes = run_episodes(policy, records * 5, sandbox, max_turns=6)
    turns = [t for e in episodes for t in e.turns]
    assert len(turns) >= 10
    assert all(isinstance(t.reward.score, float) for t in turns)
    assert all(e.stop_reason in (STOP_NO_CALL, STOP_MAX_TURNS) for e in episodes)
    failed = [r for t in turns for r in t.results if not r.ok]
    assert failed and all(r.content.startswith("an error occured when call") for r in failed)


def test_prompt_budget_stops_the_episode(records, tokenizer, sandbox):
    policy = ScriptedPolicy(tokenizer, SCRIPTS)
    episodes = run_episodes(policy, records, sandbox, max_prompt_tokens=8)
    assert [e.stop_reason for e in episodes] == [STOP_PROMPT_TOO_LONG] * 2
    assert all(not e.turns and e.metrics()["solve_r"] == 0.0 for e in episodes)


def test_max_turns_bounds_an_episode_that_keeps_calling(records, tokenizer, sandbox):
    policy = ScriptedPolicy(tokenizer, lambda request: _call("weather_now", city="Oslo"))
    (episode,) = run_episodes(policy, records[:1], sandbox, max_turns=3)
    assert episode.stop_reason == STOP_MAX_TURNS and len(episode.turns) == 3
    assert episode.metrics() == pytest.approx({"solve_p": 0.0, "solve_r": 0.0, "solve_f1": 0.0})


# -- model policies -----------------------------------------------------------------------------------------------
def test_policy_turns_hold_the_rendered_prompt_and_the_generated_tokens(records, tokenizer, sandbox):
    model = tiny_random_qwen2(tokenizer)
    policy = ModelPolicy(model, tokenizer, max_new_tokens=12)
    episodes = run_episodes(policy, records, sandbox, max_turns=2)
    for episode in episodes:
        for turn in episode.turns:
            assert turn.prompt_ids == render_prompt(tokenizer, turn.messages, episode.record.tools)
            assert len(turn.logprobs) == len(turn.completion_ids) > 0
            (direct,) = generate(
                model,
                [turn.prompt_ids],
                max_new_tokens=12,
                eos_token_ids=policy.eos_token_ids,
                pad_token_id=policy.pad_token_id,
            )
            assert direct.ids == turn.completion_ids
            assert direct.logprobs == pytest.approx(turn.logprobs, abs=1e-4)


def test_cached_and_uncached_rollouts_agree(records, tokenizer, sandbox):
    model = tiny_random_qwen2(tokenizer, seed=1)
    runs = [
        run_episodes(ModelPolicy(model, tokenizer, max_new_tokens=16, use_cache=use_cache), records, sandbox)
        for use_cache in (True, False)
    ]
    cached, uncached = ([t.completion_ids for e in run for t in e.turns] for run in runs)
    assert cached == uncached and all(cached)


def test_generate_is_padding_invariant_and_logprobs_match_a_full_forward(tokenizer):
    model = tiny_random_qwen2(tokenizer, seed=2)
    prompts = [
        tokenizer.encode("What is the capital of France?"),
        tokenizer.encode("Hi"),
        [5, 6, 7, 8, 9, 10, 11],
    ]
    batched = generate(model, prompts, max_new_tokens=10, eos_token_ids=[-7], pad_token_id=0)
    alone = [generate(model, [p], max_new_tokens=10, eos_token_ids=[-7], pad_token_id=0)[0] for p in prompts]
    assert [c.ids for c in batched] == [c.ids for c in alone]
    assert all(len(c.ids) == 10 and not c.stopped for c in batched)
    sequence = torch.tensor([prompts[0] + batched[0].ids])
    with torch.no_grad():
        logprobs = model(sequence).logits.log_softmax(-1)[0]
    expected = [float(logprobs[len(prompts[0]) - 1 + i, t]) for i, t in enumerate(batched[0].ids)]
    assert batched[0].logprobs == pytest.approx(expected, abs=1e-4)


def test_generate_stops_each_sequence_at_its_own_stop_token(tokenizer):
    model = tiny_random_qwen2(tokenizer, seed=3)
    prompts = [[5, 6, 7], [8, 9]]
    free = generate(model, prompts, max_new_tokens=8, eos_token_ids=[-7], pad_token_id=0)
    stop = free[0].ids[2]  # the first sequence's third token becomes a stop token
    stopped = generate(model, prompts, max_new_tokens=8, eos_token_ids=[-7, stop], pad_token_id=0)
    assert stopped[0].ids == free[0].ids[:3] and stopped[0].stopped
    cut = free[1].ids.index(stop) + 1 if stop in free[1].ids else 8
    assert stopped[1].ids == free[1].ids[:cut]


def test_sampling_is_reproducible_with_a_generator(tokenizer):
    model = tiny_random_qwen2(tokenizer, seed=4)
    prompts = [[5, 6, 7]] * 4

    def sample(seed):
        generator = torch.Generator().manual_seed(seed)
        return [
            c.ids
            for c in generate(
                model,
                prompts,
                max_new_tokens=8,
                temperature=1.0,
                eos_token_ids=[-7],
                pad_token_id=0,
                generator=generator,
            )
        ]

    assert sample(0) == sample(0)
    assert len({tuple(ids) for ids in sample(0)}) > 1  # the four rows are sampled independently


def test_golden_calls_on_generated_environments_solve_everything(tokenizer, sandbox):
    """The pipeline's golden turns, replayed through the rollout loop, solve every sub-question at every hop."""
    from toolrl_analysis.envs.pipeline import EnvBuildConfig, build_envsets
    from toolrl_analysis.envs.toolcalls import ToolCall, format_tool_calls

    records = build_envsets(EnvBuildConfig(seed=3, train_size=0, test_per_scenario=2)).test

    def golden(request):
        record = records[request.episode_index]
        subquestions = {sub["id"]: sub for sub in record.meta["subquestions"]}
        turns = record.meta["golden_turns"]
        if request.turn_index < len(turns):
            calls = [
                ToolCall(subquestions[i]["tool"], subquestions[i]["arguments"])
                for i in turns[request.turn_index]
            ]
            return format_tool_calls(calls)
        return f"The answer is {record.answer}."

    episodes = run_episodes(ScriptedPolicy(tokenizer, golden), records, sandbox)
    assert all(e.metrics() == {"solve_p": 1.0, "solve_r": 1.0, "solve_f1": 1.0} for e in episodes)
    assert all(e.turns[-1].reward.case == "answer" and e.stop_reason == STOP_NO_CALL for e in episodes)
    hops = hop_breakdown(episodes)
    assert not hops.empty and (hops["solved_fraction"] == 1.0).all()
    assert hops[hops["scenario"] == "overall"]["subquestions"].sum() == sum(
        e.n_subquestions for e in episodes if "multi_hop" in e.scenario
    )


def test_execute_turns_keeps_order_across_turns_and_answers_unknown_names(records, sandbox):
    from toolrl_analysis.envs.reward import execute_turns
    from toolrl_analysis.envs.toolcalls import parse_tool_calls

    parsed = [
        parse_tool_calls(
            _call("author_of", book="1984")
            + _call("no_such_tool")
            + _call("birth_year", person="Jane Austen")
        ),
        parse_tool_calls("no calls here"),
        parse_tool_calls(_call("capital_lookup", country="Spain")),
    ]
    codes = [records[1].codes, records[0].codes, records[0].codes]
    results = execute_turns(sandbox, codes, [turn.calls for turn in parsed])
    assert [[r.content for r in turn] for turn in results] == [
        ["George Orwell", "an error occured when call no_such_tool: 'no_such_tool'", "1775"],
        [],
        ['{"country": "Spain", "capital": "Madrid"}'],
    ]
    assert results[0][1].error == "not_defined"


def test_samples_per_prompt_shares_one_prefill_and_matches_repeated_prompts(tokenizer):
    model = tiny_random_qwen2(tokenizer, seed=3)
    prompts = [tokenizer.encode("What is the capital of France?"), tokenizer.encode("Hi")]
    options = dict(max_new_tokens=8, eos_token_ids=[-7], pad_token_id=0, temperature=1.0)
    shared = generate(
        model, prompts, samples_per_prompt=3, generator=torch.Generator().manual_seed(0), **options
    )
    repeated = generate(
        model, [p for p in prompts for _ in range(3)], generator=torch.Generator().manual_seed(0), **options
    )
    assert len(shared) == 6
    assert [c.ids for c in shared] == [c.ids for c in repeated]  # same random stream, same order
    for a, b in zip(shared, repeated, strict=True):
        assert a.logprobs == pytest.approx(b.logprobs, abs=1e-5)
    assert len({tuple(c.ids) for c in shared[:3]}) > 1  # samples of one prompt differ
