"""The supervised warm-up's data: which environments, which tokenizer corpus, which tokens carry the loss.

Two sources of tool-use demonstrations (`SFTConfig.data`):
  * `stream` (the default): environments built on the fly from a training-only seed stream of fresh worlds
    (`envs.pipeline.stream_environments`, seeded by strings, never by a build's integer seed). Each world
    gives `envs_per_world` environments, so entity names almost never repeat: the only way to fill an argument
    is to read it from the question or a tool response. With a fixed world the model memorises names and
    writes ones it has seen instead (measured: 0 of 40 names copied after 2,500 steps).
  * `envs`: the build's own `train.jsonl`, minus the validation slice.
Either way the validation slice (for the role curves and Solve-F1 that choose the checkpoint) is the end of
the build's `train.jsonl`: the training distribution, never the test split.

The tokenizer is trained on the same kind of stream (other worlds), so names split into pieces shared by all
names instead of whole-name tokens that only the tokenizer's own world has.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from typing import Any

from toolrl_analysis.envs.oracle import FAILED_CALL, oracle_conversations
from toolrl_analysis.envs.pipeline import EnvBuildConfig, stream_environments
from toolrl_analysis.envs.schema import SCENARIOS, EnvRecord

Example = tuple[list[int], list[int]]  # token ids, loss mask (1 = a target)


def chat_example(tokenizer, messages, tools=None) -> Example:
    """Token ids and the assistant-token mask (1 on what the model must learn to write)."""
    out = tokenizer.apply_chat_template(
        messages, tools=tools, tokenize=True, return_dict=True, return_assistant_tokens_mask=True
    )
    return list(out["input_ids"]), list(out["assistant_masks"])


def text_examples(tokenizer, texts: Sequence[str], max_len: int) -> list[Example]:
    """General text, chunked to `max_len` tokens; every token is a target."""
    examples = []
    for text in texts:
        ids = tokenizer(text, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
        for start in range(0, len(ids), max_len):
            chunk = ids[start : start + max_len]
            if len(chunk) > 8:
                examples.append((chunk, [1] * len(chunk)))
    return examples


def validation_slice(records: Sequence[EnvRecord], per_scenario: int) -> list[EnvRecord]:
    """The last `per_scenario` records of each scenario that has golden calls, in scenario order."""
    out = []
    for scenario in SCENARIOS:
        usable = [r for r in records if r.scenario == scenario and r.meta.get("golden_turns")]
        out.extend(usable[len(usable) - min(per_scenario, len(usable)) :])
    return out


def stream_records(
    build: EnvBuildConfig, seed: int, count: int, per_world: int, mix: Sequence[float], purpose: str
) -> list[EnvRecord]:
    """`count` environments of the training stream `purpose` (sft, tokenizer) for `seed`."""
    worlds = range((count + per_world - 1) // per_world)
    return stream_environments(build, f"{purpose}/{seed}", worlds, per_world, mix)[:count]


def tool_use_examples(
    tokenizer, records: Sequence[EnvRecord], sandbox, *, seed: int, correction_prob: float, loss_on: str,
    max_len: int,
) -> tuple[list[Example], dict[str, Any]]:  # fmt: skip
    """Oracle trajectories (real tool output, some with a failed call and its correction), tokenised.
    `loss_on="all"` makes every token a target (the question and tool responses too), which measurably
    brings the phase change of reading the question earlier than assistant tokens alone."""
    rng = random.Random(f"sft-trajectories/{seed}")
    conversations = oracle_conversations(records, sandbox, rng, correction_prob)
    examples, dropped = [], 0
    for messages, record in zip(conversations, records, strict=True):
        ids, mask = chat_example(tokenizer, messages, record.tools)
        if len(ids) > max_len:
            dropped += 1
            continue
        failed = [
            i for i, m in enumerate(m for m in messages if m["role"] == "assistant") if m.get(FAILED_CALL)
        ]
        targets = [1] * len(ids) if loss_on == "all" else list(mask)
        for turn, (start, end) in enumerate(_runs(mask)):
            if turn in failed:  # the mistake stays in the context, but is never a target
                targets[start:end] = [0] * (end - start)
        examples.append((ids, targets))
    corrections = sum(any(m.get(FAILED_CALL) for m in c) for c in conversations)
    info = {
        "scenarios": {s: sum(r.scenario == s for r in records) for s in SCENARIOS},
        "examples": len(examples),
        "dropped_too_long": dropped,
        "corrections": corrections,
    }
    return examples, info


def _runs(mask: Sequence[int]) -> list[tuple[int, int]]:
    """[start, end) of each run of 1s: the assistant turns of a rendered conversation, in order."""
    runs, start = [], None
    for index, flag in enumerate([*mask, 0]):
        if flag and start is None:
            start = index
        elif not flag and start is not None:
            runs.append((start, index))
            start = None
    return runs


def general_examples(tokenizer, *, tasks: int, text_count: int, seed: int, max_len: int) -> list[Example]:
    """Short chat tasks (assistant tokens are the targets) and stdlib prose (every token)."""
    from toolrl_analysis.models.general import general_tasks, general_text, task_chat

    task_examples = [chat_example(tokenizer, task_chat(t)) for t in general_tasks(tasks, seed, "train")]
    if not text_count:  # tokenising the whole prose corpus for none of it would only slow start-up
        return task_examples
    prose = text_examples(tokenizer, general_text("train"), max_len)
    random.Random(f"sft-prose/{seed}").shuffle(prose)
    return task_examples + prose[:text_count]
