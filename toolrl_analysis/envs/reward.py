"""FTRL's verifiable reward: answer verification, the step reward of one assistant turn, and episode metrics.

Step reward (docs/architecture.md, "Reward and metrics"), with p = parsed calls in the turn and q = sub-questions they newly solve:
`f1 = 2q/(p+1)` (default), `precision = q/p`, `rate = q`, `pr = q²/p`. A turn without calls scores
-0.5 when empty, -0.3 when it holds tool-call markup that did not parse, 1/(1+t) when it contains the gold answer
(t = sub-questions still unsolved), 0.5 when everything was already solved, and 0 otherwise.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from toolrl_analysis.envs.sandbox import ToolResult, error_result
from toolrl_analysis.envs.toolcalls import (
    TOOL_CALL_CLOSE,
    TOOL_CALL_OPEN,
    TOOL_RESPONSE_OPEN,
    ParsedTurn,
    ToolCall,
    parse_tool_calls,
)
from toolrl_analysis.errors import ConfigError, EnvFormatError

REWARD_VARIANTS = ("f1", "precision", "rate", "pr")
STEP_CASES = ("calls", "empty", "malformed", "answer", "all_solved", "no_call")


def _normalise(text: str) -> str:
    return text.lower().replace(",", "").strip()


def answer_verify(predict: Any, golden: str) -> bool:
    """FTRL's check: every ", "-separated piece of `golden` occurs in `predict` (case-insensitive, commas removed)."""
    if type(predict) is dict or type(predict) is list:
        predict = json.dumps(predict, ensure_ascii=False)
    elif type(predict) is not str:
        predict = str(predict)
    predict = _normalise(predict)
    return all(_normalise(piece) in predict for piece in str(golden).split(", "))


def apply_results(
    unsolved_set: Mapping[str, Sequence[str]], calls: Sequence[ToolCall], outputs: Sequence[str]
) -> tuple[dict[str, list[str]], list[bool]]:
    """Mark the sub-questions that `calls` solve. A call solves at most one answer of its tool: the first remaining
    one its output verifies, which is then removed. Returns (the new unsolved set, one flag per call)."""
    remaining = {str(tool): _answers(answers) for tool, answers in unsolved_set.items()}
    solved_flags = []
    for call, output in zip(calls, outputs, strict=True):
        answers = remaining.get(call.name, [])
        index = next((i for i, answer in enumerate(answers) if answer_verify(output, answer)), None)
        if index is not None:
            del answers[index]
        solved_flags.append(index is not None)
    return remaining, solved_flags


@dataclass
class StepReward:
    score: float
    variant: str
    case: str  # one of STEP_CASES
    n_calls: int = 0
    n_solved: int = 0
    # Counts of sub-answers still unsolved before and after the turn (Turn.unsolved_set_* are the dicts).
    unsolved_before: int = 0
    unsolved_after: int = 0
    solved_flags: list[bool] = field(default_factory=list)
    remaining: dict[str, list[str]] = field(default_factory=dict)  # the unsolved set after this turn

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def step_reward(
    turn: ParsedTurn,
    outputs: Sequence[str],
    unsolved_set: Mapping[str, Sequence[str]],
    solve_rate: float,
    answer: str | None,
    variant: str = "f1",
) -> StepReward:
    """The reward of one assistant turn, given the outputs of its calls (one per call, errors included)."""
    if variant not in REWARD_VARIANTS:
        raise ConfigError(f"unknown reward variant '{variant}'; choose one of {', '.join(REWARD_VARIANTS)}")
    if len(outputs) != len(turn.calls):
        raise ValueError(
            f"step_reward needs one output per call: {len(turn.calls)} calls, {len(outputs)} outputs"
        )
    before = sum(len(_answers(v)) for v in unsolved_set.values())
    remaining, flags = apply_results(unsolved_set, turn.calls, outputs)
    reward = StepReward(0.0, variant, "calls", len(turn.calls), sum(flags), before, before - sum(flags))
    reward.solved_flags, reward.remaining = flags, remaining
    if turn.calls:
        p, q = len(turn.calls), sum(flags)
        reward.score = {"f1": 2 * q / (p + 1), "precision": q / p, "rate": float(q), "pr": q * q / p}[variant]
        return reward
    content = turn.content or ""
    gold = _normalise(answer) if isinstance(answer, str) else ""
    if not content:
        reward.case, reward.score = "empty", -0.5
    elif any(marker in content for marker in (TOOL_CALL_OPEN, TOOL_CALL_CLOSE, TOOL_RESPONSE_OPEN)):
        reward.case, reward.score = "malformed", -0.3
    elif gold and gold in _normalise(
        content
    ):  # an empty gold answer is no answer (FTRL would match anything)
        reward.case, reward.score = "answer", 1.0 / (1.0 + before)
    elif _as_float(solve_rate) >= 1.0:
        reward.case, reward.score = "all_solved", 0.5
    else:
        reward.case, reward.score = "no_call", 0.0
    return reward


