"""The stages of `reproduce`, in order, each calling the library function its command calls (cli.py):

envs build -> the base (the shipped embedded base, a policy file, or train-base) -> evaluate it (test
split of held-out worlds and the same-world split) and its pass@k -> train-grpo with GRPO (one run per
training seed) and with Reinforce++ -> evaluate each, pass@k of the first GRPO run -> compare each
algorithm's run with the base -> ablate --grid paper, probe, and judge's general and context claims with
divergence on the GRPO pair -> figures and report.md.
"""

from __future__ import annotations

import dataclasses
import shutil
from dataclasses import asdict
from pathlib import Path

from toolrl_analysis.models.placement import Placement
from toolrl_analysis.reproduce.settings import ChainSettings
from toolrl_analysis.reproduce.stages import Stage, StageContext

# The two RL algorithms: run directory -> train-grpo's --algo.
ALGORITHMS = {"grpo": "grpo", "reinforce_pp": "reinforce++"}
ANALYSED = "grpo"  # ablation and probing explain the GRPO pair, the paper's main run
SAME_WORLD = "same_world"  # eval/<policy>/same_world/: the split about the training worlds
PASS_AT_K = "pass_at_k"  # eval/<policy>/pass_at_k/: sampled episodes and pass@k


def seed_run(index: int) -> str:
    """Run directory of GRPO training seed `index` (0 is the analysed run)."""
    return ANALYSED if index == 0 else f"{ANALYSED}-seed{index}"


def rl_runs(settings: ChainSettings) -> dict[str, tuple[str, int]]:
    """Run directory -> (algorithm, seed offset): every GRPO seed, then Reinforce++."""
    runs = {seed_run(i): ("grpo", i) for i in range(settings.grpo_seeds)}
    return runs | {"reinforce_pp": ("reinforce++", 0)}


def label(run_name: str) -> str:
    """How stages name a run: grpo, grpo seed 1, reinforce++."""
    if run_name.startswith(f"{ANALYSED}-seed"):
        return f"{ANALYSED} seed {run_name.removeprefix(f'{ANALYSED}-seed')}"
    return ALGORITHMS.get(run_name, run_name)


def envs_stage(run: Path, settings: ChainSettings) -> Stage:
    from toolrl_analysis.envs.pipeline import SPLIT_FILES, build_envsets, build_size, write_envset

    config = settings.envs
    total = build_size(config)

    def action(ctx: StageContext) -> None:
        built = [0]

        def advance(n: int) -> None:
            built[0] += n
            ctx.fraction(built[0] / total)

        write_envset(build_envsets(config, progress=advance), run / "envs")

    outputs = (*SPLIT_FILES.values(), "manifest.json")
    return Stage("envs", run / "envs", outputs, {}, asdict(config), action)


def base_stage(run: Path, settings: ChainSettings) -> Stage:
    from toolrl_analysis.models.embedded import EMBEDDED_DIR, MANIFEST_FILE, embedded_base_path

    out = run / "base"
    if settings.base == "train":
        from toolrl_analysis.training.sft import train_base

        def train(ctx: StageContext) -> None:
            # train-base checkpoints every eval_every steps; stopped before the first, it starts again
            resume = ctx.resume and (out / "checkpoints" / "state.pt").is_file()
            train_base(
                run / "envs", out, settings.sft, resume=resume,
                on_step=lambda state: ctx.fraction(state.step / max(1, state.total)), log=ctx.log,
            )  # fmt: skip

        inputs = {
            "envs/train.jsonl": run / "envs" / "train.jsonl",
            "envs/manifest.json": run / "envs" / "manifest.json",
        }
        config = {"source": "train-base", **asdict(settings.sft)}
        return Stage("base", out, ("base.pt",), inputs, config, train, after=("envs",), resumable=True)

    # The shipped base (or a given policy file) is copied into the run, so the run holds every file it used.
    source = embedded_base_path() if settings.base == "embedded" else Path(settings.base)

    def copy(ctx: StageContext) -> None:
        out.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(source, out / "base.pt")
        if settings.base == "embedded" and (EMBEDDED_DIR / MANIFEST_FILE).is_file():
            shutil.copyfile(EMBEDDED_DIR / MANIFEST_FILE, out / "embedded_manifest.json")

    config = {"source": settings.base if settings.base == "embedded" else "file"}
    return Stage("base", out, ("base.pt",), {"base": source}, config, copy)


