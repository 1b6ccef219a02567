"""Variant results -> tidy frames with uncertainties: `metrics` (long: one row per variant x figure, each
with value, se and a 95% interval) and `variants` (wide: one row per variant, with the fraction of the
training gain retained)."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pandas as pd

from toolrl_analysis.analysis.ablate.bootstrap import (
    Estimate,
    Resamples,
    binomial,
    gain_retained,
    group_means,
    macro_mean,
    ratio_of_sums,
)
from toolrl_analysis.analysis.ablate.grid import Variant
from toolrl_analysis.analysis.ablate.variants import VariantResult
from toolrl_analysis.context_meter import CONTEXT_ROLES, ROLES
from toolrl_analysis.evaluate import OVERALL, SOLVE_METRICS

METRIC_COLUMNS = ["variant", "group", "scope", "metric", "value", "se", "low", "high"]
# Figures the fraction of the gain retained can be computed on (the overall value of each).
RETAINED_METRICS = ("solve_f1", "solve_p", "solve_r", "nll_real", "context_gap")
_NO_SAMPLING = ("loss", "perplexity")  # a fixed text scored deterministically: no sampling uncertainty


def tool_use_estimates(episodes: pd.DataFrame, resamples: Resamples) -> dict[tuple[str, str], Estimate]:
    """(scope, metric) -> estimate: Solve-P/R/F1 per scenario and overall (macro over scenarios, as
    `evaluate`), calls per episode and the format-error rate (pooled over turns)."""
    out: dict[tuple[str, str], Estimate] = {}
    scenarios = episodes["scenario"].to_numpy()
    for metric in SOLVE_METRICS:
        by_group = group_means(episodes[metric].to_numpy(float), resamples)
        out.update({(scenario, metric): by_group[scenario] for scenario in by_group})
        out[(OVERALL, metric)] = macro_mean(list(by_group.values()))
    ones = np.ones(len(episodes))
    for scope in [*resamples.groups, OVERALL]:
        mask = np.ones(len(episodes), bool) if scope == OVERALL else scenarios == scope
        calls, turns = episodes["calls"].to_numpy(float) * mask, episodes["turns"].to_numpy(float) * mask
        out[(scope, "calls_per_episode")] = ratio_of_sums(calls, ones * mask, resamples)
        out[(scope, "format_error_rate")] = ratio_of_sums(
            episodes["format_errors"].to_numpy(float) * mask, turns, resamples
        )
    return out


def role_estimates(meter: pd.DataFrame, n: int, resamples: Resamples) -> dict[tuple[str, str], Estimate]:
    """(role, metric) -> estimate from the meter's per-environment sums: NLL with the real and the replaced
    context, their gap, top-1 accuracy; and the one-number `context_gap` over the context roles."""

    def per_environment(frame: pd.DataFrame, column: str) -> np.ndarray:
        totals = frame.groupby("environment")[column].sum()
        values = np.zeros(n)
        values[totals.index.to_numpy(int)] = totals.to_numpy(float)
        return values

    out: dict[tuple[str, str], Estimate] = {}
    for role in (*ROLES, "all"):
        sums = {}
        for context in ("real", "replaced"):
            chosen = meter[meter["context"] == context]
            if role != "all":
                chosen = chosen[chosen["role"] == role]
            sums[context] = {c: per_environment(chosen, c) for c in ("nll_sum", "top1_sum", "tokens")}
        if not sums["real"]["tokens"].sum():
            continue
        real = ratio_of_sums(sums["real"]["nll_sum"], sums["real"]["tokens"], resamples)
        replaced = ratio_of_sums(sums["replaced"]["nll_sum"], sums["replaced"]["tokens"], resamples)
        out[(role, "nll_real")] = real
        out[(role, "nll_replaced")] = replaced
        out[(role, "gap")] = replaced - real
        out[(role, "top1_real")] = ratio_of_sums(sums["real"]["top1_sum"], sums["real"]["tokens"], resamples)
    context = meter[meter["role"].isin(CONTEXT_ROLES)]
    signed = context.assign(nll_sum=np.where(context["context"] == "real", -1.0, 1.0) * context["nll_sum"])
    tokens = per_environment(context[context["context"] == "real"], "tokens")
    if tokens.sum():
        out[(OVERALL, "context_gap")] = ratio_of_sums(per_environment(signed, "nll_sum"), tokens, resamples)
    return out


def general_rows(general: pd.DataFrame | None) -> list[dict]:
    """The general suite with its uncertainty: task accuracies binomial (Wilson), the held-out text none."""
    if general is None:
        return []
    values = {(r.suite, r.metric): float(r.value) for r in general.itertuples()}
    count = int(values.get(("tasks", "tasks"), 0))
    rows = []
    for (suite, metric), value in values.items():
        if metric in ("tokens", "tasks"):
            continue
        if metric in _NO_SAMPLING:
            nan = float("nan")
            stats = {"value": value, "se": nan, "low": nan, "high": nan}
        else:
            stats = binomial(value, count)
        rows.append({"group": "general", "scope": suite, "metric": metric, **stats})
    return rows


def build_frames(
    variants: Sequence[Variant],
    results: Sequence[VariantResult],
    resamples: Resamples,
    metric: str,
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(`metrics`, `variants`) frames; see the module docstring."""
    estimates: dict[str, dict[tuple[str, str], Estimate]] = {}
    rows: list[dict] = []
    n = resamples.weights.shape[1]
    for result in results:
        name = result.variant.name
        if result.episodes is None:  # a control: scored by the teacher-forced metric only
            continue
        tool = tool_use_estimates(result.episodes, resamples)
        roles = role_estimates(result.meter, n, resamples) if result.meter is not None else {}
        estimates[name] = {**tool, **roles}
        rows += [
            {"variant": name, "group": "tool_use", "scope": s, "metric": m, **e.summary()}
            for (s, m), e in tool.items()
        ]
        rows += [
            {"variant": name, "group": "roles", "scope": s, "metric": m, **e.summary()}
            for (s, m), e in roles.items()
        ]
        rows += [{"variant": name, **row} for row in general_rows(result.general)]
    metrics = pd.DataFrame(rows, columns=METRIC_COLUMNS)
    by_name = {r.variant.name: r for r in results}
    wide = [_variant_row(v, by_name.get(v.name), estimates, metrics, metric, n) for v in variants]
    return metrics, pd.DataFrame(wide)


