"""The probing dataset: decision points in tool-use conversations, labelled from the environments' `meta`.

A decision point is the conversation just before an assistant turn, rendered with the generation prompt; its
last token (the decision token) is where the model decides what to do next. Conversations come from oracle
trajectories (golden calls with real tool output, some preceded by a failed call) and from policies' own
rollouts. Each conversation is tokenised once: every decision prompt is a prefix of the whole conversation,
and with causal attention the hidden state at a prefix's last token is the same in the whole sequence.

Labels are read from the context and `meta.subquestions` (a tool response solves a sub-question when it is
that sub-question's tool and its output verifies the answer, FTRL's `answer_verify`):

  next_tool        decision token: the tool of the next sub-question still needed (among the tools offered)
  call_or_answer   decision token: "call" while a sub-question is unsolved, "answer" once all are solved
  response_useful  last token of each tool response: "useful" if it solved a sub-question still needed then
  source_response  decision token, when the next sub-question takes an argument from an earlier answer: how
                   many tool responses back the one holding that value is ("0" the latest, ..., "3+")

Every row also carries a control type: a surface feature of the context that recurs across environments (the
number of earlier responses and the scenario; for responses, the tool and its index). The control task
permutes the labels within each type (`fit.control_labels`), so it keeps what the type tells about the label
and nothing else.
Token regions (question, tool documents, tool calls, tool responses, other) serve the attention analysis.
"""

from __future__ import annotations

import bisect
import random
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import pandas as pd

from toolrl_analysis.analysis.probe.activations import CaptureRequest, attention_implementation
from toolrl_analysis.envs.reward import answer_verify
from toolrl_analysis.envs.schema import EnvRecord
from toolrl_analysis.models.chat_template import TOOL_TAGS

TASKS = ("next_tool", "call_or_answer", "response_useful", "source_response")
DECISION_TASKS = ("next_tool", "call_or_answer", "source_response")
REGIONS = ("question", "tool_documents", "tool_calls", "tool_responses", "other")
_TOOL_CALL_OPEN, _TOOL_CALL_CLOSE, _TOOL_RESPONSE_OPEN, _TOOL_RESPONSE_CLOSE = TOOL_TAGS
_SPANS = {
    "tool_documents": re.compile(r"<tools>.*?</tools>", re.S),
    "tool_calls": re.compile(re.escape(_TOOL_CALL_OPEN) + ".*?" + re.escape(_TOOL_CALL_CLOSE), re.S),
    "tool_responses": re.compile(
        re.escape(_TOOL_RESPONSE_OPEN) + ".*?" + re.escape(_TOOL_RESPONSE_CLOSE), re.S
    ),
}
_MAX_OFFSET = 3  # source_response classes 0, 1, 2, 3+


@dataclass
class Trajectory:
    """One conversation of one environment, tokenised once."""

    env_id: str
    scenario: str
    source: str  # "oracle" or "rollout:<model>"
    input_ids: list[int]
    token_regions: list[int]  # index into REGIONS per token
    decision_positions: list[int]  # the decision token of each assistant turn


@dataclass
class ProbingDataset:
    """Trajectories plus one row per (trajectory, position, task) with its label and control type."""

    trajectories: list[Trajectory]
    rows: pd.DataFrame  # trajectory, position, env_id, scenario, source, task, label, control_type
    dropped: dict[str, int]  # why conversations or decision points were left out

    def positions(self) -> pd.DataFrame:
        """The distinct (trajectory, position) pairs rows need, each with its feature row `feature`."""
        pairs = (
            self.rows[["trajectory", "position"]].drop_duplicates().sort_values(["trajectory", "position"])
        )
        return pairs.reset_index(drop=True).rename_axis("feature").reset_index()

    def capture_requests(self) -> list[CaptureRequest]:
        """One request per trajectory: hidden states at its labelled positions (in `positions()` order),
        attention mass from each of its decision tokens."""
        pairs = self.positions()
        wanted = pairs.groupby("trajectory")["position"].apply(list).to_dict()
        return [
            CaptureRequest(t.input_ids, wanted.get(i, []), t.decision_positions, t.token_regions)
            for i, t in enumerate(self.trajectories)
        ]

    def summary(self) -> pd.DataFrame:
        """Rows, environments and classes per task and source."""
        return (
            self.rows.groupby(["task", "source"])
            .agg(rows=("label", "size"), environments=("env_id", "nunique"), classes=("label", "nunique"))
            .reset_index()
        )


