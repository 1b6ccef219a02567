"""The context-reading meter: teacher-forced NLL per token role of oracle trajectories, with the context
swapped out as a control.

A policy that reads its context writes the tool name, the arguments and the final answer *because of* the
question and the tool responses. So we score each assistant token of an oracle trajectory twice: once in its
own conversation, and once with the question and the tool responses taken from another environment (the
system prompt with the tool list, and the assistant turns themselves, stay). The gap between the two, per
role, is how much the model uses its context for that kind of token. A model that ignores its input has a gap
of about 0 everywhere; one that copies the entity name from the question has a large gap on
`value_from_question`.

Roles of assistant tokens (`ROLES`):
  format               JSON punctuation, tags, `<|im_end|>`, "The answer is"
  tool_kind            the first segment of the tool name (`organisation` in `organisation_founding_year`)
  tool_relation        the rest of the tool name (`founding_year`)
  arg_key              an argument key (`organisation`, `field`)
  value_from_question  an argument value (a leaf string) that occurs in the question
  value_from_response  an argument value that occurs in an earlier tool response but not in the question
  value_other          any other argument value (an enum such as `field`, a number of results)
  answer_from_response the final answer, where it occurs in a tool response
  answer_other         a final answer computed from the responses (a sum, a difference)

It works on any chat model whose template writes tool calls as Qwen's `{"name": ..., "arguments": ...}` JSON
(ours, Qwen2.5, Qwen3): assistant turns are found with the template's generation mask where it has one, else
between `<|im_start|>assistant\\n` and `<|im_end|>`.
"""

from __future__ import annotations

import json
import math
import random
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import pandas as pd
import torch

from toolrl_analysis.envs.schema import EnvRecord
from toolrl_analysis.errors import ConfigError
from toolrl_analysis.models.placement import input_device

ROLES = (
    "format",
    "tool_kind",
    "tool_relation",
    "arg_key",
    "value_from_question",
    "value_from_response",
    "value_other",
    "answer_from_response",
    "answer_other",
)
# The roles whose tokens should depend on the context (the meter's one-line summary averages these).
CONTEXT_ROLES = (
    "tool_kind",
    "tool_relation",
    "value_from_question",
    "value_from_response",
    "answer_from_response",
)
CONTEXTS = ("real", "replaced")
_ASSISTANT_OPEN = "<|im_start|>assistant\n"
_TURN_END = "<|im_end|>"


# =============================================================================================
# Labelling
# =============================================================================================
@dataclass
class LabelledExample:
    """One conversation as the model sees it: token ids, and a role (or None) for every token."""

    ids: list[int]
    roles: list[str | None]  # None outside assistant turns

    @property
    def targets(self) -> list[tuple[int, str]]:
        """(position, role) of every assistant token."""
        return [(i, r) for i, r in enumerate(self.roles) if r is not None]


def _norm(text: str) -> str:
    return " ".join(str(text).lower().split())


def _leaves(value: Any) -> list[str]:
    """Leaf values of a JSON argument, as the strings that stand for them in the rendered call."""
    if isinstance(value, dict):
        return [leaf for v in value.values() for leaf in _leaves(v)]
    if isinstance(value, list):
        return [leaf for v in value for leaf in _leaves(v)]
    return [value if isinstance(value, str) else json.dumps(value)]


def _keys(value: Any) -> list[str]:
    if isinstance(value, dict):
        return [k for k, v in value.items() for k in [k, *_keys(v)]]
    if isinstance(value, list):
        return [k for v in value for k in _keys(v)]
    return []


def _question(messages: Sequence[dict[str, Any]]) -> str:
    return next((str(m.get("content") or "") for m in messages if m.get("role") == "user"), "")


def _assistant_spans(
    text: str, mask: Sequence[int] | None, offsets: Sequence[tuple[int, int]]
) -> list[tuple]:
    """Character spans of the assistant turns, in order."""
    spans: list[tuple[int, int]] = []
    if mask is not None and any(mask):
        start = None
        for index, flag in enumerate([*mask, 0]):
            if flag and start is None:
                start = offsets[index][0]
            if not flag and start is not None:
                spans.append((start, offsets[index - 1][1]))
                start = None
        return spans
    at = text.find(_ASSISTANT_OPEN)
    while at >= 0:
        begin = at + len(_ASSISTANT_OPEN)
        end = text.find(_TURN_END, begin)
        end = len(text) if end < 0 else end + len(_TURN_END)
        spans.append((begin, end))
        at = text.find(_ASSISTANT_OPEN, end)
    return spans


