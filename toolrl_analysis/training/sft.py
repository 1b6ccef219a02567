"""Supervised warm-up of the embedded base: a from-scratch tiny model that reads its context.

The data are oracle trajectories (golden calls, the real tools' output from the sandbox, a final answer) on
a stream of fresh worlds (`base_data`), with general tasks and prose (mixed in, or late). Reading the
question comes as a phase change after a few hundred focused steps: first the entity kind of the tool, then
the relation, and last (and slowest) copying the entity name into the argument. The context-reading meter
(`context_meter`) measures each of these every `eval_every` steps on a validation slice, beside greedy
Solve-F1.

The base must be competent but clearly imperfect, so that RL has room to show gains (held-out Solve-F1
0.2-0.6, multi-hop weaker). `select = "band"` keeps every evaluated checkpoint and ships the last one whose
validation Solve-F1 is inside `band` with multi-hop below single-hop; the curriculum (`curriculum_steps` of
`curriculum_mix` first, then `mix`) and `mix` itself (fewer multi-hop demonstrations) shape what it can do.

A run checkpoints its whole state every `eval_every` steps (`checkpoints/state.pt`), and `resume=True`
continues it to the same result as an uninterrupted run.
"""

from __future__ import annotations

import json
import math
import random
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import torch

from toolrl_analysis.config import require
from toolrl_analysis.envs.schema import SCENARIOS
from toolrl_analysis.errors import UserError
from toolrl_analysis.io import read_json_object
from toolrl_analysis.training.base_data import Example
from toolrl_analysis.training.schedules import linear_warmup, warmup_stable_decay, warmup_then_cosine

LOSS_ON = ("all", "assistant")
DATA_SOURCES = ("stream", "envs")
SELECTIONS = ("band", "last")
# Keys that say how a run is driven, not what it computes: a resumed run may change them.
RUN_CONTROL = ("log_every", "time_limit_s")
# Keys a resumed run may change to continue training further, as long as every step already taken keeps its
# learning rate and its batches: the continued run is then the run that had asked for them from the start
# (more steps at a constant rate, a constant run branched into its wsd decay, a late general-material phase).
EXTENDABLE = (
    "steps", "schedule", "decay_steps", "general_from_step", "general_every", "general_tasks", "general_text_share"
)  # fmt: skip
SCHEDULES = ("cosine", "constant", "wsd")
STATE_FILE = "checkpoints/state.pt"  # the run's whole state (resume.py's format), every eval_every steps


