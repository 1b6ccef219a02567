"""Evaluation: tool use (Solve-P/R/F1 per scenario, greedy, up to 20 turns) and a general-capability suite.

Tool use follows FTRL's `Code/evaluation/evaluation_self.py`: each episode gets its own metrics
(p calls, q solved, n sub-questions; Solve-P = q/p or 1 when p = 0, Solve-R = q/n, Solve-F1 = 2q/(p+n)),
and a scenario's score is the *mean over its episodes* (FTRL writes per-sample metrics and averages them;
its README reports "the average performance across scenarios"). So the `overall` row is the mean of the
scenario means (macro over scenarios), which equals the plain episode mean on FTRL's balanced test set.
Counts such as calls per episode and the format-error rate (malformed tool-call turns / all turns) are
pooled over the whole set for `overall`.

The general suite stands in for the paper's MMLU/BBH/GSM8K: mean token cross-entropy (and perplexity) on
held-out general text, and exact-match accuracy on short question/answer tasks asked through the chat
template (plus a lenient `contains_answer` rate, for chatty real checkpoints). It only uses the model's own
tokenizer and chat template, so it runs on real checkpoints too.

All results are tidy DataFrames; `EvaluationReport` bundles them, writes CSV/JSON, and converts to a dict.
"""

from __future__ import annotations

import math
import os
import re
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd
import torch

from toolrl_analysis.envs.schema import SCENARIOS, EnvRecord
from toolrl_analysis.episodes import GENERAL_TASKS, VARIANT_GENERAL_TASKS, template_kwargs  # noqa: F401
from toolrl_analysis.models.placement import Placement, describe, input_device
from toolrl_analysis.results import json_records, write_results
from toolrl_analysis.rollout import (
    EPISODES,
    STOP_PROMPT_TOO_LONG,
    Episode,
    EpisodeOptions,
    ModelPolicy,
    decode_completion,
    generate,
    model_max_positions,
    pad_token_id_for,
    render_prompt,
    run_episodes,
    stop_token_ids,
)

OVERALL = "overall"
SOLVE_METRICS = ("solve_p", "solve_r", "solve_f1")


# =============================================================================================
# Tool use
# =============================================================================================
def evaluate_tool_use(
    model: torch.nn.Module,
    tokenizer,
    records: Sequence[EnvRecord],
    *,
    sandbox=None,
    max_turns: int = EPISODES.max_turns,
    max_new_tokens: int = EPISODES.max_new_tokens,
    max_prompt_tokens: int | None = None,
    batch_size: int = EPISODES.batch_size,
    on_turn: Callable[[int, list[Episode]], None] | None = None,
    thinking: bool | None = None,
) -> list[Episode]:
    """Greedy episodes on every record. Prompts longer than the model can take end the episode with
    `prompt_too_long` (counted as unsolved), so long FTRL environments never crash a small model."""
    policy = ModelPolicy(
        model, tokenizer, max_new_tokens=max_new_tokens, temperature=0.0, batch_size=batch_size,
        thinking=thinking,
    )  # fmt: skip
    if sandbox is not None:
        return run_episodes(
            policy,
            records,
            sandbox,
            max_turns=max_turns,
            max_prompt_tokens=max_prompt_tokens,
            on_turn=on_turn,
        )
    from toolrl_analysis.envs.sandbox import Sandbox

    with Sandbox(workers=max(2, min(4, os.cpu_count() or 2))) as own_sandbox:
        return run_episodes(
            policy,
            records,
            own_sandbox,
            max_turns=max_turns,
            max_prompt_tokens=max_prompt_tokens,
            on_turn=on_turn,
        )


def sample_tool_use(
    model: torch.nn.Module,
    tokenizer,
    records: Sequence[EnvRecord],
    *,
    samples: int,
    temperature: float,
    sandbox,
    seed: int = 0,
    max_turns: int = EPISODES.max_turns,
    max_new_tokens: int = EPISODES.max_new_tokens,
    max_prompt_tokens: int | None = None,
    batch_size: int = EPISODES.batch_size,
    on_turn: Callable[[int, list[Episode]], None] | None = None,
    thinking: bool | None = None,
) -> pd.DataFrame:
    """`samples` episodes of every record at `temperature` (one seeded generator, so a rerun gives the same
    episodes): the episode table with a `sample` column, for pass@k (pass_at_k.py)."""
    policy = ModelPolicy(
        model, tokenizer, max_new_tokens=max_new_tokens, temperature=temperature, batch_size=batch_size,
        generator=torch.Generator().manual_seed(seed), thinking=thinking,
    )  # fmt: skip
    return sampled_episodes(policy, records, samples, sandbox, max_turns, max_prompt_tokens, on_turn)