def _call_spans(turn: str, base: int, calls: Sequence[dict[str, Any]], context: dict) -> list[tuple]:
    """(start, end, role) spans of one assistant turn's calls, found in order in the rendered turn."""
    spans: list[tuple[int, int, str]] = []
    cursor = 0
    for call in calls:
        function = call.get("function", call)
        name, arguments = str(function.get("name", "")), function.get("arguments") or {}
        if isinstance(arguments, str):
            try:
                arguments = json.loads(arguments)
            except json.JSONDecodeError:
                arguments = {}
        at = turn.find(json.dumps(name), cursor)
        if at < 0:
            continue
        begin = at + 1
        kind, sep, _ = name.partition("_")
        spans.append((base + begin, base + begin + len(kind), "tool_kind"))
        if sep:
            spans.append((base + begin + len(kind), base + begin + len(name), "tool_relation"))
        cursor = begin + len(name)
        for key in _keys(arguments):
            at = turn.find(json.dumps(key) + ":", cursor)
            if at >= 0:
                spans.append((base + at + 1, base + at + 1 + len(key), "arg_key"))
        for leaf in _leaves(arguments):
            written = json.dumps(leaf)[1:-1] if isinstance(leaf, str) else leaf
            at = turn.find(written, cursor)
            if at < 0:
                continue
            spans.append((base + at, base + at + len(written), _value_role(leaf, context)))
            cursor = at + len(written)
    return spans


def _value_role(leaf: str, context: dict) -> str:
    value = _norm(leaf)
    if len(value) >= 2 and value in context["question"]:
        return "value_from_question"
    if len(value) >= 2 and any(value in r for r in context["responses"]):
        return "value_from_response"
    return "value_other"


def _answer_spans(turn: str, base: int, answer: str | None, context: dict) -> list[tuple]:
    at = turn.lower().find(str(answer).lower()) if answer else -1
    if at < 0:
        return []
    role = "answer_from_response" if any(_norm(answer) in r for r in context["responses"]) else "answer_other"
    return [(base + at, base + at + len(str(answer)), role)]


def label_roles(
    tokenizer, messages: Sequence[dict[str, Any]], tools=None, answer: str | None = None
) -> LabelledExample:
    """Token ids of the rendered conversation and the role of each assistant token.

    The role of a token is that of the labelled span it lies in wholly; a token that straddles a span's edge
    (`"}}` after a value) is format. `answer` is the gold final answer, looked for in the last assistant turn.
    """
    text = tokenizer.apply_chat_template(list(messages), tools=tools, tokenize=False)
    encoded = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    ids, offsets = list(encoded["input_ids"]), [tuple(o) for o in encoded["offset_mapping"]]
    try:
        rendered = tokenizer.apply_chat_template(
            list(messages), tools=tools, tokenize=True, return_dict=True, return_assistant_tokens_mask=True
        )
        mask = list(rendered["assistant_masks"]) if list(rendered["input_ids"]) == ids else None
    except (ValueError, TypeError, KeyError):  # templates without {% generation %}
        mask = None
    spans = _assistant_spans(text, mask, offsets)
    context = {"question": _norm(_question(messages)), "responses": []}
    labelled: list[tuple[int, int, str]] = []
    responses: list[str] = []
    turns = iter(spans)
    last_assistant = max((i for i, m in enumerate(messages) if m.get("role") == "assistant"), default=-1)
    for position, message in enumerate(messages):  # in order, so "earlier response" means earlier
        if message.get("role") == "tool":
            responses.append(_norm(message.get("content") or ""))
            continue
        if message.get("role") != "assistant":
            continue
        span = next(turns, None)
        if span is None:
            break
        start, end = span
        context["responses"] = list(responses)
        calls = message.get("tool_calls") or []
        if calls:
            labelled.extend(_call_spans(text[start:end], start, calls, context))
        elif position == last_assistant:
            labelled.extend(_answer_spans(text[start:end], start, answer, context))
    roles: list[str | None] = []
    for token_start, token_end in offsets:
        inside = next((s for s in spans if s[0] <= token_start and token_end <= s[1]), None)
        if inside is None or token_end <= token_start:
            roles.append(None)
            continue
        role = next((r for s, e, r in labelled if s <= token_start and token_end <= e), "format")
        roles.append(role)
    return LabelledExample(ids=ids, roles=roles)


