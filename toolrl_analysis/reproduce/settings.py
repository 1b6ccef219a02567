"""What each stage of `reproduce` runs with: each command's defaults (the shipped recipes), the sizes of the
default and the `--quick` run, and `--set STAGE.KEY=VALUE` overrides on top. `reproduce --print-config`
prints the result as TOML, one table per stage.

The default run is sized to finish in about an hour on 2 CPU cores from the shipped base: the whole test
split is evaluated, while ablation and probing use a balanced slice of it (`limit`), which the report says.
`--quick` cuts every stage down to a smoke run of a few minutes; it is not a result.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from toolrl_analysis.config import config_toml, load_config, require, toml_value
from toolrl_analysis.episodes import EPISODES, GENERAL_TASKS, VARIANT_GENERAL_TASKS
from toolrl_analysis.errors import ConfigError
from toolrl_analysis.models.placement import Placement

BASE_SOURCES = ("embedded", "train")  # or the path of a policy file


@dataclass
class EvalSettings:
    """`evaluate` of each policy on the test split (and its general suite and role-NLL table)."""

    limit: int = 0  # environments, balanced over scenarios (0: the whole test split)
    max_turns: int = EPISODES.max_turns  # how episodes are played: rollout.EpisodeOptions
    max_new_tokens: int = EPISODES.max_new_tokens
    batch_size: int = EPISODES.batch_size
    general: bool = True
    general_tasks: int = GENERAL_TASKS  # exact-match tasks: enough for the "general ability is kept" interval
    # pass@k of the base and the (first) GRPO policy: `samples` episodes per environment at `temperature`
    # on a slice of `sample_limit` test environments, balanced over scenarios (0: the whole split)
    samples: int = 8
    sample_limit: int = 100
    temperature: float = 1.0
    success_threshold: float = 1.0  # Solve-F1 an episode needs to count as a success

    def validate(self) -> None:
        require(self.limit >= 0, "limit", "must not be negative")
        for key in ("max_turns", "max_new_tokens", "batch_size", "general_tasks"):
            require(getattr(self, key) >= 1, key, "must be at least 1")
        require(self.samples >= 0, "samples", "must not be negative (0: no pass@k)")
        require(self.sample_limit >= 0, "sample_limit", "must not be negative")
        require(self.temperature > 0, "temperature", "must be positive (sampling)")
        require(0 < self.success_threshold <= 1, "success_threshold", "must be in (0, 1]")


@dataclass
class AblateSettings:
    """`ablate --grid paper` on the GRPO pair."""

    # Solve-F1 environments of the analysis split, balanced over scenarios: the references and the main
    # variants (24) are played on them
    limit: int = 48
    analysis_limit: int = 0  # environments for the teacher-forced metric (0: the whole analysis split)
    controls: int = 20  # matched random controls per subset
    rank: int = 1  # k of the rank-k block
    score_threads: int = 2  # torch threads of the teacher-forced scoring (1 when the cores are shared)
    max_turns: int = EPISODES.max_turns
    max_new_tokens: int = EPISODES.max_new_tokens
    batch_size: int = EPISODES.batch_size
    # the general suite per main variant (~8 s each): off, so that the grid with its 20 controls per subset
    # fits in 20 minutes; the general claim is judged on the evaluated policies, not on the ablation
    general: bool = False
    general_tasks: int = VARIANT_GENERAL_TASKS
    roles: bool = True  # the role-NLL table per variant (the behavioural context-reading measure)
    bootstrap: int = 1000
    seed: int = 0
    metric: str = "solve_f1"

    def validate(self) -> None:
        require(self.limit >= 1, "limit", "must be at least 1")
        for key in ("max_turns", "max_new_tokens", "batch_size", "general_tasks"):
            require(getattr(self, key) >= 1, key, "must be at least 1")
        require(self.bootstrap >= 2, "bootstrap", "must be at least 2")
        require(self.analysis_limit >= 0, "analysis_limit", "must not be negative (0: the whole split)")
        require(self.controls >= 2, "controls", "must be at least 2 (their spread is the null distribution)")
        require(self.rank >= 1, "rank", "must be at least 1")
        require(self.score_threads >= 0, "score_threads", "must be 0 (torch's default) or more")


@dataclass
class JudgeSettings:
    """`judge`'s general and context claims and `divergence` on the GRPO pair (the report's verdicts are
    written from them; tool use and the lower MLPs are decided from the evaluate and ablate stages)."""

    analysis_limit: int = 0  # environments of the analysis split (0: all of them)
    tasks: int = 4096  # held-out general tasks, teacher-forced
    top: int = 20  # max-KL tokens saved with their context
    max_turns: int = EPISODES.max_turns
    max_new_tokens: int = EPISODES.max_new_tokens
    batch_size: int = EPISODES.batch_size

    def validate(self) -> None:
        require(self.analysis_limit >= 0, "analysis_limit", "must not be negative (0: the whole split)")
        for key in ("tasks", "top", "max_turns", "max_new_tokens", "batch_size"):
            require(getattr(self, key) >= 1, key, "must be at least 1")


# Overrides of the default run (on top of each command's defaults); measured to keep `make reproduce` near an hour.
DEFAULT = {
    "envs": [],
    "base": [],
    "grpo": [],
    "eval": [],
    "ablate": [],
    "probe": ["limit=0", "rollout_envs=16", "seeds=5"],  # all 200 test environments: MDE near 0.05
    "judge": [],
    "patch": [],
}
# The smoke run: every stage at a few environments and one or two iterations.
QUICK = {
    "envs": ["train_size=80", "test_per_scenario=4", "validation_per_scenario=2", "same_world_test_per_scenario=4",
             "train_worlds=4", "test_worlds=1", "validation_worlds=1", "analysis_worlds=1", "analysis_per_scenario=4"],
    "base": ["steps=60", "curriculum_steps=0", "stream_envs=240", "tokenizer_envs=100", "eval_every=60", "val_solve_envs=1",
             "val_meter_envs=2", "general_tasks=200", "general_from_step=0"],
    # a 60-step base rarely has reward spread: its flat groups stay in the update so that the weights still
    # move and compare and ablate have an update to read
    "grpo": ["iterations=2", "envs_per_iteration=4", "max_samples_per_iteration=8", "group_size=4",
             "eval_every=0", "max_turns=4", "max_new_tokens=48", "save_every=1", "drop_flat_groups=false"],
    "eval": ["limit=8", "max_turns=4", "max_new_tokens=48", "general_tasks=16", "samples=2", "sample_limit=4"],
    "ablate": ["limit=8", "max_turns=2", "max_new_tokens=32", "bootstrap=200", "controls=3"],
    "probe": ["limit=16", "rollout_envs=0", "seeds=2", "max_iter=30"],
    "judge": ["tasks=256", "max_turns=2", "max_new_tokens=32"],
    "patch": ["limit=4", "controls=1"],
}  # fmt: skip
STAGE_KEYS = tuple(DEFAULT)
STAGE_FIELDS = {
    "envs": "envs",
    "base": "sft",
    "grpo": "grpo",
    "eval": "eval",
    "ablate": "ablate",
    "probe": "probe",
    "judge": "judge",
    "patch": "patch",
}
# GRPO runs of the default recipe with seeds seed, seed + 1, ...: `--set grpo.seeds=N` (a key of the chain,
# not of GRPOConfig). The first is the analysed pair; the others give the gain's spread over training seeds.
GRPO_SEEDS = {False: 3, True: 1}


def split_overrides(items: list[str]) -> dict[str, list[str]]:
    """`--set STAGE.KEY=VALUE` -> {stage: ["KEY=VALUE", ...]}; the error names the stages there are."""
    out: dict[str, list[str]] = {stage: [] for stage in STAGE_KEYS}
    for item in items:
        key, sep, value = item.partition("=")
        stage, dot, name = key.strip().partition(".")
        if not sep or not dot or not name:
            raise ConfigError(
                f"--set {item!r} must look like STAGE.KEY=VALUE (STAGE: {', '.join(STAGE_KEYS)})"
            )
        if stage not in out:
            raise ConfigError(f"--set {item!r}: unknown stage {stage!r} (one of {', '.join(STAGE_KEYS)})")
        out[stage].append(f"{name}={value}")
    return out


@dataclass
class ChainSettings:
    quick: bool
    base: str
    grpo_seeds: int
    envs: Any
    sft: Any
    grpo: Any
    eval: EvalSettings
    ablate: AblateSettings
    probe: Any
    judge: JudgeSettings
    patch: Any
    placement: Placement = Placement()  # --device, --dtype of every stage that loads a model

    def document(self) -> dict[str, Any]:
        chain = {"quick": self.quick, "base": self.base, "grpo_seeds": self.grpo_seeds}
        chain |= {"device": self.placement.device, "dtype": self.placement.dtype}
        return chain | {k: dataclasses.asdict(getattr(self, k)) for k in STAGE_FIELDS.values()}

    def stage_config(self, config: dict[str, Any]) -> dict[str, Any]:
        """A model-loading stage's record: its configuration, and the device and dtype when they are not
        auto (so a run made on the defaults stays current, and a bfloat16 run is not mistaken for it)."""
        return config | self.placement.record()

    def toml(self) -> str:
        """The resolved settings as TOML: the chain's own keys ([chain]), then one table per stage, named as
        `--set STAGE.KEY=VALUE` names it."""
        head = f"[chain]\nquick = {toml_value(self.quick)}\nbase = {toml_value(self.base)}  # --base\n"
        head += (
            f"grpo_seeds = {self.grpo_seeds}  # --set grpo.seeds=N: GRPO runs, seeds seed, seed + 1, ...\n"
        )
        head += f"device = {toml_value(self.placement.device)}  # --device\n"
        head += f"dtype = {toml_value(self.placement.dtype)}  # --dtype\n"
        return "\n".join([head, *(config_toml(getattr(self, f), table=s) for s, f in STAGE_FIELDS.items())])


def load_settings(
    quick: bool = False,
    base: str = "embedded",
    overrides: list[str] | None = None,
    placement: Placement | None = None,
) -> ChainSettings:
    from toolrl_analysis.analysis.patching.run import PatchConfig
    from toolrl_analysis.analysis.probe.run import ProbeConfig
    from toolrl_analysis.envs.pipeline import EnvBuildConfig
    from toolrl_analysis.training.grpo import GRPOConfig
    from toolrl_analysis.training.sft import SFTConfig

    sizes = QUICK if quick else DEFAULT
    extra = split_overrides(list(overrides or []))
    if base not in BASE_SOURCES and not Path(base).is_file():
        raise ConfigError(f"--base must be embedded, train or a policy file; {base} is none of them")

    seeds = GRPO_SEEDS[quick]
    for item in [i for i in extra["grpo"] if i.partition("=")[0].strip() == "seeds"]:
        extra["grpo"].remove(item)
        value = item.partition("=")[2].strip()
        if not value.isdigit() or int(value) < 1:
            raise ConfigError(f"--set grpo.seeds={value}: must be a whole number of runs, at least 1")
        seeds = int(value)

    def merged(stage: str) -> list[str]:
        return sizes[stage] + extra[stage]

    envs = load_config(EnvBuildConfig, None, merged("envs"))
    if envs.analysis_per_scenario < 1:  # the ablation stage reads the analysis split, never the test split
        raise ConfigError(
            "--set envs.analysis_per_scenario: reproduce's ablation needs at least 1 (it uses them)"
        )
    return ChainSettings(
        quick=quick,
        base=base,
        grpo_seeds=seeds,
        envs=envs,
        sft=load_config(SFTConfig, None, merged("base")),
        grpo=load_config(GRPOConfig, None, merged("grpo")),
        eval=load_config(EvalSettings, None, merged("eval")),
        ablate=load_config(AblateSettings, None, merged("ablate")),
        probe=load_config(ProbeConfig, None, merged("probe")),
        judge=load_config(JudgeSettings, None, merged("judge")),
        patch=load_config(PatchConfig, None, merged("patch")),
        placement=placement or Placement(),
    )