def sampled_episodes(
    policy, records: Sequence[EnvRecord], samples: int, sandbox, max_turns: int = EPISODES.max_turns,
    max_prompt_tokens: int | None = None, on_turn: Callable[[int, list[Episode]], None] | None = None,
) -> pd.DataFrame:  # fmt: skip
    """`samples` episodes of every record with any policy: the episode table with a `sample` column."""
    repeated = [record for record in records for _ in range(samples)]
    episodes = run_episodes(
        policy, repeated, sandbox, max_turns=max_turns, max_prompt_tokens=max_prompt_tokens, on_turn=on_turn
    )
    table = episode_table(episodes)
    table.insert(1, "sample", [index % samples for index in range(len(table))])
    return table


def episode_table(episodes: Sequence[Episode]) -> pd.DataFrame:
    """One row per episode: identity, counts, stop reason and its Solve metrics."""
    rows = []
    for episode in episodes:
        rows.append(
            {
                "episode": episode.index,
                "env_id": episode.record.env_id,
                "scenario": episode.scenario,
                "turns": len(episode.turns),
                "calls": episode.n_calls,
                "solved": episode.n_solved,
                "subquestions": episode.n_subquestions,
                "format_errors": episode.n_format_errors,
                "reward": episode.total_reward,
                "stop_reason": episode.stop_reason,
                **episode.metrics(),
            }
        )
    columns = [
        "episode",
        "env_id",
        "scenario",
        "turns",
        "calls",
        "solved",
        "subquestions",
        "format_errors",
        "reward",
        "stop_reason",
        *SOLVE_METRICS,
    ]
    return pd.DataFrame(rows, columns=columns)


def _scenario_order(scenarios) -> list[str]:
    known = [s for s in SCENARIOS if s in set(scenarios)]
    return known + sorted(set(scenarios) - set(known))


def _summary_rows(scenario: str, frame: pd.DataFrame) -> list[dict[str, Any]]:
    turns = int(frame["turns"].sum())
    values = {metric: float(frame[metric].mean()) for metric in SOLVE_METRICS}
    values["calls_per_episode"] = float(frame["calls"].mean())
    values["turns_per_episode"] = float(frame["turns"].mean())
    values["format_error_rate"] = float(frame["format_errors"].sum() / turns) if turns else 0.0
    values["prompt_too_long_rate"] = float((frame["stop_reason"] == STOP_PROMPT_TOO_LONG).mean())
    return [
        {"scenario": scenario, "metric": m, "value": v, "episodes": len(frame)} for m, v in values.items()
    ]


def summarize_tool_use(table: pd.DataFrame) -> pd.DataFrame:
    """Tidy summary, one row per scenario x metric (`scenario, metric, value, episodes`), plus `overall`.

    Per scenario every metric is a mean over its episodes, except `format_error_rate` (pooled over turns).
    `overall`: Solve-P/R/F1 are the mean of the scenario means (FTRL's cross-scenario average); the
    other metrics are pooled over all episodes.
    """
    columns = ["scenario", "metric", "value", "episodes"]
    if table.empty:
        return pd.DataFrame(columns=columns)
    rows: list[dict[str, Any]] = []
    for scenario in _scenario_order(table["scenario"].unique()):
        rows.extend(_summary_rows(scenario, table[table["scenario"] == scenario]))
    overall = _summary_rows(OVERALL, table)
    scenario_means = pd.DataFrame(rows)
    for row in overall:
        if row["metric"] in SOLVE_METRICS:
            row["value"] = float(
                scenario_means.loc[scenario_means["metric"] == row["metric"], "value"].mean()
            )
    rows.extend(overall)
    return pd.DataFrame(rows, columns=columns)


