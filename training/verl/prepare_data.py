"""Put each row's tool schemas into its verl prompt, rendered by the policy's own chat template.

Why: verl's RLHFDataset renders the `prompt` column with `tokenizer.apply_chat_template(prompt,
add_generation_prompt=True)`, without `tools=`, so the per-row schemas that `toolrl-analyze envs export
--format verl` keeps in `extra_info.tools` would never reach the model. (FTRL patched verl's dataset to pass
`tools=`; we leave verl as it is.) For each row this script renders the prompt *with* its tools, then rewrites
the prompt so that the same template *without* tools gives that text character for character: the system
turn takes the template's own tool section, and earlier assistant tool calls are written into their turn's
text the way Qwen's templates write them. Every row is re-rendered and compared; a template that puts tools
anywhere but the system turn (or writes calls differently) is refused, never silently changed.

Input: the parquet written by `envs export --format verl`, or an EnvSet directory / JSONL file. Use the
latter for per-step states that carry history: the parquet keeps only role and content of each message, so
the tool calls of earlier assistant turns are gone from it.

    python training/verl/prepare_data.py train.parquet --tokenizer Qwen/Qwen2.5-7B-Instruct --out prepared.parquet
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from toolrl_analysis.envs.ftrl_io import verl_environment, verl_message
from toolrl_analysis.errors import UserError

# render(messages, tools) -> the prompt text, as apply_chat_template(..., add_generation_prompt=True) gives it
Render = Callable[[list[dict[str, Any]], list[dict[str, Any]] | None], str]

PREPARED_FLAG = "tools_in_prompt"  # set in extra_info, so a prepared file is left as it is
_SLOT = "<<toolrl-system-slot>>"


def _has_string_arguments(messages: Sequence[dict[str, Any]]) -> bool:
    return any(
        isinstance(call.get("function", call).get("arguments"), str)
        for message in messages
        for call in message.get("tool_calls") or []
    )


def prompt_with_tools(
    messages: Sequence[dict[str, Any]], tools: list[dict[str, Any]] | None, render: Render
) -> list[dict[str, str]]:
    """Messages that render without `tools` exactly as `messages` render with them."""
    render = _reporting(render)
    target = render(list(messages), tools or None)
    # Templates differ on JSON-string arguments (parsed, or dumped as a string): try both, keep the exact one.
    encodings = (True, False) if _has_string_arguments(messages) else (True,)
    for parse_string_arguments in encodings:
        flat = [verl_message(m, parse_string_arguments) for m in messages]
        rest = flat[1:] if flat and flat[0]["role"] == "system" else flat
        # Where the system text goes: render once with a marker in its place.
        probe = render([{"role": "system", "content": _SLOT}, *rest], None)
        if probe.count(_SLOT) != 1:
            raise UserError("the chat template does not write the system message once, as given")
        head, tail = probe.split(_SLOT)
        if target.startswith(head) and target.endswith(tail) and len(target) >= len(head) + len(tail):
            prepared = [{"role": "system", "content": target[len(head) : len(target) - len(tail)]}, *rest]
            if render(prepared, None) == target:
                return prepared
    raise UserError(
        "the chat template does not list tools in the system turn (or writes tool calls differently); "
        "these prompts cannot carry their tools through verl's plain RLHFDataset"
    )


def _reporting(render: Render) -> Render:
    """A template that raises (e.g. on several calls in one turn) is a user-facing refusal, not a traceback."""

    def checked(messages: list[dict[str, Any]], tools: list[dict[str, Any]] | None) -> str:
        try:
            return render(messages, tools)
        except Exception as exc:  # jinja2 TemplateError, or anything a template's raise_exception sends
            raise UserError(f"the chat template failed: {exc}") from None

    return checked


def _empty_assistant_turns(messages: Sequence[dict[str, Any]]) -> bool:
    return any(
        m.get("role") == "assistant" and not m.get("content") and not m.get("tool_calls") for m in messages
    )


def load_rows(source: str | Path) -> tuple[list[dict[str, Any]], list[list[dict[str, Any]]]]:
    """verl rows and, per row, the conversation to render (with tool calls when the source still has them)."""
    source = Path(source)
    if source.suffix == ".parquet":
        import pyarrow.parquet as pq

        if not source.is_file():
            raise UserError(f"no such file: {source}")
        rows = pq.read_table(source).to_pylist()
        for column in ("prompt", "data_source", "reward_model", "extra_info"):
            if rows and column not in rows[0]:
                raise UserError(f"{source} has no '{column}' column; write it with envs export --format verl")
        return rows, [row["prompt"] for row in rows]
    from toolrl_analysis.envs.ftrl_io import load_source, verl_rows

    records = load_source(source)
    return verl_rows(records), [record.messages for record in records]


def prepare_rows(
    rows: list[dict[str, Any]], conversations: list[list[dict[str, Any]]], render: Render
) -> dict[str, int]:
    """Rewrite each row's prompt in place; returns counts for the summary line."""
    counts = {"rows": len(rows), "prepared": 0, "already": 0, "empty_assistant_turns": 0}
    for index, (row, conversation) in enumerate(zip(rows, conversations, strict=True)):
        # Every row's environment must be readable by the reward function; a bad one stops here, named.
        info = row.get("extra_info")
        tools = verl_environment(row.get("data_source", ""), "", info, row=index).tools
        if info.get(PREPARED_FLAG):
            counts["already"] += 1
            continue
        try:
            row["prompt"] = prompt_with_tools(conversation, tools, render)
        except UserError as exc:
            raise UserError(f"row {index}: {exc}") from None
        row["extra_info"] = {**info, PREPARED_FLAG: True}
        counts["prepared"] += 1
        counts["empty_assistant_turns"] += _empty_assistant_turns(conversation)
    return counts


def tokenizer_render(path: str) -> Render:
    """The policy tokenizer's chat template, as verl will apply it (generation prompt added)."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(path)
    if not getattr(tokenizer, "chat_template", None):
        raise UserError(f"the tokenizer at {path} has no chat template")

    def render(messages: list[dict[str, Any]], tools: list[dict[str, Any]] | None) -> str:
        return tokenizer.apply_chat_template(
            messages, tools=tools, add_generation_prompt=True, tokenize=False
        )

    return render


def write_rows(rows: list[dict[str, Any]], out: str | Path) -> Path:
    import pyarrow as pa
    import pyarrow.parquet as pq

    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pylist(rows), out)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("source", help="verl parquet from envs export, or an EnvSet directory / .jsonl")
    parser.add_argument("--tokenizer", required=True, help="the policy's tokenizer (HF directory or hub id)")
    parser.add_argument("--out", required=True, help="the parquet verl will train on")
    args = parser.parse_args(argv)
    try:
        rows, conversations = load_rows(args.source)
        if not rows:
            raise UserError(f"{args.source} holds no rows")
        counts = prepare_rows(rows, conversations, tokenizer_render(args.tokenizer))
        out = write_rows(rows, args.out)
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"{counts['prepared']} prompts now carry their tools ({counts['already']} already did) -> {out}")
    if counts["empty_assistant_turns"]:
        print(
            f"warning: {counts['empty_assistant_turns']} prompts hold assistant turns with no text; if they were "
            "tool calls, the parquet export dropped them: prepare from the EnvSet JSONL instead",
            file=sys.stderr,
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
