"""The build chain: world -> scenario decomposition -> documents -> integration -> scaling -> deployment.

`build_envsets(config)` returns FTRL-compatible records for every split and a manifest; `write_envset(...)`
writes them (SPLIT_FILES) and DIR/manifest.json. The splits live in worlds of their own:

- `train`: `train_worlds` worlds, environments dealt round-robin over them;
- `test` (the headline split) and `validation`: held-out worlds whose entity names occur nowhere in the
  training worlds (nor in each other), so a policy can score there only by reading its context;
- `analysis`: more held-out worlds, for the analyses that need many environments (`ablate --grid`'s
  teacher-forced metric), so that they never reuse the headline test split for their choices;
- `test_same_world`: unseen questions about the training worlds, so the gap between the two test splits
  is what a policy recalls of its training world rather than reads.

Everything is seeded from strings (random.Random(str) hashes with SHA-512, not with Python's salted hash),
orders are fixed, and no timestamps are written, so one seed always gives the same bytes. Same-world test
questions are built first and train questions may not repeat any of them (same chains of relations from
the same subjects count as the same question, whatever the wording).
"""

from __future__ import annotations

import dataclasses
import json
import random
import statistics
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

from toolrl_analysis.config import require
from toolrl_analysis.envs.decompose import FTRL_PROMPT, ComposeError, Decomposition, ScenarioShape, compose
from toolrl_analysis.envs.deploy import lookup_records, tool_source
from toolrl_analysis.envs.documents import document
from toolrl_analysis.envs.integrate import integrate
from toolrl_analysis.envs.scaling import OPERATIONS, ScalingSettings, scale
from toolrl_analysis.envs.schema import SCENARIOS, EnvRecord, write_envs
from toolrl_analysis.envs.world import NameGuard, World, build_world
from toolrl_analysis.errors import ConfigError, UserError
from toolrl_analysis.io import file_sha256