def summary_value(summary: pd.DataFrame, metric: str = "solve_f1", scenario: str = OVERALL) -> float:
    """One number from a `summarize_tool_use` frame, e.g. the overall Solve-F1."""
    rows = summary[(summary["scenario"] == scenario) & (summary["metric"] == metric)]
    if rows.empty:
        raise KeyError(f"no metric {metric!r} for scenario {scenario!r}")
    return float(rows["value"].iloc[0])


def solved_subquestions(episode: Episode) -> list[tuple[dict[str, Any], bool]]:
    """Pair each `meta.subquestions` entry with whether the episode solved it.

    A sub-question is identified by its tool and answer; the answers solved for a tool are the initial
    `unsolved_set[tool]` minus what is left at the end (as multisets). Entries whose (tool, answer) is not
    in the initial unsolved_set cannot be judged and are left out.
    """
    initial = {tool: Counter(answers) for tool, answers in episode.record.unsolved_set.items()}
    solved = {tool: counts - Counter(episode.unsolved_set.get(tool, [])) for tool, counts in initial.items()}
    pairs = []
    for sub in episode.record.meta.get("subquestions") or []:
        tool, answer = str(sub.get("tool", "")), str(sub.get("answer", ""))
        if initial.get(tool, Counter())[answer] <= 0:
            continue
        initial[tool][answer] -= 1
        hit = solved[tool][answer] > 0
        if hit:
            solved[tool][answer] -= 1
        pairs.append((sub, hit))
    return pairs


def hop_breakdown(episodes: Sequence[Episode]) -> pd.DataFrame:
    """Fraction of sub-questions at hop k solved, for the multi-hop scenarios (`scenario, hop, subquestions,
    solved, solved_fraction`), plus `overall` over those scenarios. Records without `meta` are skipped."""
    rows = []
    for episode in episodes:
        if "multi_hop" not in episode.scenario:
            continue
        for sub, hit in solved_subquestions(episode):
            if sub.get("hop") is not None:
                rows.append({"scenario": episode.scenario, "hop": int(sub["hop"]), "solved": int(hit)})
    columns = ["scenario", "hop", "subquestions", "solved", "solved_fraction"]
    if not rows:
        return pd.DataFrame(columns=columns)
    raw = pd.DataFrame(rows)
    frames = [raw, raw.assign(scenario=OVERALL)]
    grouped = (
        pd.concat(frames)
        .groupby(["scenario", "hop"], sort=False)
        .agg(subquestions=("solved", "size"), solved=("solved", "sum"))
        .reset_index()
    )
    grouped["solved_fraction"] = grouped["solved"] / grouped["subquestions"]
    order = {s: i for i, s in enumerate([*_scenario_order(raw["scenario"].unique()), OVERALL])}
    grouped = grouped.sort_values(
        ["scenario", "hop"], key=lambda c: c.map(order) if c.name == "scenario" else c
    )
    return grouped[columns].reset_index(drop=True)


# =============================================================================================
# General capability
# =============================================================================================
@torch.no_grad()
def heldout_lm_loss(
    model: torch.nn.Module, tokenizer, texts: Sequence[str], *, max_length: int = 512, batch_size: int = 8
) -> dict[str, float]:
    """Mean next-token cross-entropy over all tokens of `texts` (cut into windows of `max_length`), and
    its perplexity. Token-weighted, so long texts count for more."""
    max_length = min(max_length, model_max_positions(model))
    windows = []
    for text in texts:
        ids = tokenizer(text, verbose=False)["input_ids"]  # long texts are cut into windows below
        windows.extend(ids[i : i + max_length] for i in range(0, len(ids), max_length))
    windows = [w for w in windows if len(w) >= 2]
    device = input_device(model)
    pad = pad_token_id_for(tokenizer)
    total_loss, total_tokens = 0.0, 0
    was_training = model.training
    model.eval()
    try:
        for start in range(0, len(windows), batch_size):
            chunk = windows[start : start + batch_size]
            width = max(len(w) for w in chunk)
            ids = torch.full((len(chunk), width), pad, dtype=torch.long, device=device)
            mask = torch.zeros_like(ids)
            for row, window in enumerate(chunk):
                ids[row, : len(window)] = torch.tensor(window)
                mask[row, : len(window)] = 1
            logits = model(input_ids=ids, attention_mask=mask).logits[:, :-1].float()
            targets = ids[:, 1:].masked_fill(mask[:, 1:] == 0, -100)
            loss = torch.nn.functional.cross_entropy(
                logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), ignore_index=-100, reduction="sum"
            )
            total_loss += float(loss)
            total_tokens += int((targets != -100).sum())
    finally:
        model.train(was_training)
    mean = total_loss / total_tokens if total_tokens else float("nan")
    return {"loss": mean, "perplexity": math.exp(min(mean, 50.0)), "tokens": float(total_tokens)}