@dataclass
class SFTConfig:
    """One `train-base` run. The defaults are the recipe of the shipped base (`make base` regenerates it bit
    for bit); `--config FILE` and `--set key=value` override them, and `train-base --print-config` prints
    them as TOML.

    Each field's comment says what it does, its unit, and where it comes from. The data recipe follows FTRL's
    environments (Ye et al. 2025); what each lever did on the embedded model is in docs/recipes.md.
    """

    # Model size from models/factory.PRESETS: "tiny" (about 1.1M parameters) or "small" (about 5M).
    preset: str = "tiny"
    # Architecture (parameter names and layout): "qwen2", "qwen3" or "llama".
    family: str = "qwen2"
    # Tokens in the byte-level BPE vocabulary, and environments in its training corpus (with stdlib prose).
    vocab_size: int = 4096
    tokenizer_envs: int = 2000
    # Where demonstrations come from: "stream" (fresh worlds from a training-only seed stream) or "envs"
    # (the build's train.jsonl minus the validation slice). See training/base_data.py.
    data: str = "stream"
    # Stream: environments in the main pool, and environments per fresh world.
    stream_envs: int = 16000
    envs_per_world: int = 300
    # Relative weights of single_hop, parallel_single_hop, multi_hop, parallel_multi_hop demonstrations
    # after the curriculum (fewer multi-hop ones keep the base weaker there).
    mix: list[float] = field(default_factory=lambda: [1.0, 1.0, 0.5, 0.5])
    # Optimiser steps at the start drawn from a pool of `curriculum_envs` with `curriculum_mix` weights.
    curriculum_steps: int = 2000
    curriculum_envs: int = 12000
    curriculum_mix: list[float] = field(default_factory=lambda: [1.0, 0.0, 0.0, 0.0])
    # Probability that a trajectory has one failed call (a misspelled argument) followed by its correction.
    correction_prob: float = 0.0
    # Which tokens are targets: "all" (plain language modelling over the whole conversation) or
    # "assistant" (only what the model writes). General text is always plain language modelling.
    loss_on: str = "all"
    # General-text windows, as a fraction of the tool-use examples.
    general_text_share: float = 0.0
    # Short general tasks (arithmetic, copying, reversing) added as chat examples.
    general_tasks: int = 4000
    # 0: the general material is mixed into every pool from the start. Otherwise it is a pool of its own, and
    # from this step on one batch in `general_every` comes from it (after the copy circuit has formed, which
    # general material from the start slowed).
    general_from_step: int = 5000
    general_every: int = 4
    # Optimiser steps in all.
    steps: int = 5500
    # Padded tokens per batch (examples of similar length are batched together).
    batch_tokens: int = 4096
    # Tokens; longer tool-use examples are dropped and general text is cut into windows of this length.
    max_seq_len: int = 1280
    # AdamW peak learning rate, decoupled weight decay (Loshchilov & Hutter 2019) and betas (0.95 for beta2,
    # as in GPT-3 and most LM pre-training recipes, reacts faster than torch's 0.999 default).
    lr: float = 3e-3
    weight_decay: float = 0.01
    adam_betas: list[float] = field(default_factory=lambda: [0.9, 0.95])
    # Linear warm-up steps; then "cosine" (to 10% of lr at the last step), "constant", or "wsd": constant
    # until the last `decay_steps`, then linearly to 0 (a constant run can be resumed into its decay).
    warmup_steps: int = 50
    schedule: str = "constant"
    decay_steps: int = 0
    # Maximum global L2 norm of the gradient per optimiser step.
    grad_clip: float = 1.0
    # Validation every this many steps (and at the end): the role-NLL meter on `val_meter_envs` per scenario
    # and greedy Solve-F1 on `val_solve_envs` per scenario, from the end of the build's train.jsonl.
    eval_every: int = 500
    val_meter_envs: int = 25
    val_solve_envs: int = 20
    # Tokens per generated assistant turn in the validation episodes.
    val_max_new_tokens: int = 128
    # Which checkpoint becomes base.pt: "band" (the last evaluated one whose overall validation Solve-F1 is
    # inside `band` with multi-hop below single-hop; the closest one if none is) or "last".
    select: str = "band"
    band: list[float] = field(default_factory=lambda: [0.2, 0.6])
    # Seed of the tokenizer, the data stream, the model's initialisation and the batch order.
    seed: int = 0
    # torch intra-op threads; 0 keeps torch's default. Results are bit-identical for the same value.
    threads: int = 2
    # Optimiser steps between rows of the loss curve (loss.csv) and plain progress lines.
    log_every: int = 10
    # Seconds; 0 = no limit, otherwise stop early (and say so) after this long.
    time_limit_s: float = 0.0

    SECTIONS: ClassVar[dict[str, tuple[str, ...]]] = {
        "model": ("preset", "family", "vocab_size", "tokenizer_envs"),
        "data": (
            "data", "stream_envs", "envs_per_world", "mix", "curriculum_steps", "curriculum_envs", "curriculum_mix",
            "correction_prob", "loss_on", "general_text_share", "general_tasks", "general_from_step",
            "general_every",
        ),
        "optimiser": (
            "steps", "batch_tokens", "max_seq_len", "lr", "weight_decay", "adam_betas", "warmup_steps", "schedule",
            "decay_steps", "grad_clip",
        ),
        "validation": ("eval_every", "val_meter_envs", "val_solve_envs", "val_max_new_tokens", "select", "band"),
        "run": ("seed", "threads", "log_every", "time_limit_s"),
    }  # fmt: skip

    def validate(self) -> None:
        from toolrl_analysis.models.factory import FAMILIES, PRESETS

        require(self.preset in PRESETS, "preset", f"must be one of {', '.join(PRESETS)}")
        require(self.family in FAMILIES, "family", f"must be one of {', '.join(FAMILIES)}")
        require(512 <= self.vocab_size <= 65536, "vocab_size", "must be between 512 and 65536")
        require(self.tokenizer_envs >= 1, "tokenizer_envs", "must be at least 1")
        require(self.data in DATA_SOURCES, "data", f"must be one of {', '.join(DATA_SOURCES)}")
        require(self.stream_envs >= 1, "stream_envs", "must be at least 1")
        require(self.envs_per_world >= 1, "envs_per_world", "must be at least 1")
        for key in ("mix", "curriculum_mix"):
            weights = getattr(self, key)
            require(
                len(weights) == len(SCENARIOS) and min(weights) >= 0 and sum(weights) > 0,
                key,
                f"must list {len(SCENARIOS)} weights >= 0 with a positive sum",
            )
        require(0 <= self.curriculum_steps <= self.steps, "curriculum_steps", "must be between 0 and steps")
        require(self.curriculum_envs >= 1, "curriculum_envs", "must be at least 1")
        require(0.0 <= self.correction_prob <= 1.0, "correction_prob", "must be between 0 and 1")
        require(self.loss_on in LOSS_ON, "loss_on", f"must be one of {', '.join(LOSS_ON)}")
        require(self.general_text_share >= 0, "general_text_share", "must not be negative")
        require(self.general_tasks >= 0, "general_tasks", "must not be negative")
        require(self.general_from_step >= 0, "general_from_step", "must not be negative")  # past steps: never
        require(self.general_every >= 1, "general_every", "must be at least 1")
        require(
            not self.general_from_step or self.general_tasks or self.general_text_share,
            "general_from_step",
            "needs general material (general_tasks or general_text_share above 0)",
        )
        require(self.steps >= 1, "steps", "must be at least 1")
        require(self.max_seq_len >= 64, "max_seq_len", "must be at least 64")
        require(self.batch_tokens >= self.max_seq_len, "batch_tokens", "must be at least max_seq_len")
        require(self.lr > 0 and math.isfinite(self.lr), "lr", "must be a positive number")
        require(self.weight_decay >= 0, "weight_decay", "must not be negative")
        require(
            len(self.adam_betas) == 2 and all(0 <= b < 1 for b in self.adam_betas),
            "adam_betas",
            "must be two numbers in [0, 1)",
        )
        require(self.warmup_steps >= 0, "warmup_steps", "must not be negative")
        require(self.schedule in SCHEDULES, "schedule", f"must be one of {', '.join(SCHEDULES)}")
        require(0 <= self.decay_steps <= self.steps, "decay_steps", "must be between 0 and steps")
        require(self.schedule != "wsd" or self.decay_steps > 0, "decay_steps", "must be positive with wsd")
        require(self.grad_clip > 0, "grad_clip", "must be positive")
        require(self.eval_every >= 1, "eval_every", "must be at least 1")
        require(self.val_meter_envs >= 0, "val_meter_envs", "must not be negative")
        require(self.val_solve_envs >= 0, "val_solve_envs", "must not be negative")
        require(self.val_max_new_tokens >= 8, "val_max_new_tokens", "must be at least 8")
        require(self.select in SELECTIONS, "select", f"must be one of {', '.join(SELECTIONS)}")
        require(
            len(self.band) == 2 and 0 <= self.band[0] <= self.band[1] <= 1,
            "band",
            "must be two Solve-F1 values [low, high] with 0 <= low <= high <= 1",
        )
        require(self.threads >= 0, "threads", "must not be negative")
        require(self.log_every >= 1, "log_every", "must be at least 1")
        require(self.time_limit_s >= 0, "time_limit_s", "must not be negative")

    def pool_at(self, step: int) -> str:
        """The pool that the batch of 0-based optimiser step `step` is drawn from."""
        late = step - self.general_from_step
        if self.general_from_step and late >= 0 and late % self.general_every == 0:
            return "general"
        return "curriculum" if step < self.curriculum_steps else "main"

    def mixed_general(self) -> tuple[int, float]:
        """General material inside the tool-use pools: (tasks, text share); none with a late phase."""
        return (0, 0.0) if self.general_from_step else (self.general_tasks, self.general_text_share)

    def lr_factor(self, step: int) -> float:
        if self.schedule == "constant":
            return linear_warmup(step, self.warmup_steps)
        if self.schedule == "wsd":
            return warmup_stable_decay(step, self.warmup_steps, self.steps, self.decay_steps)
        return warmup_then_cosine(step, self.warmup_steps, self.steps)