def eval_stage(run: Path, settings: ChainSettings, policy: str, model: Path, after: str) -> Stage:
    """Greedy evaluation on the test split (held-out worlds; with the general suite and the role table) into
    eval/<policy>/, and on the same-world split, when the build has one, into eval/<policy>/same_world/."""
    from toolrl_analysis.envs.schema import balanced_slice, read_envs, write_envs
    from toolrl_analysis.evaluate import evaluate_checkpoint

    options = settings.eval
    out = run / "eval" / policy
    splits = {"test": (run / "envs" / "test.jsonl", out)}
    # The envs stage writes the same-world split; stages are built before it runs, so the settings decide.
    if settings.envs.same_world_test_per_scenario:
        splits["test_same_world"] = (run / "envs" / "test_same_world.jsonl", out / SAME_WORLD)

    def action(ctx: StageContext) -> None:
        for index, (split, (envs, where)) in enumerate(splits.items()):
            share = 1 / len(splits)

            def on_turn(turn_index, episodes, index=index, share=share) -> None:
                done = sum(e.done for e in episodes) / max(1, len(episodes))
                ctx.fraction(share * (index + 0.8 * done))  # the test split's suite and roles follow

            if options.limit:  # a slice balanced over scenarios (the file's first records are all single-hop)
                where.mkdir(parents=True, exist_ok=True)
                write_envs(balanced_slice(read_envs(envs), options.limit), where / "environments.jsonl")
                envs = where / "environments.jsonl"
            main = split == "test"  # the general suite and the role table belong to the policy, measured once
            report = evaluate_checkpoint(
                model, envs, general=options.general and main, roles=main, max_turns=options.max_turns,
                max_new_tokens=options.max_new_tokens, batch_size=options.batch_size,
                n_general_tasks=options.general_tasks, on_turn=on_turn, placement=settings.placement,
            )  # fmt: skip
            report.save(where)

    inputs = {"policy": model} | {f"envs/{split}.jsonl": path for split, (path, _) in splits.items()}
    outputs = ("evaluation.json", "tool_use.csv", "episodes.csv")
    if "test_same_world" in splits:
        outputs += (f"{SAME_WORLD}/episodes.csv",)
    return Stage(
        f"evaluate {label(policy)}",
        out,
        outputs,
        inputs,
        settings.stage_config(asdict(options)),
        action,
        after=(after, "envs"),
    )


def pass_at_k_stage(run: Path, settings: ChainSettings, policy: str, model: Path, after: str) -> Stage:
    """`samples` sampled episodes per environment on a balanced slice of the test split, and pass@k."""
    from toolrl_analysis.envs.schema import balanced_slice, read_envs
    from toolrl_analysis.evaluate import evaluate
    from toolrl_analysis.models.checkpoint import load_policy

    options = settings.eval
    out = run / "eval" / policy / PASS_AT_K
    envs = run / "envs" / "test.jsonl"

    def action(ctx: StageContext) -> None:
        records = read_envs(envs)
        records = balanced_slice(records, options.sample_limit) if options.sample_limit else records
        greedy = 1 / (1 + options.samples)  # the share of episodes in the greedy pass, which comes first

        def on_turn(turn_index, episodes) -> None:
            done = sum(e.done for e in episodes) / max(1, len(episodes))
            sampling = len(episodes) > len(records)
            ctx.fraction(greedy + (1 - greedy) * done if sampling else greedy * done)

        policy_model, tokenizer = load_policy(model, placement=settings.placement)
        report = evaluate(
            policy_model, tokenizer, records, general=False, roles=False, max_turns=options.max_turns,
            max_new_tokens=options.max_new_tokens, batch_size=options.batch_size, samples=options.samples,
            temperature=options.temperature, success_threshold=options.success_threshold, on_turn=on_turn,
        )  # fmt: skip
        report.save(out)

    sampling = {
        k: getattr(options, k) for k in ("samples", "sample_limit", "temperature", "success_threshold")
    }
    config = sampling | {k: getattr(options, k) for k in ("max_turns", "max_new_tokens", "batch_size")}
    inputs = {"policy": model, "envs/test.jsonl": envs}
    return Stage(
        f"pass@k {label(policy)}", out, ("pass_at_k.csv", "evaluation.json"), inputs,
        settings.stage_config(config), action,
        after=(after, "envs"),
    )  # fmt: skip


def rl_stage(run: Path, settings: ChainSettings, name: str, algo: str, seed_offset: int) -> Stage:
    from toolrl_analysis.training.grpo import train_grpo

    config = dataclasses.replace(settings.grpo, algo=algo, seed=settings.grpo.seed + seed_offset)
    out = run / name

    def action(ctx: StageContext) -> None:
        summary = train_grpo(
            run / "envs", run / "base" / "base.pt", out, config, resume=ctx.resume,
            on_iteration=lambda row: ctx.fraction(row["iteration"] / max(1, config.iterations)), log=ctx.log,
            placement=Placement(settings.placement.device),  # training keeps float32 weights (train_grpo)
        )  # fmt: skip
        if summary["interrupted"]:  # Ctrl-C: the trainer saved a checkpoint; the rerun resumes from it
            raise KeyboardInterrupt

    inputs = {"base/base.pt": run / "base" / "base.pt", "envs/train.jsonl": run / "envs" / "train.jsonl"}
    if settings.envs.validation_per_scenario:  # train-grpo validates on it (training/grpo.py)
        inputs["envs/validation.jsonl"] = run / "envs" / "validation.jsonl"
    return Stage(
        f"train {label(name)}", out, ("trained.pt", "metrics.csv"), inputs,
        asdict(config) | Placement(settings.placement.device).record(),
        action,
        after=("base", "envs"), resumable=True,
    )  # fmt: skip


