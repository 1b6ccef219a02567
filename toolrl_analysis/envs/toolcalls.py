"""Qwen-style tool calls in assistant text: parse (never raises) and format.

The assistant writes `<tool_call>{"name": ..., "arguments": {...}}</tool_call>` blocks. Parsing follows FTRL's
`parse_qwen`: the content is the text before the first `<tool_call>`; the rest is split on `</tool_call>`, each
chunk that starts with `<tool_call>` holds one JSON call, and chunks that fail to parse are skipped. When no call
parses, the content is the whole text. Differences, all on inputs FTRL would mishandle: a call must have a string
name and an object of arguments (FTRL accepted e.g. a list and failed later, at the call), and we report whether
any markup failed to parse (`malformed`).

Llama 3.1 writes a tool call as the whole turn, a JSON object `{"name": ..., "parameters": {...}}` (its
JSON-based tool calling), optionally after `<|python_tag|>`, ending with `<|eot_id|>` or `<|eom_id|>`; several
calls come as a JSON list or separated by `;`. A turn without `<tool_call>` is read that way when it starts
with `<|python_tag|>` or its JSON uses `parameters`: a bare object with `arguments` stays text, as FTRL reads
Qwen turns.

Qwen3 may reason first, in a `<think>...</think>` block (or after a `<think>` its template already wrote into
the prompt, so the turn holds only `...</think>`). The reasoning is set apart before parsing: a call mentioned
while thinking is not a call, and the content is what follows the block. A block that never closes (the
token budget ran out) leaves no content. A stray `</think>` after a tool call is not reasoning: the turn is
parsed whole, as any other.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

TOOL_CALL_OPEN = "<tool_call>"
TOOL_CALL_CLOSE = "</tool_call>"
TOOL_RESPONSE_OPEN = "<tool_response>"
END_OF_TURN_TOKENS = ("<|endoftext|>", "<|im_end|>", "<|eot_id|>", "<|eom_id|>")
THINK_OPEN, THINK_CLOSE = "<think>", "</think>"
PYTHON_TAG = "<|python_tag|>"  # Llama 3.1: what follows is a tool call
LLAMA_KEYS = ("parameters", "arguments")


@dataclass
class ToolCall:
    name: str
    arguments: dict[str, Any] = field(default_factory=dict)


@dataclass
class ParsedTurn:
    content: str  # text before the first call; the whole text when no call parsed
    calls: list[ToolCall] = field(default_factory=list)
    malformed: bool = False  # tool-call markup present, but a block failed to parse or none did
    reasoning: str = ""  # a Qwen3 thinking block, set apart (never parsed for calls)


def strip_end_of_turn(text: str) -> str:
    """Remove trailing end-of-turn tokens and whitespace, as FTRL's reward does before parsing."""
    text = text.strip()
    while text.endswith(END_OF_TURN_TOKENS):
        for token in END_OF_TURN_TOKENS:
            text = text.removesuffix(token).strip()
    return text


def parse_tool_calls(text: str) -> ParsedTurn:
    """Split one assistant turn into content and tool calls. Never raises, whatever the input."""
    reasoning, text = split_reasoning(strip_end_of_turn(_as_text(text)))
    parsed = _parse_calls(text)
    parsed.reasoning = reasoning
    return parsed


def split_reasoning(text: str) -> tuple[str, str]:
    """(reasoning, the rest) of a turn that opens with a thinking block; ("", text) for any other turn."""
    stripped = text.lstrip()
    opened = stripped.startswith(THINK_OPEN)
    body = stripped[len(THINK_OPEN) :] if opened else stripped
    end = body.find(THINK_CLOSE)
    if end == -1:
        return (body.strip(), "") if opened else ("", text)
    if not opened and (THINK_OPEN in body[:end] or TOOL_CALL_OPEN in body[:end]):
        # a block that starts mid-turn is not reasoning the template opened, and a call is never reasoning
        return "", text
    return body[:end].strip(), body[end + len(THINK_CLOSE) :].strip()