def _same_past(saved: SFTConfig, config: SFTConfig, step: int) -> bool:
    """Whether `config` trains at least `step` steps and gives each of them the learning rate and the pools
    it had."""
    return (
        config.steps >= step
        and saved.mixed_general() == config.mixed_general()
        and all(
            math.isclose(saved.lr_factor(s), config.lr_factor(s), rel_tol=1e-12)
            and saved.pool_at(s) == config.pool_at(s)
            for s in range(step)
        )
    )


# -- batches ---------------------------------------------------------------------------------------
def token_budget_batches(examples: list[Example], batch_tokens: int, rng: random.Random) -> list[list[int]]:
    """Batches of similar length (little padding) holding at most `batch_tokens` padded tokens, shuffled."""
    order = sorted(range(len(examples)), key=lambda i: (len(examples[i][0]), rng.random()))
    batches, current, longest = [], [], 0
    for index in order:
        length = len(examples[index][0])
        if current and max(longest, length) * (len(current) + 1) > batch_tokens:
            batches.append(current)
            current, longest = [], 0
        current.append(index)
        longest = max(longest, length)
    if current:
        batches.append(current)
    rng.shuffle(batches)
    return batches


def collate(examples: list[Example], pad_id: int) -> dict[str, torch.Tensor]:
    width = max(len(ids) for ids, _ in examples)
    input_ids = torch.full((len(examples), width), pad_id, dtype=torch.long)  # [B, T]
    labels = torch.full((len(examples), width), -100, dtype=torch.long)  # [B, T], -100 = not a target
    attention = torch.zeros((len(examples), width), dtype=torch.long)  # [B, T]
    for row, (ids, mask) in enumerate(examples):
        input_ids[row, : len(ids)] = torch.tensor(ids)
        attention[row, : len(ids)] = 1
        labels[row, : len(ids)] = torch.where(torch.tensor(mask, dtype=torch.bool), torch.tensor(ids), -100)
    return {"input_ids": input_ids, "attention_mask": attention, "labels": labels}