def compare_stage(run: Path, name: str) -> Stage:
    from toolrl_analysis.analysis.diff import compare_checkpoints

    out = run / "compare" / name
    base, trained = run / "base" / "base.pt", run / name / "trained.pt"

    def action(ctx: StageContext) -> None:
        def progress(tensor: str, done: int, total: int) -> None:
            ctx.fraction(done / max(1, total))

        # with the geometry relative to the base: a second or two on the embedded model
        compare_checkpoints(base, trained, spectral=True, progress=progress).write(out)

    inputs = {"base/base.pt": base, f"{name}/trained.pt": trained}
    outputs = ("summary.json", "components.csv", "bands.csv", "parameters.csv")
    return Stage(f"compare {ALGORITHMS[name]}", out, outputs, inputs, {"spectral": True}, action,
                 after=("base", f"train {ALGORITHMS[name]}"))  # fmt: skip


OVERLAP_TOLERANCE = "bf16"  # a change a bf16 copy keeps: at 0, fp32 runs change every entry (chance is 1)


def overlap_stage(run: Path, settings: ChainSettings) -> Stage | None:
    """Where the GRPO seeds changed the base, against chance, and whether they agree in sign (two seeds or
    more; none otherwise)."""
    from toolrl_analysis.analysis.diff import overlap_runs

    names = [seed_run(i) for i in range(settings.grpo_seeds)]
    if len(names) < 2:
        return None
    out = run / "overlap"
    base = run / "base" / "base.pt"

    def action(ctx: StageContext) -> None:
        def progress(tensor: str, done: int, total: int) -> None:
            ctx.fraction(done / max(1, total))

        trained = [run / name / "trained.pt" for name in names]
        overlap_runs(base, trained, tolerance=OVERLAP_TOLERANCE, progress=progress).write(out)

    inputs = {"base/base.pt": base} | {f"{name}/trained.pt": run / name / "trained.pt" for name in names}
    return Stage("overlap", out, ("overlap.csv", "overlap.json"), inputs, {"tolerance": OVERLAP_TOLERANCE},
                 action, after=("base", *(f"train {label(name)}" for name in names)))  # fmt: skip


def patch_stage(run: Path, settings: ChainSettings) -> Stage:
    """Cross-model activation patching of the GRPO pair at decision tokens (the analysis split)."""
    from toolrl_analysis.analysis.patching.run import NothingToPatch, patch_pair

    out = run / "patch"
    base, trained = run / "base" / "base.pt", run / ANALYSED / "trained.pt"

    def action(ctx: StageContext) -> None:
        def progress(step: str, done: int, total: int) -> None:
            ctx.fraction(done / max(1, total))

        try:
            patch_pair(base, trained, run / "envs", config=settings.patch, placement=settings.placement,
                       log=ctx.log, progress=progress).write(out)  # fmt: skip
        except NothingToPatch as exc:  # a policy that writes no tool call: the report says so
            import pandas as pd

            from toolrl_analysis.analysis.patching.summary import RECOVERY_COLUMNS
            from toolrl_analysis.results import write_results

            document = {"summary": {"reason": str(exc)}, "headline": [], "recovery": []}
            write_results(out, {"recovery": pd.DataFrame(columns=RECOVERY_COLUMNS)}, document, "patch.json")

    inputs = {
        "base/base.pt": base,
        f"{ANALYSED}/trained.pt": trained,
        "envs/analysis.jsonl": run / "envs" / "analysis.jsonl",
    }
    config = settings.stage_config({"backend": "hf", **asdict(settings.patch)})
    return Stage("patch", out, ("recovery.csv", "patch.json"), inputs, config, action,
                 after=("base", "train grpo", "envs"))  # fmt: skip