@dataclass
class EnvBuildConfig:
    """`envs build` configuration: the defaults are the shipped build (`envs build --print-config` prints
    them as TOML); `--config FILE` and `--set key=value` override them."""

    seed: int = 0
    train_size: int = 2000
    test_per_scenario: int = 50
    # Relative weights of single_hop, parallel_single_hop, multi_hop, parallel_multi_hop in train.
    train_mix: list[float] = field(default_factory=lambda: [1.0, 1.0, 1.0, 1.0])
    # Worlds. train: this many worlds share train_size (and test_same_world); test and validation come from
    # worlds of their own whose names occur nowhere in the training worlds. World 0 of train is the
    # integer-seeded world of every earlier build.
    train_worlds: int = 50
    test_worlds: int = 4
    validation_worlds: int = 2
    validation_per_scenario: int = 50  # held-out worlds, for choosing recipes (train-grpo validates on it)
    analysis_worlds: int = 2
    # held-out worlds for the analyses: ablate --grid's teacher-forced metric scores every one of them for
    # each of its ~200 variants; 160 give mlp@lower's fraction an interval of about +-0.01 and its contrast
    # with the controls a detectable effect of ~0.04, in ~18 minutes (docs/recipes.md)
    analysis_per_scenario: int = 40
    same_world_test_per_scenario: int = 50  # training worlds, questions train never asks
    # World size.
    world_people: int = 400
    world_places: int = 120
    world_organisations: int = 120
    world_artefacts: int = 160
    # Scenario shapes (sub-questions per question).
    parallel_single_min: int = 2
    parallel_single_max: int = 3
    multi_hop_min: int = 2
    multi_hop_max: int = 6
    parallel_multi_chains_min: int = 2
    parallel_multi_chains_max: int = 3
    parallel_multi_min: int = 4
    parallel_multi_max: int = 10
    # Parallel questions that ask for a sum / difference / comparison (FTRL style) instead of a list.
    parallel_aggregate_prob: float = 0.5
    # Function integration: probability that a family with two or more relations is merged.
    merge_prob: float = 1.0
    # Complexity scaling: probability that each operation is applied to an environment.
    functional_generalisation: float = 0.5
    parameter_expansion: float = 0.5
    parameter_type_generalisation: float = 0.25
    toolset_extension: float = 1.0
    distractors_min: int = 2
    distractors_max: int = 3
    max_tools: int = 6
    # Records each tool embeds beyond the ones the question needs.
    neighbour_facts: int = 4

    SECTIONS: ClassVar[dict[str, tuple[str, ...]]] = {
        "": ("seed",),
        "sizes": ("train_size", "test_per_scenario", "train_mix"),
        "worlds": (
            "train_worlds", "test_worlds", "validation_worlds", "validation_per_scenario",
            "analysis_worlds", "analysis_per_scenario", "same_world_test_per_scenario",
        ),
        "world": ("world_people", "world_places", "world_organisations", "world_artefacts"),
        "scenarios": (
            "parallel_single_min", "parallel_single_max", "multi_hop_min", "multi_hop_max",
            "parallel_multi_chains_min", "parallel_multi_chains_max", "parallel_multi_min", "parallel_multi_max",
            "parallel_aggregate_prob",
        ),
        "integration": ("merge_prob",),
        "scaling": (
            "functional_generalisation", "parameter_expansion", "parameter_type_generalisation",
            "toolset_extension", "distractors_min", "distractors_max", "max_tools", "neighbour_facts",
        ),
    }  # fmt: skip

    def validate(self) -> None:
        require(self.train_size >= 0, "train_size", "must be >= 0")
        require(self.test_per_scenario >= 0, "test_per_scenario", "must be >= 0")
        for key in ("validation_per_scenario", "analysis_per_scenario", "same_world_test_per_scenario"):
            require(getattr(self, key) >= 0, key, "must be >= 0")
        for key in ("train_worlds", "test_worlds", "validation_worlds", "analysis_worlds"):
            require(1 <= getattr(self, key) <= 1000, key, "must be between 1 and 1000")
        require(len(self.train_mix) == len(SCENARIOS), "train_mix", f"must list {len(SCENARIOS)} weights")
        require(
            all(w >= 0 for w in self.train_mix) and sum(self.train_mix) > 0, "train_mix", "needs weights >= 0"
        )
        for key in ("world_people", "world_places", "world_organisations", "world_artefacts"):
            require(20 <= getattr(self, key) <= 5000, key, "must be between 20 and 5000")
        for key in (
            "parallel_aggregate_prob",
            "merge_prob",
            "functional_generalisation",
            "parameter_expansion",
            "parameter_type_generalisation",
            "toolset_extension",
        ):
            require(0.0 <= getattr(self, key) <= 1.0, key, "must be a probability in [0, 1]")
        require(self.parallel_single_min >= 2, "parallel_single_min", "must be >= 2")
        require(self.parallel_single_max >= self.parallel_single_min, "parallel_single_max", "must be >= min")
        require(self.parallel_single_max <= 5, "parallel_single_max", "must be <= 5")
        require(self.multi_hop_min >= 2, "multi_hop_min", "must be >= 2")
        require(self.multi_hop_max >= self.multi_hop_min, "multi_hop_max", "must be >= multi_hop_min")
        require(self.multi_hop_max <= 8, "multi_hop_max", "must be <= 8")
        require(self.parallel_multi_chains_min >= 2, "parallel_multi_chains_min", "must be >= 2")
        require(
            self.parallel_multi_chains_max >= self.parallel_multi_chains_min,
            "parallel_multi_chains_max",
            "must be >= min",
        )
        require(self.parallel_multi_max >= self.parallel_multi_min, "parallel_multi_max", "must be >= min")
        require(
            self.parallel_multi_min <= self.parallel_multi_chains_max * self.multi_hop_max,
            "parallel_multi_min",
            "is more than parallel_multi_chains_max chains of multi_hop_max hops can hold",
        )
        require(
            self.parallel_multi_max >= 2 * self.parallel_multi_chains_min,
            "parallel_multi_max",
            "must allow parallel_multi_chains_min chains of two hops",
        )
        require(self.distractors_min >= 0, "distractors_min", "must be >= 0")
        require(self.distractors_max >= self.distractors_min, "distractors_max", "must be >= distractors_min")
        require(self.max_tools >= 1, "max_tools", "must be >= 1")
        require(0 <= self.neighbour_facts <= 50, "neighbour_facts", "must be between 0 and 50")

    @property
    def shape(self) -> ScenarioShape:
        names = {f.name for f in dataclasses.fields(ScenarioShape)}
        return ScenarioShape(**{k: v for k, v in dataclasses.asdict(self).items() if k in names})

    @property
    def scaling(self) -> ScalingSettings:
        names = {f.name for f in dataclasses.fields(ScalingSettings)}
        return ScalingSettings(**{k: v for k, v in dataclasses.asdict(self).items() if k in names})