class BatchStream:
    """Epochs of shuffled token-budget batches over one pool; its position is part of the saved state."""

    def __init__(self, examples: list[Example], batch_tokens: int, seed: str):
        self.examples, self.batch_tokens = examples, batch_tokens
        self.rng = random.Random(seed)
        self.pending: list[list[int]] = []

    def next(self, pad_id: int) -> dict[str, torch.Tensor]:
        if not self.pending:
            self.pending = token_budget_batches(self.examples, self.batch_tokens, self.rng)
        return collate([self.examples[i] for i in self.pending.pop()], pad_id)

    def state(self) -> dict[str, Any]:
        return {"rng": self.rng.getstate(), "pending": self.pending}

    def load(self, state: dict[str, Any]) -> None:
        self.rng.setstate(state["rng"])
        self.pending = state["pending"]


# -- the command -----------------------------------------------------------------------------------
@dataclass
class Progress:
    """What a progress display needs after each step (the last validation row may be older)."""

    step: int
    total: int
    loss: float
    tokens_per_s: float
    eta_s: float
    validation: dict[str, Any] | None = None


def build_settings(envs_dir: Path):
    """The environment-build config the stream follows: the build's own (manifest.json), else the defaults."""
    from toolrl_analysis.config import build_config
    from toolrl_analysis.envs.pipeline import EnvBuildConfig

    manifest = envs_dir / "manifest.json" if envs_dir.is_dir() else envs_dir.parent / "manifest.json"
    if manifest.is_file():
        values = read_json_object(manifest, UserError).get("config") or {}
        return build_config(EnvBuildConfig, values, source=str(manifest))
    return EnvBuildConfig()


def base_tokenizer(config: SFTConfig, build, records):
    """The policy tokenizer: trained on stream worlds (the `tokenizer` stream), or on the build's records."""
    from toolrl_analysis.models.tokenizer import build_policy_tokenizer
    from toolrl_analysis.training.base_data import stream_records

    if config.data == "stream":
        corpus = stream_records(
            build, config.seed, config.tokenizer_envs, 100, [1.0] * len(SCENARIOS), "tokenizer"
        )
    else:
        corpus = list(records)
    return build_policy_tokenizer(corpus, vocab_size=config.vocab_size, seed=config.seed)


