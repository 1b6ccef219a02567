"""The probing dataset, built from real environments and oracle trajectories with real tool output."""

import pytest

from toolrl_analysis.analysis.probe.decision_points import (
    REGIONS,
    TASKS,
    build_dataset,
    decision_labels,
    oracle_conversations_for,
)
from toolrl_analysis.envs.pipeline import EnvBuildConfig, build_envsets
from toolrl_analysis.envs.sandbox import Sandbox
from toolrl_analysis.models.tokenizer import build_policy_tokenizer


@pytest.fixture(scope="module")
def build():
    return build_envsets(EnvBuildConfig(seed=5, train_size=24, test_per_scenario=4))


@pytest.fixture(scope="module")
def tokenizer(build):
    return build_policy_tokenizer(build.train, vocab_size=700)


@pytest.fixture(scope="module")
def conversations(build):
    # correction_prob=1: every trajectory whose arguments can be misspelled holds one failed call first
    with Sandbox(workers=2) as sandbox:
        return oracle_conversations_for(build.test, sandbox, seed=0, correction_prob=1.0)


@pytest.fixture(scope="module")
def dataset(conversations, tokenizer):
    return build_dataset(conversations, tokenizer)


def _first_call(message):
    return message["tool_calls"][0]["function"] if message.get("tool_calls") else None


def test_decision_labels_say_what_the_oracle_does_next(conversations):
    checked = {"golden": 0, "failed": 0, "answer": 0, "source": 0}
    for record, messages, _ in conversations:
        subs = {s["id"]: s for s in record.meta["subquestions"]}
        assistant = [i for i, m in enumerate(messages) if m["role"] == "assistant"]
        for turn, index in enumerate(assistant):
            labels = decision_labels(record, messages[:index])
            call = _first_call(messages[index])
            if call is None:  # the final answer comes once every sub-question is solved
                assert labels["call_or_answer"] == "answer" and labels["next_tool"] is None
                checked["answer"] += 1
                continue
            assert labels["call_or_answer"] == "call"
            golden = next((s for s in subs.values() if s["arguments"] == call["arguments"]), None)
            if golden is None:  # a failed call (misspelled argument) before one of the next turn's calls
                following = [c["function"]["name"] for c in messages[assistant[turn + 1]]["tool_calls"]]
                assert labels["next_tool"] in following
                checked["failed"] += 1
                continue
            # a golden turn starts with the first sub-question still needed, in the order the question asks
            assert labels["next_tool"] == call["name"] == golden["tool"]
            checked["golden"] += 1
            if golden.get("depends_on") is not None:
                # the response that many back holds the answer this argument needs
                responses = [m["content"] for m in messages[:index] if m["role"] == "tool"]
                offset = int(labels["source_response"].rstrip("+"))
                assert subs[golden["depends_on"]]["answer"].lower() in responses[-1 - offset].lower()
                checked["source"] += 1
            else:
                assert labels["source_response"] is None
    assert checked["answer"] == len(conversations) and checked["golden"] >= 2 * len(conversations)
    assert checked["failed"] >= len(conversations) // 2 and checked["source"] >= 8


def test_rows_cover_every_task_and_failed_calls_are_useless(dataset, conversations):
    rows = dataset.rows
    assert set(rows["task"]) == set(TASKS)
    assert set(rows["source"]) == {"oracle"} and not any(dataset.dropped.values())
    useful = rows[rows["task"] == "response_useful"]
    n_tool = sum(m["role"] == "tool" for _, messages, _ in conversations for m in messages)
    n_calls = sum(
        len(r.meta["golden_turns"]) for r, _, _ in conversations
    )  # golden turns, one call each here
    assert len(useful) == n_tool
    # every golden call is useful; the inserted failed calls (misspelled arguments) are not
    assert (useful["label"] == "useless").sum() == n_tool - sum(
        len(t) for r, _, _ in conversations for t in r.meta["golden_turns"]
    )
    assert (useful["label"] == "useless").sum() >= n_calls // 4
    assert set(rows.loc[rows["task"] == "call_or_answer", "label"]) == {"call", "answer"}
    assert rows["control_type"].notna().all()


def test_positions_are_decision_tokens_and_response_ends(dataset, tokenizer):
    for trajectory_index, trajectory in enumerate(dataset.trajectories):
        ids = trajectory.input_ids
        for position in trajectory.decision_positions:
            assert tokenizer.decode(ids[: position + 1]).endswith("<|im_start|>assistant\n")
        rows = dataset.rows[(dataset.rows["trajectory"] == trajectory_index)]
        for position in rows.loc[rows["task"] == "response_useful", "position"]:
            assert tokenizer.decode(ids[: position + 1]).endswith("</tool_response>")
        assert set(rows.loc[rows["task"] != "response_useful", "position"]) <= set(
            trajectory.decision_positions
        )


def test_token_regions_follow_the_rendered_conversation(dataset, conversations, tokenizer):
    for trajectory, (record, messages, _) in zip(dataset.trajectories, conversations, strict=True):
        ids, regions = trajectory.input_ids, trajectory.token_regions
        text_of = {
            name: tokenizer.decode([t for t, r in zip(ids, regions, strict=True) if r == REGIONS.index(name)])
            for name in REGIONS
        }
        assert record.question.split("Question: ")[-1] in text_of["question"]
        assert all(name in text_of["tool_documents"] for name in record.tool_names)
        assert text_of["tool_calls"].count("<tool_call>") == sum(
            len(m.get("tool_calls", [])) for m in messages
        )
        for message in messages:
            if message["role"] == "tool":
                assert message["content"] in text_of["tool_responses"]
        assert "<|im_start|>" in text_of["other"] and "<|im_start|>" not in text_of["question"]


def test_capture_requests_ask_for_every_labelled_position_once(dataset):
    requests = dataset.capture_requests()
    positions = dataset.positions()
    assert len(requests) == len(dataset.trajectories)
    assert sum(len(r.positions) for r in requests) == len(positions) == positions["feature"].max() + 1
    for request, trajectory in zip(requests, dataset.trajectories, strict=True):
        assert list(request.positions) == sorted(set(request.positions))
        assert list(request.attention_positions) == trajectory.decision_positions
        assert len(request.token_regions) == len(request.input_ids)
