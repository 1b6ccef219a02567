"""Tool-call parsing and the FTRL reward: hand-computed values for every case, and a fuzz that nothing raises."""

from __future__ import annotations

import json
import math

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from toolrl_analysis.envs.reward import (
    REWARD_VARIANTS,
    STEP_CASES,
    answer_verify,
    apply_results,
    episode_metrics,
    score_step,
    step_reward,
)
from toolrl_analysis.envs.sandbox import Sandbox
from toolrl_analysis.envs.schema import EnvRecord
from toolrl_analysis.envs.toolcalls import ParsedTurn, ToolCall, format_tool_calls, parse_tool_calls
from toolrl_analysis.errors import ConfigError


def call_text(name, arguments) -> str:
    return f"<tool_call>\n{json.dumps({'name': name, 'arguments': arguments})}\n</tool_call>"


# -- parsing ----------------------------------------------------------------------------------------------------
def test_plain_text_has_no_calls():
    turn = parse_tool_calls("  The answer is 42.<|im_end|>")
    assert turn == ParsedTurn(content="The answer is 42.", calls=[], malformed=False)


def test_calls_and_content_before_them():
    text = "Let me look.\n" + call_text("weather", {"city": "Paris"}) + "\n" + call_text("time", {})
    turn = parse_tool_calls(text + "<|im_end|><|endoftext|>")
    assert turn.content == "Let me look."
    assert turn.calls == [ToolCall("weather", {"city": "Paris"}), ToolCall("time", {})]
    assert not turn.malformed


def test_format_matches_the_qwen_template_and_round_trips():
    calls = [ToolCall("search", {"query": "café", "n": 2}), ToolCall("noop", {})]
    text = format_tool_calls(calls)
    assert text == (
        '<tool_call>\n{"name": "search", "arguments": {"query": "café", "n": 2}}\n</tool_call>\n'
        '<tool_call>\n{"name": "noop", "arguments": {}}\n</tool_call>'
    )
    assert parse_tool_calls(text) == ParsedTurn(content="", calls=calls, malformed=False)


def test_arguments_given_as_a_json_string():
    turn = parse_tool_calls('<tool_call>{"name": "t", "arguments": "{\\"a\\": 1}"}</tool_call>')
    assert turn.calls == [ToolCall("t", {"a": 1})]


def test_unclosed_last_call_still_parses():
    assert parse_tool_calls('<tool_call>{"name": "t", "arguments": {}}').calls == [ToolCall("t", {})]


@pytest.mark.parametrize(
    "block",
    [
        '{"name": "t", "arguments": {',  # broken JSON
        '{"name": 5, "arguments": {}}',  # name not a string
        '{"name": "", "arguments": {}}',  # empty name
        '{"name": "t", "arguments": [1, 2]}',  # arguments not an object
        '{"name": "t", "arguments": "[1]"}',  # ... not even once decoded
        '{"name": "t"}',  # no arguments
        '["t", {}]',  # not an object
    ],
)
def test_a_bad_block_is_skipped_and_flagged(block):
    good = call_text("ok", {"x": 1})
    turn = parse_tool_calls(f"Thinking {good}\n<tool_call>{block}</tool_call>")
    assert turn.calls == [ToolCall("ok", {"x": 1})] and turn.malformed and turn.content == "Thinking"
    only_bad = f"Thinking <tool_call>{block}</tool_call>"
    assert parse_tool_calls(only_bad) == ParsedTurn(content=only_bad, calls=[], malformed=True)


def test_text_between_calls_hides_the_next_call_as_in_ftrl():
    text = call_text("a", {}) + " and then " + call_text("b", {})
    turn = parse_tool_calls(text)
    assert [c.name for c in turn.calls] == ["a"] and turn.malformed


def test_stray_markup_without_an_opening_tag_is_malformed():
    assert parse_tool_calls("done </tool_call>").malformed
    assert parse_tool_calls("<tool_response>42</tool_response>").malformed


