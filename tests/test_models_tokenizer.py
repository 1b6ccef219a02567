"""Tokenizer: byte-level BPE with Qwen's special tokens, deterministic training, save/load, training corpus."""

from __future__ import annotations

import json

import pytest

from toolrl_analysis.envs.schema import EnvRecord
from toolrl_analysis.models.chat_template import CHAT_TEMPLATE, TOOL_TAGS, render_chat
from toolrl_analysis.models.general import general_text
from toolrl_analysis.models.tokenizer import (
    SPECIAL_TOKENS,
    build_policy_tokenizer,
    load_tokenizer,
    oracle_like_messages,
    tokenizer_corpus,
    train_tokenizer,
)

PLACE_TOOL = {
    "type": "function",
    "function": {
        "name": "place_info",
        "description": "Look up facts about a place.",
        "parameters": {
            "type": "object",
            "properties": {
                "place": {"type": "string"},
                "field": {"type": "string", "enum": ["mayor", "population"]},
            },
            "required": ["place", "field"],
        },
    },
}
PERSON_TOOL = {
    "type": "function",
    "function": {
        "name": "person_info",
        "description": "Look up facts about a person.",
        "parameters": {
            "type": "object",
            "properties": {"person": {"type": "string"}, "field": {"type": "string", "enum": ["birthplace"]}},
            "required": ["person", "field"],
        },
    },
}


def _question(text: str) -> list[dict]:
    return [{"role": "user", "content": f"Please call given tools to answer the question.\nQuestion: {text}"}]


def our_record() -> EnvRecord:
    """A two-hop environment with golden calls in `meta`, like the environment pipeline writes."""
    subquestions = [
        {
            "id": 0,
            "tool": "person_info",
            "arguments": {"person": "Ada Vell", "field": "birthplace"},
            "answer": "Guren",
        },
        {
            "id": 1,
            "tool": "place_info",
            "arguments": {"place": "Guren", "field": "mayor"},
            "answer": "Lapil Fazunt",
        },
    ]
    return EnvRecord(
        messages=_question("Who is the mayor of the birthplace of Ada Vell?"),
        tools=[PLACE_TOOL, PERSON_TOOL],
        codes={
            "place_info": "def place_info(place, field): ...",
            "person_info": "def person_info(person, field): ...",
        },
        unsolved_set={"person_info": ["Guren"], "place_info": ["Lapil Fazunt"]},
        answer="Lapil Fazunt",
        data_source="self/multi_hop",
        meta={"env_id": "test-0", "subquestions": subquestions, "golden_turns": [[0], [1]]},
    )


def ftrl_record() -> EnvRecord:
    """An FTRL-style record: no `meta`, so the corpus guesses arguments from the schema."""
    return EnvRecord(
        messages=_question("What is the population of Vaba?"),
        tools=[PLACE_TOOL],
        codes={"place_info": "def place_info(place, field): ..."},
        unsolved_set={"place_info": ["5208"]},
        answer="5208",
        data_source="self/single_hop",
    )


@pytest.fixture(scope="module")
def corpus() -> list[str]:
    return tokenizer_corpus([our_record(), ftrl_record()] * 20, general_text("train", max_chars=60_000))


@pytest.fixture(scope="module")
def tokenizer(corpus):
    return train_tokenizer(corpus, vocab_size=700)


def test_special_tokens_and_settings(tokenizer):
    assert len(tokenizer) == 700
    assert tokenizer.convert_tokens_to_ids(list(SPECIAL_TOKENS)) == [0, 1, 2]
    assert (tokenizer.eos_token, tokenizer.pad_token, tokenizer.bos_token) == (
        "<|im_end|>",
        "<|endoftext|>",
        None,
    )
    assert tokenizer.padding_side == "left"
    assert tokenizer.chat_template == CHAT_TEMPLATE
    for tag in (*SPECIAL_TOKENS, *TOOL_TAGS):
        assert len(tokenizer(tag, add_special_tokens=False)["input_ids"]) == 1, tag


def test_tool_tags_never_split_and_survive_skip_special_tokens(tokenizer):
    text = '<|im_start|>assistant\n<tool_call>\n{"name": "place_info"}\n</tool_call><|im_end|>'
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    tokens = tokenizer.convert_ids_to_tokens(ids)
    assert "<tool_call>" in tokens and "</tool_call>" in tokens
    assert tokenizer.decode(ids) == text
    assert (
        tokenizer.decode(ids, skip_special_tokens=True)
        == 'assistant\n<tool_call>\n{"name": "place_info"}\n</tool_call>'
    )