def _pools(config: SFTConfig, build, records, validation_ids, tokenizer, sandbox) -> tuple[dict, dict]:
    """The example pools (`main`, and `curriculum` when used), each with general material mixed in, or
    a `general` pool of its own when the general material comes late (`general_from_step`)."""
    from toolrl_analysis.training.base_data import general_examples, stream_records, tool_use_examples

    def demonstrations(count: int, mix: list[float], purpose: str) -> list:
        if config.data == "stream":
            return stream_records(build, config.seed, count, config.envs_per_world, mix, purpose)
        pool = [r for r in records if id(r) not in validation_ids and r.meta.get("golden_turns")]
        rng = random.Random(f"{purpose}/{config.seed}")
        weights = dict(zip(SCENARIOS, mix, strict=True))
        return [r for r in pool if rng.random() < weights.get(r.scenario, 0) / max(mix)]

    def general(tasks: int, text_share: float, tool_examples: int) -> list:
        text_count = int(text_share * tool_examples)  # prose windows, as a share of the tool-use examples
        return general_examples(
            tokenizer, tasks=tasks, text_count=text_count, seed=config.seed, max_len=config.max_seq_len
        )

    options = {"seed": config.seed, "correction_prob": config.correction_prob, "loss_on": config.loss_on}
    pools, info = {}, {}
    plan = [("main", config.stream_envs, config.mix)]
    if config.curriculum_steps:
        plan.append(("curriculum", config.curriculum_envs, config.curriculum_mix))
    for name, count, mix in plan:
        examples, info[name] = tool_use_examples(
            tokenizer,
            demonstrations(count, mix, f"sft-{name}"),
            sandbox,
            max_len=config.max_seq_len,
            **options,
        )
        mixed = general(*config.mixed_general(), len(examples))
        info[name]["general_examples"] = len(mixed)
        pools[name] = examples + mixed
    if config.general_from_step:
        pools["general"] = general(config.general_tasks, config.general_text_share, len(pools["main"]))
        info["general"] = {"examples": len(pools["general"]), "from_step": config.general_from_step}
    return pools, info