# Split -> file, in the order they are written; `test` is the headline split (held-out worlds).
SPLIT_FILES = {
    "train": "train.jsonl",
    "test": "test.jsonl",
    "test_same_world": "test_same_world.jsonl",
    "validation": "validation.jsonl",
    "analysis": "analysis.jsonl",
}
# Held-out splits, in the order their worlds are built: adding a later one leaves the earlier ones' bytes.
NEW_WORLD_SPLITS = ("test", "validation", "analysis")


@dataclass
class EnvSetBuild:
    train: list[EnvRecord]
    test: list[EnvRecord]
    manifest: dict[str, Any]
    test_same_world: list[EnvRecord] = field(default_factory=list)
    validation: list[EnvRecord] = field(default_factory=list)
    analysis: list[EnvRecord] = field(default_factory=list)

    def splits(self) -> dict[str, list[EnvRecord]]:
        return {split: getattr(self, split) for split in SPLIT_FILES}


# -- one environment -------------------------------------------------------------------------------
def _decompose(
    world: World, scenario: str, config: EnvBuildConfig, stream: str, taken: set[tuple]
) -> tuple[Decomposition, random.Random]:
    for attempt in range(200):
        rng = random.Random(f"{stream}/{attempt}")
        try:
            decomposition = compose(world, scenario, rng, config.shape)
        except ComposeError:
            continue
        if decomposition.key not in taken:
            taken.add(decomposition.key)
            return decomposition, rng
    raise ConfigError(
        f"could not compose a new {scenario} question for {stream}: the world is too small for this many "
        "environments (raise world_people, world_places, world_organisations, world_artefacts, or the split's "
        "number of worlds)"
    )


def build_environment(
    world: World,
    scenario: str,
    split: str,
    index: int,
    config: EnvBuildConfig,
    taken: set[tuple],
    id_prefix: str | None = None,
) -> EnvRecord:
    """Run the five stages for one environment; its id is `{id_prefix or split}-{index:05d}`."""
    env_id = f"{id_prefix or split}-{index:05d}"
    d, rng = _decompose(world, scenario, config, f"toolrl-env/{config.seed}/{env_id}", taken)

    # Documents (one per sub-question) and their integration into tools.
    documents = [document(sq.kind, sq.relation) for sq in d.subquestions]
    merged = integrate(documents, rng, config.merge_prob)
    spec_by_name = {t.name: t for t in merged.tools}
    spec_of_sq = {
        sq.id: spec_by_name[merged.tool_of_document[doc.name]]
        for sq, doc in zip(d.subquestions, documents, strict=True)
    }

    # Complexity scaling edits the specs in place (names may change) and adds distractors.
    scaled = scale(merged.tools, rng, config.scaling)

    # Localized deployment: code with an embedded lookup table for every tool.
    gold_answers = {sq.answer for sq in d.subquestions}
    entities = d.entities
    codes: dict[str, str] = {}
    for spec in scaled.tools:
        if spec.role == "golden":
            subjects = [sq.subject for sq in d.subquestions if spec_of_sq[sq.id] is spec]
        else:
            subjects = [e for e in entities if world.kind_of(e) == spec.kind]
        records = lookup_records(
            spec, world, subjects, rng, config.neighbour_facts, gold_answers | set(entities)
        )
        codes[spec.name] = tool_source(spec, records)

    order = list(scaled.tools)
    rng.shuffle(order)  # the position of a tool says nothing about its role
    unsolved: dict[str, list[str]] = {}
    subquestions = []
    for sq in d.subquestions:
        spec = spec_of_sq[sq.id]
        unsolved.setdefault(spec.name, []).append(sq.answer)
        subquestions.append(
            {
                "id": sq.id,
                "question": sq.question,
                "tool": spec.name,
                "arguments": spec.golden_arguments(sq.subject, sq.relation),
                "answer": sq.answer,
                "chain": sq.chain,
                "hop": sq.hop,
                "depends_on": sq.depends_on,
                "argument_from_answer": spec.subject_param if sq.depends_on is not None else None,
                "relation": sq.relation,
                "subject": sq.subject,
            }
        )
    golden_names = [t.name for t in scaled.tools if t.role == "golden"]
    meta = {
        "env_id": env_id,
        "seed": config.seed,
        "scenario": scenario,
        "aggregate": d.aggregate,
        "subquestions": subquestions,
        "golden_turns": d.golden_turns,
        "scaling": scaled.applied,
        "scaling_details": scaled.details,
        "merges": merged.merges,
        "distractors": scaled.distractors,
        "documents": len(documents),
        "tools": len(golden_names),
    }
    return EnvRecord(
        messages=[{"content": FTRL_PROMPT + d.question, "role": "user"}],
        tools=[spec.schema() for spec in order],
        codes={spec.name: codes[spec.name] for spec in order},
        unsolved_set=unsolved,
        answer=d.answer,
        data_source=f"self/{scenario}",
        split=split,
        solve_rate=0.0,
        meta=meta,
    )


