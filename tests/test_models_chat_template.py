"""Chat template: Qwen2.5's turn and tool-call format, compact tool lines, identical with and without a tokenizer."""

from __future__ import annotations

import json

import pytest

from toolrl_analysis.models.chat_template import ASSISTANT_PREFIX, IM_END, render_chat
from toolrl_analysis.models.general import general_text
from toolrl_analysis.models.tokenizer import train_tokenizer

WEATHER_TOOL = {
    "type": "function",
    "function": {
        "name": "weather_now",
        "description": "Current weather for a city. Uses the national weather service and caches answers.",
        "parameters": {
            "type": "object",
            "properties": {
                "unit": {"type": "string", "enum": ["celsius", "fahrenheit"], "description": "Unit."},
                "city": {"type": "string", "description": "City name."},
                "days": {"type": "integer"},
                "tags": {"type": "array", "items": {"type": "string"}},
            },
            "required": ["city"],
        },
    },
}
PERSON_TOOL = {  # a bare function schema (no "type": "function" wrapper) with a nested object argument
    "name": "person_info",
    "description": "An advanced and very comprehensive tool designed to look up a great many facts about people, "
    "their birthplaces and employers, with caching",
    "parameters": {
        "type": "object",
        "properties": {"person": {"type": "object", "properties": {"name": {"type": "string"}}}},
        "required": ["person"],
    },
}
QUESTION = {"role": "user", "content": "What is the weather in Paris and where was Ada born?"}


@pytest.fixture(scope="module")
def tokenizer():
    corpus = general_text("train", max_chars=40_000) + [
        render_chat([QUESTION], tools=[WEATHER_TOOL, PERSON_TOOL])
    ]
    return train_tokenizer(corpus, vocab_size=600)


def _call(name: str, **arguments) -> dict:
    return {"type": "function", "function": {"name": name, "arguments": arguments}}


def test_tools_are_listed_one_compact_line_each():
    text = render_chat([QUESTION], tools=[WEATHER_TOOL, PERSON_TOOL], add_generation_prompt=True)
    tools_block = text.split("<tools>\n", 1)[1].split("\n</tools>", 1)[0]
    weather_line, person_line = tools_block.split("\n")
    # Required parameters first, optional ones marked with '?', enums inline, first sentence of the description.
    assert weather_line == (
        "weather_now(city: string, unit?: string [enum celsius|fahrenheit], days?: integer, tags?: array[string])"
        " - Current weather for a city"
    )
    assert person_line.startswith("person_info(person: {name: string}) - An advanced and very")
    assert person_line.endswith("...") and len(person_line.split(" - ", 1)[1]) <= 83
    assert '"parameters"' not in text  # no JSON schema dump
    assert text.startswith("<|im_start|>system\nYou are a helpful assistant.\n\n# Tools\n")
    assert text.endswith("<|im_start|>user\n" + QUESTION["content"] + "<|im_end|>\n" + ASSISTANT_PREFIX)


def test_assistant_tool_calls_render_like_format_tool_calls():
    calls = [_call("weather_now", city="Paris", unit="celsius"), _call("person_info", person={"name": "Ada"})]
    text = render_chat([QUESTION, {"role": "assistant", "content": None, "tool_calls": calls}])
    expected = "\n".join(
        "<tool_call>\n" + json.dumps(c["function"], ensure_ascii=False) + "\n</tool_call>" for c in calls
    )
    assert text.endswith(ASSISTANT_PREFIX + expected + IM_END + "\n")


def test_arguments_as_json_string_and_content_before_calls():
    call = {"type": "function", "function": {"name": "weather_now", "arguments": '{"city": "Zürich"}'}}
    text = render_chat([QUESTION, {"role": "assistant", "content": "Let me check.", "tool_calls": [call]}])
    segment = text.split(ASSISTANT_PREFIX, 1)[1]
    assert segment.startswith("Let me check.\n<tool_call>\n")
    payload = segment.split("<tool_call>\n", 1)[1].split("\n</tool_call>", 1)[0]
    assert json.loads(payload) == {"name": "weather_now", "arguments": {"city": "Zürich"}}