def _task_messages(task: Any) -> list[dict[str, Any]]:
    """`general_tasks` items carry `messages`; a bare `prompt`/`question` string is accepted too."""
    if isinstance(task, dict) and task.get("messages"):
        return list(task["messages"])
    text = task.get("prompt", task.get("question")) if isinstance(task, dict) else None
    if text is None:
        raise TypeError(f"general task {task!r} has neither 'messages' nor 'prompt'")
    return [{"role": "user", "content": str(text)}]


def task_accuracy(
    model: torch.nn.Module,
    tokenizer,
    tasks: Sequence[dict[str, Any]],
    *,
    max_new_tokens: int = 32,
    batch_size: int = 16,
    thinking: bool | None = None,
) -> dict[str, float]:
    """Exact-match accuracy (`models.general.exact_match`) of greedy answers to `tasks`, each asked
    through the tokenizer's chat template."""
    from toolrl_analysis.models.general import exact_match

    if not tasks:
        return {"accuracy": float("nan"), "contains_answer": float("nan"), "tasks": 0.0}
    stops = stop_token_ids(tokenizer, model)
    budget = model_max_positions(model) - max_new_tokens
    kwargs = template_kwargs(thinking)
    prompts = [render_prompt(tokenizer, _task_messages(t), None, **kwargs)[-budget:] for t in tasks]
    correct = contains = 0
    for start in range(0, len(prompts), batch_size):
        completions = generate(
            model,
            prompts[start : start + batch_size],
            max_new_tokens=max_new_tokens,
            temperature=0.0,
            eos_token_ids=stops,
            pad_token_id=pad_token_id_for(tokenizer),
        )
        for task, completion in zip(tasks[start : start + batch_size], completions, strict=True):
            reply, answer = decode_completion(tokenizer, completion.ids, stops), str(task["answer"]).strip()
            correct += exact_match(reply, answer)
            # Lenient view for chatty real checkpoints ("12 + 5 = 17."): the answer as a whole word.
            contains += re.search(rf"(?<![\w-]){re.escape(answer)}(?!\w)", reply) is not None
    n = len(tasks)
    return {"accuracy": correct / n, "contains_answer": contains / n, "tasks": float(n)}


def evaluate_general(
    model: torch.nn.Module,
    tokenizer,
    *,
    n_tasks: int = GENERAL_TASKS,
    seed: int = 0,
    max_new_tokens: int = 32,
    thinking: bool | None = None,
) -> pd.DataFrame:
    """The general-capability suite as a tidy frame: `suite, metric, value`."""
    from toolrl_analysis.models.general import general_tasks, general_text

    loss = heldout_lm_loss(model, tokenizer, general_text("heldout"))
    accuracy = task_accuracy(
        model, tokenizer, list(general_tasks(n_tasks, seed=seed, split="test")), max_new_tokens=max_new_tokens,
        thinking=thinking,
    )  # fmt: skip
    rows = [
        {"suite": "heldout_text", "metric": "loss", "value": loss["loss"]},
        {"suite": "heldout_text", "metric": "perplexity", "value": loss["perplexity"]},
        {"suite": "heldout_text", "metric": "tokens", "value": loss["tokens"]},
        {"suite": "tasks", "metric": "exact_match", "value": accuracy["accuracy"]},
        {"suite": "tasks", "metric": "contains_answer", "value": accuracy["contains_answer"]},
        {"suite": "tasks", "metric": "tasks", "value": accuracy["tasks"]},
    ]
    return pd.DataFrame(rows, columns=["suite", "metric", "value"])


