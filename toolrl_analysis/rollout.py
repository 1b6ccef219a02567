"""Multi-turn tool-use episodes: a policy talks to sandboxed tools, batched across environments.

Every turn re-renders the whole conversation with the tokenizer's chat template (as FTRL does), the policy
completes it, tool calls are parsed and *all* calls of the batch for that turn run concurrently in one
`Sandbox.call_many`, and the step reward is computed against the episode's remaining `unsolved_set`.

Two kinds of policy share one small interface (`Policy.act`): `ModelPolicy` wraps any Hugging Face
causal LM and the batched sampler `generate()` below; `ScriptedPolicy` replays fixed texts (tests).

The records that come back (`Episode`, `Turn`) serve evaluation and RL training alike: a `Turn` holds the
messages it saw, the prompt and completion token ids, the behaviour log-probs, the parsed calls, the tool
results and the reward breakdown, so a trainer can cut an episode into per-step samples.
"""

from __future__ import annotations

import copy
import inspect
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch

from toolrl_analysis.envs.reward import StepReward, episode_metrics, execute_turns, step_reward
from toolrl_analysis.envs.sandbox import ToolResult
from toolrl_analysis.envs.schema import EnvRecord
from toolrl_analysis.envs.toolcalls import ParsedTurn, ToolCall, parse_tool_calls
from toolrl_analysis.episodes import EPISODES, EpisodeOptions, template_kwargs  # noqa: F401 (re-exported)
from toolrl_analysis.models.placement import input_device

STOP_NO_CALL = "no_call"
STOP_MAX_TURNS = "max_turns"
STOP_PROMPT_TOO_LONG = "prompt_too_long"
TURN_END_TOKEN = "<|im_end|>"  # Qwen-style chat templates (ours included) end every turn with it
# Chat-control tokens never belong in a decoded reply, whether or not a tokenizer marks them special.
_CONTROL_TOKENS = ("<|im_start|>", "<|im_end|>", "<|endoftext|>", "<|eot_id|>")


DEFAULT_MAX_TURNS = EPISODES.max_turns


# =============================================================================================
# Batched sampling
# =============================================================================================
@dataclass
class Completion:
    """One sampled continuation.

    `ids` are the generated token ids, including the stop token when one was produced; `logprobs[i]` is
    log p(ids[i] | prefix) under the distribution sampled from, `log_softmax(logits / temperature)` (the raw
    `log_softmax(logits)` when greedy): the behaviour log-probs a policy-gradient trainer compares against,
    which must be taken at the same temperature (verl divides the logits by it for the old, new and reference
    log-probs alike). `stopped` is False when `max_new_tokens` cut it off.
    """

    ids: list[int]
    logprobs: list[float]
    stopped: bool = True


def cache_keyword(model: torch.nn.Module) -> str:
    """transformers 5 renamed `past_key_values` to `cache`; use whichever the model's forward declares."""
    parameters = inspect.signature(model.forward).parameters
    return "cache" if "cache" in parameters else "past_key_values"


def new_cache(model: torch.nn.Module):
    from transformers import DynamicCache

    try:
        return DynamicCache(config=model.config)  # lets hybrid/sliding models pick their layer types
    except TypeError:  # older transformers: no config argument
        return DynamicCache()


def position_ids(attention_mask: torch.Tensor) -> torch.Tensor:
    """Position of each token counting real tokens only ([B, L] -> [B, L]): with left padding every
    sequence still starts at position 0."""
    return (attention_mask.cumsum(-1) - 1).clamp(min=0)