# -- answer_verify ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("predict", "golden", "expected"),
    [
        ("The capital is PARIS.", "paris", True),
        ("New York is in the USA", "USA, New York", True),  # pieces in any order
        ("New York", "New York, USA", False),  # every piece must occur
        ("population: 1000 people", "1,000", True),  # commas removed on both sides
        ("population: 1,000,000", "1000000", True),
        ("a b", "a,b", False),  # "a,b" is one piece, "ab"
        ({"count": "1,000", "unit": "Apples"}, "1000, apples", True),  # dicts are JSON-encoded first
        (["Paris", "Lyon"], "lyon", True),
        (1000, "1000", True),  # other types are str()-ed
        (None, "none", True),
        ("x", "", True),  # FTRL: an empty gold piece is in everything
        ("Café", "CAFÉ", True),
    ],
)
def test_answer_verify(predict, golden, expected):
    assert answer_verify(predict, golden) is expected


# -- apply_results ---------------------------------------------------------------------------------------------
def test_apply_results_removes_the_first_verified_answer_and_leaves_the_input_alone():
    unsolved = {"weather": ["sunny", "rainy, 20"], "capital": ["Paris"]}
    calls = [ToolCall("weather", {}), ToolCall("weather", {}), ToolCall("other", {}), ToolCall("capital", {})]
    outputs = ["20 mm, rainy", "still rainy, 20", "Paris", "Berlin"]
    remaining, flags = apply_results(unsolved, calls, outputs)
    assert flags == [
        True,
        False,
        False,
        False,
    ]  # 'other' is not a key; the second weather call finds nothing left
    assert remaining == {"weather": ["sunny"], "capital": ["Paris"]}
    assert unsolved == {"weather": ["sunny", "rainy, 20"], "capital": ["Paris"]}


def test_one_call_solves_at_most_one_answer_and_duplicates_need_two_calls():
    calls = [ToolCall("t", {})] * 3
    remaining, flags = apply_results({"t": ["42", "42"]}, calls, ["42 and 42", "42", "42"])
    assert flags == [True, True, False] and remaining == {"t": []}


# -- step reward: calls ---------------------------------------------------------------------------------------
UNSOLVED = {"weather": ["sunny", "rainy, 20"], "capital": ["Paris"]}


def turn_of(*names: str) -> ParsedTurn:
    return ParsedTurn(content="", calls=[ToolCall(n, {}) for n in names], malformed=False)


@pytest.mark.parametrize(
    ("names", "outputs", "expected"),
    [
        # p=2, q=1: f1 = 2/3, precision = 1/2, rate = 1, pr = 1/2
        (
            ("weather", "capital"),
            ["It is Sunny", "Berlin"],
            {"f1": 2 / 3, "precision": 0.5, "rate": 1.0, "pr": 0.5},
        ),
        # p=3, q=3: f1 = 6/4, precision = 1, rate = 3, pr = 9/3
        (
            ("weather", "weather", "capital"),
            ["sunny", "rainy with 20 mm", "paris"],
            {"f1": 1.5, "precision": 1.0, "rate": 3.0, "pr": 3.0},
        ),
        # p=4, q=2: f1 = 4/5, precision = 1/2, rate = 2, pr = 4/4
        (
            ("weather", "capital", "capital", "nope"),
            ["rainy, 20", "Paris", "Paris", "sunny"],
            {"f1": 0.8, "precision": 0.5, "rate": 2.0, "pr": 1.0},
        ),
        # p=1, q=0: every variant 0
        (("weather",), ["an error occured when call weather: boom"], {v: 0.0 for v in REWARD_VARIANTS}),
    ],
)
def test_step_reward_with_calls(names, outputs, expected):
    for variant, value in expected.items():
        reward = step_reward(turn_of(*names), outputs, UNSOLVED, 0.0, "Paris", variant)
        assert reward.score == pytest.approx(value), variant
        assert reward.case == "calls" and reward.variant == variant
        assert reward.n_calls == len(names) and reward.unsolved_before == 3
        assert reward.unsolved_after == 3 - reward.n_solved == 3 - sum(reward.solved_flags)


