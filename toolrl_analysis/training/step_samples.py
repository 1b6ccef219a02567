"""What one policy-gradient sample is, and FTRL's per-step samples (its `data_sample.py`): every state an
episode passed through, whose next turn is scored by the step reward."""

from __future__ import annotations

from dataclasses import dataclass

from toolrl_analysis.envs.reward import execute_turns, step_reward
from toolrl_analysis.envs.schema import EnvRecord
from toolrl_analysis.envs.toolcalls import parse_tool_calls


@dataclass
class Sample:
    """One policy-gradient sample: a prompt, one completion, its reward and group."""

    prompt_ids: list[int]
    completion_ids: list[int]
    behaviour_logprobs: list[float]
    reward: float
    group: int  # samples of one group share a baseline
    episode: int  # samples of one episode share one reward (all turns of it, in episode credit)


@dataclass
class StepState:
    record: EnvRecord
    prompt_ids: list[int]
    unsolved_set: dict[str, list[str]]
    solve_rate: float


def step_states(episodes) -> list[StepState]:
    """Every state an episode passed through before an assistant turn: the history so far, what is
    still unsolved, and the solved fraction."""
    return [
        StepState(episode.record, turn.prompt_ids, turn.unsolved_set_before, turn.solve_rate_before)
        for episode in episodes
        for turn in episode.turns
    ]


def oracle_scripts(records: list[EnvRecord]) -> list[list[str]]:
    """Each record's golden turns as assistant texts (the calls of a turn as tool-call blocks), then the
    final answer: what a perfect policy would write, turn by turn."""
    import json

    from toolrl_analysis.envs.check import golden_calls
    from toolrl_analysis.envs.toolcalls import TOOL_CALL_CLOSE, TOOL_CALL_OPEN

    scripts = []
    for record in records:
        turns = [
            "\n".join(
                f"{TOOL_CALL_OPEN}\n{json.dumps({'name': name, 'arguments': args}, ensure_ascii=False)}\n"
                f"{TOOL_CALL_CLOSE}"
                for _, name, args in turn
            )
            for turn in golden_calls(record)
        ]
        scripts.append([*turns, f"The answer is {record.answer}."])
    return scripts


def oracle_prefix_states(
    records: list[EnvRecord], tokenizer, sandbox, max_prompt_tokens: int
) -> list[StepState]:
    """The states along each record's golden trajectory after at least one correct turn: later hops (and the
    final answer) in the histories a policy that got the earlier hops right would have. The oracle turns run
    through the real rollout (tools in the sandbox, the same history format), so these states are exactly
    those a policy reaches on that path."""
    from toolrl_analysis.rollout import ScriptedPolicy, run_episodes

    usable = [r for r in records if r.meta.get("golden_turns")]
    if not usable:
        return []
    scripts = oracle_scripts(usable)
    episodes = run_episodes(
        ScriptedPolicy(tokenizer, scripts), usable, sandbox, max_turns=max(len(s) for s in scripts),
        max_prompt_tokens=max_prompt_tokens,
    )  # fmt: skip
    return [state for state, turn in _states_with_turns(episodes) if turn.index >= 1]


def _states_with_turns(episodes):
    for episode in episodes:
        for turn in episode.turns:
            yield (
                StepState(episode.record, turn.prompt_ids, turn.unsolved_set_before, turn.solve_rate_before),
                turn,
            )


def score_completions(texts: list[str], states: list[StepState], sandbox, variant: str) -> list[float]:
    """Step reward of each completion text in its state; all tool calls run in one concurrent batch."""
    parsed = [parse_tool_calls(text) for text in texts]
    results = execute_turns(sandbox, [state.record.codes for state in states], [p.calls for p in parsed])
    return [
        step_reward(
            turn,
            [r.content for r in turn_results],
            state.unsolved_set,
            state.solve_rate,
            state.record.answer,
            variant=variant,
        ).score
        for turn, turn_results, state in zip(parsed, results, states, strict=True)
    ]