# =============================================================================================
# The control: the same assistant turns in another environment's context
# =============================================================================================
def replace_context(
    messages: Sequence[dict[str, Any]], donor: Sequence[dict[str, Any]]
) -> list[dict[str, Any]]:
    """`messages` with its question and tool responses taken from `donor` (responses cycle when the donor
    has fewer). The system prompt, the tool list and the assistant turns are kept."""
    donor_question = _question(donor)
    donor_responses = [m for m in donor if m.get("role") == "tool"] or [{"role": "tool", "content": ""}]
    out, replies = [], 0
    question_done = False
    for message in messages:
        message = dict(message)
        if message.get("role") == "user" and not question_done:
            message["content"], question_done = donor_question, True
        elif message.get("role") == "tool":
            message["content"] = donor_responses[replies % len(donor_responses)].get("content", "")
            replies += 1
        out.append(message)
    return out


def donor_order(records: Sequence[EnvRecord], seed: int = 0) -> list[int]:
    """For each record, the index of another record to take the context from: a seeded derangement within
    the same scenario where it has two or more records, otherwise across the whole set."""
    rng = random.Random(f"context-donors/{seed}")
    by_scenario: dict[str, list[int]] = {}
    for index, record in enumerate(records):
        by_scenario.setdefault(record.scenario, []).append(index)
    donors = list(range(len(records)))
    leftovers: list[int] = []
    for group in by_scenario.values():
        if len(group) < 2:
            leftovers.extend(group)
            continue
        shuffled = group[:]
        rng.shuffle(shuffled)
        for a, b in zip(shuffled, shuffled[1:] + shuffled[:1], strict=True):
            donors[a] = b
    for index in leftovers:
        donors[index] = (index + 1) % len(records) if len(records) > 1 else index
    return donors


# =============================================================================================
# Scoring
# =============================================================================================
def batches(examples: Sequence[LabelledExample], batch_tokens: int) -> list[list[int]]:
    """Indices of `examples`, shortest first, in batches of at most `batch_tokens` padded tokens (a longer
    example gets a batch of its own)."""
    order = sorted(range(len(examples)), key=lambda i: len(examples[i].ids))
    out: list[list[int]] = []
    for index in order:
        if out and len(examples[index].ids) * (len(out[-1]) + 1) <= batch_tokens:
            out[-1].append(index)
        else:
            out.append([index])
    return out


@torch.no_grad()
def target_logits(model, chunk: Sequence[LabelledExample]) -> list[tuple[torch.Tensor, torch.Tensor] | None]:
    """Per example of one batch: (logits [n, V] in float32 that predict its labelled tokens, the n target
    ids), or None when it has no labelled token after the first position."""
    device = input_device(model)
    pad = int(getattr(model.config, "pad_token_id", None) or 0)
    width = max(len(e.ids) for e in chunk)
    ids = torch.full((len(chunk), width), pad, dtype=torch.long, device=device)
    mask = torch.zeros_like(ids)
    for row, example in enumerate(chunk):
        ids[row, : len(example.ids)] = torch.tensor(example.ids)
        mask[row, : len(example.ids)] = 1
    was_training = model.training
    model.eval()
    try:
        hidden, head = _final_states(model, ids, mask)
        out: list[tuple[torch.Tensor, torch.Tensor] | None] = []
        for row, example in enumerate(chunk):
            positions = [p for p, _ in example.targets if p > 0]
            if not positions:
                out.append(None)
                continue
            at = torch.tensor(positions, device=hidden.device)  # the last block's device (device_map="auto")
            logits = head(hidden[row, at - 1]).float()  # token p is predicted at p-1
            out.append((logits, ids[row, at.to(device)].to(logits.device)))
        return out
    finally:
        model.train(was_training)


