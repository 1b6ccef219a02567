"""General-capability material: stdlib prose split train/held-out, seeded exact-match tasks with disjoint splits."""

from __future__ import annotations

import re

import pytest

from toolrl_analysis.models.general import (
    TASK_KINDS,
    exact_match,
    general_tasks,
    general_text,
    task_chat,
    task_split,
)


def test_text_splits_are_disjoint_modest_and_stable():
    train, heldout = general_text("train"), general_text("heldout")
    train_chars, heldout_chars = sum(map(len, train)), sum(map(len, heldout))
    assert 100_000 < train_chars < 800_000 and 20_000 < heldout_chars < train_chars / 3
    assert not set(train) & set(heldout)
    assert not {d.split("\n", 1)[0] for d in train} & {d.split("\n", 1)[0] for d in heldout}
    assert general_text("train") == train
    assert not any("<tool_call>" in d for d in train + heldout)


def test_max_chars_keeps_a_prefix_from_many_modules():
    text = general_text("train", max_chars=20_000)
    assert sum(map(len, text)) <= 20_000
    assert text == general_text("train")[: len(text)]
    assert len({d.split("\n", 1)[0].split(".")[0] for d in text}) > 10  # round-robin over modules


def test_tasks_are_seeded_distinct_and_split_disjoint():
    train = general_tasks(400, seed=0, split="train")
    test = general_tasks(200, seed=0, split="test")
    assert general_tasks(400, seed=0, split="train") == train
    assert general_tasks(50, seed=1, split="train") != train[:50]
    questions = [t["messages"][0]["content"] for t in train]
    assert len(set(questions)) == len(questions)
    assert not set(questions) & {t["messages"][0]["content"] for t in test}
    assert all(task_split(t["messages"][0]["content"]) == "test" for t in test)
    assert {t["kind"] for t in train} == set(TASK_KINDS)
    assert general_tasks(300, seed=5, split="test")[0]["messages"][0]["role"] == "user"


def test_task_answers_are_correct():
    for task in general_tasks(300, seed=2):
        question, answer = task["messages"][0]["content"], task["answer"]
        if task["kind"] in ("add", "subtract", "multiply"):
            a, op, b = re.fullmatch(r"What is (\d+) ([-+*]) (\d+)\?", question).groups()
            assert int(answer) == {"+": int(a) + int(b), "-": int(a) - int(b), "*": int(a) * int(b)}[op]
        elif task["kind"] == "repeat":
            assert question == f"Repeat exactly: {answer}"
        elif task["kind"] == "reverse_word":
            assert question.endswith(": " + answer[::-1])
        elif task["kind"] == "reverse_list":
            assert question.split(": ", 1)[1].split(", ")[::-1] == answer.split(", ")
        else:
            assert int(answer) == len(question.split(": ", 1)[1].split())


def test_task_chat_and_exact_match():
    task = general_tasks(1, seed=0)[0]
    chat = task_chat(task)
    assert chat[:-1] == task["messages"] and chat[-1] == {"role": "assistant", "content": task["answer"]}
    assert exact_match(" 42.\n", "42") and not exact_match("The answer is 42", "42")


def test_bad_split_names_are_refused():
    with pytest.raises(ValueError):
        general_text("test")
    with pytest.raises(ValueError):
        general_tasks(1, split="heldout")