def test_raw_generated_text_is_kept_verbatim():
    raw = 'thinking...\n<tool_call>\n{"name": "weather_now", "arguments": {"city": "Paris"}}\n</tool_call>  '
    text = render_chat([QUESTION, {"role": "assistant", "content": raw}])
    assert text.endswith(ASSISTANT_PREFIX + raw + IM_END + "\n")


def test_consecutive_tool_messages_share_one_user_turn():
    messages = [
        QUESTION,
        {
            "role": "assistant",
            "tool_calls": [_call("weather_now", city="Paris"), _call("person_info", person={})],
        },
        {"role": "tool", "content": "Sunny, 21 C"},
        {"role": "tool", "content": {"birthplace": "London"}},
        {"role": "assistant", "content": "Sunny; London."},
    ]
    text = render_chat(messages)
    assert (
        "<|im_start|>user\n<tool_response>\nSunny, 21 C\n</tool_response>\n"
        '<tool_response>\n{"birthplace": "London"}\n</tool_response><|im_end|>\n' in text
    )
    assert text.endswith(ASSISTANT_PREFIX + "Sunny; London." + IM_END + "\n")


def test_system_message_replaces_the_default():
    text = render_chat([{"role": "system", "content": "Be terse."}, QUESTION], add_generation_prompt=True)
    assert text == (
        "<|im_start|>system\nBe terse.<|im_end|>\n<|im_start|>user\n" + QUESTION["content"] + "<|im_end|>\n"
        "<|im_start|>assistant\n"
    )


def test_tokenizer_renders_exactly_like_render_chat(tokenizer):
    messages = [
        QUESTION,
        {"role": "assistant", "content": "", "tool_calls": [_call("weather_now", city="Paris")]},
        {"role": "tool", "content": "Sunny"},
    ]
    tools = [WEATHER_TOOL, PERSON_TOOL]
    via_tokenizer = tokenizer.apply_chat_template(
        messages, tools=tools, add_generation_prompt=True, tokenize=False
    )
    assert via_tokenizer == render_chat(messages, tools=tools, add_generation_prompt=True)


def test_assistant_token_mask_covers_the_reply_and_its_end_token(tokenizer):
    # SFT can ask apply_chat_template for the loss mask: the {% generation %} block marks assistant text.
    reply = '<tool_call>\n{"name": "weather_now", "arguments": {"city": "Paris"}}\n</tool_call>'
    out = tokenizer.apply_chat_template(
        [QUESTION, {"role": "assistant", "content": reply}],
        tools=[WEATHER_TOOL],
        tokenize=True,
        return_dict=True,
        return_assistant_tokens_mask=True,
    )
    marked = [i for i, m in zip(out["input_ids"], out["assistant_masks"], strict=True) if m]
    assert tokenizer.decode(marked) == reply + IM_END


def test_round_trip_through_parse_tool_calls():
    from toolrl_analysis.envs import toolcalls

    calls = [
        _call("weather_now", city="Paris", days=2),
        _call("person_info", person={"name": "Ada Lovelace"}),
    ]
    text = render_chat([QUESTION, {"role": "assistant", "tool_calls": calls}])
    segment = text.rsplit(ASSISTANT_PREFIX, 1)[1].removesuffix(IM_END + "\n")
    parsed = toolcalls.parse_tool_calls(segment)
    assert not parsed.malformed
    assert [(c.name, c.arguments) for c in parsed.calls] == [
        (c["function"]["name"], c["function"]["arguments"]) for c in calls
    ]
    expected = [toolcalls.ToolCall(c["function"]["name"], c["function"]["arguments"]) for c in calls]
    assert segment == toolcalls.format_tool_calls(expected)
    # ToolCall objects themselves may stand in for OpenAI-style dicts.
    as_objects = render_chat([QUESTION, {"role": "assistant", "tool_calls": expected}])
    assert as_objects == text