def test_byte_level_round_trip_and_single_digits(tokenizer):
    text = "naïve café — 東京 🙂 tab\tnewline\n  spaces 12345"
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    assert tokenizer.decode(ids) == text
    assert tokenizer.convert_ids_to_tokens(tokenizer("2025", add_special_tokens=False)["input_ids"]) == list(
        "2025"
    )


def test_tool_names_get_merges(tokenizer):
    # Trained on rendered environments, a tool name costs a few tokens, not one per byte.
    assert len(tokenizer("place_info", add_special_tokens=False)["input_ids"]) <= 3


def test_training_is_deterministic(corpus, tokenizer):
    again = train_tokenizer(corpus, vocab_size=700)
    assert again.backend_tokenizer.to_str() == tokenizer.backend_tokenizer.to_str()


def test_save_and_load_round_trip(tokenizer, tmp_path):
    tokenizer.save_pretrained(tmp_path)
    loaded = load_tokenizer(tmp_path)
    messages = oracle_like_messages(our_record())
    text = render_chat(messages, tools=[PLACE_TOOL, PERSON_TOOL])
    assert loaded(text)["input_ids"] == tokenizer(text)["input_ids"]
    assert loaded.chat_template == tokenizer.chat_template
    assert (loaded.padding_side, loaded.eos_token_id, loaded.pad_token_id) == ("left", 2, 0)


def test_too_small_vocabulary_is_refused():
    with pytest.raises(ValueError, match="vocab_size"):
        train_tokenizer(["hello"], vocab_size=100)


def test_oracle_like_messages_follow_golden_turns():
    messages = oracle_like_messages(our_record())
    roles = [m["role"] for m in messages]
    assert roles == ["user", "assistant", "tool", "assistant", "tool", "assistant"]
    first_call = messages[1]["tool_calls"][0]["function"]
    assert first_call == {"name": "person_info", "arguments": {"person": "Ada Vell", "field": "birthplace"}}
    assert "Guren" in messages[2]["content"]
    assert messages[-1]["content"] == "The answer is Lapil Fazunt."


def test_oracle_like_messages_guess_arguments_without_meta():
    messages = oracle_like_messages(ftrl_record())
    call = messages[1]["tool_calls"][0]["function"]
    assert call["name"] == "place_info"
    assert set(call["arguments"]) == {"place", "field"}
    assert call["arguments"]["field"] in ("mayor", "population")
    assert oracle_like_messages(ftrl_record()) == messages  # seeded


def test_corpus_is_rendered_chats_then_general_text(corpus):
    first = corpus[0]
    assert first.startswith("<|im_start|>system") and "<tool_call>" in first and "<tool_response>" in first
    reply = first.split("<|im_start|>assistant\n", 1)[1]
    assert (
        json.loads(reply.split("<tool_call>\n", 1)[1].split("\n</tool_call>", 1)[0])["name"] == "person_info"
    )
    assert corpus == tokenizer_corpus(
        [our_record(), ftrl_record()] * 20, general_text("train", max_chars=60_000)
    )
    sampled = tokenizer_corpus([our_record(), ftrl_record()] * 20, max_envs=5)
    assert len(sampled) == 5


def test_policy_tokenizer_covers_environments_and_general_tasks():
    tokenizer = build_policy_tokenizer([our_record(), ftrl_record()] * 5, vocab_size=1024)
    assert len(tokenizer) == 1024
    prompt = tokenizer.apply_chat_template(
        our_record().messages, tools=our_record().tools, add_generation_prompt=True, tokenize=False
    )
    assert prompt.endswith("<|im_start|>assistant\n")
    # frequent words are single tokens; spaces are tokens of their own
    assert len(tokenizer("Repeat exactly:", add_special_tokens=False)["input_ids"]) <= 4


def test_a_word_is_the_same_tokens_after_a_space_or_a_quote():
    # the model copies names from the question into JSON arguments: that must be plain token copying
    tokenizer = build_policy_tokenizer([our_record(), ftrl_record()] * 5, vocab_size=1024)

    def tokens(text):
        return tokenizer(text, add_special_tokens=False)["input_ids"]

    for word in ("Paris", "Zorblat", "founder"):
        assert tokens(word) == tokens(f" {word}")[1:] == tokens(f'"{word}')[1:] == tokens(f"_{word}")[1:]