def test_duplicate_answers_reward():
    # {"t": ["42", "42"]}, three calls all returning 42: q=2, p=3 -> f1 = 4/4, precision = 2/3, rate = 2, pr = 4/3
    expected = {"f1": 1.0, "precision": 2 / 3, "rate": 2.0, "pr": 4 / 3}
    for variant, value in expected.items():
        reward = step_reward(turn_of("t", "t", "t"), ["42"] * 3, {"t": ["42", "42"]}, 0.0, None, variant)
        assert reward.score == pytest.approx(value)
        assert reward.solved_flags == [True, True, False] and reward.remaining == {"t": []}


# -- step reward: no calls ------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("text", "unsolved", "solve_rate", "answer", "case", "score"),
    [
        ("", UNSOLVED, 0.0, "Paris", "empty", -0.5),
        ("  <|im_end|>", UNSOLVED, 1.0, "Paris", "empty", -0.5),
        (
            '<tool_call>{"name": "weather", "arguments": {</tool_call>',
            UNSOLVED,
            0.0,
            "Paris",
            "malformed",
            -0.3,
        ),
        ("I called it </tool_call> Paris", UNSOLVED, 1.0, "Paris", "malformed", -0.3),
        ("<tool_response>Paris</tool_response>", UNSOLVED, 0.0, "Paris", "malformed", -0.3),
        # t = 3 still unsolved: 1/(1+3); the comparison ignores case and commas
        ("So the answer is PARIS, FRANCE.", UNSOLVED, 0.0, "paris, france", "answer", 0.25),
        ("Paris", {"capital": []}, 1.0, "Paris", "answer", 1.0),  # t = 0, checked before all_solved
        ("Paris", {"capital": ["x"]}, 0.5, "Paris", "answer", 0.5),  # t = 1
        ("All done.", {"capital": []}, 1.0, "Paris", "all_solved", 0.5),
        ("All done.", {"capital": []}, 1.0, "", "all_solved", 0.5),  # empty gold answer matches nothing
        ("I do not know.", UNSOLVED, 0.0, "Paris", "no_call", 0.0),
        ("I do not know.", UNSOLVED, 0.0, None, "no_call", 0.0),
    ],
)
def test_step_reward_without_calls(text, unsolved, solve_rate, answer, case, score):
    turn = parse_tool_calls(text)
    for variant in REWARD_VARIANTS:  # the variant only matters when there are calls
        reward = step_reward(turn, [], unsolved, solve_rate, answer, variant)
        assert (reward.case, reward.score) == (case, pytest.approx(score))
        assert reward.n_calls == reward.n_solved == 0 and reward.unsolved_after == reward.unsolved_before


def test_step_reward_breakdown_and_errors():
    reward = step_reward(turn_of("capital"), ["Paris"], UNSOLVED, 0.0, "Paris")
    assert reward.as_dict() == {
        "score": 1.0, "variant": "f1", "case": "calls", "n_calls": 1, "n_solved": 1, "unsolved_before": 3,
        "unsolved_after": 2, "solved_flags": [True], "remaining": {"weather": ["sunny", "rainy, 20"], "capital": []},
    }  # fmt: skip
    json.dumps(reward.as_dict())
    with pytest.raises(ConfigError, match="unknown reward variant"):
        step_reward(turn_of(), [], UNSOLVED, 0.0, None, "recall")
    with pytest.raises(ValueError, match="one output per call"):
        step_reward(turn_of("capital"), [], UNSOLVED, 0.0, None)


def test_episode_metrics():
    assert episode_metrics(4, 2, 3) == pytest.approx({"solve_p": 0.5, "solve_r": 2 / 3, "solve_f1": 4 / 7})
    assert episode_metrics(0, 0, 3) == {"solve_p": 1.0, "solve_r": 0.0, "solve_f1": 0.0}
    assert episode_metrics(3, 3, 3) == {"solve_p": 1.0, "solve_r": 1.0, "solve_f1": 1.0}
    assert episode_metrics(0, 0, 0) == {"solve_p": 1.0, "solve_r": 1.0, "solve_f1": 1.0}


