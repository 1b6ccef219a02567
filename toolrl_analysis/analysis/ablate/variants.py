"""Evaluate every variant with the same code as `toolrl-analyze evaluate`, on one model object and one sandbox.

The pair is read into memory once; each variant's spliced tensors are written into a single loaded model
(every shared tensor, so nothing of the previous variant survives). Main variants are played with
`evaluate.evaluate` (Solve-F1, the general suite, the context-reading meter on oracle trajectories); every
variant scores the base's and the trained model's greedy trajectories, played once (`likelihood`).
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
from toolrl_analysis.analysis.ablate.splice import reference as reference_splice
from toolrl_analysis.analysis.checkpoints import Checkpoint
from toolrl_analysis.analysis.diff import MatchedTensor, PairPlan, iter_pairs, torch_threads
from toolrl_analysis.envs.schema import EnvRecord
from toolrl_analysis.episodes import EPISODES, VARIANT_GENERAL_TASKS
from toolrl_analysis.errors import CheckpointError, first_line, first_names
from toolrl_analysis.models.placement import Placement

InMemoryPairs = dict[str, tuple[MatchedTensor, torch.Tensor, torch.Tensor]]


@dataclass
class EvaluationOptions:
    """What `evaluate` runs for every variant; episodes are played as every command plays them (`EPISODES`)."""

    general: bool = True
    roles: bool = True
    max_turns: int = EPISODES.max_turns
    max_new_tokens: int = EPISODES.max_new_tokens
    batch_size: int = EPISODES.batch_size
    thinking: bool | None = EPISODES.thinking
    general_tasks: int = VARIANT_GENERAL_TASKS
    sandbox_workers: int = 2
    # torch threads while evaluating (0: torch's default). A tiny model gains nothing from more than one,
    # and on a busy 2-core machine two threads ran the general suite 12x slower than one (measured).
    threads: int = 1
    # threads for the teacher-forced scoring, one big forward pass at a time (2 on 2 idle cores: 1.8x faster;
    # on cores shared with another job, oversubscribed threads ran it several times slower: use 1 there)
    score_threads: int = 2
    placement: Placement | None = None  # --device, --dtype of the model the variants are written into


@dataclass
class VariantResult:
    """What one variant measured: per-episode tool use, the general suite, the meter's sums (main variants
    played on `records`), and the teacher-forced metric (every variant, on the analysis trajectories)."""

    variant: Variant
    account: SpliceAccount
    episodes: pd.DataFrame | None
    tool_use: pd.DataFrame | None
    general: pd.DataFrame | None
    meter: pd.DataFrame | None  # context_meter.meter_values; None when no record has golden calls
    seconds: float
    likelihood: pd.DataFrame | None = None  # likelihood.score


def pairs_in_memory(base: Checkpoint, trained: Checkpoint, plan: PairPlan) -> InMemoryPairs:
    return {
        pair.matched.name: (pair.matched, pair.base, pair.trained)
        for pair in iter_pairs(base, trained, plan.matched)
    }


def load_model(base: Checkpoint, trained: Checkpoint, placement: Placement | None = None):
    """(model, tokenizer) from whichever side is a loadable policy (ours, or an HF directory), trained first,
    where `placement` says (variants are copied into its tensors, on its device and in its dtype)."""
    from toolrl_analysis.models.checkpoint import load_policy

    problems = []
    for side in (trained, base):
        try:
            return load_policy(side.path, placement=placement)
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
    analysis_records: Sequence[EnvRecord] | None = None,
    progress: Callable[[str, int, int], None] | None = None,
) -> list[VariantResult]:
    """Every buildable variant (one without a splice is skipped: its note says why): main variants through
    `evaluate` on `records`, and every variant through the teacher-forced metric on the greedy trajectories
    of the base and the trained model over `analysis_records` (none when None)."""
    from toolrl_analysis.analysis.ablate.likelihood import SOURCES, play, score
    from toolrl_analysis.analysis.ablate.low_rank import low_rank_in_memory
    from toolrl_analysis.context_meter import meter_values, oracle_meter_set
    from toolrl_analysis.envs.sandbox import Sandbox
    from toolrl_analysis.evaluate import evaluate

    model, tokenizer = load_model(base, trained, options.placement)
    unmatched = {"base": unmatched_tensors(base, plan), "trained": unmatched_tensors(trained, plan)}
    buildable = [v for v in variants if v.buildable]
    results = []
    svd_cache: dict = {}
    threads = torch_threads(options.threads) if options.threads else contextlib.nullcontext()
    with threads, Sandbox(workers=options.sandbox_workers) as sandbox:
        meter = oracle_meter_set(tokenizer, records, sandbox) if options.roles else None
        trajectories = []
        if analysis_records:
            for source in SOURCES:
                if progress is not None:
                    progress(f"playing the {source} model's trajectories", 0, len(buildable))
                tensors, _ = splice_in_memory(reference_splice(source), pairs)
                write_into(model, {**unmatched[source], **tensors})
                trajectories.append(
                    play(model, tokenizer, analysis_records, sandbox, source, max_turns=options.max_turns,
                         max_new_tokens=options.max_new_tokens, batch_size=options.batch_size,
                         thinking=options.thinking)
                )  # fmt: skip
        for done, variant in enumerate(buildable):
            if progress is not None:
                progress(variant.name, done, len(buildable))
            started = time.perf_counter()
            if variant.low_rank is not None:
                tensors, account = low_rank_in_memory(variant.low_rank, pairs, svd_cache)
            else:
                tensors, account = splice_in_memory(variant.splice, pairs)
            write_into(model, {**unmatched[variant.start], **tensors})
            del tensors
            report, values = None, None
            if variant.main:
                report = evaluate(
                    model, tokenizer, records, general=options.general, roles=False, sandbox=sandbox,
                    max_turns=options.max_turns, max_new_tokens=options.max_new_tokens,
                    batch_size=options.batch_size, n_general_tasks=options.general_tasks,
                    thinking=options.thinking,
                )  # fmt: skip
                if meter is not None:
                    meter_set, indices = meter
                    values = meter_values(model, meter_set)
                    values["environment"] = values["example"].map(dict(enumerate(indices)))
            likelihood = None
            if trajectories:
                scoring = (
                    torch_threads(options.score_threads)
                    if options.score_threads
                    else contextlib.nullcontext()
                )
                with torch.inference_mode(), scoring:
                    # controls need only the trained model's trajectories (the verdict's metric)
                    likelihood = score(model, trajectories if variant.main else trajectories[:1])
            played = (report.episodes, report.tool_use, report.general) if report else (None, None, None)
            seconds = time.perf_counter() - started
            results.append(VariantResult(variant, account, *played, values, seconds, likelihood))
    if progress is not None:
        progress("", len(buildable), len(buildable))
    return results