# ---------------------------------------------------------------------------------------------
# Labels from the context
# ---------------------------------------------------------------------------------------------
def _subquestions(record: EnvRecord) -> list[dict[str, Any]]:
    """meta.subquestions in the golden order (the order of meta.golden_turns where given)."""
    subs = [s for s in record.meta.get("subquestions") or [] if isinstance(s, dict)]
    order = [i for turn in record.meta.get("golden_turns") or [] for i in turn]
    rank = {sq_id: n for n, sq_id in enumerate(order)}
    return sorted(subs, key=lambda s: rank.get(s.get("id"), len(rank)))


def _tool_responses(messages: Sequence[dict[str, Any]]) -> list[tuple[str, str]]:
    """(tool name, output) of every tool message, in order."""
    return [(str(m.get("name", "")), str(m.get("content", ""))) for m in messages if m.get("role") == "tool"]


def _solve(subs: list[dict[str, Any]], responses: list[tuple[str, str]]) -> tuple[dict[Any, int], list[bool]]:
    """Which response solved each sub-question id, and whether each response solved one still needed."""
    solved_by: dict[Any, int] = {}
    useful = []
    for index, (name, output) in enumerate(responses):
        hit = next(
            (
                s
                for s in subs
                if s.get("id") not in solved_by
                and s.get("tool") == name
                and answer_verify(output, str(s.get("answer", "")))
            ),
            None,
        )
        if hit is not None:
            solved_by[hit.get("id")] = index
        useful.append(hit is not None)
    return solved_by, useful


def decision_labels(record: EnvRecord, context: Sequence[dict[str, Any]]) -> dict[str, str | None]:
    """The decision-token labels (None where a task does not apply) and the control type."""
    subs = _subquestions(record)
    responses = _tool_responses(context)
    solved_by, _ = _solve(subs, responses)
    pending = [s for s in subs if s.get("id") not in solved_by]
    following = pending[0] if pending else None
    source = None
    if following is not None and following.get("depends_on") in solved_by:
        offset = len(responses) - 1 - solved_by[following["depends_on"]]
        source = str(offset) if offset < _MAX_OFFSET else f"{_MAX_OFFSET}+"
    tool = str(following.get("tool")) if following is not None else None
    return {
        "next_tool": tool if tool in record.tool_names else None,
        "call_or_answer": ("call" if following is not None else "answer") if subs else None,
        "source_response": source,
        # not the last tool called: that alone predicts much of the next tool, and the control would then
        # measure the last call rather than the context (`fit.control_labels`)
        "control_type": f"{min(len(responses), 4)}|{record.scenario}",
    }


# ---------------------------------------------------------------------------------------------
# Tokens, regions, positions
# ---------------------------------------------------------------------------------------------
def _render(tokenizer, messages, tools, generation_prompt: bool) -> str:
    return tokenizer.apply_chat_template(
        list(messages), tools=tools or None, tokenize=False, add_generation_prompt=generation_prompt
    )


def _char_regions(text: str, record: EnvRecord) -> list[tuple[int, int, int]]:
    """(start, stop, region index) spans of the rendered conversation; the rest is 'other'. Tool calls and
    responses count only after the question: the system turn's instructions show a sample call."""
    spans = []
    documents = _SPANS["tool_documents"].search(text) if record.tools else None
    if documents is not None:
        spans.append((documents.start(), documents.end(), REGIONS.index("tool_documents")))
    question = record.question
    at = text.find(question, documents.end() if documents else 0) if question else -1
    if at >= 0:
        spans.append((at, at + len(question), REGIONS.index("question")))
    after = at + len(question) if at >= 0 else (documents.end() if documents else 0)
    for region in ("tool_calls", "tool_responses"):
        spans += [(m.start(), m.end(), REGIONS.index(region)) for m in _SPANS[region].finditer(text, after)]
    return spans


def _token_regions(offsets: Sequence[tuple[int, int]], spans: list[tuple[int, int, int]]) -> list[int]:
    other = REGIONS.index("other")
    regions = []
    for start, _ in offsets:
        regions.append(next((r for a, b, r in spans if a <= start < b), other))
    return regions


def _token_at(offsets: Sequence[tuple[int, int]], char: int) -> int:
    """The token whose span holds character `char`."""
    starts = [start for start, _ in offsets]
    return max(0, bisect.bisect_right(starts, char) - 1)