# -- score_step: parse + sandbox + reward ---------------------------------------------------------------------
CAPITAL_CODE = (
    "def get_capital(country):\n    return {'France': 'Paris', 'Japan': 'Tokyo'}.get(country, 'unknown')\n"
)


@pytest.fixture(scope="module")
def sandbox():
    with Sandbox(workers=2, timeout=3.0) as box:
        yield box


def test_score_step_runs_calls_in_the_sandbox(sandbox):
    record = EnvRecord(
        messages=[{"role": "user", "content": "Capitals of France and Japan?"}],
        tools=[],
        codes={"get_capital": CAPITAL_CODE},
        unsolved_set={"get_capital": ["Paris", "Tokyo"]},
        answer="Paris, Tokyo",
        data_source="self/parallel_single_hop",
    )
    text = "Calling.\n" + format_tool_calls(
        [ToolCall("get_capital", {"country": "France"}), ToolCall("get_kapital", {"country": "Japan"})]
    )
    reward, results = score_step(text, record, sandbox)
    assert [r.content for r in results] == ["Paris", "an error occured when call get_kapital: 'get_kapital'"]
    assert [r.error for r in results] == [None, "not_defined"]
    assert reward.score == pytest.approx(2 / 3) and reward.solved_flags == [True, False]
    assert record.unsolved_set == {"get_capital": ["Paris", "Tokyo"]}  # untouched

    # FTRL's own row encoding (JSON strings) works the same; the answer case needs no sandbox round-trip.
    row = record.to_ftrl()
    assert score_step("Both: Paris, Tokyo", row, sandbox, "rate")[0].score == pytest.approx(1 / 3)
    reward, results = score_step(
        format_tool_calls([ToolCall("get_capital", {"country": "Japan"})]), row, sandbox
    )
    assert results[0].content == "Tokyo" and reward.score == 1.0


# -- fuzz -----------------------------------------------------------------------------------------------------
FRAGMENTS = [
    "<tool_call>", "</tool_call>", "<tool_response>", "<|im_end|>", "<|endoftext|>", "\n", " ", "{", "}", "[", "]",
    '"name"', '"arguments"', ":", ",", "null", "NaN", "-Infinity", "1e999", "9" * 5000, '"\\ud800"', "\x00", "é",
    '{"name": "t", "arguments": {}}', '{"name": 1, "arguments": []}', '{"name": "t", "arguments": "{\\"a\\": 1}"}',
    '{"name": "t", "arguments": {"x": NaN}}', '{"name": "t", "arguments": "null"}', "[" * 3000, '{"a":' * 500,
]  # fmt: skip
json_values = st.recursive(
    st.none() | st.booleans() | st.floats() | st.integers() | st.text(max_size=6),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.sampled_from("abc"), inner, max_size=2),
    max_leaves=4,
)
call_blocks = st.builds(
    lambda name, args, wrap: f"<tool_call>{json.dumps({'name': name, 'arguments': args})}" + wrap,
    st.sampled_from(["t", "u", "", "é"]),
    json_values,
    st.sampled_from(["</tool_call>", "", "</tool_call>\n"]),
)
texts = st.lists(
    st.one_of(st.sampled_from(FRAGMENTS), call_blocks, st.text(max_size=12), json_values.map(json.dumps)),
    max_size=8,
).map("".join)
FUZZ = settings(max_examples=2500, deadline=None, derandomize=True, database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])  # fmt: skip