def ablate_stage(run: Path, settings: ChainSettings) -> Stage:
    from toolrl_analysis.analysis.ablate import EvaluationOptions, ablate

    options = settings.ablate
    out = run / "ablate"
    base, trained = run / "base" / "base.pt", run / ANALYSED / "trained.pt"

    def action(ctx: StageContext) -> None:
        def progress(name: str, done: int, total: int) -> None:
            ctx.fraction(done / max(1, total))

        evaluation = EvaluationOptions(
            general=options.general, roles=options.roles, max_turns=options.max_turns,
            max_new_tokens=options.max_new_tokens, batch_size=options.batch_size,
            general_tasks=options.general_tasks, score_threads=options.score_threads,
            placement=settings.placement,
        )  # fmt: skip
        result = ablate(
            base, trained, grid="paper", envs=run / "envs", limit=options.limit, seed=options.seed,
            replicates=options.bootstrap, metric=options.metric, options=evaluation, controls=options.controls,
            rank=options.rank, analysis_limit=options.analysis_limit or None, progress=progress,
        )  # fmt: skip
        result.write(out)

    inputs = {
        "base/base.pt": base,
        f"{ANALYSED}/trained.pt": trained,
        "envs/analysis.jsonl": run / "envs" / "analysis.jsonl",
    }
    outputs = ("variants.csv", "metrics.csv", "episodes.csv", "likelihood.csv", "ablation.json")
    return Stage(
        "ablate",
        out,
        outputs,
        inputs,
        settings.stage_config(asdict(options)),
        action,
        after=("base", "train grpo", "envs"),
    )


def probe_stage(run: Path, settings: ChainSettings) -> Stage:
    from toolrl_analysis.analysis.probe.run import run_probe

    out = run / "probe"
    base, trained = run / "base" / "base.pt", run / ANALYSED / "trained.pt"
    envs = run / "envs" / "test.jsonl"

    def action(ctx: StageContext) -> None:
        run_probe(
            base,
            trained,
            envs,
            backend="hf",
            config=settings.probe,
            log=ctx.log,
            placement=settings.placement,
        ).write(out)

    inputs = {"base/base.pt": base, f"{ANALYSED}/trained.pt": trained, "envs/test.jsonl": envs}
    outputs = ("probe_summary.csv", "probe_comparison.csv", "probe.json")
    config = settings.stage_config({"backend": "hf", **asdict(settings.probe)})
    return Stage("probe", out, outputs, inputs, config, action, after=("base", "train grpo", "envs"))


def judge_stage(run: Path, settings: ChainSettings) -> Stage:
    """`judge`'s general and context claims into judge/, and `divergence` into judge/divergence/."""
    from toolrl_analysis.analysis.judge.divergence import measure_divergence
    from toolrl_analysis.analysis.judge.run import judge
    from toolrl_analysis.episodes import EpisodeOptions

    options = settings.judge
    out = run / "judge"
    base, trained = run / "base" / "base.pt", run / ANALYSED / "trained.pt"

    def action(ctx: StageContext) -> None:
        episodes = EpisodeOptions(options.max_turns, options.max_new_tokens, options.batch_size)
        limit = options.analysis_limit or None
        judge(base, trained, run / "envs", claims=("general", "context"), analysis_limit=limit,
              tasks=options.tasks, options=episodes, log=ctx.log, placement=settings.placement).write(out)  # fmt: skip
        ctx.fraction(0.3)
        measure_divergence(
            base, trained, run / "envs", limit=limit, options=episodes, top=options.top,
            placement=settings.placement,
        ).write(out / "divergence")  # fmt: skip

    inputs = {
        "base/base.pt": base,
        f"{ANALYSED}/trained.pt": trained,
        "envs/analysis.jsonl": run / "envs" / "analysis.jsonl",
    }
    outputs = ("judge.json", "items.csv", "divergence/by_role.csv", "divergence/divergence.json")
    config = settings.stage_config(asdict(options))
    return Stage("judge", out, outputs, inputs, config, action, after=("base", "train grpo", "envs"))


def build_stages(run: Path, settings: ChainSettings) -> list[Stage]:
    base = run / "base" / "base.pt"
    runs = rl_runs(settings)
    sampling = settings.eval.samples > 0
    stages = [
        envs_stage(run, settings),
        base_stage(run, settings),
        eval_stage(run, settings, "base", base, "base"),
    ]
    stages += [pass_at_k_stage(run, settings, "base", base, "base")] if sampling else []
    stages += [rl_stage(run, settings, name, algo, offset) for name, (algo, offset) in runs.items()]
    stages += [
        eval_stage(run, settings, name, run / name / "trained.pt", f"train {label(name)}") for name in runs
    ]
    if sampling:
        stages += [pass_at_k_stage(run, settings, ANALYSED, run / ANALYSED / "trained.pt", "train grpo")]
    stages += [compare_stage(run, name) for name in ALGORITHMS]
    stages += [stage] if (stage := overlap_stage(run, settings)) else []
    stages += [ablate_stage(run, settings), probe_stage(run, settings), judge_stage(run, settings)]
    stages += [patch_stage(run, settings)]
    return stages