def build_trajectory(
    record: EnvRecord, messages: Sequence[dict[str, Any]], tokenizer, source: str, max_tokens: int
) -> tuple[Trajectory | None, list[dict[str, Any]], dict[str, int]]:
    """Tokenise one conversation and label its decision points and tool responses.

    Returns (trajectory or None, its rows without the trajectory index, drop counts).
    """
    dropped = {"too_long": 0, "not_a_prefix": 0, "response_tags_unmatched": 0}
    text = _render(tokenizer, messages, record.tools, generation_prompt=False)
    encoded = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True, verbose=False)
    ids, offsets = list(encoded["input_ids"]), [tuple(o) for o in encoded["offset_mapping"]]
    if len(ids) > max_tokens:
        dropped["too_long"] = 1
        return None, [], dropped
    base = {"env_id": record.env_id, "scenario": record.scenario, "source": source}
    rows: list[dict[str, Any]] = []
    decisions = []
    for index, message in enumerate(messages):
        if message.get("role") != "assistant" or index == 0:
            continue
        prompt = _render(tokenizer, messages[:index], record.tools, generation_prompt=True)
        prompt_ids = tokenizer(prompt, add_special_tokens=False, verbose=False)["input_ids"]
        if ids[: len(prompt_ids)] != list(prompt_ids):  # the template or the tokenizer broke the prefix
            dropped["not_a_prefix"] += 1
            continue
        position = len(prompt_ids) - 1
        decisions.append(position)
        labels = decision_labels(record, messages[:index])
        for task in DECISION_TASKS:
            if labels[task] is not None:
                rows.append({**base, "position": position, "task": task, "label": labels[task],
                             "control_type": labels["control_type"]})  # fmt: skip
    responses = _tool_responses(messages)
    spans = _char_regions(text, record)
    ends = sorted(stop - 1 for _, stop, region in spans if region == REGIONS.index("tool_responses"))
    if record.meta.get("subquestions") and responses:
        if len(ends) == len(responses):
            _, useful = _solve(_subquestions(record), responses)
            for index, ((name, _), end) in enumerate(zip(responses, ends, strict=True)):
                rows.append({**base, "position": _token_at(offsets, end), "task": "response_useful",
                             "label": "useful" if useful[index] else "useless",
                             "control_type": f"{name}|{min(index, 4)}"})  # fmt: skip
        else:  # a tool output that itself contains a response tag
            dropped["response_tags_unmatched"] += 1
    trajectory = Trajectory(
        record.env_id,
        record.scenario,
        source,
        ids,
        _token_regions(offsets, spans),
        decisions,
    )
    return trajectory, rows, dropped


def build_dataset(
    conversations: Sequence[tuple[EnvRecord, Sequence[dict[str, Any]], str]],
    tokenizer,
    max_tokens: int = 4096,
) -> ProbingDataset:
    """A ProbingDataset from (record, conversation, source) triples."""
    trajectories: list[Trajectory] = []
    rows: list[dict[str, Any]] = []
    dropped: dict[str, int] = {}
    for record, messages, source in conversations:
        trajectory, its_rows, its_dropped = build_trajectory(record, messages, tokenizer, source, max_tokens)
        for key, count in its_dropped.items():
            dropped[key] = dropped.get(key, 0) + count
        if trajectory is None:
            continue
        rows += [{"trajectory": len(trajectories), **row} for row in its_rows]
        trajectories.append(trajectory)
    columns = ["trajectory", "position", "env_id", "scenario", "source", "task", "label", "control_type"]
    return ProbingDataset(trajectories, pd.DataFrame(rows, columns=columns), dropped)


# ---------------------------------------------------------------------------------------------
# Where the conversations come from
# ---------------------------------------------------------------------------------------------
def oracle_conversations_for(
    records: Sequence[EnvRecord], sandbox, seed: int, correction_prob: float
) -> list[tuple[EnvRecord, list[dict[str, Any]], str]]:
    """Golden trajectories with real tool output; `correction_prob` of them hold a failed call (a useless
    response) before its correction. Records without golden calls are skipped."""
    from toolrl_analysis.envs.oracle import oracle_conversations

    usable = [r for r in records if r.meta.get("golden_turns")]
    conversations = oracle_conversations(usable, sandbox, random.Random(seed), correction_prob)
    return [(r, m, "oracle") for r, m in zip(usable, conversations, strict=True)]


def rollout_conversations(
    model,
    tokenizer,
    records: Sequence[EnvRecord],
    sandbox,
    name: str,
    *,
    max_turns: int,
    max_new_tokens: int,
    on_turn: Callable | None = None,
    batch_size: int = 32,
    thinking: bool | None = None,
) -> list[tuple[EnvRecord, list[dict[str, Any]], str]]:
    """The policy's own greedy episodes, as conversations."""
    from toolrl_analysis.rollout import ModelPolicy, run_episodes

    policy = ModelPolicy(
        model,
        tokenizer,
        max_new_tokens=max_new_tokens,
        temperature=0.0,
        batch_size=batch_size,
        thinking=thinking,
    )
    with attention_implementation(model, "sdpa"):  # generation needs no attention weights
        episodes = run_episodes(policy, records, sandbox, max_turns=max_turns, on_turn=on_turn)
    return [(e.record, e.messages, f"rollout:{name}") for e in episodes]