@FUZZ
@given(
    texts,
    st.dictionaries(
        st.sampled_from(["t", "u", ""]), st.lists(st.sampled_from(["t", "42, x", "", "é"]), max_size=3)
    ),
    st.sampled_from([0.0, 0.5, 1.0]),
    st.one_of(st.none(), st.sampled_from(["t", "", "42"]), st.text(max_size=6)),
)
def test_fuzz_parse_and_step_reward(text, unsolved, solve_rate, answer):
    turn = parse_tool_calls(text)
    assert isinstance(turn.content, str) and isinstance(turn.malformed, bool)
    assert all(isinstance(c.name, str) and c.name and isinstance(c.arguments, dict) for c in turn.calls)
    if "<tool_call>" not in text:
        assert not turn.calls
    # Outputs cut from the text itself: random, and now and then they contain the answers.
    outputs = [text[i::3] for i in range(len(turn.calls))]
    for variant in REWARD_VARIANTS:
        reward = step_reward(turn, outputs, unsolved, solve_rate, answer, variant)
        assert math.isfinite(reward.score) and reward.case in STEP_CASES
        assert 0 <= reward.n_solved <= reward.n_calls == len(turn.calls)
        assert reward.unsolved_after == reward.unsolved_before - reward.n_solved >= 0
        if reward.case == "calls":
            assert 0.0 <= reward.score <= max(1.0, float(reward.n_calls))
        else:
            assert -0.5 <= reward.score <= 1.0


@settings(FUZZ, max_examples=600)
@given(st.one_of(json_values, st.text(max_size=30)), st.text(max_size=30))
def test_fuzz_answer_verify(predict, golden):
    text = json.dumps(predict, ensure_ascii=False) if isinstance(predict, dict | list) else str(predict)
    verified = answer_verify(predict, golden)
    assert isinstance(verified, bool)
    if verified:  # more text around a prediction never takes a verified answer away
        assert answer_verify(f"x {text} y", golden)
    marker = "zq-never-in-the-prediction"
    if marker not in text.lower():  # one golden piece missing from the prediction fails the whole answer
        assert not answer_verify(predict, f"{golden}, {marker}") and not answer_verify(predict, marker)
    if golden.strip() and ", " not in golden:  # one piece, written into the prediction, verifies
        assert answer_verify(f"{text} {golden.upper() if golden.isascii() else golden}", golden)
    ascii_golden = golden.encode("ascii", "ignore").decode()
    assert answer_verify(ascii_golden, ascii_golden)  # a gold answer verifies itself


@pytest.mark.parametrize(
    ("text", "calls", "malformed"),
    [
        # Llama 3.1's JSON tool call: the whole turn, `parameters`, its end-of-turn tokens
        ('{"name": "person_info", "parameters": {"person": "Ada Vole"}}<|eot_id|>',
         [("person_info", {"person": "Ada Vole"})], False),
        ('<|python_tag|>{"name": "place_info", "parameters": {"place": "Kor"}}<|eom_id|>',
         [("place_info", {"place": "Kor"})], False),
        ('<|python_tag|>{"name": "a", "arguments": {"x": 1}}', [("a", {"x": 1})], False),
        ('[{"name": "a", "parameters": {"x": 1}}, {"name": "b", "parameters": {"y": "2"}}]',
         [("a", {"x": 1}), ("b", {"y": "2"})], False),
        ('{"name": "a", "parameters": {"x": 1}}; {"name": "b", "parameters": "{\\"y\\": 2}"}',
         [("a", {"x": 1}), ("b", {"y": 2})], False),
        # broken Llama markup is malformed, never a crash
        ('<|python_tag|>{"name": "a", "parameters": {', [], True),
        ('{"name": 3, "parameters": {}}', [], True),
        # a bare object with `arguments` and no tag stays text, as FTRL reads a Qwen turn
        ('{"name": "a", "arguments": {"x": 1}}', [], False),
        ("The answer is 42.", [], False),
    ],
)  # fmt: skip
def test_llama_tool_calls_parse_in_their_own_format(text, calls, malformed):
    parsed = parse_tool_calls(text)
    assert [(c.name, c.arguments) for c in parsed.calls] == calls
    assert parsed.malformed is malformed
    if not calls:
        assert parsed.content == parse_tool_calls(text).content and parsed.content


def test_parameters_inside_qwen_tool_call_tags_stay_unparsed_as_ftrl_reads_them():
    parsed = parse_tool_calls('<tool_call>\n{"name": "a", "parameters": {"x": 1}}\n</tool_call>')
    assert parsed.calls == [] and parsed.malformed