def execute_turns(
    sandbox: Any, codes_per_turn: Sequence[Mapping[str, str]], calls_per_turn: Sequence[Sequence[ToolCall]]
) -> list[list[ToolResult]]:
    """Run the calls of many turns (turn i against tool code `codes_per_turn[i]`) in one concurrent
    `call_many`; one result list per turn, in call order. A name without code gets FTRL's KeyError text
    without a sandbox round-trip."""
    results: list[list[ToolResult | None]] = [[None] * len(calls) for calls in calls_per_turn]
    runnable: list[tuple[int, int]] = []
    jobs: list[tuple[str, str, dict[str, Any]]] = []
    for row, (codes, calls) in enumerate(zip(codes_per_turn, calls_per_turn, strict=True)):
        for column, call in enumerate(calls):
            if call.name in codes:
                runnable.append((row, column))
                jobs.append((codes[call.name], call.name, call.arguments))
            else:
                results[row][column] = error_result(call.name, "not_defined", repr(call.name))
    for (row, column), result in zip(runnable, sandbox.call_many(jobs) if jobs else [], strict=True):
        results[row][column] = result
    return results  # type: ignore[return-value]


def execute_calls(calls: Sequence[ToolCall], codes: Mapping[str, str], sandbox: Any) -> list[ToolResult]:
    """Run one turn's parsed calls in the sandbox, concurrently."""
    return execute_turns(sandbox, [codes], [calls])[0]


def score_step(
    text: str, record_like: Any, sandbox: Any, variant: str = "f1"
) -> tuple[StepReward, list[ToolResult]]:
    """Parse one assistant turn, run its calls against the record's tool code, and score it.

    `record_like` is an EnvRecord or a mapping with FTRL's fields (`codes`, `unsolved_set`, `solve_rate`,
    `answer`; `codes` and `unsolved_set` may be JSON strings, as in FTRL files). Nothing in it is changed."""
    codes = _field(record_like, "codes", {})
    unsolved_set = _field(record_like, "unsolved_set", {})
    turn = parse_tool_calls(text)
    results = execute_calls(turn.calls, codes, sandbox) if turn.calls else []
    reward = step_reward(
        turn,
        [r.content for r in results],
        unsolved_set,
        _field(record_like, "solve_rate", 0.0),
        _field(record_like, "answer", None),
        variant,
    )
    return reward, results


def episode_metrics(n_calls: int, n_solved: int, n_subquestions: int) -> dict[str, float]:
    """Solve-P = q/p (1 if p = 0), Solve-R = q/n, Solve-F1 = 2q/(p+n); with nothing to solve R and F1 are 1 when
    nothing was called either."""
    p, q, n = n_calls, n_solved, n_subquestions
    return {
        "solve_p": q / p if p else 1.0,
        "solve_r": q / n if n else 1.0,
        "solve_f1": 2 * q / (p + n) if p + n else 1.0,
    }


def _answers(value: Any) -> list[str]:
    return [str(a) for a in value] if isinstance(value, list | tuple) else [str(value)]


def _as_float(value: Any) -> float:
    try:
        return float(value)
    except (TypeError, ValueError):
        return 0.0


def _field(record_like: Any, name: str, default: Any) -> Any:
    value = (
        record_like.get(name, default)
        if isinstance(record_like, Mapping)
        else getattr(record_like, name, default)
    )
    if name in ("codes", "unsolved_set") and isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError as exc:
            raise EnvFormatError(f"field '{name}' is not valid JSON: {exc.msg}") from None
    if name in ("codes", "unsolved_set") and not isinstance(value, Mapping):
        raise EnvFormatError(f"field '{name}' must be an object, got {type(value).__name__}")
    return value