def _variant_row(
    variant: Variant,
    result: VariantResult | None,
    estimates: dict[str, dict[tuple[str, str], Estimate]],
    metrics: pd.DataFrame,
    metric: str,
    n: int,
) -> dict:
    nan = float("nan")
    row = {
        "variant": variant.name,
        "kind": variant.kind,
        "subset": variant.subset or "",
        "control": variant.control,
        "parameters": result.account.parameters if result else 0,
        "update_share": result.account.update_share if result else nan,
        "draw": variant.draw if variant.draw is not None else -1,
        "control_energy_ratio": variant.drawn.energy_ratio if variant.drawn else nan,
        "evaluated": result is not None,
        "played": result is not None and result.episodes is not None,
        "seconds": result.seconds if result else nan,
        "note": variant.note,
    }
    own = metrics[metrics["variant"] == variant.name]
    for record in own.itertuples():
        if record.group == "roles" and record.scope != OVERALL:
            continue  # the per-role table stays in `metrics`; the wide row keeps the summary figures
        key = record.metric if record.scope == OVERALL else f"{record.scope}.{record.metric}"
        row[key], row[f"{key}_se"] = record.value, record.se
    row["retained_metric"] = metric
    mine = estimates.get(variant.name, {})
    base, trained = estimates.get("base", {}), estimates.get("trained", {})
    key = (OVERALL, metric) if metric != "nll_real" else ("all", "nll_real")
    if result is None:
        retained = (nan, nan, nan, nan, variant.note or "not evaluated")
    elif result.episodes is None:
        retained = (nan, nan, nan, nan, "a control: scored by the teacher-forced metric only")
    elif key not in mine or key not in base or key not in trained:
        retained = (nan, nan, nan, nan, f"{metric} was not measured")
    else:
        found = gain_retained(mine[key], base[key], trained[key], metric, n)
        retained = (found.value, found.low, found.high, found.se, found.reason)
    names = (
        "gain_retained",
        "gain_retained_low",
        "gain_retained_high",
        "gain_retained_se",
        "gain_retained_reason",
    )
    row.update(dict(zip(names, retained, strict=True)))
    if ("all", "nll_real") in mine:  # the oracle trajectories' NLL over every assistant token
        row["nll_real"], row["nll_real_se"] = mine[("all", "nll_real")].value, mine[("all", "nll_real")].se
    return row
