"""The embedded policy's chat template: Qwen2.5's turn and tool-call format with a compact tool listing.

The template lives in `chat_template.jinja` next to this file and is attached to the tokenizer, so callers use
`tokenizer.apply_chat_template(messages, tools=record.tools, add_generation_prompt=True, tokenize=False)` exactly
as they would with a real Qwen checkpoint. `render_chat` renders the same text without a tokenizer (the
tokenizer's own training corpus is rendered before the tokenizer exists).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

TEMPLATE_PATH = Path(__file__).with_name("chat_template.jinja")
CHAT_TEMPLATE = TEMPLATE_PATH.read_text(encoding="utf-8")

IM_START = "<|im_start|>"
IM_END = "<|im_end|>"
END_OF_TEXT = "<|endoftext|>"
TOOL_TAGS = ("<tool_call>", "</tool_call>", "<tool_response>", "</tool_response>")
# What follows the prompt when the model is asked to speak: its reply starts right after this.
ASSISTANT_PREFIX = f"{IM_START}assistant\n"


def render_chat(
    messages: Sequence[dict[str, Any]],
    tools: Sequence[dict[str, Any]] | None = None,
    add_generation_prompt: bool = False,
    chat_template: str = CHAT_TEMPLATE,
) -> str:
    """Render like `tokenizer.apply_chat_template(..., tokenize=False)`, through the same Jinja machinery."""
    from transformers.utils.chat_template_utils import render_jinja_template

    # apply_chat_template drops None-valued keys (OpenAI's content=None beside tool_calls); do the same.
    conversation = [{k: v for k, v in message.items() if v is not None} for message in messages]
    rendered, _ = render_jinja_template(
        conversations=[conversation],
        tools=list(tools) if tools is not None else None,
        chat_template=chat_template,
        add_generation_prompt=add_generation_prompt,
    )
    return rendered[0]