# -- the whole set ---------------------------------------------------------------------------------
def train_scenarios(config: EnvBuildConfig) -> list[str]:
    """Scenario of each train environment: counts by largest remainder of the mix, then a seeded shuffle."""
    total = sum(config.train_mix)
    exact = [config.train_size * w / total for w in config.train_mix]
    counts = [int(x) for x in exact]
    by_remainder = sorted(range(len(exact)), key=lambda i: (-(exact[i] - counts[i]), i))
    for i in by_remainder[: config.train_size - sum(counts)]:
        counts[i] += 1
    out = [s for s, n in zip(SCENARIOS, counts, strict=True) for _ in range(n)]
    random.Random(f"toolrl-mix/{config.seed}").shuffle(out)
    return out


def split_worlds(config: EnvBuildConfig) -> dict[str, list[World]]:
    """The worlds of each split. Held-out worlds are built against a guard holding every name before them
    (train, then test, validation, analysis), so they share no entity, and no name inside another, with those."""

    def world(seed: int | str, guard: NameGuard | None = None) -> World:
        return build_world(
            seed,  # type: ignore[arg-type]  # a string seed keeps each split's worlds apart
            config.world_people,
            config.world_places,
            config.world_organisations,
            config.world_artefacts,
            exclude=guard,
        )

    # A split never has more worlds than environments (a world nobody asks about would cost time only).
    used = max(1, min(config.train_worlds, max(config.train_size, 4 * config.same_world_test_per_scenario)))
    train = [world(config.seed if k == 0 else f"build/{config.seed}/train/{k}") for k in range(used)]
    guard = NameGuard(name for w in train for name in w.names())
    worlds = {"train": train}
    sizes = {"test": (config.test_worlds, config.test_per_scenario),
             "validation": (config.validation_worlds, config.validation_per_scenario),
             "analysis": (config.analysis_worlds, config.analysis_per_scenario)}  # fmt: skip
    for split in NEW_WORLD_SPLITS:
        wanted, per_scenario = sizes[split]
        count = max(1, min(wanted, len(SCENARIOS) * per_scenario))
        worlds[split] = [world(f"build/{config.seed}/{split}/{k}", guard) for k in range(count)]
        for w in worlds[split]:
            for name in w.names():
                guard.add(name)
    return worlds


def build_envsets(config: EnvBuildConfig, progress: Callable[[int], None] | None = None) -> EnvSetBuild:
    """Build every split: per scenario, `test_per_scenario` (held-out worlds), `validation_per_scenario` and
    `analysis_per_scenario` (other held-out worlds) and `same_world_test_per_scenario` (training worlds); and train (train_size,
    mixed by train_mix). Environments are dealt round-robin over their split's worlds."""
    worlds = split_worlds(config)
    taken: dict[int, set[tuple]] = {id(w): set() for ws in worlds.values() for w in ws}

    def make(
        split: str, pool: list[World], scenarios: list[str], prefix: str | None = None
    ) -> list[EnvRecord]:
        out: list[EnvRecord] = []
        for index, scenario in enumerate(scenarios):
            w = pool[index % len(pool)]
            out.append(build_environment(w, scenario, split, index, config, taken[id(w)], prefix))
            if progress:
                progress(1)
        return out

    def balanced(per_scenario: int) -> list[str]:
        return [s for s in SCENARIOS for _ in range(per_scenario)]

    # Same-world test questions first: train may not repeat them.
    same = make("test", worlds["train"], balanced(config.same_world_test_per_scenario), "same")
    train = make("train", worlds["train"], train_scenarios(config))
    test = make("test", worlds["test"], balanced(config.test_per_scenario))
    validation = make("validation", worlds["validation"], balanced(config.validation_per_scenario))
    analysis = make("analysis", worlds["analysis"], balanced(config.analysis_per_scenario))
    splits = {"train": train, "test": test, "test_same_world": same, "validation": validation,
              "analysis": analysis}  # fmt: skip
    return EnvSetBuild(
        train=train, test=test, test_same_world=same, validation=validation, analysis=analysis,
        manifest=manifest(splits, config, worlds),
    )  # fmt: skip