# =============================================================================================
# Everything together
# =============================================================================================
@dataclass
class EvaluationReport:
    episodes: pd.DataFrame  # one row per episode (episode_table)
    tool_use: pd.DataFrame  # scenario x metric (summarize_tool_use)
    hops: pd.DataFrame  # multi-hop scenarios x hop (hop_breakdown)
    general: pd.DataFrame | None  # suite x metric (evaluate_general), None when skipped
    info: dict[str, Any] = field(default_factory=dict)
    # role x context NLL table of the context-reading meter (context_meter.meter_frame); None when the
    # environments have no golden calls to build oracle trajectories from (e.g. FTRL's files)
    roles: pd.DataFrame | None = None
    # With sampling (samples > 0): one row per sampled episode, successes per environment, and pass@k
    samples: pd.DataFrame | None = None
    success: pd.DataFrame | None = None
    pass_at_k: pd.DataFrame | None = None
    # An environment set's same-world split (its training worlds), greedy, beside the headline test split
    same_world: EvaluationReport | None = None

    def metric(self, metric: str, scenario: str = OVERALL) -> float:
        return summary_value(self.tool_use, metric, scenario)

    def to_dict(self) -> dict[str, Any]:
        def records(frame):
            return None if frame is None else json_records(frame)

        return {
            "info": self.info,
            "tool_use": records(self.tool_use),
            "hops": records(self.hops),
            "general": records(self.general),
            "roles": records(self.roles),
            "pass_at_k": records(self.pass_at_k),
            "success_counts": records(self.success),
            "episodes": records(self.episodes),
        } | ({"same_world": self.same_world.to_dict()} if self.same_world is not None else {})

    def save(self, out_dir: str | Path) -> list[Path]:
        """`tool_use.csv`, `hops.csv`, `episodes.csv`, `general.csv`, `roles.csv`, `samples.csv` and
        `pass_at_k.csv` (when run), and `evaluation.json`."""
        frames = {
            "tool_use": self.tool_use, "hops": self.hops, "episodes": self.episodes, "general": self.general,
            "roles": self.roles, "samples": self.samples, "pass_at_k": self.pass_at_k,
        }  # fmt: skip
        written = write_results(out_dir, frames, self.to_dict(), "evaluation.json")
        out = Path(out_dir)
        if self.same_world is not None:
            written += self.same_world.save(out / "same_world")
        return written


def evaluate(
    model: torch.nn.Module,
    tokenizer,
    records: Sequence[EnvRecord],
    *,
    general: bool = True,
    roles: bool = True,
    sandbox=None,
    max_turns: int = EPISODES.max_turns,
    max_new_tokens: int = EPISODES.max_new_tokens,
    max_prompt_tokens: int | None = None,
    batch_size: int = EPISODES.batch_size,
    n_general_tasks: int = GENERAL_TASKS,
    samples: int = 0,
    temperature: float = 1.0,
    success_threshold: float = 1.0,
    seed: int = 0,
    on_turn: Callable[[int, list[Episode]], None] | None = None,
    thinking: bool | None = None,
) -> EvaluationReport:
    """Greedy tool-use evaluation on `records`; with `samples` > 0 also that many sampled episodes per
    record at `temperature`, and pass@1..samples (a success: Solve-F1 >= `success_threshold`); the
    context-reading meter on their oracle trajectories (unless `roles=False`; skipped for records without
    golden calls) and (unless `general=False`) the general suite."""
    if samples:
        check_sampling(samples, temperature, success_threshold)
    if sandbox is None:
        from toolrl_analysis.envs.sandbox import Sandbox

        with Sandbox(workers=max(2, min(4, os.cpu_count() or 2))) as own_sandbox:
            return evaluate(
                model, tokenizer, records, general=general, roles=roles, sandbox=own_sandbox,
                max_turns=max_turns, max_new_tokens=max_new_tokens, max_prompt_tokens=max_prompt_tokens,
                batch_size=batch_size, n_general_tasks=n_general_tasks, samples=samples,
                temperature=temperature, success_threshold=success_threshold, seed=seed, on_turn=on_turn,
                thinking=thinking,
            )  # fmt: skip
    from toolrl_analysis.context_meter import measure_roles
    from toolrl_analysis.pass_at_k import pass_at_k_table, success_counts

    budgets = dict(max_turns=max_turns, max_new_tokens=max_new_tokens, max_prompt_tokens=max_prompt_tokens,
                   thinking=thinking)  # fmt: skip
    episodes = evaluate_tool_use(
        model, tokenizer, records, sandbox=sandbox, batch_size=batch_size, on_turn=on_turn, **budgets
    )
    table = episode_table(episodes)
    info: dict[str, Any] = {
        "environments": len(records),
        "max_turns": max_turns,
        "max_new_tokens": max_new_tokens,
        "decoding": "greedy",
    } | ({"enable_thinking": thinking} if thinking is not None else {})
    sampled = success = passk = None
    if samples:
        sampled = sample_tool_use(
            model, tokenizer, records, samples=samples, temperature=temperature, sandbox=sandbox, seed=seed,
            batch_size=batch_size, on_turn=on_turn, **budgets,
        )  # fmt: skip
        success = success_counts(sampled, success_threshold)
        passk = pass_at_k_table(success)
        info |= {"samples": samples, "temperature": temperature, "success_threshold": success_threshold}
    return EvaluationReport(
        episodes=table,
        tool_use=summarize_tool_use(table),
        hops=hop_breakdown(episodes),
        general=evaluate_general(model, tokenizer, n_tasks=n_general_tasks, thinking=thinking)
        if general
        else None,
        roles=measure_roles(model, tokenizer, records, sandbox) if roles else None,
        info=info,
        samples=sampled,
        success=success,
        pass_at_k=passk,
    )


