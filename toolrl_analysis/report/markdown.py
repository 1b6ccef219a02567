"""RUN/report.md: the run held against the paper, section by section, from the run's saved files alone."""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from toolrl_analysis.report.tables import (
    POLICIES,
    TRAINED,
    ablation_table,
    ablation_verdicts,
    environment_table,
    general_table,
    pass_at_k_comparison,
    probe_frames,
    probe_table,
    read_csv,
    read_json,
    role_kept_table,
    role_table_by_policy,
    seed_table,
    tool_use_estimates_by_policy,
    tool_use_table,
    verdict_table,
)
from toolrl_analysis.report.update_tables import geometry_table, overlap_table, patching_table
from toolrl_analysis.report.verdicts import judge_all

SMOKE = (
    "> **Smoke run (`--quick`).** Every stage ran at a few environments and one or two RL iterations to "
    "check that the chain works end to end. Nothing below is a result; the verdicts are computed by the "
    "same rules but on far too little data to mean anything."
)


def markdown_table(frame: pd.DataFrame, digits: int = 3) -> str:
    frame = frame.copy()
    for column in frame.columns:
        if pd.api.types.is_float_dtype(frame[column]):
            frame[column] = frame[column].map(lambda v: "n/a" if pd.isna(v) else f"{v:.{digits}f}")
    header = "| " + " | ".join(map(str, frame.columns)) + " |"
    rule = "|" + "---|" * len(frame.columns)
    rows = [
        "| " + " | ".join(str(v).replace("|", "\\|") for v in row) + " |"
        for row in frame.itertuples(index=False)
    ]
    return "\n".join([header, rule, *rows])


def _figures(run: Path, *names: str) -> list[str]:
    return [f"![{name}](figures/{name}.png)" for name in names if (run / "figures" / f"{name}.png").is_file()]


def _header(run: Path) -> list[str]:
    lines = ["# Reproducing FTRL's analysis (Ye et al., 2025) on the embedded model", ""]
    document = read_json(run / "reproduce.json") or {}
    if document.get("quick"):
        lines += [SMOKE, ""]
    base = f"`{document.get('base', '?')}`"
    shipped = read_json(run / "base" / "embedded_manifest.json") or {}
    chosen = [r for r in shipped.get("validation", []) if r.get("step") == shipped.get("chosen_step")]
    if chosen and "val_f1_overall" in chosen[0]:
        base += f" (chosen at step {shipped['chosen_step']}, validation Solve-F1 {chosen[0]['val_f1_overall']:.3f})"
    lines += [
        f"Base: {base}. Every number below is computed from the files in this directory; "
        "`python figures/make_figures.py --run RUN` redraws the figures and this report without running a model.",
        "",
    ]
    ablate, probe = document.get("ablate") or {}, document.get("probe") or {}
    evaluation = document.get("eval") or {}
    if document:
        limit = evaluation.get("limit") or "all"
        lines += [
            f"Sizes: evaluation on {limit} test environments ({evaluation.get('max_turns')} turns, "
            f"{evaluation.get('max_new_tokens')} tokens a turn, {evaluation.get('general_tasks')} general tasks); "
            f"ablation: every variant scored on the analysis split ({ablate.get('analysis_limit') or 'all'} "
            f"environments of held-out worlds), the main variants played on {ablate.get('limit')} of them "
            f"({ablate.get('controls')} matched controls per subset); probes on {probe.get('limit') or 'all'} environments "
            f"({probe.get('seeds')} seeds, {probe.get('rollout_envs')} rollout environments per model).",
            "",
        ]
    return lines


def _verdicts(run: Path) -> list[str]:
    verdicts, _ = judge_all(run)
    lines = ["## Verdicts", "", "| claim | verdict |", "|---|---|"]
    lines += [f"| {v.claim} | **{v.verdict}** |" for v in verdicts]
    lines += [""]
    for v in verdicts:
        lines += [f"**{v.claim}** *{v.verdict}.* {v.evidence}", "", f"*Rule:* {v.rule}", ""]
    return lines


def _environments(run: Path) -> list[str]:
    table = environment_table(run)
    if table is None:
        return []
    lines = ["## 1. Environments (the paper's five-stage construction)", "", markdown_table(table), ""]
    manifest = read_json(run / "envs" / "manifest.json") or {}
    integration = manifest.get("integration")
    if integration:
        lines += [
            f"Function integration: {integration['documents']} documents became {integration['tools']} tools "
            f"(ratio {integration['ratio_tools_per_document']}; {integration['merges']} merges in "
            f"{integration['environments_with_merge']} environments). Columns after *merges / env* give the share "
            "of environments each complexity-scaling operation was applied to.",
            "",
        ]
    return lines