def _sample(probs: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    """One token per row, drawn on the generator's device: a seeded CPU generator draws on the CPU for a model
    on a GPU too, so one seed gives the same tokens from the same probabilities on every device."""
    if generator is None or generator.device == probs.device:
        return torch.multinomial(probs, 1, generator=generator).squeeze(-1)
    drawn = torch.multinomial(probs.to(generator.device), 1, generator=generator).squeeze(-1)
    return drawn.to(probs.device)


@torch.no_grad()
def generate(
    model: torch.nn.Module,
    prompt_ids: Sequence[Sequence[int]],
    *,
    max_new_tokens: int,
    temperature: float = 0.0,
    eos_token_ids: int | Sequence[int],
    pad_token_id: int,
    use_cache: bool = True,
    generator: torch.Generator | None = None,
    samples_per_prompt: int = 1,
) -> list[Completion]:
    """Complete every prompt in one left-padded batch; `temperature <= 0` means greedy.

    `samples_per_prompt` > 1 returns that many completions per prompt (prompt-major order): each prompt
    is prefilled once and its KV cache copied, instead of prefilling G identical prompts (GRPO groups).

    Each sequence stops at its first token in `eos_token_ids` (kept in `Completion.ids`) or after
    `max_new_tokens`. With `use_cache=False` the full sequence is recomputed at every step (slow; for
    benchmarks and for checking the cache path). The model's train/eval mode is restored afterwards.
    """
    if not prompt_ids:
        return []
    if any(len(p) == 0 for p in prompt_ids):
        raise ValueError("generate() needs at least one prompt token per sequence")
    stop_ids = [eos_token_ids] if isinstance(eos_token_ids, int) else list(eos_token_ids)
    device = input_device(model)
    repeats = max(1, samples_per_prompt)
    if not use_cache and repeats > 1:  # nothing to share without a cache
        prompt_ids, repeats = [p for p in prompt_ids for _ in range(repeats)], 1
    batch, width = len(prompt_ids), max(len(p) for p in prompt_ids)
    total = batch * repeats

    input_ids = torch.full((batch, width), pad_token_id, dtype=torch.long, device=device)
    attention = torch.zeros((batch, width), dtype=torch.long, device=device)
    for row, prompt in enumerate(prompt_ids):
        input_ids[row, width - len(prompt) :] = torch.tensor(list(prompt), dtype=torch.long)
        attention[row, width - len(prompt) :] = 1

    stop_tensor = torch.tensor(stop_ids, dtype=torch.long, device=device)
    finished = torch.zeros(total, dtype=torch.bool, device=device)
    stopped_at = torch.full((total,), -1, dtype=torch.long, device=device)
    new_tokens: list[torch.Tensor] = []
    new_logprobs: list[torch.Tensor] = []

    cache_kw = cache_keyword(model)
    keep_last = "logits_to_keep" in inspect.signature(model.forward).parameters
    cache = new_cache(model) if use_cache else None
    step_input = input_ids
    was_training = model.training
    model.eval()
    try:
        for step in range(max_new_tokens):
            kwargs: dict[str, Any] = {"attention_mask": attention, "use_cache": use_cache}
            if keep_last:
                kwargs["logits_to_keep"] = 1  # only the last position's logits are needed
            if use_cache:
                kwargs[cache_kw] = cache
                kwargs["position_ids"] = position_ids(attention)[:, -step_input.shape[1] :]
                logits = model(input_ids=step_input, **kwargs).logits[:, -1, :].float().to(device)
            else:
                kwargs["position_ids"] = position_ids(attention)
                logits = model(input_ids=input_ids, **kwargs).logits[:, -1, :].float().to(device)
            if step == 0 and repeats > 1:
                logits = logits.repeat_interleave(repeats, dim=0)
                attention = attention.repeat_interleave(repeats, dim=0)
                input_ids = input_ids.repeat_interleave(repeats, dim=0)
                cache.batch_repeat_interleave(repeats)

            if temperature <= 0:
                logprobs = torch.log_softmax(logits, dim=-1)  # [B, V]
                token = logits.argmax(dim=-1)
            else:
                scaled = logits / temperature  # [B, V]: the distribution sampled from
                logprobs = torch.log_softmax(scaled, dim=-1)  # [B, V]
                token = _sample(torch.softmax(scaled, dim=-1), generator)
            token = torch.where(finished, torch.full_like(token, pad_token_id), token)
            new_tokens.append(token)
            new_logprobs.append(logprobs.gather(-1, token.unsqueeze(-1)).squeeze(-1))

            just_stopped = ~finished & torch.isin(token, stop_tensor)
            stopped_at = torch.where(just_stopped, torch.full_like(stopped_at, step), stopped_at)
            # Finished rows keep being fed padding that nothing attends to.
            attention = torch.cat([attention, (~finished).long().unsqueeze(-1)], dim=-1)
            finished |= just_stopped
            input_ids = torch.cat([input_ids, token.unsqueeze(-1)], dim=-1)
            step_input = token.unsqueeze(-1)
            if bool(finished.all()):
                break
    finally:
        model.train(was_training)

    if not new_tokens:
        return [Completion([], [], False) for _ in range(total)]
    tokens = torch.stack(new_tokens, dim=1).tolist()
    token_logprobs = torch.stack(new_logprobs, dim=1).tolist()
    completions = []
    for row in range(total):
        end = int(stopped_at[row]) + 1 if stopped_at[row] >= 0 else len(tokens[row])
        completions.append(
            Completion(tokens[row][:end], token_logprobs[row][:end], bool(stopped_at[row] >= 0))
        )
    return completions


def stop_token_ids(tokenizer, model: torch.nn.Module | None = None) -> list[int]:
    """The ids that end an assistant turn: `<|im_end|>` if the vocabulary has it, plus the tokenizer's and
    the model's generation-config eos ids (each may be an int or a list)."""
    ids: list[int] = []

    def add(value):
        if value is None:
            return
        for item in value if isinstance(value, list | tuple) else [value]:
            if isinstance(item, int) and item >= 0 and item not in ids:
                ids.append(item)

    add(tokenizer.get_vocab().get(TURN_END_TOKEN))
    add(tokenizer.eos_token_id)
    generation_config = getattr(model, "generation_config", None)
    add(getattr(generation_config, "eos_token_id", None))
    if not ids:
        raise ValueError("tokenizer has no end-of-turn token: neither <|im_end|> nor an eos token")
    return ids


def pad_token_id_for(tokenizer) -> int:
    if tokenizer.pad_token_id is not None:
        return int(tokenizer.pad_token_id)
    eos = tokenizer.eos_token_id
    return int(eos[0] if isinstance(eos, list) else eos if eos is not None else 0)


# =============================================================================================
# Policies
# =============================================================================================
@dataclass
class TurnRequest:
    """What a policy is asked to complete: the rendered prompt plus where it comes from."""

    episode_index: int
    turn_index: int
    prompt_ids: list[int]
    messages: list[dict[str, Any]]


class Policy(Protocol):
    tokenizer: Any

    def act(self, requests: Sequence[TurnRequest]) -> list[Completion]: ...


class ModelPolicy:
    """A Hugging Face causal LM behind `generate()`. Prompts are sorted by length and sent in chunks of
    `batch_size` to keep padding (and memory) small; results come back in request order."""

    def __init__(
        self,
        model: torch.nn.Module,
        tokenizer,
        *,
        max_new_tokens: int = 512,
        temperature: float = 0.0,
        batch_size: int = 32,
        use_cache: bool = True,
        generator: torch.Generator | None = None,
        thinking: bool | None = None,
    ):
        self.model, self.tokenizer = model, tokenizer
        self.template_kwargs = template_kwargs(thinking)  # how its prompts are rendered (run_episodes)
        self.max_new_tokens, self.temperature = max_new_tokens, temperature
        self.batch_size, self.use_cache, self.generator = batch_size, use_cache, generator
        self.eos_token_ids = stop_token_ids(tokenizer, model)
        self.pad_token_id = pad_token_id_for(tokenizer)

    def act(self, requests: Sequence[TurnRequest]) -> list[Completion]:
        order = sorted(range(len(requests)), key=lambda i: len(requests[i].prompt_ids))
        out: list[Completion | None] = [None] * len(requests)
        for start in range(0, len(order), self.batch_size):
            chunk = order[start : start + self.batch_size]
            completions = generate(
                self.model,
                [requests[i].prompt_ids for i in chunk],
                max_new_tokens=self.max_new_tokens,
                temperature=self.temperature,
                eos_token_ids=self.eos_token_ids,
                pad_token_id=self.pad_token_id,
                use_cache=self.use_cache,
                generator=self.generator,
            )
            for i, completion in zip(chunk, completions, strict=True):
                out[i] = completion
        return out  # type: ignore[return-value]


class ScriptedPolicy:
    """Replays fixed assistant texts: `responses[episode_index][turn_index]` (an empty string once a
    script runs out), or a callable `responses(request) -> str`. Log-probs are reported as 0."""

    def __init__(self, tokenizer, responses: Sequence[Sequence[str]] | Callable[[TurnRequest], str]):
        self.tokenizer = tokenizer
        self.responses = responses
        self.end_id = stop_token_ids(tokenizer)[0]

    def text_for(self, request: TurnRequest) -> str:
        if callable(self.responses):
            return self.responses(request)
        script = self.responses[request.episode_index]
        return script[request.turn_index] if request.turn_index < len(script) else ""

    def act(self, requests: Sequence[TurnRequest]) -> list[Completion]:
        completions = []
        for request in requests:
            ids = self.tokenizer.encode(self.text_for(request), add_special_tokens=False) + [self.end_id]
            completions.append(Completion(ids, [0.0] * len(ids), True))
        return completions


# =============================================================================================
# Episode records
# =============================================================================================
@dataclass
class Turn:
    """One assistant turn and what followed it.

    A training sample is one turn (prompt_ids, then completion_ids, the policy's own tokens), not one
    concatenated episode: the chat template re-renders the history every turn, so earlier completions need not
    reappear token for token in later prompts.
    """

    index: int
    messages: list[dict[str, Any]]  # the conversation the policy saw (before this turn); read-only
    prompt_ids: list[int]
    completion_ids: list[int]
    logprobs: list[float]  # behaviour log-probs of completion_ids (see Completion)
    text: str  # decoded completion, without the stop token
    parsed: ParsedTurn
    results: list[ToolResult]  # one per parsed call, same order
    reward: StepReward
    unsolved_set_before: dict[str, list[str]]  # what was still unsolved before this turn
    unsolved_set_after: dict[str, list[str]]  # and after it (reward.unsolved_before/after count them)
    solve_rate_before: float  # solved fraction of the initial sub-questions before this turn
    stopped: bool = True  # False: the completion hit max_new_tokens

    @property
    def calls(self) -> list[ToolCall]:
        return self.parsed.calls

    @property
    def format_error(self) -> bool:
        """The turn contained tool-call markup that failed to parse."""
        return bool(self.parsed.malformed)


@dataclass
class Episode:
    """One environment played to the end."""

    index: int
    record: EnvRecord
    turns: list[Turn] = field(default_factory=list)
    messages: list[dict[str, Any]] = field(default_factory=list)  # final conversation
    unsolved_set: dict[str, list[str]] = field(default_factory=dict)  # what is still unsolved
    stop_reason: str | None = None  # no_call | max_turns | prompt_too_long

    @property
    def done(self) -> bool:
        return self.stop_reason is not None

    @property
    def scenario(self) -> str:
        return self.record.scenario

    @property
    def n_subquestions(self) -> int:
        return self.record.n_subquestions

    @property
    def n_calls(self) -> int:
        return sum(len(t.calls) for t in self.turns)

    @property
    def n_solved(self) -> int:
        return self.n_subquestions - sum(len(v) for v in self.unsolved_set.values())

    @property
    def solve_rate(self) -> float:
        return self.n_solved / self.n_subquestions if self.n_subquestions else 0.0

    @property
    def n_format_errors(self) -> int:
        return sum(t.format_error for t in self.turns)

    @property
    def total_reward(self) -> float:
        return sum(t.reward.score for t in self.turns)

    def metrics(self) -> dict[str, float]:
        """Solve-P, Solve-R, Solve-F1 of this episode (docs/architecture.md, "Reward and metrics")."""
        return episode_metrics(self.n_calls, self.n_solved, self.n_subquestions)


# =============================================================================================
# The rollout loop
# =============================================================================================
def render_prompt(
    tokenizer, messages: list[dict[str, Any]], tools: list[dict[str, Any]] | None, **template_kwargs
):
    """Chat-template token ids of `messages` with the generation prompt appended.

    Rendered to text first and tokenized without extra special tokens: the template already carries
    any BOS, and `apply_chat_template(tokenize=True)` changed its return type across versions.
    """
    text = tokenizer.apply_chat_template(
        messages, tools=tools or None, tokenize=False, add_generation_prompt=True, **template_kwargs
    )
    return tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"]  # we check lengths ourselves


def decode_completion(tokenizer, ids: Sequence[int], stop_ids: Sequence[int]) -> str:
    """Text of a completion without its stop token and without chat-control tokens; tool-call markup
    is kept even where a tokenizer registers `<tool_call>` as a special token."""
    ids = list(ids)
    while ids and ids[-1] in stop_ids:
        ids.pop()
    text = tokenizer.decode(ids, skip_special_tokens=False)
    for token in set(tokenizer.all_special_tokens) | set(_CONTROL_TOKENS):
        if token and "tool" not in token:
            text = text.replace(token, "")
    return text


def assistant_message(parsed: ParsedTurn, text: str) -> dict[str, Any]:
    """What goes into the history: structured tool calls when any parsed (FTRL keeps the well-formed
    ones), otherwise the raw text. Reasoning goes under `reasoning_content`, where Qwen3's template looks
    for it (it shows it again for the turns after the question, and drops it from earlier exchanges); a
    template without it ignores the key."""
    thought = {"reasoning_content": parsed.reasoning} if parsed.reasoning else {}
    if parsed.calls:
        return {
            "role": "assistant",
            "content": parsed.content,
            "tool_calls": [
                {"type": "function", "function": {"name": call.name, "arguments": call.arguments}}
                for call in parsed.calls
            ],
        } | thought
    return {"role": "assistant", "content": parsed.content if thought else text} | thought


def _solve_rate(record: EnvRecord, unsolved: dict[str, list[str]]) -> float:
    total = record.n_subquestions
    return (total - sum(len(v) for v in unsolved.values())) / total if total else 0.0


def model_max_positions(model: torch.nn.Module | None, fallback: int = 2048) -> int:
    """The model's position limit (`config.max_position_embeddings`), or `fallback` where it states none."""
    return int(getattr(getattr(model, "config", None), "max_position_embeddings", None) or fallback)


def default_max_prompt_tokens(policy: Policy, fallback: int = 32768) -> int:
    """Room left for the prompt: the model's position limit minus the completion budget."""
    limit = model_max_positions(getattr(policy, "model", None), fallback)
    return max(1, limit - int(getattr(policy, "max_new_tokens", 0)))


def run_episodes(
    policy: Policy,
    records: Sequence[EnvRecord],
    sandbox,
    *,
    max_turns: int = DEFAULT_MAX_TURNS,
    max_prompt_tokens: int | None = None,
    reward_variant: str = "f1",
    template_kwargs: dict[str, Any] | None = None,
    on_turn: Callable[[int, list[Episode]], None] | None = None,
) -> list[Episode]:
    """Play every record to the end, all episodes advancing one turn at a time in lockstep.

    An episode stops after a turn without tool calls (`no_call`), after `max_turns` (`max_turns`), or when
    its next prompt would exceed `max_prompt_tokens` (`prompt_too_long`; default: the model's position
    limit minus the policy's `max_new_tokens`). Whatever the policy emits is parsed and scored, never
    raised. `on_turn(turn_index, episodes)` is called after each lockstep turn (progress display).
    """
    tokenizer = policy.tokenizer
    if template_kwargs is None:  # the policy's own (a ModelPolicy's thinking choice), else the template's
        template_kwargs = getattr(policy, "template_kwargs", None) or {}
    budget = max_prompt_tokens if max_prompt_tokens is not None else default_max_prompt_tokens(policy)
    stop_ids = stop_token_ids(tokenizer, getattr(policy, "model", None))
    episodes = [
        Episode(
            index=i, record=r, messages=copy.deepcopy(r.messages), unsolved_set=copy.deepcopy(r.unsolved_set)
        )
        for i, r in enumerate(records)
    ]

    for turn_index in range(max_turns):
        requests: list[TurnRequest] = []
        for episode in episodes:
            if episode.done:
                continue
            prompt = render_prompt(tokenizer, episode.messages, episode.record.tools, **template_kwargs)
            if len(prompt) > budget:
                episode.stop_reason = STOP_PROMPT_TOO_LONG
                continue
            # A shallow copy suffices: messages are appended, never edited, once in the history.
            requests.append(TurnRequest(episode.index, turn_index, prompt, list(episode.messages)))
        if not requests:
            break

        completions = policy.act(requests)
        texts = [decode_completion(tokenizer, c.ids, stop_ids) for c in completions]
        parsed = [parse_tool_calls(text) for text in texts]
        results = execute_turns(
            sandbox, [episodes[r.episode_index].record.codes for r in requests], [p.calls for p in parsed]
        )

        for request, completion, text, turn_parse, turn_results in zip(
            requests, completions, texts, parsed, results, strict=True
        ):
            episode = episodes[request.episode_index]
            record = episode.record
            solve_rate_before = _solve_rate(record, episode.unsolved_set)
            reward = step_reward(
                turn_parse,
                [r.content for r in turn_results],
                episode.unsolved_set,
                solve_rate_before,
                record.answer,
                variant=reward_variant,
            )
            episode.turns.append(
                Turn(
                    index=turn_index,
                    messages=request.messages,
                    prompt_ids=request.prompt_ids,
                    completion_ids=list(completion.ids),
                    logprobs=list(completion.logprobs),
                    text=text,
                    parsed=turn_parse,
                    results=turn_results,
                    reward=reward,
                    unsolved_set_before=copy.deepcopy(episode.unsolved_set),
                    unsolved_set_after=copy.deepcopy(reward.remaining),
                    solve_rate_before=solve_rate_before,
                    stopped=completion.stopped,
                )
            )
            episode.unsolved_set = copy.deepcopy(reward.remaining)
            episode.messages.append(assistant_message(turn_parse, text))
            for call, result in zip(turn_parse.calls, turn_results, strict=True):
                episode.messages.append({"role": "tool", "name": call.name, "content": result.content})
            if not turn_parse.calls:
                episode.stop_reason = STOP_NO_CALL
        if on_turn is not None:
            on_turn(turn_index, episodes)

    for episode in episodes:
        if episode.stop_reason is None:
            episode.stop_reason = STOP_MAX_TURNS
    return episodes
