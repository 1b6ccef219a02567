"""The embedded policy's tokenizer: a small byte-level BPE with Qwen's special tokens and chat template.

Byte-level means no text is ever unknown; Qwen's pre-tokenizer split (one token per digit) helps arithmetic.
`<|im_start|>`, `<|im_end|>`, `<|endoftext|>` are special tokens; the four tool tags are added (non-special)
tokens, as in Qwen2.5: they never split, and `decode(..., skip_special_tokens=True)` keeps them, so a rollout
that decodes generated ids still sees its `<tool_call>` blocks.
"""

from __future__ import annotations

import json
import random
import re
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from toolrl_analysis.envs.schema import EnvRecord
from toolrl_analysis.models.chat_template import (
    CHAT_TEMPLATE,
    END_OF_TEXT,
    IM_END,
    IM_START,
    TOOL_TAGS,
    render_chat,
)

SPECIAL_TOKENS = (END_OF_TEXT, IM_START, IM_END)  # ids 0, 1, 2
MIN_VOCAB_SIZE = 512  # 256 byte symbols + specials + a few merges
MODEL_MAX_LENGTH = 4096
# Like Qwen2's split (letter runs, single digits, punctuation runs, newlines, spaces), except that a letter
# run never absorbs the character before it. Qwen turns " Butor" (in a question) and "Butor" (after a JSON
# quote) into different tokens; a tiny model would then have to learn that mapping before it could copy a
# name into a tool call. Here a word is the same tokens wherever it stands, so copying is plain induction.
WORD_SPLIT_PATTERN = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|\p{L}+|\p{N}|[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+"


def train_tokenizer(texts: Iterable[str], vocab_size: int = 4096):
    """Train a byte-level BPE on `texts` (deterministic for the same texts) and wrap it for transformers."""
    from tokenizers import (
        AddedToken,
        Regex,
        Tokenizer,
        decoders,
        models,
        normalizers,
        pre_tokenizers,
        processors,
    )
    from tokenizers.trainers import BpeTrainer
    from transformers import PreTrainedTokenizerFast

    if vocab_size < MIN_VOCAB_SIZE:
        raise ValueError(f"vocab_size must be at least {MIN_VOCAB_SIZE}, got {vocab_size}")
    backend = Tokenizer(models.BPE())
    backend.normalizer = normalizers.NFC()
    backend.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(WORD_SPLIT_PATTERN), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    backend.decoder = decoders.ByteLevel()
    backend.post_processor = processors.ByteLevel(trim_offsets=False)  # keeps offsets exact (assistant masks)
    trainer = BpeTrainer(
        vocab_size=vocab_size - len(TOOL_TAGS),  # the tool tags are added after training, inside the budget
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    backend.train_from_iterator(list(texts), trainer=trainer)
    backend.add_tokens([AddedToken(tag, special=False, normalized=False) for tag in TOOL_TAGS])
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        eos_token=IM_END,
        pad_token=END_OF_TEXT,
        padding_side="left",  # batched generation appends on the right
        chat_template=CHAT_TEMPLATE,
        model_max_length=MODEL_MAX_LENGTH,
        clean_up_tokenization_spaces=False,
    )


def load_tokenizer(path: str | Path):
    """A tokenizer saved with save_pretrained (ours or a real checkpoint's); never reaches for a hub."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(path), local_files_only=True)


# -- training corpus -----------------------------------------------------------------------------------------


def _function(tool: dict[str, Any]) -> dict[str, Any]:
    return tool.get("function", tool) if isinstance(tool, dict) else {}


def _placeholder_value(schema: Any, words: Sequence[str], rng: random.Random) -> Any:
    """A plausible argument value from the schema, for records without golden arguments."""
    schema = schema if isinstance(schema, dict) else {}
    if isinstance(schema.get("enum"), list) and schema["enum"]:
        return rng.choice(schema["enum"])
    kind = schema.get("type")
    if kind in ("integer", "number"):
        return rng.randint(1, 2030)
    if kind == "boolean":
        return rng.random() < 0.5
    if kind == "array":
        return [_placeholder_value(schema.get("items"), words, rng)]
    if kind == "object":
        return {}
    if not words:
        return "value"
    start = rng.randrange(len(words))
    return " ".join(words[start : start + rng.randint(1, 3)])


def _response_text(name: str, answer: str, rng: random.Random) -> str:
    """Tool outputs come as JSON (FTRL's generated code returns dicts) or as a sentence (ours)."""
    style = rng.randrange(3)
    if style == 0:
        return json.dumps({"tool": name, "result": answer}, ensure_ascii=False)
    if style == 1:
        return json.dumps({"status": "success", "data": {"answer": answer}}, ensure_ascii=False)
    return f"The {name.replace('_', ' ')} result is {answer}."


def oracle_like_messages(record: EnvRecord, seed: int = 0) -> list[dict[str, Any]]:
    """The record's conversation followed by plausible tool calls, tool responses and a final answer.

    Uses the golden calls of `meta.subquestions` / `meta.golden_turns` where the record has them; otherwise
    (e.g. FTRL's files) one call per tool of `unsolved_set` with arguments guessed from the schema. Meant for
    the tokenizer corpus, where only the vocabulary of names, arguments and JSON punctuation matters.
    """
    rng = random.Random(f"{seed}/{record.env_id}/{record.question}")
    messages: list[dict[str, Any]] = [dict(m) for m in record.messages]
    turns: list[list[tuple[str, dict[str, Any], str]]] = []
    subquestions = record.meta.get("subquestions") or []
    if subquestions:
        by_id = {sq.get("id"): sq for sq in subquestions}
        groups = record.meta.get("golden_turns") or [[sq.get("id")] for sq in subquestions]
        for group in groups:
            turn = [by_id[i] for i in group if i in by_id]
            turns.append(
                [(str(sq.get("tool")), dict(sq.get("arguments") or {}), str(sq.get("answer"))) for sq in turn]
            )
    else:
        words = re.findall(r"[A-Za-z0-9][\w'-]*", record.question.split("Question:")[-1])
        schemas = {_function(t).get("name"): _function(t) for t in record.tools}
        for name, answers in record.unsolved_set.items():
            properties = (schemas.get(name, {}).get("parameters") or {}).get("properties") or {}
            required = (schemas.get(name, {}).get("parameters") or {}).get("required") or list(properties)[:1]
            for answer in answers:
                arguments = {
                    p: _placeholder_value(properties.get(p), words, rng) for p in required if p in properties
                }
                turns.append([(name, arguments, answer)])
    for turn in turns:
        calls = [{"type": "function", "function": {"name": n, "arguments": a}} for n, a, _ in turn]
        messages.append({"role": "assistant", "content": "", "tool_calls": calls})
        for name, _, answer in turn:
            messages.append({"role": "tool", "content": _response_text(name, answer, rng)})
    messages.append({"role": "assistant", "content": f"The answer is {record.answer}."})
    return messages


def tokenizer_corpus(
    records: Sequence[EnvRecord],
    general_texts: Sequence[str] = (),
    max_envs: int = 2000,
    seed: int = 0,
) -> list[str]:
    """Chat-rendered environments (with oracle-like calls and responses) plus general text, in a fixed order."""
    chosen = list(records)
    if len(chosen) > max_envs:
        chosen = random.Random(seed).sample(chosen, max_envs)
    rendered = [render_chat(oracle_like_messages(r, seed), tools=r.tools) for r in chosen]
    return rendered + list(general_texts)


def build_policy_tokenizer(
    records: Sequence[EnvRecord], vocab_size: int = 4096, seed: int = 0, max_envs: int = 2000
):
    """The tokenizer the embedded policy uses: environments + stdlib prose + rendered general tasks."""
    from toolrl_analysis.models.general import general_tasks, general_text, task_chat

    tasks = [render_chat(task_chat(t)) for t in general_tasks(2000, seed=seed, split="train")]
    corpus = tokenizer_corpus(records, general_text("train") + tasks, max_envs=max_envs, seed=seed)
    return train_tokenizer(corpus, vocab_size=vocab_size)