def build_size(config: EnvBuildConfig) -> int:
    """Environments `build_envsets` makes (for progress bars)."""
    per_scenario = (
        config.test_per_scenario
        + config.validation_per_scenario
        + config.analysis_per_scenario
        + config.same_world_test_per_scenario
    )
    return config.train_size + len(SCENARIOS) * per_scenario


def stream_environments(
    config: EnvBuildConfig,
    stream: str,
    worlds: Sequence[int],
    per_world: int,
    mix: Sequence[float] | None = None,
) -> list[EnvRecord]:
    """Environments from an endless stream of fresh worlds: world k of `stream` (seeded by the string
    `stream/k`, never by a build's integer seed) gives `per_world` environments, with scenarios drawn by the
    weights `mix` (default `config.train_mix`). Entity names rarely repeat across worlds, so a model trained
    on the stream can only fill arguments by reading them from its context, never by recalling them."""
    weights = list(mix if mix is not None else config.train_mix)
    if len(weights) != len(SCENARIOS) or min(weights) < 0 or sum(weights) <= 0:
        raise ConfigError(f"a scenario mix needs {len(SCENARIOS)} weights >= 0 with a positive sum")
    records: list[EnvRecord] = []
    for k in worlds:
        tag = f"{stream}/{k}"
        world = build_world(
            tag,  # type: ignore[arg-type]  # a string seed keeps stream worlds apart from any build's
            config.world_people,
            config.world_places,
            config.world_organisations,
            config.world_artefacts,
        )
        rng = random.Random(f"toolrl-stream-mix/{tag}")
        taken: set[tuple] = set()
        for index in range(per_world):
            scenario = rng.choices(SCENARIOS, weights=weights)[0]
            records.append(build_environment(world, scenario, tag, index, config, taken))
    return records


def write_envset(build: EnvSetBuild, out_dir: str | Path) -> dict[str, Path]:
    """Every split's file (SPLIT_FILES; train and test always, the others when they hold records) and
    manifest.json with each file's record count and SHA-256."""
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out} exists and is not a directory")
    out.mkdir(parents=True, exist_ok=True)
    paths: dict[str, Path] = {}
    files: dict[str, dict[str, Any]] = {}
    for split, records in build.splits().items():
        path = out / SPLIT_FILES[split]
        if not records and split not in ("train", "test"):
            path.unlink(missing_ok=True)  # a rebuild without this split leaves no stale file behind
            continue
        write_envs(records, path)
        paths[split] = path
        files[split] = {"records": len(records), "sha256": file_sha256(path)}
    build.manifest["files"] = files
    paths["manifest"] = out / "manifest.json"
    paths["manifest"].write_text(
        json.dumps(build.manifest, indent=2, ensure_ascii=False) + "\n", encoding="utf-8"
    )
    return paths


# -- manifest --------------------------------------------------------------------------------------
def _stats(values: list[float]) -> dict[str, float]:
    if not values:
        return {"n": 0}
    return {
        "n": len(values),
        "min": min(values),
        "mean": round(statistics.fmean(values), 2),
        "median": statistics.median(values),
        "max": max(values),
    }


def _histogram(values: list[int]) -> dict[str, int]:
    return {str(k): v for k, v in sorted(Counter(values).items())}


