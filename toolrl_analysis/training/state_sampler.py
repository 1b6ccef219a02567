"""FTRL's step 1 for verl: sample per-step states with the current policy and write them as the next
iteration's verl parquet.

FTRL trains on states, not on whole episodes: before each iteration the current policy plays the training
environments, and every state an episode passed through (the history before an assistant turn, what is still
unsolved there, the solved fraction) becomes one training prompt whose next turn verl samples and
`ftrl_io.compute_score` scores with the step reward. Identical states (the opening prompt, which every sample
of an environment shares; a prefix two samples both reached) are written once.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

from toolrl_analysis.envs.schema import EnvRecord, limited
from toolrl_analysis.episodes import EPISODES, EpisodeOptions
from toolrl_analysis.models.placement import Placement


def state_records(episodes, sample_of: Callable[[int], int] = lambda index: 0) -> list[EnvRecord]:
    """One record per distinct state of `episodes`: the environment with the history before the turn as
    its messages, and that turn's unsolved set and solve rate (its meta says where the state came from)."""
    seen: set[tuple[str, str]] = set()
    states = []
    for episode in episodes:
        record = episode.record
        for turn in episode.turns:
            key = (record.env_id, json.dumps(turn.messages, sort_keys=True, ensure_ascii=False))
            if key in seen:
                continue
            seen.add(key)
            meta = dict(record.meta) | {
                "state": {"env_id": record.env_id, "sample": sample_of(episode.index), "turn": turn.index}
            }
            states.append(
                dataclasses.replace(
                    record,
                    messages=[dict(m) for m in turn.messages],
                    unsolved_set=turn.unsolved_set_before,
                    solve_rate=turn.solve_rate_before,
                    split="train",
                    meta=meta,
                )  # fmt: skip
            )
    return states


def sample_states(
    policy_path: str | Path,
    envs: str | Path,
    out: str | Path,
    *,
    samples: int = 4,
    temperature: float = 1.0,
    limit: int | None = None,
    seed: int = 0,
    options: EpisodeOptions = EPISODES,
    placement: Placement | None = None,
    on_turn: Callable[[int, list], None] | None = None,
) -> dict[str, Any]:
    """Play `samples` episodes per training environment with the policy at `temperature` (seeded), and write
    every distinct state to `out` in verl's parquet format (`ftrl_io.export_verl`). Returns a summary."""
    import torch

    from toolrl_analysis.envs.ftrl_io import export_verl
    from toolrl_analysis.envs.sandbox import Sandbox
    from toolrl_analysis.errors import ConfigError
    from toolrl_analysis.models.checkpoint import load_policy
    from toolrl_analysis.rollout import ModelPolicy, run_episodes
    from toolrl_analysis.training.shared import training_records

    if samples < 1:
        raise ConfigError(f"--samples must be at least 1, got {samples}")
    if not temperature > 0:
        raise ConfigError(f"--temperature must be positive (states are sampled), got {temperature}")
    records = limited(training_records(envs), limit)
    model, tokenizer = load_policy(policy_path, placement=placement)
    policy = ModelPolicy(
        model, tokenizer, max_new_tokens=options.max_new_tokens, temperature=temperature,
        batch_size=options.batch_size, generator=torch.Generator().manual_seed(seed), thinking=options.thinking,
    )  # fmt: skip
    repeated = [record for record in records for _ in range(samples)]
    with Sandbox(workers=2) as sandbox:
        episodes = run_episodes(policy, repeated, sandbox, max_turns=options.max_turns, on_turn=on_turn)
    states = state_records(episodes, sample_of=lambda index: index % samples)
    path = export_verl(states, out)
    turns = [state.meta["state"]["turn"] for state in states]
    return {
        "policy": str(policy_path),
        "out": str(path),
        "environments": len(records),
        "episodes": len(episodes),
        "states": len(states),
        "states_per_turn": {str(t): turns.count(t) for t in sorted(set(turns))},
        "samples": samples,
        "temperature": temperature,
        "seed": seed,
    }
