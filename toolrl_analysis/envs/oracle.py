"""Oracle trajectories: the conversation a perfect policy would have with an environment's tools.

The golden calls come from `meta.golden_turns` / `meta.subquestions`; the tool output is what the real tool
code prints in the sandbox, so a trajectory is exactly what a policy would see. Supervised warm-up trains on
these, and the context-reading meter scores a model's assistant tokens on them.
"""

from __future__ import annotations

import json
import random
from collections.abc import Sequence
from typing import Any

from toolrl_analysis.envs.check import golden_calls
from toolrl_analysis.envs.schema import EnvRecord

# Marks the assistant message of a deliberately failed call (chat templates ignore unknown keys): training
# shows the model the error and the correction, but does not teach it to make the mistake.
FAILED_CALL = "failed_call"


def corrupt_arguments(arguments: dict[str, Any], rng: random.Random) -> dict[str, Any] | None:
    """The golden arguments with their first string value misspelled (a plausible failed call)."""
    corrupted = json.loads(json.dumps(arguments))

    def visit(node):
        if isinstance(node, dict):
            for key, value in node.items():
                if isinstance(value, str) and len(value) > 3:
                    cut = rng.randrange(1, len(value) - 1)
                    node[key] = value[:cut] + value[cut + 1 :]
                    return True
                if visit(value):
                    return True
        if isinstance(node, list):
            for index, value in enumerate(node):
                if isinstance(value, str) and len(value) > 3:
                    node[index] = value[:-1]
                    return True
                if visit(value):
                    return True
        return False

    return corrupted if visit(corrupted) else None


def plan_trajectory(
    record: EnvRecord, rng: random.Random, correction_prob: float
) -> tuple[list[list[tuple[str, dict]]], int | None]:
    """The assistant's calls turn by turn: the golden turns, one of them possibly preceded by a failed call.
    Returns the turns and the index of the failed turn (None without one)."""
    turns = [[(name, args) for _, name, args in turn] for turn in golden_calls(record)]
    if turns and rng.random() < correction_prob:
        at = rng.randrange(len(turns))
        name, args = rng.choice(turns[at])
        wrong = corrupt_arguments(args, rng)
        if wrong is not None:
            turns.insert(at, [(name, wrong)])
            return turns, at
    return turns, None


def oracle_conversations(
    records: Sequence[EnvRecord], sandbox, rng: random.Random, correction_prob: float = 0.0
) -> list[list[dict[str, Any]]]:
    """Full conversations (question, calls, real tool output, final answer); a failed call's assistant message
    carries `FAILED_CALL: True`. All calls of all trajectories run in one batched `call_many`: golden
    arguments never depend on live output."""
    plans = [plan_trajectory(record, rng, correction_prob) for record in records]
    flat = [
        (record.codes.get(name, ""), name, args)
        for record, (plan, _) in zip(records, plans, strict=True)
        for turn in plan
        for name, args in turn
    ]
    results = iter(sandbox.call_many(flat) if flat else [])
    conversations = []
    for record, (plan, failed) in zip(records, plans, strict=True):
        messages = [dict(m) for m in record.messages]
        for index, turn in enumerate(plan):
            calls = [{"type": "function", "function": {"name": n, "arguments": a}} for n, a in turn]
            messages.append({"role": "assistant", "content": "", "tool_calls": calls})
            if index == failed:
                messages[-1][FAILED_CALL] = True
            for name, _ in turn:
                messages.append({"role": "tool", "name": name, "content": next(results).content})
        messages.append({"role": "assistant", "content": f"The answer is {record.answer}."})
        conversations.append(messages)
    return conversations