def _tool_use(run: Path) -> list[str]:
    estimates = tool_use_estimates_by_policy(run)
    if not estimates:
        return []
    lines = [
        "## 2. Tool use: base vs GRPO vs Reinforce++ (the paper's Table 2, in miniature)",
        "",
        "Greedy episodes on the test split, built in held-out worlds: none of its entities occurs in the "
        "training worlds, so a policy scores there by reading its context, not by recalling its training world. "
        "Each cell is the mean with its 95% bootstrap interval (environments resampled within scenario). "
        "`overall` is the mean over scenarios, as FTRL reports.",
        "",
    ]
    for metric, label in (("solve_f1", "Solve-F1"), ("solve_p", "Solve-P"), ("solve_r", "Solve-R")):
        lines += [f"{label}:", "", markdown_table(tool_use_table(estimates, metric)), ""]
    same = tool_use_estimates_by_policy(run, "test_same_world")
    if same:
        lines += [
            "The same policies on unseen questions about the *training* worlds (`test_same_world.jsonl`): the gain "
            "here is skill plus whatever the policy recalls of its training worlds; the difference from the "
            "held-out gain is the part that does not transfer. Solve-F1:",
            "",
            markdown_table(tool_use_table(same, "solve_f1")),
            "",
        ]
    seeds = seed_table(run)
    if seeds is not None:
        lines += [
            "GRPO's overall Solve-F1 gain over the base per training seed (paired over environments):",
            "",
            markdown_table(seeds),
            "",
        ]
    return lines + _pass_at_k(run) + _figures(run, "solve_f1", "pass_at_k", "rl_curves", "base_loss") + [""]


def _pass_at_k(run: Path) -> list[str]:
    found = pass_at_k_comparison(run)
    if found is None:
        return []
    info, gains, cover, kind = found["info"], found["gains"], found["coverage"], found["kind"]
    overall = gains[gains["scenario"] == "overall"]
    n = int(overall["k"].max())
    shown = sorted({k for k in (1, 2, 4, 8, 16, 32, n) if k <= n})
    table = pd.DataFrame(
        {
            "k": r.k,
            "base": f"{r.base:.3f}",
            "GRPO": f"{r.trained:.3f}",
            "gain [95%]": f"{r.gain:+.3f} [{r.low:+.3f}, {r.high:+.3f}]",
            "environments that differ": f"{r.differ} of {r.environments}",
        }
        for r in overall.itertuples()
        if r.k in shown
    )
    last = gains[gains["k"] == n]
    first = gains[gains["k"] == 1].set_index("scenario")
    per_scenario = pd.DataFrame(
        {
            "scenario": r.scenario,
            "pass@1 base → GRPO": f"{first.loc[r.scenario, 'base']:.3f} → {first.loc[r.scenario, 'trained']:.3f}",
            f"pass@{n} base → GRPO": f"{r.base:.3f} → {r.trained:.3f}",
            f"pass@{n} gain [95%]": f"{r.gain:+.3f} [{r.low:+.3f}, {r.high:+.3f}]",
            "environments that differ": f"{r.differ} of {r.environments}",
        }
        for r in last.itertuples()
    )
    crossover = cover["crossover_k"]
    return [
        "### pass@k and coverage: sharpening or new capability?",
        "",
        f"{info.get('samples')} episodes per environment sampled at temperature {info.get('temperature')} on "
        f"{cover['environments']} test environments (held-out worlds, balanced over scenarios); a success is an "
        f"episode with Solve-F1 ≥ {info.get('success_threshold')}; pass@k is Chen et al.'s unbiased estimator, "
        "its gain paired over environments (95% normal intervals).",
        "",
        markdown_table(table),
        "",
        markdown_table(per_scenario),
        "",
        f"Coverage over {cover['environments']} environments: solved at least once by both {cover['both']}, "
        f"only by the base {len(cover['only_base'])}, only by GRPO {len(cover['only_trained'])}, by neither "
        f"{cover['neither']}. Crossover k* (the base no longer behind): "
        + (f"{crossover}." if crossover is not None else f"none up to k = {n}.")
        + f" **Kind of gain: {kind['kind']}** ({kind['rule']}).",
        "",
    ]


def _general(run: Path) -> list[str]:
    table = general_table(run)
    if table is None:
        return []
    return [
        "## 3. General ability (the paper's MMLU/BBH/GSM8K columns, in miniature)",
        "",
        "Held-out text loss (lower is better) and exact match on short general tasks asked through the chat "
        "template, with Wilson 95% intervals.",
        "",
        markdown_table(table),
        "",
    ]