def train_base(
    envs_dir: str | Path,
    out_dir: str | Path,
    config: SFTConfig,
    resume: bool = False,
    on_step: Callable[[Progress], None] | None = None,
    log: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Tokenizer + model from scratch, supervised on oracle trajectories; writes base.pt, hf/, loss.csv,
    validation.csv and validation.png, and train_base.json (the recipe, the chosen checkpoint and why)."""
    from toolrl_analysis.envs.sandbox import Sandbox
    from toolrl_analysis.models.factory import count_parameters
    from toolrl_analysis.training.shared import seed_torch, training_records
    from toolrl_analysis.training.validation import Validation

    envs_dir, out_dir = Path(envs_dir), Path(out_dir)
    _check_resume(out_dir, resume)
    records = training_records(envs_dir)
    build = build_settings(envs_dir)
    seed_torch(config.seed, config.threads)
    started = time.perf_counter()

    # 1. resume or start
    model, tokenizer, state = _resume_or_start(config, out_dir, resume, build, records)
    with Sandbox(workers=2) as sandbox:
        validation = Validation.build(
            tokenizer,
            records,
            sandbox,
            config.val_meter_envs,
            config.val_solve_envs,
            config.val_max_new_tokens,
        )
        validation_ids = {id(r) for r in validation.records}
        pools, data_info = _pools(config, build, records, validation_ids, tokenizer, sandbox)
        log(
            f"{count_parameters(model):,} parameters; "
            + "; ".join(f"{name}: {len(pool)} examples" for name, pool in pools.items())
            + f"; data ready in {time.perf_counter() - started:.0f}s"
        )
        run = WarmUp(config, model, tokenizer, pools, state, out_dir)
        # 2. the loop: a step a batch, validation and a checkpoint every eval_every steps
        run.train(validation, sandbox, started, on_step, log)
    # 3. choose the checkpoint that becomes base.pt, and write it with the run's tables
    return run.choose_and_write(started, data_info, build.seed)


def _check_resume(out_dir: Path, resume: bool) -> None:
    """A resume needs a saved state, and a fresh run an --out without one (never overwrite a run)."""
    from toolrl_analysis.errors import ConfigError

    state_path = out_dir / STATE_FILE
    if resume and not state_path.is_file():
        raise ConfigError(f"nothing to resume: {state_path} does not exist")
    if not resume and state_path.is_file():
        raise ConfigError(
            f"{out_dir} already holds a train-base run; continue it with --resume or pick another --out"
        )


def _resume_or_start(config: SFTConfig, out_dir: Path, resume: bool, build, records) -> tuple[Any, Any, dict]:
    """(model, tokenizer, saved state): the saved run when resuming (its config must match, or only extend
    it), else a fresh tokenizer and a freshly initialised model."""
    from toolrl_analysis.errors import ConfigError
    from toolrl_analysis.models.checkpoint import load_policy
    from toolrl_analysis.models.factory import build_model
    from toolrl_analysis.training.resume import load_train_state

    if not resume:
        tokenizer = base_tokenizer(config, build, records)
        model = build_model(config.preset, family=config.family, tokenizer=tokenizer, seed=config.seed)
        return model, tokenizer, {}
    state_path = out_dir / STATE_FILE
    saved = load_train_state(state_path)[1]
    changed = sorted(
        k
        for k, v in asdict(config).items()
        if k not in RUN_CONTROL and k not in EXTENDABLE and saved["config"].get(k) != v
    )
    extended = [
        k for k in EXTENDABLE if saved["config"].get(k, getattr(SFTConfig, k, None)) != getattr(config, k)
    ]
    known = {k: v for k, v in saved["config"].items() if k in SFTConfig.__dataclass_fields__}
    if extended and not _same_past(SFTConfig(**known), config, saved["step"]):
        changed += extended
    if changed:
        raise ConfigError(f"--resume with a different config (changed: {', '.join(changed)})")
    model, tokenizer = load_policy(state_path)
    return model, tokenizer, saved


class WarmUp:
    """One train-base run in progress: the model, its optimiser and schedule, a batch stream per pool, the
    loss curve and the validations so far. `state()` is everything a resumed run needs to replay this one."""

    def __init__(
        self, config: SFTConfig, model, tokenizer, pools: dict, saved: dict[str, Any], out_dir: Path
    ):
        self.config, self.model, self.tokenizer, self.out_dir = config, model, tokenizer, out_dir
        self.streams = {
            name: BatchStream(pool, config.batch_tokens, f"sft-batches/{config.seed}/{name}")
            for name, pool in pools.items()
        }
        self.optimizer = torch.optim.AdamW(
            model.parameters(), lr=config.lr, weight_decay=config.weight_decay, betas=tuple(config.adam_betas)
        )
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, config.lr_factor)
        self.curve: list[dict[str, Any]] = saved.get("curve", [])
        self.evaluations: list[dict[str, Any]] = saved.get("evaluations", [])
        self.step, self.tokens = saved.get("step", 0), saved.get("tokens", 0)
        self.first_step = self.step  # of this session, for its ETA
        self.spent = saved.get("seconds", 0.0)  # seconds of earlier sessions
        self.stopped_early = False
        if saved:
            self.optimizer.load_state_dict(saved["optimizer"])
            self.scheduler.load_state_dict(saved["scheduler"])
            for name, stream in self.streams.items():
                if name in saved["streams"]:  # a pool added by the extension starts fresh
                    stream.load(saved["streams"][name])
            torch.set_rng_state(saved["torch_rng"])

    def state(self, seconds: float) -> dict[str, Any]:
        return {
            "config": asdict(self.config), "step": self.step, "tokens": self.tokens, "curve": self.curve,
            "evaluations": self.evaluations, "seconds": seconds, "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(), "streams": {n: s.state() for n, s in self.streams.items()},
            "torch_rng": torch.get_rng_state(),
        }  # fmt: skip

    def save_state(self, seconds: float) -> None:
        from toolrl_analysis.training.resume import save_train_state

        save_train_state(self.model, self.tokenizer, self.out_dir / STATE_FILE, self.state(seconds))

    def save_step(self) -> None:
        """The weights of this step, a candidate for base.pt."""
        from toolrl_analysis.models.checkpoint import save_policy

        save_policy(self.model, self.tokenizer, self.out_dir / "checkpoints" / f"step-{self.step:06d}.pt")

    def train_step(self) -> tuple[float, int, str]:
        """One optimiser step on the next batch of the pool this step draws from: (loss, tokens, pool)."""
        from toolrl_analysis.errors import TrainingDiverged

        pool = self.config.pool_at(self.step)
        batch = self.streams[pool].next(self.tokenizer.pad_token_id)
        loss = self.model(**batch).loss
        if not torch.isfinite(loss):
            raise TrainingDiverged(
                f"warm-up loss became {loss.item()} at step {self.step}; lower config key 'lr'"
            )
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.config.grad_clip)
        self.optimizer.step()
        self.scheduler.step()
        self.step += 1
        return loss.item(), int(batch["attention_mask"].sum()), pool

    def train(self, validation, sandbox, started: float, on_step, log: Callable[[str], None]) -> None:
        c = self.config
        if not self.evaluations:  # the untrained model: where every role curve starts
            self.model.eval()
            self.evaluations.append(validation.run(self.model, self.tokenizer, sandbox, 0) | {"seconds": 0.0})
            self.save_step()
        self.model.train()
        segment_start, segment_tokens = time.perf_counter(), 0
        while self.step < c.steps:
            loss, tokens, pool = self.train_step()
            self.tokens, segment_tokens = self.tokens + tokens, segment_tokens + tokens
            elapsed = time.perf_counter() - segment_start
            if self.step % c.log_every == 0 or self.step == c.steps:
                self.curve.append(
                    {"step": self.step, "loss": loss, "lr": self.scheduler.get_last_lr()[0], "tokens": self.tokens,
                     "seconds": self.spent + elapsed, "pool": pool}
                )  # fmt: skip
            if self.step % c.eval_every == 0 or self.step == c.steps:
                self.model.eval()
                row = validation.run(self.model, self.tokenizer, sandbox, self.step)
                self.evaluations.append(row | {"seconds": self.spent + elapsed})
                self.model.train()
                self.save_step()
                self.save_state(self.spent + time.perf_counter() - segment_start)
            if on_step is not None:
                rate = segment_tokens / max(elapsed, 1e-9)
                eta = elapsed / max(1, self.step - self.first_step) * (c.steps - self.step)
                on_step(Progress(self.step, c.steps, loss, rate, eta, self.evaluations[-1]))
            if c.time_limit_s and time.perf_counter() - started > c.time_limit_s and self.step < c.steps:
                self.save_state(self.spent + time.perf_counter() - segment_start)
                self.stopped_early = True
                log(f"time limit reached after {self.step} steps; continue with --resume")
                break
        self.spent += time.perf_counter() - segment_start

    def choose_and_write(self, started: float, data_info: dict, envs_seed: int) -> dict[str, Any]:
        """base.pt (the checkpoint `select` chooses) and hf/, loss.csv, validation.csv and .png, and
        train_base.json; returns the summary written there."""
        import pandas as pd

        from toolrl_analysis.models.checkpoint import load_policy
        from toolrl_analysis.models.embedded import tokenizer_fingerprint
        from toolrl_analysis.models.factory import count_parameters
        from toolrl_analysis.training.shared import save_trained_policy
        from toolrl_analysis.training.validation import choose_checkpoint, plot_validation

        c, out_dir, curve = self.config, self.out_dir, self.curve
        out_dir.mkdir(parents=True, exist_ok=True)
        choice, reason = (
            choose_checkpoint(self.evaluations, c.band, c.select) if self.evaluations else ({}, "")
        )
        model, tokenizer = self.model, self.tokenizer
        if choice:
            model, tokenizer = load_policy(out_dir / "checkpoints" / f"step-{choice['step']:06d}.pt")
        model.eval()
        save_trained_policy(model, tokenizer, out_dir, "base.pt")
        pd.DataFrame(curve).to_csv(out_dir / "loss.csv", index=False)
        pd.DataFrame(self.evaluations).to_csv(out_dir / "validation.csv", index=False)
        plot_validation(self.evaluations, out_dir / "validation.png")
        summary = {
            "out": str(out_dir),
            "parameters": count_parameters(model),
            "steps": self.step,
            "stopped_early": self.stopped_early,
            "chosen_step": choice.get("step"),
            "chosen_because": reason,
            "chosen_validation": choice,
            "first_loss": curve[0]["loss"] if curve else None,
            "final_loss": curve[-1]["loss"] if curve else None,
            "tokens": self.tokens,
            "train_seconds": self.spent,  # every session of the run (resumed ones too), validation included
            "seconds": time.perf_counter() - started,
            "data": data_info,
            "envs_seed": envs_seed,
            "fingerprint": tokenizer_fingerprint(tokenizer),
            "config": asdict(c),
        }
        (out_dir / "train_base.json").write_text(json.dumps(summary, indent=2))
        return summary