def manifest(
    by_split: dict[str, list[EnvRecord]], config: EnvBuildConfig, worlds: dict[str, list[World]]
) -> dict[str, Any]:
    records = [r for rs in by_split.values() for r in rs]
    counts = {
        split: {s: sum(r.scenario == s for r in rs) for s in SCENARIOS} for split, rs in by_split.items()
    }
    n_docs = sum(r.meta["documents"] for r in records)
    distinct_docs = sum(len({(q["relation"], q["tool"]) for q in r.meta["subquestions"]}) for r in records)
    n_golden = sum(r.meta["tools"] for r in records)
    per_scenario: dict[str, Any] = {}
    for s in SCENARIOS:
        rs = [r for r in records if r.scenario == s]
        per_scenario[s] = {
            "environments": len(rs),
            "subquestions": _stats([r.n_subquestions for r in rs]),
            "tools": _stats([len(r.tools) for r in rs]),
            "question_chars": _stats([len(r.question) - len(FTRL_PROMPT) for r in rs]),
            "aggregates": dict(sorted(Counter(r.meta["aggregate"] for r in rs).items())),
        }
    scaling = {
        op: {split: sum(op in r.meta["scaling"] for r in rs) for split, rs in by_split.items()}
        for op in OPERATIONS
    }
    scaled_tools = {op: sum(len(r.meta["scaling_details"].get(op, {})) for r in records) for op in OPERATIONS}
    return {
        "format": "toolrl-analysis.envset/1",
        "seed": config.seed,
        "counts": counts,
        "totals": {split: len(rs) for split, rs in by_split.items()},
        "world": worlds["train"][0].stats(),  # every world has these sizes
        "worlds": {split: [str(w.seed) for w in ws] for split, ws in worlds.items()},
        "split_worlds": {  # which split's worlds each split's environments come from
            "train": "train",
            "test": "test (held out: no entity of train)",
            "test_same_world": "train (unseen questions)",
            "validation": "validation (held out: no entity of train or test)",
        },
        "integration": {
            "documents": n_docs,
            "distinct_documents": distinct_docs,
            "tools": n_golden,
            "ratio_tools_per_document": round(n_golden / n_docs, 4) if n_docs else None,
            "environments_with_merge": sum(bool(r.meta["merges"]) for r in records),
            "merges": sum(len(r.meta["merges"]) for r in records),
        },
        "scaling": {"environments": scaling, "tools": scaled_tools},
        "tools_per_environment": {
            "all": _stats([len(r.tools) for r in records]),
            "histogram": _histogram([len(r.tools) for r in records]),
            "golden": _stats([r.meta["tools"] for r in records]),
            "distractors": _stats([len(r.meta["distractors"]) for r in records]),
        },
        "prompt_chars": {
            "user_message": _stats([len(r.question) for r in records]),
            "question": _stats([len(r.question) - len(FTRL_PROMPT) for r in records]),
            "tools_json": _stats([len(json.dumps(r.tools, ensure_ascii=False)) for r in records]),
        },
        "answer_chars": _stats([len(r.answer) for r in records]),
        "scenarios": per_scenario,
        "config": dataclasses.asdict(config),
    }


def render_build(manifest: dict[str, Any], out_dir: str, console: Any) -> None:
    """The human summary of `envs build`."""
    from rich.table import Table

    table = Table(title=f"environments written to {out_dir} (seed {manifest['seed']})")
    splits = list(manifest["counts"])
    for column in ("scenario", *splits, "sub-questions", "tools", "question chars"):
        table.add_column(column, justify="left" if column == "scenario" else "right")
    for scenario, row in manifest["scenarios"].items():
        table.add_row(
            scenario,
            *(str(manifest["counts"][split][scenario]) for split in splits),
            f"{row['subquestions'].get('min', 0)}-{row['subquestions'].get('max', 0)}",
            f"{row['tools'].get('mean', 0)}",
            f"{row['question_chars'].get('mean', 0)}",
        )
    console.print(table)
    integration = manifest["integration"]
    console.print(
        f"function integration: {integration['documents']} documents -> {integration['tools']} tools "
        f"(ratio {integration['ratio_tools_per_document']}, {integration['merges']} merges)"
    )
    scaling = Table(title="complexity scaling (environments)")
    for column in ("operation", *splits, "tools"):
        scaling.add_column(column, justify="left" if column == "operation" else "right")
    for op, counts in manifest["scaling"]["environments"].items():
        scaling.add_row(op, *(str(counts[split]) for split in splits), str(manifest["scaling"]["tools"][op]))
    console.print(scaling)
    worlds = {split: len(seeds) for split, seeds in manifest.get("worlds", {}).items()}
    if worlds:
        console.print(
            "worlds: "
            + ", ".join(f"{split} {n}" for split, n in worlds.items())
            + " (test, validation and analysis share no entity name with train, nor with each other; test_same_world asks about train's worlds)"
        )
    tools = manifest["tools_per_environment"]["all"]
    if tools.get("n"):
        console.print(f"tools per environment: {tools['min']}-{tools['max']} (mean {tools['mean']})")


def write_samples(records: list[EnvRecord], out_dir: str | Path) -> list[Path]:
    """The first environment of each scenario, pretty-printed (objects, not JSON strings) for reading."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for scenario in SCENARIOS:
        record = next((r for r in records if r.scenario == scenario), None)
        if record is None:
            continue
        path = out / f"{scenario}.json"
        path.write_text(json.dumps(record.to_dict(), indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
        written.append(path)
    return written