def _roles(run: Path) -> list[str]:
    table = role_table_by_policy(run)
    if table is None:
        return []
    return [
        "## 4. Context reading: the role-NLL table",
        "",
        "Teacher-forced NLL (nats per token) of held-out oracle trajectories, per token role; *gap* is the NLL with "
        "another environment's question and tool responses minus the NLL with the real ones: how much the model "
        "reads its context for that role.",
        "",
        markdown_table(table),
        "",
    ]


def _parameters(run: Path) -> list[str]:
    lines = []
    for policy in TRAINED:
        bands = read_csv(run / "compare" / policy / "bands.csv")
        if bands is None:
            continue
        if not lines:
            lines = ["## 5. Where the update went (the paper's parameter-change analysis)", ""]
        lines += [
            f"{POLICIES[policy]}: share of the squared update norm per depth band and component family.",
            "",
            markdown_table(bands),
            "",
            *_figures(run, f"heatmap_{policy}", f"bands_{policy}"),
            "",
        ]
    return lines


def _ablation(run: Path) -> list[str]:
    table = ablation_table(run)
    if table is None:
        return []
    summary = (read_json(run / "ablate" / "ablation.json") or {}).get("summary", {})
    lines = [
        "## 6. Where the change lives: ablation of the GRPO update",
        "",
        f"`ablate --grid paper`: each variant reverts a part of the update to the base (or transplants only that "
        f"part into the base). *LL kept* = the fraction of the change in the trained model's log-likelihood of its "
        f"own greedy trajectories that the variant keeps, on {summary.get('analysis_environments')} analysis "
        f"environments (held-out worlds); *Solve-F1 kept*, the same fraction of the gain in Solve-F1 on "
        f"{summary.get('environments')} of them. 95% Fieller intervals; n/a when the change is within its noise.",
        "",
        markdown_table(table),
        "",
    ]
    tracking = summary.get("tracking") or {}
    if tracking.get("n") and tracking.get("r") is not None:  # r is null (NaN) when a side never moved
        lines += [
            f"The teacher-forced metric tracks Solve-F1 over the {tracking['n']} played variants (change from the "
            f"base): r = {tracking['r']:.2f} [{tracking['low']:.2f}, {tracking['high']:.2f}].",
            "",
        ]
    roles = role_kept_table(run)
    if roles is not None:
        lines += [
            "The same fraction per token role (the trained model's trajectories; tokens over all environments):",
            "",
            markdown_table(roles),
            "",
        ]
    grid = ablation_verdicts(run)
    if grid:
        lines += [
            f"Each subset against {summary.get('control_draws')} matched random controls (same family, shape and "
            "parameter count, other blocks), by the one rule of `analysis/ablate/verdict.py`:",
            "",
            markdown_table(verdict_table(grid)),
            "",
            f"*Rule:* {grid[0]['rule']}",
            "",
        ]
    for control in summary.get("controls", []):
        ratios = [r for r in control.get("energy_ratios", []) if r is not None and r == r]
        if ratios:
            lines.append(
                f"- controls of {control['subset']}: {control['draws']} draws of {control['parameters']:,} "
                f"parameters; their update energy is {min(ratios):.2f}-{max(ratios):.2f}x the subset's"
            )
    return lines + [""] + _figures(run, "gain_retained", "control_null") + [""]


def _probes(run: Path) -> list[str]:
    frames = probe_frames(run)
    if "probe_summary" not in frames or "probe_comparison" not in frames:
        return []
    lines = [
        "## 7. Context understanding inside the network: probes and attention",
        "",
        "Linear probes per layer (0 = embeddings) on the hidden state at each decision point, for base and "
        "trained, with control tasks that permute the labels within a surface type of the context (selectivity = "
        "accuracy - control accuracy: what the hidden state says beyond that type); mean and 95% interval over "
        "seeds (re-splits of the environments). Trained - base is paired over the held-out environments (each "
        "environment's correct answers summed over the splits that held it out) and Holm-corrected, with the "
        "change in selectivity the comparison could detect (80% power) and the layers where the data exclude a "
        "change of 0.05 either way (equivalence, Holm). Probes are read beside the context verdict, not in it.",
        "",
        markdown_table(probe_table(frames["probe_summary"], frames["probe_comparison"])),
        "",
    ]
    attention = frames.get("attention_comparison")
    if attention is not None and not attention.empty:
        aggregates = {"base": ("base_mean", "mean"), "trained": ("trained_mean", "mean"),
                      "blocks_that_differ": ("significant", lambda s: int(s.astype(bool).sum()))}  # fmt: skip
        if "effect_size" in attention:
            aggregates |= {"largest_difference": ("diff_mean", lambda s: float(s.abs().max())),
                           "largest_effect_size": ("effect_size", lambda s: float(s.abs().max())),
                           "median_mde": ("mde", "median")}  # fmt: skip
        rows = attention.groupby("region", sort=False).agg(**aggregates)
        environments = int(attention["n"].max()) if "n" in attention else 0
        lines += [
            "Attention mass from the decision token to each region of the context (mean over blocks), compared "
            f"per environment ({environments} environments: each environment's mean over its decision points, "
            "then paired): blocks that differ after Holm, the largest |trained - base| and effect size d_z over "
            "blocks, and the median detectable difference (80% power):",
            "",
            markdown_table(rows.reset_index(), 4),
            "",
        ]
    return lines + _figures(run, "probe_curves_resid", "attention_mass", "attention_difference") + [""]