@torch.no_grad()
def token_nlls(model, examples: Sequence[LabelledExample], batch_tokens: int = 16384) -> list[list[float]]:
    """NLL and greedy-correctness of every labelled token of every example: [(nll, top1), ...] per example,
    in the order of `example.targets`."""
    results: list[list[tuple[float, bool]]] = [[] for _ in examples]
    for batch in batches(examples, batch_tokens):
        for index, found in zip(batch, target_logits(model, [examples[i] for i in batch]), strict=True):
            if found is None:
                continue
            logits, targets = found
            nll = torch.nn.functional.cross_entropy(logits, targets, reduction="none")
            results[index] = list(zip(nll.tolist(), (logits.argmax(-1) == targets).tolist(), strict=True))
    return results


def _final_states(model, ids: torch.Tensor, mask: torch.Tensor):
    """(states, head): the last hidden states and the function from them to logits. The head runs only at
    the positions scored (a vocabulary-wide projection of every position cost a quarter of the time); a
    model without a separate decoder and head gives its logits, and the identity."""
    decoder, head = getattr(model, "get_decoder", None), getattr(model, "get_output_embeddings", None)
    decoder, head = decoder() if decoder else None, head() if head else None
    if decoder is None or head is None or getattr(model.config, "final_logit_softcapping", None):
        return model(input_ids=ids, attention_mask=mask).logits, lambda logits: logits
    states = decoder(input_ids=ids, attention_mask=mask).last_hidden_state
    scale = getattr(model.config, "logit_scale", None)  # Cohere-style scaled logits
    return states, (lambda h: head(h) * scale) if scale else head


@dataclass
class MeterSet:
    """The labelled held-out trajectories, real and with their context replaced, ready to score."""

    real: list[LabelledExample]
    replaced: list[LabelledExample]
    scenarios: list[str]


def build_meter_set(tokenizer, records: Sequence[EnvRecord], conversations, seed: int = 0) -> MeterSet:
    """Label each oracle conversation, and its copy in a donor's context (`donor_order`)."""
    if not records:
        raise ConfigError(
            "the context-reading meter needs environments with golden calls (meta.golden_turns)"
        )
    donors = donor_order(records, seed)
    real, replaced = [], []
    for index, (record, messages) in enumerate(zip(records, conversations, strict=True)):
        labelled = label_roles(tokenizer, messages, record.tools, record.answer)
        swapped = label_roles(
            tokenizer, replace_context(messages, conversations[donors[index]]), record.tools, record.answer
        )
        # The assistant turns are the same text in both, so their tokens line up one to one.
        if [labelled.ids[p] for p, _ in labelled.targets] != [swapped.ids[p] for p, _ in swapped.targets]:
            raise ConfigError(
                f"environment {record.env_id or index}: the assistant tokens change with the context; "
                "this chat template cannot be metered"
            )
        swapped.roles = _transfer_roles(labelled, swapped)
        real.append(labelled)
        replaced.append(swapped)
    return MeterSet(real=real, replaced=replaced, scenarios=[r.scenario for r in records])


def _transfer_roles(source: LabelledExample, target: LabelledExample) -> list[str | None]:
    """The real conversation's roles on the replaced one's assistant tokens (the question decides what
    counts as copied, and that is the real question)."""
    roles: list[str | None] = [None] * len(target.ids)
    for (_, role), (position, _) in zip(source.targets, target.targets, strict=True):
        roles[position] = role
    return roles


def role_sums(example: LabelledExample, values: Sequence[tuple[float, bool]]) -> list[dict[str, Any]]:
    """One example's `token_nlls` summed per role: `role`, `nll_sum`, `top1_sum`, `tokens` (roles it has)."""
    per_role: dict[str, list[tuple[float, bool]]] = {}
    for (_, role), value in zip([t for t in example.targets if t[0] > 0], values, strict=True):
        per_role.setdefault(role, []).append(value)
    return [
        {
            "role": role,
            "nll_sum": sum(v[0] for v in role_values),
            "top1_sum": float(sum(v[1] for v in role_values)),
            "tokens": len(role_values),
        }
        for role, role_values in per_role.items()
    ]


