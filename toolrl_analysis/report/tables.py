"""The run's saved files read back as tables, with their uncertainties. Nothing here runs a model.

Tool-use intervals come from a stratified bootstrap over the evaluated environments (the ablation's
bootstrap, `analysis/ablate/bootstrap.py`), paired across policies whenever they were evaluated on the same
environments in the same order, which `reproduce` guarantees.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from toolrl_analysis.analysis.ablate.bootstrap import Estimate, Resamples, binomial, stratified_resamples
from toolrl_analysis.analysis.ablate.tables import role_estimates, tool_use_estimates
from toolrl_analysis.analysis.stats import bounds_text
from toolrl_analysis.envs.schema import SCENARIOS

POLICIES = {"base": "base", "grpo": "GRPO", "reinforce_pp": "Reinforce++"}
TRAINED = ("grpo", "reinforce_pp")
REPLICATES = 2000
SEED = 0
ORDER = [*SCENARIOS, "overall"]


def read_csv(path: Path) -> pd.DataFrame | None:
    return pd.read_csv(path) if path.is_file() and path.stat().st_size else None


def read_json(path: Path) -> dict[str, Any] | None:
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else None


# -- environments ------------------------------------------------------------------------------------
def environment_table(run: Path) -> pd.DataFrame | None:
    """Per scenario (every split together): environments per split, sub-questions, tools offered,
    distractors, merged tools, and the share of environments each complexity-scaling operation was applied
    to."""
    from toolrl_analysis.envs.pipeline import SPLIT_FILES
    from toolrl_analysis.envs.scaling import OPERATIONS
    from toolrl_analysis.envs.schema import read_envs

    paths = {split: run / "envs" / name for split, name in SPLIT_FILES.items()}
    if not all(paths[split].is_file() for split in ("train", "test")):
        return None
    splits = [split for split, path in paths.items() if path.is_file()]
    rows = []
    for split in splits:
        path = paths[split]
        for record in read_envs(path):
            meta = record.meta
            row = {
                "scenario": record.scenario,
                "split": split,
                "subquestions": record.n_subquestions,
                "tools": len(record.tools),
                "distractors": len(meta.get("distractors") or []),
                "merges": len(meta.get("merges") or []),
            }
            row |= {op: op in (meta.get("scaling") or []) for op in OPERATIONS}
            rows.append(row)
    frame = pd.DataFrame(rows)
    out = []
    for scenario in [s for s in SCENARIOS if s in set(frame["scenario"])]:
        chosen = frame[frame["scenario"] == scenario]
        subs = chosen["subquestions"]
        row = {
            "scenario": scenario,
            **{split: int((chosen["split"] == split).sum()) for split in splits},
            "sub-questions": f"{subs.mean():.2f} ({subs.min()}-{subs.max()})",
            "tools offered": f"{chosen['tools'].mean():.2f}",
            "distractors": f"{chosen['distractors'].mean():.2f}",
            "merges / env": f"{chosen['merges'].mean():.2f}",
        }
        row |= {op.replace("_", " "): f"{chosen[op].mean():.0%}" for op in OPERATIONS}
        out.append(row)
    return pd.DataFrame(out)


# -- tool use ------------------------------------------------------------------------------------------
# Where each test split's evaluation lives under eval/<policy>/: the headline split of held-out worlds, and
# the split about the training worlds (reproduce/chain.py writes both).
SPLIT_DIRS = {"test": "", "test_same_world": "same_world"}


def episodes_of(run: Path, split: str = "test", policies=None) -> dict[str, pd.DataFrame]:
    found = {}
    for policy in policies or POLICIES:
        frame = read_csv(run / "eval" / policy / SPLIT_DIRS[split] / "episodes.csv")
        if frame is not None and not frame.empty:
            found[policy] = frame
    return found


def resamples_for(episodes: pd.DataFrame, replicates: int = REPLICATES, seed: int = SEED) -> Resamples:
    return stratified_resamples(episodes["scenario"].tolist(), replicates, seed)


def paired(episodes: dict[str, pd.DataFrame]) -> bool:
    """Whether every policy was evaluated on the same environments in the same order."""
    ids = [tuple(frame["env_id"].astype(str)) for frame in episodes.values()]
    return all(i == ids[0] for i in ids)


def tool_use_estimates_by_policy(
    run: Path, split: str = "test", policies=None
) -> dict[str, dict[tuple[str, str], Estimate]]:
    """policy -> (scope, metric) -> Estimate; one set of resamples for all when the evaluations pair."""
    episodes = episodes_of(run, split, policies)
    if not episodes:
        return {}
    shared = resamples_for(next(iter(episodes.values()))) if paired(episodes) else None
    return {
        policy: tool_use_estimates(frame, shared or resamples_for(frame))
        for policy, frame in episodes.items()
    }


def grpo_seed_runs(run: Path) -> list[str]:
    """The GRPO runs evaluated in this run directory: grpo, then grpo-seed1, grpo-seed2, ..."""
    names = [p.name for p in (run / "eval").glob("grpo-seed*") if p.name.removeprefix("grpo-seed").isdigit()]
    first = ["grpo"] if (run / "eval" / "grpo").is_dir() else []
    return first + sorted(names, key=lambda n: int(n.removeprefix("grpo-seed")))


def seed_gains(run: Path) -> dict[str, dict[str, Estimate]]:
    """GRPO run -> split -> the paired overall Solve-F1 gain over the base on that split."""
    out: dict[str, dict[str, Estimate]] = {}
    policies = ["base", *grpo_seed_runs(run)]
    for split in SPLIT_DIRS:
        estimates = tool_use_estimates_by_policy(run, split, policies)
        if "base" not in estimates:
            continue
        base = estimates["base"][("overall", "solve_f1")]
        for name, found in estimates.items():
            if name != "base":
                out.setdefault(name, {})[split] = found[("overall", "solve_f1")] - base
    return out


def seed_table(run: Path) -> pd.DataFrame | None:
    """One row per GRPO training seed: its paired gain on held-out worlds and on the training worlds, then
    the mean and standard deviation of the gains over seeds."""
    gains = seed_gains(run)
    if not gains:
        return None
    labels = {"test": "gain, held-out worlds [95%]", "test_same_world": "gain, same world [95%]"}
    rows = []
    for index, (name, by_split) in enumerate(gains.items()):
        row = {"GRPO run": name, "seed offset": index}
        row |= {labels[split]: interval(estimate) for split, estimate in by_split.items()}
        rows.append(row)
    if len(gains) > 1:
        row = {"GRPO run": f"mean ± sd over {len(gains)} seeds", "seed offset": ""}
        for split, text in labels.items():
            values = [by[split].value for by in gains.values() if split in by]
            if len(values) > 1:
                row[text] = f"{np.mean(values):+.3f} ± {np.std(values, ddof=1):.3f}"
        rows.append(row)
    return pd.DataFrame(rows)


def interval(estimate: Estimate, digits: int = 3) -> str:
    low, high = estimate.interval
    return f"{estimate.value:.{digits}f} [{low:.{digits}f}, {high:.{digits}f}]"


def tool_use_table(estimates: dict[str, dict[tuple[str, str], Estimate]], metric: str) -> pd.DataFrame:
    """One row per scenario, one column per policy: `metric` with its 95% interval."""
    rows = []
    for scope in ORDER:
        row = {"scenario": scope}
        for policy, by_key in estimates.items():
            if (scope, metric) in by_key:
                row[POLICIES[policy]] = interval(by_key[(scope, metric)])
        if len(row) > 1:
            rows.append(row)
    return pd.DataFrame(rows)


def tool_use_points(run: Path, metric: str = "solve_f1") -> pd.DataFrame:
    """policy, scenario, `metric`, low, high: each policy's test-split score per scenario and overall with its
    95% bootstrap interval over environments (the report's intervals), for the bar chart."""
    rows = []
    for policy, estimates in tool_use_estimates_by_policy(run).items():
        for (scope, name), estimate in estimates.items():
            if name == metric:
                low, high = estimate.interval
                rows.append(
                    {
                        "policy": POLICIES[policy],
                        "scenario": scope,
                        metric: estimate.value,
                        "low": low,
                        "high": high,
                    }
                )
    return pd.DataFrame(rows, columns=["policy", "scenario", metric, "low", "high"])


# -- general ability ---------------------------------------------------------------------------------
def general_values(run: Path, policy: str) -> dict[str, float] | None:
    frame = read_csv(run / "eval" / policy / "general.csv")
    if frame is None:
        return None
    return {f"{r.suite}.{r.metric}": float(r.value) for r in frame.itertuples()}


def general_table(run: Path) -> pd.DataFrame | None:
    values = {p: v for p in POLICIES if (v := general_values(run, p)) is not None}
    if not values:
        return None
    rows = []
    for policy, found in values.items():
        accuracy = binomial(found["tasks.exact_match"], int(found.get("tasks.tasks", 0)))
        row = {
            "policy": POLICIES[policy],
            "held-out text loss": f"{found['heldout_text.loss']:.4f}",
            "exact match [95%]": f"{accuracy['value']:.3f} [{accuracy['low']:.3f}, {accuracy['high']:.3f}]",
            "contains answer": f"{found.get('tasks.contains_answer', float('nan')):.3f}",
            "tasks": int(found.get("tasks.tasks", 0)),
        }
        if "base" in values:  # the base is the reference of the change, not a row with a missing value
            loss = values["base"]["heldout_text.loss"]
            change = (found["heldout_text.loss"] - loss) / loss
            row["loss change vs base"] = "(reference)" if policy == "base" else f"{change:+.2%}"
        rows.append(row)
    return pd.DataFrame(rows)


# -- context reading (role-NLL table) -----------------------------------------------------------------
def role_table_by_policy(run: Path) -> pd.DataFrame | None:
    from toolrl_analysis.context_meter import role_table

    tables = {}
    for policy in POLICIES:
        frame = read_csv(run / "eval" / policy / "roles.csv")
        if frame is not None:
            tables[policy] = role_table(frame).set_index("role")
    if not tables:
        return None
    first = next(iter(tables.values()))
    out = pd.DataFrame({"role": first.index, "tokens": first["tokens"].to_numpy()})
    for policy, table in tables.items():
        out[f"NLL {POLICIES[policy]}"] = out["role"].map(table["nll_real"])
        out[f"gap {POLICIES[policy]}"] = out["role"].map(table["gap"])
    return out[out["tokens"] > 0].reset_index(drop=True)


# -- ablation ----------------------------------------------------------------------------------------
def ablation_estimates(run: Path, metric: str = "solve_f1") -> dict[str, Any] | None:
    """variant -> overall `metric` Estimate, and the context gap of base and trained, from the ablation's
    saved episodes and meter sums, with the ablation's own bootstrap draws (seed and replicates)."""
    episodes = read_csv(run / "ablate" / "episodes.csv")
    document = read_json(run / "ablate" / "ablation.json")
    if episodes is None or document is None:
        return None
    summary = document.get("summary", {})
    first = episodes[episodes["variant"] == episodes["variant"].iloc[0]]
    resamples = stratified_resamples(
        first["scenario"].tolist(),
        int(summary.get("bootstrap_replicates", 1000)),
        int(summary.get("seed", 0)),
    )
    values = {
        variant: tool_use_estimates(frame.reset_index(drop=True), resamples)[("overall", metric)]
        for variant, frame in episodes.groupby("variant", sort=False)
    }
    gaps = {}
    meter = read_csv(run / "ablate" / "meter.csv")
    if meter is not None:
        for variant in ("base", "trained"):
            found = role_estimates(meter[meter["variant"] == variant], len(first), resamples)
            if ("overall", "context_gap") in found:
                gaps[variant] = found[("overall", "context_gap")]
    return {"metric": values, "context_gap": gaps, "environments": len(first), "summary": summary}


def ablation_table(run: Path) -> pd.DataFrame | None:
    """The grid's main variants: parameters, update share, Solve-F1, and the fraction of the change each keeps
    in Solve-F1 and in the teacher-forced metric (controls are summarised by the verdict table)."""
    variants = read_csv(run / "ablate" / "variants.csv")
    if variants is None:
        return None
    metric = variants["retained_metric"].iloc[0] if "retained_metric" in variants else "solve_f1"
    if "control" in variants:
        variants = variants[~variants["control"].astype(bool)]
    rows = []
    for row in variants.to_dict(orient="records"):
        reference = row["variant"] in ("base", "trained")  # the two models themselves: nothing spliced
        played = row.get("played", True) and not pd.isna(row.get(metric, float("nan")))
        rows.append(
            {
                "variant": row["variant"],
                "parameters spliced": "(reference)" if reference else f"{int(row['parameters']):,}",
                "update share": ""
                if reference or pd.isna(row["update_share"])
                else f"{row['update_share']:.2f}",
                f"{metric} (mean ± s.e.)": f"{row[metric]:.3f} ± {row.get(f'{metric}_se', float('nan')):.3f}"
                if played
                else "",
                f"{metric} kept [95%]": fraction_text(row, "gain_retained"),
                "LL kept [95%]": fraction_text(row, "ll_retained"),
            }
        )
    return pd.DataFrame(rows)


def fraction_text(row: dict, column: str) -> str:
    """`column` of a row with its `_low` / `_high` bounds (`bounds_text`)."""
    return bounds_text(row.get(column), row.get(f"{column}_low"), row.get(f"{column}_high"))


def role_kept_table(run: Path, variants=("revert mlp@lower", "transplant mlp@lower")) -> pd.DataFrame | None:
    """Per token role, on the trained model's trajectories: the fraction of the change `variants` keep."""
    roles = read_csv(run / "ablate" / "roles_kept.csv")
    if roles is None or roles.empty:
        return None
    chosen = roles[(roles["source"] == "trained") & roles["variant"].isin(variants)]
    if chosen.empty:
        return None
    table = chosen.assign(kept=[bounds_text(r.kept, r.low, r.high) for r in chosen.itertuples()])
    wide = table.pivot_table(
        index=["role", "tokens"], columns="variant", values="kept", aggfunc="first", sort=False
    )
    return wide.reset_index()


def ablation_verdicts(run: Path) -> list[dict[str, Any]]:
    """The grid's verdict objects, recomputed from the saved files by `ablate`'s own rule (empty without)."""
    from toolrl_analysis.analysis.ablate import verdicts_of

    document, likelihood = (
        read_json(run / "ablate" / "ablation.json"),
        read_csv(run / "ablate" / "likelihood.csv"),
    )
    return [] if document is None or likelihood is None else verdicts_of(document, likelihood)


def verdict_table(verdicts: list[dict[str, Any]]) -> pd.DataFrame:
    """One row per subset: the fraction its revert (or the rank-k transplant) keeps, its controls' spread,
    the effect E with its interval, Holm's p, the minimum detectable effect, and the verdict."""
    rows = []
    for found in verdicts:
        side = found.get(found["decided_by"]) or {}
        controls, effect = side.get("controls") or {}, side.get("effect") or {}
        fraction = found.get(f"{found['decided_by']}_fraction") or {}
        rows.append(
            {
                "subset": found["subset"],
                "measured by": found["decided_by"],
                "kept by the subset": bounds_text(fraction.get("value"), fraction.get("low"), fraction.get("high")),
                "kept by its controls (mean ± sd, draws)": (
                    f"{controls['mean']:.3f} ± {controls['sd']:.3f} ({controls['draws']})" if controls else "none"
                ),
                "E [95%]": bounds_text(effect.get("value"), effect.get("low"), effect.get("high")),
                "Holm p": f"{side['p_holm']:.3g}" if "p_holm" in side else "",
                "MDE": f"{side['mde']:.3f}" if "mde" in side else "",
                "verdict": found["verdict"],
            }
        )  # fmt: skip
    return pd.DataFrame(rows)


# -- probes ------------------------------------------------------------------------------------------
def probe_frames(run: Path) -> dict[str, pd.DataFrame]:
    names = (
        "probe_summary",
        "probe_comparison",
        "attention_by_block",
        "attention_comparison",
        "head_comparison",
    )
    return {name: frame for name in names if (frame := read_csv(run / "probe" / f"{name}.csv")) is not None}


def probe_table(summary: pd.DataFrame, comparison: pd.DataFrame) -> pd.DataFrame:
    """Per task (residual stream): each model's best layer by accuracy, and where trained and base differ."""
    rows = []
    summary = summary[summary["site"] == "resid"]
    for task, frame in summary.groupby("task", sort=False):
        row = {"task": task}
        for model in ("base", "trained"):
            chosen = frame[frame["model"] == model]
            if chosen.empty:
                continue
            top = chosen.loc[chosen["accuracy_mean"].idxmax()]
            row[f"{model} best layer: accuracy"] = (
                f"{int(top['layer'])}: {top['accuracy_mean']:.2f} [{top['accuracy_ci_low']:.2f}, "
                f"{top['accuracy_ci_high']:.2f}]"
            )
            row[f"{model} selectivity there"] = f"{top['selectivity_mean']:.2f}"
        differs = comparison[(comparison["task"] == task) & (comparison["site"] == "resid")]
        differs = differs[differs["significant"].astype(bool)]
        row["differs (Holm), trained - base"] = (
            ", ".join(f"{r.metric} @{int(r.layer)} {r.diff_mean:+.2f}" for r in differs.itertuples())
            or "nowhere"
        )
        row["detectable selectivity change (median over layers)"] = _smallest_mde(comparison, task)
        if "equivalent" in differs:
            chosen = comparison[(comparison["task"] == task) & (comparison["site"] == "resid")]
            chosen = chosen[chosen["metric"] == "selectivity"]
            row["layers where a 0.05 change is excluded"] = (
                f"{int(chosen['equivalent'].astype(bool).sum())} of {len(chosen)}"
            )
        rows.append(row)
    return pd.DataFrame(rows)


def _smallest_mde(comparison: pd.DataFrame, task: str) -> str:
    """The minimum detectable selectivity change (80% power, 5% two-sided, before Holm) over the task's
    layers: median and range over the layers where at least two environments differ, else n/a."""
    if "mde" not in comparison:
        return "n/a"
    chosen = comparison[(comparison["task"] == task) & (comparison["site"] == "resid")]
    values = chosen.loc[chosen["metric"] == "selectivity", "mde"].dropna()
    if values.empty:
        return "n/a"
    return f"{values.median():.3f} ({values.min():.3f}-{values.max():.3f})"


# -- pass@k and coverage -------------------------------------------------------------------------------
def success_counts_of(run: Path, policy: str) -> tuple[pd.DataFrame, dict[str, Any]] | None:
    """The per-environment successes of eval/<policy>/pass_at_k/ and the sampling settings."""
    from toolrl_analysis.pass_at_k import counts_from_records

    document = read_json(run / "eval" / policy / "pass_at_k" / "evaluation.json")
    if not document or not document.get("success_counts"):
        return None
    return counts_from_records(document["success_counts"]), document.get("info", {})


def pass_at_k_comparison(run: Path, trained: str = "grpo") -> dict[str, Any] | None:
    """Paired pass@k gains, coverage and the kind of gain (pass_at_k.py) of `trained` against the base."""
    from toolrl_analysis.pass_at_k import coverage, gain_kind, paired_gain

    base, other = success_counts_of(run, "base"), success_counts_of(run, trained)
    if base is None or other is None:
        return None
    gains = paired_gain(base[0], other[0])
    return {"gains": gains, "coverage": coverage(base[0], other[0], gains), "kind": gain_kind(gains),
            "info": base[1], "trained": trained}  # fmt: skip