def _judged(run: Path) -> list[str]:
    """Section 8: what `judge` measured for the context and general claims, and `divergence`'s tables."""
    lines = []
    roles = read_csv(run / "judge" / "context_roles.csv")
    if roles is not None and not roles.empty:
        lines += [
            "## 8. Context understanding against a sharpened base, and where the outputs differ",
            "",
            "Oracle trajectories of the analysis split, teacher-forced, per token role: NLL (nats per token) of "
            "the base, the *sharpened* base (its logits times the one factor that gives it the trained model's "
            "mean entropy on these tokens) and the trained model in the real context; top-1 of base and trained "
            "(sharpening keeps the base's); and each model's context gap (swapped minus real context). "
            "`understanding` pools the roles the context verdict reads.",
            "",
            markdown_table(roles, 3),
            "",
        ]
    divergence = read_csv(run / "judge" / "divergence" / "by_role.csv")
    summary = (read_json(run / "judge" / "divergence" / "divergence.json") or {}).get("summary") or {}
    if divergence is not None and summary:
        shown = ["source", "role", "tokens", "kl_base_trained", "kl_share", "entropy_base", "entropy_sharp",
                 "entropy_trained", "logp_change", "logp_change_sharp"]  # fmt: skip
        lines += [
            "KL(base || trained) per token on both models' greedy trajectories of the analysis split "
            f"({summary.get('tokens')} tokens, {summary.get('environments')} environments), by token role; "
            "*logp_change* is the rise in the log-prob of the token written (trained minus base, and minus the "
            f"sharpened base, factor {summary.get('scale', float('nan')):.3f} on these tokens). The forking tokens "
            f"(the 20% of highest base entropy) carry {summary.get('forking_kl_share', float('nan')):.1%} of the KL. "
            "The 20 tokens of largest KL, with their context, are in `judge/divergence/top_contexts.jsonl`.",
            "",
            markdown_table(divergence[shown], 4),
            "",
        ]
        lines += _figures(run, "divergence") + [""]
    items = read_csv(run / "judge" / "items.csv")
    if items is not None and not items.empty:
        kinds = items.groupby("kind").agg(items=("item", "size"), tokens=("tokens", "sum"),
                                          nll_base=("nll_base", "sum"), nll_trained=("nll_trained", "sum"),
                                          exact_base=("exact_base", "mean"), exact_trained=("exact_trained", "mean"))  # fmt: skip
        kinds["nll_base"] /= kinds["tokens"]
        kinds["nll_trained"] /= kinds["tokens"]
        lines += [
            "General ability as the general verdict reads it: paired per item, teacher-forced, on held-out "
            "general tasks and on oracle tool-use conversations of held-out environments (NLL in nats per "
            "assistant token; exact match: every token of the answer turn the model's greedy choice).",
            "",
            markdown_table(kinds.reset_index(), 4),
            "",
        ]
    return lines


def _geometry(run: Path) -> list[str]:
    """Section 9: the update measured against the base's own weights (compare --spectral)."""
    lines = []
    for policy in TRAINED:
        table = geometry_table(run, policy)
        if table is None:
            continue
        if not lines:
            lines = [
                "## 9. The update against the base's weights (beyond the paper)",
                "",
                "Per family and depth band, over the weight matrices: rho_k, the share of the update's squared norm "
                "inside the base's top-k singular block (U_k^T dW V_k), its median, and the median of rho_k over "
                "its chance level k^2/(mn) (an update of i.i.d. entries); the largest principal angle between the "
                "base's and the trained model's top-k singular subspaces; the median spectral drift "
                "||s(W') - s(W)|| / ||s(W)||; and the share of the squared update a bf16 copy of the trained model "
                'would lose (entries whose change rounds away). "The Path Not Taken" (arXiv 2511.08567) reads '
                "RL's updates as off the principal directions with little spectral drift: a share near chance and "
                "small angles.",
                "",
            ]
        lines += [
            f"{POLICIES[policy]}:",
            "",
            markdown_table(table, 4),
            "",
            *_figures(run, f"geometry_{policy}"),
            "",
        ]
    return lines