def meter_values(model, meter_set: MeterSet, batch_tokens: int = 16384) -> pd.DataFrame:
    """The meter's raw sums, one row per example x context x role (roles the example has): `example`,
    `context`, `role`, `nll_sum`, `top1_sum`, `tokens`. Sums, so that a bootstrap over environments can
    resample examples and still weight every token alike."""
    rows = []
    for context, examples in (("real", meter_set.real), ("replaced", meter_set.replaced)):
        scored = token_nlls(model, examples, batch_tokens)
        for index, (example, values) in enumerate(zip(examples, scored, strict=True)):
            rows += [{"example": index, "context": context, **sums} for sums in role_sums(example, values)]
    return pd.DataFrame(rows, columns=["example", "context", "role", "nll_sum", "top1_sum", "tokens"])


def frame_from_values(values: pd.DataFrame) -> pd.DataFrame:
    """`meter_frame`'s table from `meter_values`' sums (a subset of examples gives that subset's table)."""
    rows = []
    for context in CONTEXTS:
        of_context = values[values["context"] == context]
        for role in (*ROLES, "all"):
            chosen = of_context if role == "all" else of_context[of_context["role"] == role]
            tokens = int(chosen["tokens"].sum())
            rows.append(
                {
                    "role": role,
                    "context": context,
                    "nll": float(chosen["nll_sum"].sum()) / tokens if tokens else math.nan,
                    "top1": float(chosen["top1_sum"].sum()) / tokens if tokens else math.nan,
                    "tokens": tokens,
                }
            )
    return pd.DataFrame(rows, columns=["role", "context", "nll", "top1", "tokens"])


def meter_frame(model, meter_set: MeterSet, batch_tokens: int = 16384) -> pd.DataFrame:
    """Tidy table: one row per role x context with `nll`, `top1`, `tokens`; the overall rows are `role='all'`."""
    return frame_from_values(meter_values(model, meter_set, batch_tokens))


def role_table(frame: pd.DataFrame) -> pd.DataFrame:
    """Wide view of `meter_frame`: one row per role with real and replaced NLL / top-1 and the gap
    (replaced − real NLL: how many nats the context is worth on that role)."""
    wide = frame.pivot_table(index="role", columns="context", values=["nll", "top1"], sort=False)
    wide.columns = [f"{metric}_{context}" for metric, context in wide.columns]
    tokens = frame[frame["context"] == "real"].set_index("role")["tokens"]
    out = wide.reindex([r for r in (*ROLES, "all") if r in wide.index]).reset_index()
    out["tokens"] = out["role"].map(tokens).fillna(0).astype(int)
    out["gap"] = out["nll_replaced"] - out["nll_real"]
    return out[["role", "tokens", "nll_real", "nll_replaced", "gap", "top1_real", "top1_replaced"]]


def context_gap(frame: pd.DataFrame, roles: Sequence[str] = CONTEXT_ROLES) -> float:
    """One number: the token-weighted mean gap over the roles that should depend on the context."""
    table = role_table(frame)
    table = table[table["role"].isin(roles) & (table["tokens"] > 0)]
    if table.empty:
        return math.nan
    return float((table["gap"] * table["tokens"]).sum() / table["tokens"].sum())


def oracle_meter_set(
    tokenizer, records: Sequence[EnvRecord], sandbox, seed: int = 0
) -> tuple[MeterSet, list[int]] | None:
    """The meter set of the records that have golden calls, and their indices in `records` (None if none
    has). Build it once to meter several models on the same trajectories."""
    from toolrl_analysis.envs.oracle import oracle_conversations

    indices = [i for i, r in enumerate(records) if r.meta.get("golden_turns")]
    if not indices:
        return None
    labelled = [records[i] for i in indices]
    conversations = oracle_conversations(labelled, sandbox, random.Random(f"meter/{seed}"))
    return build_meter_set(tokenizer, labelled, conversations, seed), indices


def measure_roles(
    model, tokenizer, records: Sequence[EnvRecord], sandbox, seed: int = 0
) -> pd.DataFrame | None:
    """`meter_frame` on the oracle trajectories of the records that have golden calls (None if none has)."""
    built = oracle_meter_set(tokenizer, records, sandbox, seed)
    return None if built is None else meter_frame(model, built[0])
