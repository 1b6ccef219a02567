"""What is patched and scored: per environment, one token sequence, its target tokens and its position sets.

The text is the trained model's own greedy episode (played as `probe` plays its rollouts,
`decision_points.rollout_conversations`), not the oracle's: the target is how likely the trained model finds
the tool calls it writes itself, which is the behaviour RL shaped, and an oracle trajectory would score
calls the trained model may never make. Both models are teacher forced on the same tokens, so positions
align across the pair.

- targets: every token inside `<tool_call>...</tool_call>` of the assistant turns (tags included; a call
  that does not parse still counts, it is what the model wrote); token p is predicted at position p - 1.
- decision: `decision_points`' decision token (the last token of the generation prompt) of each assistant
  turn that writes a call: where the model decides to call, and which tool.
- context: the question and the tool responses (`decision_points.REGIONS`), all before the last call.
- all: every position.

Sequences end at the last target token: nothing after it can change a target. Random controls draw, per
environment, as many positions as the set has among the *candidates*: positions before the last target that
are neither a target nor the position predicting one (so a control never patches the call being written),
and not in the set itself. Where fewer candidates remain, all of them are drawn, and the table says how
many (`count`).
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from toolrl_analysis.analysis.probe.decision_points import REGIONS, Trajectory, build_trajectory

POSITION_SETS = ("decision", "context", "all")
CONTROLLED = ("decision", "context")  # "all" leaves no position to draw a control from
_CALLS = REGIONS.index("tool_calls")
_CONTEXT = (REGIONS.index("question"), REGIONS.index("tool_responses"))


@dataclass
class PatchText:
    """One environment's sequence; `environment` is its index among the records."""

    environment: int
    env_id: str
    scenario: str
    input_ids: list[int]
    targets: list[int]
    positions: dict[str, list[int]]
    candidates: list[int]

    def controls(self, name: str, draws: int, seed: int) -> list[list[int]]:
        """`draws` seeded random position sets for set `name` (the same draws in every layer, site and
        direction, so the controls are paired with the set)."""
        chosen = set(self.positions[name])
        pool = [p for p in self.candidates if p not in chosen]
        out = []
        for draw in range(1, draws + 1):
            rng = random.Random(f"patch-controls/{seed}/{self.environment}/{name}/{draw}")
            out.append(sorted(rng.sample(pool, min(len(chosen), len(pool)))))
        return out


def patch_text(trajectory: Trajectory, environment: int) -> PatchText | None:
    """The PatchText of one tokenised conversation, or None when it holds no tool-call token."""
    regions = trajectory.token_regions
    targets = [p for p, region in enumerate(regions) if region == _CALLS and p > 0]
    if not targets:
        return None
    end = targets[-1] + 1
    decisions = sorted(d for d in trajectory.decision_positions if d < end)
    bounds = [*decisions[1:], end]
    wanted = set(targets)
    decision = [d for d, stop in zip(decisions, bounds, strict=True) if wanted & set(range(d + 1, stop + 1))]
    context = [p for p in range(end) if regions[p] in _CONTEXT]
    blocked = wanted | {p - 1 for p in targets}
    candidates = [p for p in range(end - 1) if p not in blocked]
    return PatchText(
        environment=environment,
        env_id=trajectory.env_id,
        scenario=trajectory.scenario,
        input_ids=list(trajectory.input_ids[:end]),
        targets=targets,
        positions={"decision": decision, "context": context, "all": list(range(end))},
        candidates=candidates,
    )


def build_texts(
    conversations: Sequence[tuple[Any, Sequence[dict[str, Any]], str]], tokenizer, max_tokens: int
) -> tuple[list[PatchText], dict[str, int]]:
    """PatchTexts of (record, messages, source) conversations, in order, and why any were left out."""
    texts: list[PatchText] = []
    dropped = {"too_long": 0, "no_tool_call": 0}
    for environment, (record, messages, source) in enumerate(conversations):
        trajectory, _, reasons = build_trajectory(record, messages, tokenizer, source, max_tokens)
        if trajectory is None:
            dropped["too_long"] += reasons.get("too_long", 0)
            continue
        text = patch_text(trajectory, environment)
        if text is None:
            dropped["no_tool_call"] += 1
            continue
        texts.append(text)
    return texts, dropped