def _overlap(run: Path) -> list[str]:
    """Section 10: where the GRPO seeds changed the base, against chance (overlap)."""
    table = overlap_table(run)
    if table is None:
        return []
    summary = read_json(run / "overlap" / "overlap.json") or {}
    runs = [r.get("run") for r in summary.get("runs", [])]
    return [
        "## 10. Do GRPO seeds change the same weights? (beyond the paper)",
        "",
        f"The update masks of the {len(runs)} GRPO seeds (an entry is changed where |dW| exceeds half a bf16 "
        "ULP of the base weight, a change a bf16 copy keeps), summed over every pair of seeds per family and "
        "band: the share of one seed's changed entries also changed by the other, and the Jaccard index, each "
        "beside its level under independent masks of the same densities; and the share of the shared entries "
        "whose updates agree in sign (chance 0.5). Mukherjee et al. (arXiv 2505.11711) found RL's updates "
        "sparse and overlapping across seeds more than chance.",
        "",
        markdown_table(table, 4),
        "",
        *_figures(run, "overlap"),
        "",
    ]


def _patching(run: Path) -> list[str]:
    """Section 11: cross-model activation patching at decision tokens (patch)."""
    table = patching_table(run)
    summary = (read_json(run / "patch" / "patch.json") or {}).get("summary") or {}
    if table is None:
        if not summary.get("reason"):
            return []
        return ["## 11. Which blocks carry the change at the decision tokens? (beyond the paper)", "",
                f"Not measured: {summary['reason']}.", ""]  # fmt: skip
    change = summary.get("change") or {}
    nan = float("nan")
    interval = [change.get("low", nan), change.get("high", nan)]
    return [
        "## 11. Which blocks carry the change at the decision tokens? (beyond the paper)",
        "",
        "Cross-model activation patching (CMAP, arXiv 2402.14811) on the trained model's own greedy "
        f"trajectories of {summary.get('environments')} analysis environments: one site (residual stream after "
        "a block, or what its attention or MLP adds) of one block is swapped between the models at the decision "
        "tokens, the context, or every position. Sufficiency runs the base with the trained model's activation; "
        "necessity the trained model with the base's. Recovery is the share of the training's change in the "
        "log-prob of the trained model's tool-call tokens that the swap restores (or removes), a ratio of sums "
        "over environments with a Fieller interval; each set is compared with as many random positions, Holm "
        "over the table. The change to explain: "
        f"{change.get('mean', float('nan')):+.3f} nats per environment [{interval[0]:+.3f}, {interval[1]:+.3f}]. "
        "Below, the cell that recovers most per direction and position set; every cell is in "
        "`patch/recovery.csv`.",
        "",
        markdown_table(table, 3),
        "",
        *_figures(run, "patching"),
        "",
    ]


def _timings(run: Path) -> list[str]:
    timings = read_json(run / "timings.json")
    if not timings:
        return []
    rows = [
        {"stage": name, "this invocation": info.get("status"), "seconds": info.get("seconds")}
        for name, info in timings.items()
    ]
    return [
        "## Wall time per stage (2 CPU cores unless stated)",
        "",
        markdown_table(pd.DataFrame(rows), 1),
        "",
    ]


def write_report(run: str | Path) -> Path:
    run = Path(run)
    lines = _header(run) + _verdicts(run)
    for section in (
        _environments,
        _tool_use,
        _general,
        _roles,
        _parameters,
        _ablation,
        _probes,
        _judged,
        _geometry,
        _overlap,
        _patching,
        _timings,
    ):
        lines += section(run)
    path = run / "report.md"
    path.write_text("\n".join(lines).rstrip() + "\n", encoding="utf-8")
    return path


def report_document(run: str | Path) -> dict:
    """The verdicts as JSON (for `reproduce --json`)."""
    verdicts, by_policy = judge_all(run)
    claims = [{"claim": v.claim, "verdict": v.verdict, "evidence": v.evidence} for v in verdicts]
    return {"verdicts": claims, "tool_use_by_policy": by_policy}