def _parse_calls(text: str) -> ParsedTurn:
    start = text.find(TOOL_CALL_OPEN)
    if start == -1:
        llama = _llama_calls(text)
        if llama is not None:
            return llama
        has_markup = TOOL_CALL_CLOSE in text or TOOL_RESPONSE_OPEN in text
        return ParsedTurn(content=text, calls=[], malformed=has_markup)
    calls: list[ToolCall] = []
    failed = False
    for chunk in text[start:].split(TOOL_CALL_CLOSE):
        chunk = chunk.strip()
        if not chunk:
            continue
        if not chunk.startswith(TOOL_CALL_OPEN):
            # Text between or after calls; FTRL skips the chunk, and with it any call it contains.
            failed = failed or TOOL_CALL_OPEN in chunk
            continue
        call = _decode_call(chunk[len(TOOL_CALL_OPEN) :].strip())
        if call is None:
            failed = True
        else:
            calls.append(call)
    if not calls:
        return ParsedTurn(content=text, calls=[], malformed=True)
    return ParsedTurn(content=text[:start].strip(), calls=calls, malformed=failed)


def format_tool_calls(calls: list[ToolCall]) -> str:
    """The assistant text for `calls`, exactly as Qwen2.5's chat template renders an assistant's tool_calls."""
    return "\n".join(
        f"{TOOL_CALL_OPEN}\n{json.dumps({'name': c.name, 'arguments': c.arguments}, ensure_ascii=False)}\n"
        f"{TOOL_CALL_CLOSE}"
        for c in calls
    )


def _llama_calls(text: str) -> ParsedTurn | None:
    """A Llama 3.1 tool-call turn (see the module docstring), or None when the turn is not one."""
    tagged = text.startswith(PYTHON_TAG)
    body = text.removeprefix(PYTHON_TAG).strip()
    if not (tagged or (body.startswith(("{", "[")) and '"parameters"' in body)):
        return None
    try:
        data = json.loads(body)
        items = data if isinstance(data, list) else [data]
    except (ValueError, RecursionError, MemoryError):
        items = [part for part in body.split(";") if part.strip()]  # `{...}; {...}`
    calls = [
        _as_call(item, LLAMA_KEYS) if isinstance(item, dict) else _decode_call(item.strip(), LLAMA_KEYS)
        for item in items
    ]
    if not calls or None in calls:
        return ParsedTurn(content=text, calls=[], malformed=True)
    return ParsedTurn(content="", calls=[c for c in calls if c is not None])


def _decode_call(body: str, keys: tuple[str, ...] = ("arguments",)) -> ToolCall | None:
    try:
        data = json.loads(body)
    except (ValueError, RecursionError, MemoryError):  # JSONDecodeError, int digit limit, deep nesting
        return None
    return _as_call(data, keys) if isinstance(data, dict) else None


def _as_call(data: dict, keys: tuple[str, ...] = ("arguments",)) -> ToolCall | None:
    """A call from its JSON object, its arguments under the first of `keys` it has (`arguments` inside
    `<tool_call>`, as FTRL reads it; Llama 3.1 also writes `parameters`), maybe as a JSON string."""
    key = next((k for k in keys if k in data), None)
    if key is None:
        return None
    name, arguments = data.get("name"), data[key]
    if isinstance(arguments, str):  # some models write the arguments as a JSON string
        try:
            arguments = json.loads(arguments)
        except (ValueError, RecursionError, MemoryError):
            return None
    if not isinstance(name, str) or not name or not isinstance(arguments, dict):
        return None
    return ToolCall(name=name, arguments=arguments)


def _as_text(text: Any) -> str:
    if isinstance(text, str):
        return text
    if isinstance(text, bytes | bytearray):
        return bytes(text).decode("utf-8", errors="replace")
    return "" if text is None else str(text)
