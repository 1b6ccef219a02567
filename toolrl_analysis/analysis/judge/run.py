"""`judge(base, trained, envs)`: run what each claim needs on one pair, and decide it by its rule (`rules`).

- tool_use: both models play the test split greedily (held-out worlds); paired bootstrap of the Solve-F1 gain.
- general: teacher-forced, paired per item (`retention`).
- context: the oracle trajectories of the analysis split, real and swapped context, compared token by token
  against the base and the sharpened base (`context`).
- lower_mlp: `ablate`'s grid rule on the lower MLPs alone, with their matched controls.

The analyses read the analysis split (`ablate.run.heldout_path`); the tool-use gain reads the test split, as
the final number it is.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd

from toolrl_analysis.analysis.judge.rules import (
    CLAIM_NAMES,
    CLAIMS,
    INCONCLUSIVE,
    LOWER_MLP,
    RULES,
    as_sentence,
    general_rule,
    tool_use_rule,
)
from toolrl_analysis.episodes import EPISODES, EpisodeOptions
from toolrl_analysis.errors import UserError
from toolrl_analysis.models.placement import Placement

Log = Callable[[str], None]


@dataclass
class ClaimResult:
    verdict: str
    evidence: str
    numbers: dict[str, Any] = field(default_factory=dict)


@dataclass
class Judgement:
    verdicts: dict[str, ClaimResult]
    frames: dict[str, pd.DataFrame | None]
    summary: dict[str, Any]
    ablation: Any = None  # the lower-MLP claim's Ablation

    def to_document(self) -> dict[str, Any]:
        from toolrl_analysis.results import json_clean

        verdicts = {
            claim: {"verdict": r.verdict, "evidence": r.evidence, "rule": RULES[claim], "claim": CLAIMS[claim],
                    "numbers": r.numbers}
            for claim, r in self.verdicts.items()
        }  # fmt: skip
        return json_clean({"verdicts": verdicts, "summary": self.summary})

    def write(self, out_dir: str | Path) -> list[Path]:
        """episodes / items / context_roles as CSV, judge.json, and the lower-MLP ablation under lower_mlp/."""
        from toolrl_analysis.results import write_results

        written = write_results(out_dir, self.frames, self.to_document(), "judge.json")
        if self.ablation is not None:
            written += self.ablation.write(Path(out_dir) / "lower_mlp")
        return written


def check_claims(claims: Sequence[str]) -> tuple[str, ...]:
    unknown = [c for c in claims if c not in CLAIM_NAMES]
    if unknown or not claims:
        raise UserError(
            f"unknown claim {unknown[0]!r}; the claims are {', '.join(CLAIM_NAMES)}"
            if unknown
            else f"--claims is empty; the claims are {', '.join(CLAIM_NAMES)}"
        )
    return tuple(dict.fromkeys(claims))


def load_pair(base: str | Path, trained: str | Path, placement: Placement | None = None):
    """((base model, trained model), tokenizer); a pair whose tokenizers differ cannot be compared token by
    token."""
    from toolrl_analysis.models.checkpoint import load_pair as load_models

    return load_models(base, trained, "judging", placement=placement)


def test_path(envs: str | Path) -> Path:
    path = Path(envs)
    return path / "test.jsonl" if path.is_dir() else path


# -- the claims ----------------------------------------------------------------------------------------
def tool_use_claim(
    models, tokenizer, records, sandbox, options: EpisodeOptions
) -> tuple[ClaimResult, pd.DataFrame]:
    from toolrl_analysis.analysis.ablate.bootstrap import stratified_resamples
    from toolrl_analysis.analysis.ablate.tables import OVERALL, tool_use_estimates
    from toolrl_analysis.analysis.diff import torch_threads
    from toolrl_analysis.evaluate import episode_table, evaluate_tool_use

    frames = {}
    for name, model in zip(("base", "trained"), models, strict=True):
        with torch_threads(1):  # generation of a small model: one thread is fastest (ablate's measurement)
            episodes = evaluate_tool_use(model, tokenizer, records, sandbox=sandbox, max_turns=options.max_turns,
                                     max_new_tokens=options.max_new_tokens, batch_size=options.batch_size,
                                     thinking=options.thinking)  # fmt: skip
        frames[name] = episode_table(episodes)
    resamples = stratified_resamples(frames["base"]["scenario"].tolist(), 2000, 0)
    found = {
        name: tool_use_estimates(frame, resamples)[(OVERALL, "solve_f1")] for name, frame in frames.items()
    }
    gain = found["trained"] - found["base"]
    low, high = gain.interval
    verdict = tool_use_rule(low, high)
    evidence = (
        f"on {len(records)} test environments of held-out worlds, Solve-F1 {found['base'].value:.3f} -> "
        f"{found['trained'].value:.3f}, D = {gain.value:+.3f} [{low:+.3f}, {high:+.3f}]"
    )
    numbers = {"base": found["base"].value, "trained": found["trained"].value, "gain": gain.value,
               "low": low, "high": high, "environments": len(records)}  # fmt: skip
    table = pd.concat([f.assign(model=name) for name, f in frames.items()], ignore_index=True)
    return ClaimResult(verdict, evidence, numbers), table


def general_claim(
    models, tokenizer, tool_examples, tasks: int, tool_use: str | None = None
) -> tuple[ClaimResult, pd.DataFrame]:
    from toolrl_analysis.analysis.ablate.contrasts import ratio
    from toolrl_analysis.analysis.judge.retention import Items, exact_match_kept, general_items, score_items

    items = score_items(
        *models,
        [general_items(tokenizer, tasks), Items("tool_use", tool_examples, [None] * len(tool_examples))],
    )
    on_tasks = items[items["kind"] == "general_tasks"]
    retained = exact_match_kept(on_tasks["exact_base"], on_tasks["exact_trained"])
    rises = {}
    for kind, mine in items.groupby("kind", sort=False):
        found = ratio(mine["nll_trained"] - mine["nll_base"], mine["nll_base"])
        rises[kind] = {"value": found.value, "low": found.low, "high": found.high, "items": len(mine),
                       "nll_base": mine["nll_base"].sum() / mine["tokens"].sum(),
                       "nll_trained": mine["nll_trained"].sum() / mine["tokens"].sum()}  # fmt: skip
    verdict, reason = general_rule(retained, rises, tool_use)
    flips = {"lost": retained["lost"], "gained": retained["gained"]}
    measured = (
        f"exact match on {len(on_tasks)} held-out general tasks {on_tasks['exact_base'].mean():.3f} -> "
        f"{on_tasks['exact_trained'].mean():.3f} ({flips['lost']} lost, {flips['gained']} gained), "
        f"R = {_bounds(retained)}; in-distribution loss "
        + "; ".join(
            f"{kind} {r['nll_base']:.4f} -> {r['nll_trained']:.4f} nats/token, rise {_bounds(r, percent=True)}"
            for kind, r in rises.items()
        )
    )
    numbers = {"retained": retained, "rises": rises, "measured": measured, **flips}
    return ClaimResult(verdict, f"{measured}. {as_sentence(reason)}", numbers), items


def _bounds(found: dict[str, Any], percent: bool = False) -> str:
    from toolrl_analysis.analysis.stats import bounds_text

    if not percent:
        return bounds_text(found.get("value"), found.get("low"), found.get("high"), digits=3)
    scaled = [None if v is None else 100 * v for v in (found.get(k) for k in ("value", "low", "high"))]
    return bounds_text(*scaled, digits=2) + " %"


def context_claim(models, meter_set) -> tuple[ClaimResult, pd.DataFrame]:
    from toolrl_analysis.analysis.judge.context import measure_context
    from toolrl_analysis.analysis.judge.outputs import compare_tokens

    real = compare_tokens(*models, meter_set.real)
    swapped = compare_tokens(*models, meter_set.replaced)
    measured = measure_context(real, swapped)
    numbers = {"scale": measured.scale, "tests": measured.tests, "environments": measured.environments}
    return ClaimResult(measured.verdict, measured.evidence(), numbers), measured.roles


def lower_mlp_claim(base, trained, envs, *, analysis_limit, controls, options, placement=None, progress=None):
    from toolrl_analysis.analysis.ablate.run import ablate
    from toolrl_analysis.analysis.ablate.variants import EvaluationOptions

    evaluation = EvaluationOptions(general=False, roles=False, max_turns=options.max_turns,
                                   max_new_tokens=options.max_new_tokens, batch_size=options.batch_size,
                                   thinking=options.thinking, placement=placement)  # fmt: skip
    # the main variants are played on one environment per scenario only: the verdict reads the
    # teacher-forced metric, on the whole analysis split
    ablation = ablate(base, trained, grid="paper", envs=envs, limit=4, analysis_limit=analysis_limit,
                      controls=controls, rank=0, subsets=(LOWER_MLP,), options=evaluation, progress=progress)  # fmt: skip
    found = next((v for v in ablation.verdicts if v["subset"] == LOWER_MLP), None)
    if found is None:
        return ClaimResult(INCONCLUSIVE, "the lower MLPs could not be ablated"), ablation
    fraction = found.get("revert_fraction") or {}
    evidence = (
        f"on {ablation.summary.get('analysis_environments')} analysis environments, reverting {LOWER_MLP} keeps "
        f"F = {_bounds(fraction)} of the change in the trained model's log-likelihood of its own trajectories"
    )
    controls = (found.get("revert") or {}).get("controls") or {}
    if controls.get("mean") is not None and math.isfinite(controls["mean"]):
        evidence += (
            f"; its {controls['draws']} matched controls keep {controls['mean']:.3f} ± {controls['sd']:.3f}"
        )
    return ClaimResult(found["verdict"], f"{evidence}. {found['reason']}.", found), ablation


# -- all together ----------------------------------------------------------------------------------------
def judge(
    base: str | Path,
    trained: str | Path,
    envs: str | Path,
    *,
    claims: Sequence[str] = CLAIM_NAMES,
    limit: int | None = None,
    analysis_limit: int | None = None,
    tasks: int | None = None,
    controls: int | None = None,
    options: EpisodeOptions = EPISODES,
    log: Log | None = None,
    placement: Placement | None = None,
) -> Judgement:
    """Each of `claims` measured on the pair (loaded where `placement` says) and decided (see the module
    docstring)."""
    from toolrl_analysis.analysis.ablate.grid import DEFAULT_CONTROLS
    from toolrl_analysis.analysis.ablate.run import heldout_path, heldout_records
    from toolrl_analysis.analysis.judge.retention import TASKS
    from toolrl_analysis.context_meter import oracle_meter_set
    from toolrl_analysis.envs.sandbox import Sandbox
    from toolrl_analysis.envs.schema import limited, read_envs

    claims = check_claims(claims)
    say = log or (lambda message: None)
    started = time.perf_counter()
    analysis = heldout_records(envs, analysis_limit) if {"general", "context"} & set(claims) else []
    tests = limited(read_envs(test_path(envs)), limit) if "tool_use" in claims else []
    verdicts: dict[str, ClaimResult] = {}
    frames: dict[str, pd.DataFrame | None] = {}
    seconds: dict[str, float] = {}
    if set(claims) - {"lower_mlp"}:
        models, tokenizer = load_pair(base, trained, placement)
        with Sandbox(workers=2) as sandbox:
            meter = oracle_meter_set(tokenizer, analysis, sandbox) if analysis else None
            for claim in [c for c in CLAIM_NAMES if c in claims and c != "lower_mlp"]:
                say(f"judging {claim}")
                at = time.perf_counter()
                if claim == "tool_use":
                    verdicts[claim], frames["episodes"] = tool_use_claim(
                        models, tokenizer, tests, sandbox, options
                    )
                elif meter is None:
                    verdicts[claim] = ClaimResult(INCONCLUSIVE, "no held-out environment has golden calls")
                elif claim == "general":
                    tool_use = verdicts["tool_use"].verdict if "tool_use" in verdicts else None
                    verdicts[claim], frames["items"] = general_claim(
                        models, tokenizer, meter[0].real, tasks or TASKS, tool_use
                    )
                else:
                    verdicts[claim], frames["context_roles"] = context_claim(models, meter[0])
                seconds[claim] = time.perf_counter() - at
    ablation = None
    if "lower_mlp" in claims:
        say("judging lower_mlp (the ablation of the lower MLPs and their controls)")
        at = time.perf_counter()
        verdicts["lower_mlp"], ablation = lower_mlp_claim(
            base, trained, envs, analysis_limit=analysis_limit, controls=controls or DEFAULT_CONTROLS,
            options=options, placement=placement,
        )  # fmt: skip
        seconds["lower_mlp"] = time.perf_counter() - at
    summary = {"base": str(base), "trained": str(trained), "test_envs": str(test_path(envs)),
               "analysis_envs": str(heldout_path(envs)), "claims": list(claims), "seconds": seconds,
               "total_seconds": time.perf_counter() - started}  # fmt: skip
    ordered = {c: verdicts[c] for c in CLAIM_NAMES if c in verdicts}
    return Judgement(ordered, frames, summary, ablation)