def check_sampling(samples: int, temperature: float, threshold: float) -> None:
    """One-line errors for the sampling options, named as the command line names them."""
    from toolrl_analysis.errors import ConfigError

    if samples < 0:
        raise ConfigError(f"--samples must be at least 1 (or left out for greedy only), got {samples}")
    if not (temperature > 0 and math.isfinite(temperature)):
        raise ConfigError(f"--temperature must be a positive number when sampling, got {temperature}")
    if not 0 < threshold <= 1:
        raise ConfigError(f"--success-threshold must be in (0, 1] (a Solve-F1), got {threshold}")


def evaluate_checkpoint(
    model_path: str | Path,
    envs_path: str | Path,
    *,
    limit: int | None = None,
    general: bool = True,
    placement: Placement | None = None,
    **options: Any,
) -> EvaluationReport:
    """Load a checkpoint (our `.pt` or an HF directory; where `placement` says) and environments from disk,
    then `evaluate`. An
    environment-set directory evaluates its test.jsonl (held-out worlds) and, greedy, its test_same_world.jsonl
    (the training worlds) into `.same_world`. A missing or unreadable checkpoint raises CheckpointError; a bad
    environment file EnvFormatError."""
    from toolrl_analysis.envs.schema import limited, read_envs
    from toolrl_analysis.errors import CheckpointError, ConfigError
    from toolrl_analysis.models.checkpoint import load_policy
    from toolrl_analysis.models.embedded import is_embedded

    if limit is not None and limit < 1:
        raise ConfigError("--limit must be a positive number of environments")
    EpisodeOptions(
        **{k: options[k] for k in ("max_turns", "max_new_tokens", "batch_size", "thinking") if k in options}
    )
    check_sampling(
        options.get("samples", 0), options.get("temperature", 1.0), options.get("success_threshold", 1.0)
    )
    if not is_embedded(model_path) and not Path(model_path).exists():
        raise CheckpointError(f"no such checkpoint: {model_path}")
    envs_path, same_path = Path(envs_path), None
    if envs_path.is_dir():  # an environment set: its headline test split, and its same-world split if built
        envs_path, same_path = envs_path / "test.jsonl", envs_path / "test_same_world.jsonl"
    records = limited(read_envs(envs_path), limit)
    model, tokenizer = load_policy(model_path, placement=placement)
    report = evaluate(model, tokenizer, records, general=general, **options)
    report.info.update({"model": str(model_path), "envs": str(envs_path)} | describe(model))
    if same_path is not None and same_path.is_file():
        greedy = {k: v for k, v in options.items() if k not in ("samples", "roles")}
        report.same_world = evaluate(
            model, tokenizer, limited(read_envs(same_path), limit), general=False, roles=False, **greedy
        )
        report.same_world.info.update({"model": str(model_path), "envs": str(same_path)})
    return report
