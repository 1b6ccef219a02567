"""Evaluate every variant with the same code as `toolrl-analyze evaluate`, on one model object and one sandbox.

The pair is read into memory once; each variant's spliced tensors are written into a single loaded model
(every shared tensor, so nothing of the previous variant survives) and `evaluate.evaluate` runs on it. The
context-reading meter's trajectories are built once and scored for every variant (`context_meter`).
Evaluation needs the models in memory; for a model too big for that, `--save` the hybrid and evaluate it
with your own serving stack.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import pandas as pd
import torch

from toolrl_analysis.analysis.ablate.grid import Variant
from toolrl_analysis.analysis.ablate.splice import SpliceAccount, splice_in_memory
from toolrl_analysis.analysis.checkpoints import Checkpoint
from toolrl_analysis.analysis.diff import MatchedTensor, PairPlan, iter_pairs, torch_threads
from toolrl_analysis.envs.schema import EnvRecord
from toolrl_analysis.episodes import EPISODES, VARIANT_GENERAL_TASKS
from toolrl_analysis.errors import CheckpointError, first_line, first_names

InMemoryPairs = dict[str, tuple[MatchedTensor, torch.Tensor, torch.Tensor]]


@dataclass
class EvaluationOptions:
    """What `evaluate` runs for every variant; episodes are played as every command plays them (`EPISODES`)."""

    general: bool = True
    roles: bool = True
    max_turns: int = EPISODES.max_turns
    max_new_tokens: int = EPISODES.max_new_tokens
    batch_size: int = EPISODES.batch_size
    general_tasks: int = VARIANT_GENERAL_TASKS
    sandbox_workers: int = 2
    # torch threads while evaluating (0: torch's default). A tiny model gains nothing from more than one,
    # and on a busy 2-core machine two threads ran the general suite 12x slower than one (measured).
    threads: int = 1


@dataclass
class VariantResult:
    """What one variant measured: per-episode tool use, the general suite, the meter's sums."""

    variant: Variant
    account: SpliceAccount
    episodes: pd.DataFrame
    tool_use: pd.DataFrame
    general: pd.DataFrame | None
    meter: pd.DataFrame | None  # context_meter.meter_values; None when no record has golden calls
    seconds: float


def pairs_in_memory(base: Checkpoint, trained: Checkpoint, plan: PairPlan) -> InMemoryPairs:
    return {
        pair.matched.name: (pair.matched, pair.base, pair.trained)
        for pair in iter_pairs(base, trained, plan.matched)
    }


def load_model(base: Checkpoint, trained: Checkpoint):
    """(model, tokenizer) from whichever side is a loadable policy (ours, or an HF directory), trained first."""
    from toolrl_analysis.models.checkpoint import load_policy

    problems = []
    for side in (trained, base):
        try:
            return load_policy(side.path)
        except CheckpointError as exc:
            problems.append(first_line(exc))
    raise CheckpointError(
        "evaluation needs a model to run: neither checkpoint loads as a policy (" + "; ".join(problems) + ")"
    )


def unmatched_tensors(checkpoint: Checkpoint, plan: PairPlan) -> dict[str, torch.Tensor]:
    """Tensors of one side that the plan leaves out (with --allow-missing), ties aside: the starting model
    keeps its own."""
    matched = {item.name for item in plan.matched} | set(plan.tied_both)
    names = [n for n in checkpoint.names() if n not in matched and n not in checkpoint.tied]
    return dict(checkpoint.iter_tensors(names))


def write_into(model: torch.nn.Module, tensors: dict[str, torch.Tensor]) -> None:
    state = model.state_dict()  # shares storage with the parameters
    unknown = [name for name in tensors if name not in state]
    if unknown:
        raise CheckpointError(f"the loaded model has no tensors named {first_names(unknown)}")
    with torch.no_grad():
        for name, tensor in tensors.items():
            state[name].copy_(tensor)


def evaluate_variants(
    base: Checkpoint,
    trained: Checkpoint,
    plan: PairPlan,
    pairs: InMemoryPairs,
    variants: Sequence[Variant],
    records: Sequence[EnvRecord],
    options: EvaluationOptions,
    *,
    progress: Callable[[str, int, int], None] | None = None,
) -> list[VariantResult]:
    """Every buildable variant through `evaluate` (a variant without a splice is skipped: its note says why)."""
    from toolrl_analysis.context_meter import meter_values, oracle_meter_set
    from toolrl_analysis.envs.sandbox import Sandbox
    from toolrl_analysis.evaluate import evaluate

    model, tokenizer = load_model(base, trained)
    unmatched = {"base": unmatched_tensors(base, plan), "trained": unmatched_tensors(trained, plan)}
    buildable = [v for v in variants if v.splice is not None]
    results = []
    threads = torch_threads(options.threads) if options.threads else contextlib.nullcontext()
    with threads, Sandbox(workers=options.sandbox_workers) as sandbox:
        meter = oracle_meter_set(tokenizer, records, sandbox) if options.roles else None
        for done, variant in enumerate(buildable):
            if progress is not None:
                progress(variant.name, done, len(buildable))
            started = time.perf_counter()
            tensors, account = splice_in_memory(variant.splice, pairs)
            write_into(model, {**unmatched[variant.splice.start], **tensors})
            del tensors
            report = evaluate(
                model, tokenizer, records, general=options.general, roles=False, sandbox=sandbox,
                max_turns=options.max_turns, max_new_tokens=options.max_new_tokens,
                batch_size=options.batch_size, n_general_tasks=options.general_tasks,
            )  # fmt: skip
            values = None
            if meter is not None:
                meter_set, indices = meter
                values = meter_values(model, meter_set)
                values["environment"] = values["example"].map(dict(enumerate(indices)))
            results.append(
                VariantResult(
                    variant, account, report.episodes, report.tool_use, report.general, values,
                    time.perf_counter() - started,
                )
            )  # fmt: skip
    if progress is not None:
        progress("", len(buildable), len(buildable))
    return results
