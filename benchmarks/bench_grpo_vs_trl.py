"""GRPO throughput, our trainer against TRL's GRPOTrainer, on the same tiny model, prompts and reward (CPU).

    .venv/bin/python benchmarks/bench_grpo_vs_trl.py [--steps 10] [--rounds 2] [--prompts-per-step 4]
        [--group-size 8] [--max-completion-length 48] [--beta 0.001] [--threads 2] [--skip-trl] [--json]

Both sides start from identical weights (our `tiny` Qwen2 preset and our tokenizer, built in-process; TRL gets
the same weights saved to and reloaded from a temporary directory, the path it builds its reference model from),
see the same first-turn prompts (environments from our pipeline rendered with the chat template and their tools;
TRL receives the rendered text and tokenizes it to the same ids, which is checked) in the same order, sample
G completions of at most `--max-completion-length` tokens per prompt at temperature 1 (no top-k/top-p), and
are scored by the same reward: our f1 step reward of the completion in the environment's initial state, its
tool calls executed in one shared Sandbox (`step_samples.score_completions`, the batched form of `reward.score_step`).
Per optimiser step: `prompts-per-step x G` completions, one PPO epoch, one mini-batch, clip range 0.2/0.28,
token-mean loss (TRL: `dapo`), group-std-scaled advantages, k3 KL against a frozen reference with coefficient
`--beta` (0 drops the reference on both sides), the same entropy bonus, AdamW at a constant learning rate,
gradient clipping at 1, float32, no gradient checkpointing, behaviour log-probs from sampling (neither side
recomputes old log-probs: ours keeps them from generation, TRL skips them with one iteration per generation).

samples/s = completions generated, scored and trained on per second of wall time inside the optimiser steps
(construction excluded); "steady" leaves out each run's first step. Each side runs `--rounds` times from the
same initial weights, alternating which goes first, and the best round of each is compared (the machine may
be shared: load averages are printed). Time is split into generation, reward (decode + tools + step reward),
reference log-probs, other scoring work, and the update (policy forward, backward, optimiser step, rest);
TRL's parts come from timers wrapped around its methods (`_generate_single_turn`, `_calculate_rewards`,
`_get_per_token_logps_and_entropies` on the reference model, `_generate_and_score_completions`,
`compute_loss`), `Tensor.backward`, and the optimiser-step callbacks.

Last, our multi-turn throughput: `run_episodes` on `--episodes` environments with the same initial model at
temperature 1 (episodes/s). TRL is an optional extra (`toolrl-analysis[trl]`); without it only our side runs.
On a loaded machine try `--threads 1`: more torch threads than free cores makes small CPU ops wait on each other.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import functools
import json
import os
import statistics
import sys
import tempfile
import time
import traceback
import warnings
from collections import defaultdict
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")

PART_ORDER = (
    "generation", "reward", "reference_logprobs", "other_scoring",
    "update", "update.forward", "update.backward", "update.optimizer_step", "update.other",
)  # fmt: skip


def load_average() -> str:
    return "/".join(f"{value:.2f}" for value in os.getloadavg())


# -- the shared fixture -------------------------------------------------------------------------------
def build_fixture(args) -> dict[str, Any]:
    from toolrl_analysis.envs.pipeline import EnvBuildConfig, build_envsets
    from toolrl_analysis.models.factory import build_model
    from toolrl_analysis.models.tokenizer import build_policy_tokenizer
    from toolrl_analysis.rollout import render_prompt

    needed = max(args.steps * args.prompts_per_step, args.episodes)
    records = build_envsets(EnvBuildConfig(seed=args.seed, train_size=needed, test_per_scenario=0)).train
    tokenizer = build_policy_tokenizer(records, vocab_size=4096, seed=args.seed)
    model = build_model("tiny", family="qwen2", tokenizer=tokenizer, seed=args.seed)
    texts = [
        tokenizer.apply_chat_template(
            r.messages, tools=r.tools or None, tokenize=False, add_generation_prompt=True
        )
        for r in records
    ]
    prompt_ids = [render_prompt(tokenizer, r.messages, r.tools) for r in records]
    return {
        "records": records,
        "tokenizer": tokenizer,
        "model": model,
        "texts": texts,
        "prompt_ids": prompt_ids,
    }


class StepRewardFunction:
    """Our step reward of each completion in its environment's initial state; all tool calls of a batch run in
    one concurrent `Sandbox.call_many`, as in `GRPOTrainer.collect_step_samples`. Counts its own time."""

    def __init__(self, records, tokenizer, sandbox, stop_ids, variant: str = "f1"):
        from toolrl_analysis.training.step_samples import StepState

        self.states = [StepState(r, [], copy.deepcopy(r.unsolved_set), r.solve_rate) for r in records]
        self.tokenizer, self.sandbox, self.stop_ids, self.variant = tokenizer, sandbox, stop_ids, variant
        self.seconds = 0.0
        self.tool_call_tags = 0
        self.completion_tokens = 0
        self.rewards: list[float] = []

    def __call__(self, completion_ids: list[list[int]], env_indices: list[int]) -> list[float]:
        from toolrl_analysis.rollout import decode_completion
        from toolrl_analysis.training.step_samples import score_completions

        start = time.perf_counter()
        texts = [decode_completion(self.tokenizer, ids, self.stop_ids) for ids in completion_ids]
        rewards = score_completions(texts, [self.states[i] for i in env_indices], self.sandbox, self.variant)
        self.seconds += time.perf_counter() - start
        self.tool_call_tags += sum(text.count("<tool_call>") for text in texts)
        self.completion_tokens += sum(len(ids) for ids in completion_ids)
        self.rewards += rewards
        return rewards


def timed(function, bucket: dict[str, float], key: str | None = None, key_of=None):
    """`function` wrapped so that the seconds spent in it add to bucket[key] (or bucket[key_of(*args)])."""

    @functools.wraps(function)
    def wrapper(*args, **kwargs):
        start = time.perf_counter()
        try:
            return function(*args, **kwargs)
        finally:
            bucket[key if key_of is None else key_of(*args, **kwargs)] += time.perf_counter() - start

    return wrapper


@contextlib.contextmanager
def patched(owner, name: str, replacement):
    """Temporarily set owner.name (a module function, a class method or an instance attribute)."""
    had = name in vars(owner)
    original = vars(owner).get(name)
    setattr(owner, name, replacement)
    try:
        yield
    finally:
        if had:
            setattr(owner, name, original)
        else:
            delattr(owner, name)


def summarize(step_seconds: list[float], parts: dict[str, float], reward: StepRewardFunction, samples: int):
    total = sum(step_seconds)
    steady = step_seconds[1:] or step_seconds
    parts = dict(parts)
    parts["update.other"] = parts["update"] - sum(parts.get(k, 0.0) for k in PART_ORDER[5:8])
    return {
        "seconds": total,
        "samples_per_s": samples * len(step_seconds) / total,
        "steady_samples_per_s": samples * len(steady) / sum(steady),
        "fastest_step_samples_per_s": samples / min(steady),
        "step_seconds": step_seconds,
        "breakdown": {k: parts[k] for k in PART_ORDER if k in parts},
        "completion_tokens": reward.completion_tokens,
        "tool_call_tags": reward.tool_call_tags,
        "reward_mean": statistics.fmean(reward.rewards),
        "load_average": load_average(),
    }


# -- our trainer --------------------------------------------------------------------------------------
def run_ours(args, fixture, sandbox) -> dict[str, Any]:
    import torch

    from toolrl_analysis.rollout import generate
    from toolrl_analysis.training import grpo, step_samples

    model = copy.deepcopy(fixture["model"])
    batch = args.prompts_per_step * args.group_size
    config = grpo.GRPOConfig(
        group_size=args.group_size, max_new_tokens=args.max_completion_length, temperature=1.0,
        kl_coef=args.beta, entropy_coef=args.entropy_coef, lr=args.lr, ppo_epochs=1,
        mini_batch_size=batch, generation_batch_size=batch, loss_aggregation="token-mean",
        clip_eps=0.2, clip_eps_high=0.28, grad_clip=1.0, seed=args.seed,
    )  # fmt: skip
    config.validate()
    with tempfile.TemporaryDirectory() as out_dir:  # update() writes nothing there
        trainer = grpo.GRPOTrainer(
            config, model, fixture["tokenizer"], fixture["records"], out_dir, sandbox, log=lambda _: None
        )
    reward = StepRewardFunction(fixture["records"], fixture["tokenizer"], sandbox, trainer.stop_ids)
    parts: dict[str, float] = defaultdict(float)
    trainer._reference_logprobs = timed(trainer._reference_logprobs, parts, "reference_logprobs")
    trainer.optimizer.step = timed(trainer.optimizer.step, parts, "update.optimizer_step")
    forward = timed(
        grpo.completion_logprobs, parts,
        key_of=lambda m, *a, **k: "reference_forward" if m is trainer.reference else "update.forward",
    )  # fmt: skip
    backward = timed(torch.Tensor.backward, parts, "update.backward")
    generator = torch.Generator().manual_seed(args.seed)
    step_seconds = []
    with patched(grpo, "completion_logprobs", forward), patched(torch.Tensor, "backward", backward):
        for step in range(args.steps):
            first = step * args.prompts_per_step
            env_indices = [
                i for i in range(first, first + args.prompts_per_step) for _ in range(args.group_size)
            ]
            prompts = [fixture["prompt_ids"][i] for i in env_indices]
            started = time.perf_counter()
            # one prefill per distinct prompt, G samples from copies of its KV cache (as the trainer does)
            completions = generate(
                model, prompts[:: args.group_size], max_new_tokens=args.max_completion_length,
                temperature=1.0, eos_token_ids=trainer.stop_ids, pad_token_id=trainer.pad_id,
                generator=generator, samples_per_prompt=args.group_size,
            )  # fmt: skip
            generated = time.perf_counter()
            rewards = reward([c.ids for c in completions], env_indices)
            scored = time.perf_counter()
            samples = [
                step_samples.Sample(prompt, c.ids, c.logprobs, r, index // args.group_size, index)
                for index, (prompt, c, r) in enumerate(zip(prompts, completions, rewards, strict=True))
            ]
            trainer.update(samples)
            trainer.iteration += 1
            finished = time.perf_counter()
            parts["generation"] += generated - started
            parts["reward"] += scored - generated
            parts["update"] += finished - scored
            step_seconds.append(finished - started)
    parts["update"] -= parts["reference_logprobs"]  # update() computes them first; reported on their own
    return summarize(step_seconds, parts, reward, batch)


# -- TRL ------------------------------------------------------------------------------------------------
def run_trl(args, fixture, sandbox) -> dict[str, Any]:
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, TrainerCallback
    from transformers.trainer_callback import PrinterCallback
    from trl import GRPOConfig as TRLConfig
    from trl import GRPOTrainer as TRLTrainer

    from toolrl_analysis.rollout import stop_token_ids

    tokenizer = fixture["tokenizer"]
    count = args.steps * args.prompts_per_step
    if tokenizer(fixture["texts"][:count])["input_ids"] != fixture["prompt_ids"][:count]:
        raise RuntimeError("TRL's tokenization of the rendered prompts differs from render_prompt()")
    dataset = Dataset.from_dict({"prompt": fixture["texts"][:count], "env_index": list(range(count))})
    reward = StepRewardFunction(
        fixture["records"], tokenizer, sandbox, stop_token_ids(tokenizer, fixture["model"])
    )

    def step_reward(prompts, completions, completion_ids, env_index, **kwargs) -> list[float]:
        return reward(completion_ids, env_index)

    parts: dict[str, float] = defaultdict(float)
    step_seconds: list[float] = []
    marks: dict[str, float] = {}

    class Timer(TrainerCallback):
        def on_step_begin(self, args, state, control, **kwargs):
            marks["step"] = time.perf_counter()

        def on_pre_optimizer_step(self, args, state, control, **kwargs):
            marks["optimizer"] = time.perf_counter()

        def on_optimizer_step(self, args, state, control, **kwargs):
            parts["update.optimizer_step"] += time.perf_counter() - marks["optimizer"]

        def on_step_end(self, args, state, control, **kwargs):
            step_seconds.append(time.perf_counter() - marks["step"])

    with tempfile.TemporaryDirectory() as tmp:
        model_dir = os.path.join(tmp, "init")
        fixture["model"].save_pretrained(model_dir)
        tokenizer.save_pretrained(model_dir)
        # Loaded from the directory so that config._name_or_path points at it: TRL builds its reference model
        # from that path (an in-memory model has none), with the same initial weights.
        model = AutoModelForCausalLM.from_pretrained(model_dir, local_files_only=True, dtype=torch.float32)
        model.generation_config = copy.deepcopy(fixture["model"].generation_config)
        reference_state = fixture["model"].state_dict()
        if any(not torch.equal(t, reference_state[k]) for k, t in model.state_dict().items()):
            raise RuntimeError("the reloaded weights differ from ours")
        config = TRLConfig(
            output_dir=os.path.join(tmp, "out"),
            use_cpu=True, bf16=False, fp16=False, gradient_checkpointing=False,
            per_device_train_batch_size=args.prompts_per_step * args.group_size,
            gradient_accumulation_steps=1, num_generations=args.group_size, num_iterations=1,
            max_completion_length=args.max_completion_length, max_steps=args.steps,
            temperature=1.0, top_p=1.0, top_k=0,
            learning_rate=args.lr, lr_scheduler_type="constant", warmup_steps=0, weight_decay=0.0,
            optim="adamw_torch", max_grad_norm=1.0,
            beta=args.beta, epsilon=0.2, epsilon_high=0.28, loss_type="dapo", scale_rewards="group",
            entropy_coef=args.entropy_coef, mask_truncated_completions=False,
            shuffle_dataset=False, seed=args.seed, data_seed=args.seed,
            report_to="none", logging_strategy="no", save_strategy="no", disable_tqdm=True,
            log_completions=False, dataloader_num_workers=0,
        )  # fmt: skip
        trainer = TRLTrainer(
            model=model, reward_funcs=step_reward, args=config, train_dataset=dataset,
            processing_class=tokenizer, callbacks=[Timer()],
        )  # fmt: skip
        trainer.remove_callback(PrinterCallback)  # it prints the final metrics dict
        if (trainer.ref_model is None) != (args.beta == 0):
            raise RuntimeError("TRL's reference model does not match beta")
        trainer._generate_single_turn = timed(trainer._generate_single_turn, parts, "generation")
        trainer._calculate_rewards = timed(trainer._calculate_rewards, parts, "reward")
        trainer._generate_and_score_completions = timed(
            trainer._generate_and_score_completions, parts, "scoring"
        )
        trainer._get_per_token_logps_and_entropies = timed(
            trainer._get_per_token_logps_and_entropies, parts,
            key_of=lambda m, *a, **k: "reference_logprobs" if m is trainer.ref_model else "policy_logprobs",
        )  # fmt: skip
        trainer.compute_loss = timed(trainer.compute_loss, parts, "update.forward")
        with patched(torch.Tensor, "backward", timed(torch.Tensor.backward, parts, "update.backward")):
            trainer.train()
    if len(step_seconds) != args.steps:
        raise RuntimeError(f"TRL ran {len(step_seconds)} optimiser steps, expected {args.steps}")
    scoring = parts.pop("scoring")
    parts["other_scoring"] = scoring - parts["generation"] - parts["reward"] - parts["reference_logprobs"]
    parts["update"] = sum(step_seconds) - scoring
    return summarize(step_seconds, parts, reward, args.prompts_per_step * args.group_size)


# -- multi-turn ----------------------------------------------------------------------------------------
def run_multiturn(args, fixture, sandbox) -> dict[str, Any]:
    import torch

    from toolrl_analysis.rollout import ModelPolicy, run_episodes

    records = fixture["records"][: args.episodes]
    policy = ModelPolicy(
        copy.deepcopy(fixture["model"]), fixture["tokenizer"], max_new_tokens=args.max_completion_length,
        temperature=1.0, batch_size=len(records), generator=torch.Generator().manual_seed(args.seed),
    )  # fmt: skip
    started = time.perf_counter()
    episodes = run_episodes(policy, records, sandbox, max_turns=args.max_turns)
    seconds = time.perf_counter() - started
    turns = [t for e in episodes for t in e.turns]
    stops: dict[str, int] = defaultdict(int)
    for episode in episodes:
        stops[episode.stop_reason] += 1
    return {
        "episodes": len(episodes),
        "seconds": seconds,
        "episodes_per_s": len(episodes) / seconds,
        "turns": len(turns),
        "generated_tokens": sum(len(t.completion_ids) for t in turns),
        "tool_calls": sum(len(t.calls) for t in turns),
        "stop_reasons": dict(stops),
        "load_average": load_average(),
    }


# -- report -----------------------------------------------------------------------------------------------
def best(runs: list[dict[str, Any]]) -> dict[str, Any]:
    return max(runs, key=lambda run: run["steady_samples_per_s"])


def print_side(name: str, runs: list[dict[str, Any]], steps: int) -> None:
    chosen = best(runs)
    print(f"\n{name}: best round {chosen['samples_per_s']:.2f} samples/s over all steps, "
          f"{chosen['steady_samples_per_s']:.2f} steady; all rounds (all/steady): "
          + ", ".join(f"{r['samples_per_s']:.2f}/{r['steady_samples_per_s']:.2f}" for r in runs))  # fmt: skip
    print(f"    fastest steady step: {chosen['fastest_step_samples_per_s']:.2f} samples/s")
    print(f"    step seconds (best round): {' '.join(f'{s:.2f}' for s in chosen['step_seconds'])}; "
          f"{chosen['completion_tokens']} completion tokens, reward mean {chosen['reward_mean']:+.3f}, "
          f"{chosen['tool_call_tags']} <tool_call> tags; load average after: {chosen['load_average']}")  # fmt: skip
    total = chosen["seconds"]
    print(f"    {'where the time goes (best round)':34s} {'s/step':>7s} {'share':>6s}")
    for part, seconds in chosen["breakdown"].items():
        label = ("  " + part) if part.startswith("update.") else part
        print(f"    {label:34s} {seconds / steps:7.3f} {100 * seconds / total:5.1f}%")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=10, help="optimiser steps per run")
    parser.add_argument(
        "--rounds", type=int, default=2, help="runs per side (alternating order); best is compared"
    )
    parser.add_argument("--prompts-per-step", type=int, default=4)
    parser.add_argument("--group-size", type=int, default=8, help="G, completions per prompt")
    parser.add_argument("--max-completion-length", type=int, default=48)
    parser.add_argument("--beta", type=float, default=0.001, help="KL coefficient (0: no reference model)")
    parser.add_argument("--entropy-coef", type=float, default=0.001)
    parser.add_argument("--lr", type=float, default=5e-5)
    parser.add_argument("--episodes", type=int, default=32, help="environments for the multi-turn run")
    parser.add_argument("--max-turns", type=int, default=20)
    parser.add_argument("--threads", type=int, default=2, help="torch threads")
    parser.add_argument("--sandbox-workers", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--trl-first", action="store_true", help="start each pair of runs with TRL")
    parser.add_argument("--skip-trl", action="store_true")
    parser.add_argument("--json", action="store_true", help="one JSON document instead of the text report")
    args = parser.parse_args(argv)
    if (
        min(args.steps, args.rounds, args.prompts_per_step, args.episodes, args.threads) < 1
        or args.group_size < 2
    ):
        parser.error("counts must be at least 1 and --group-size at least 2")

    import torch

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    from transformers.utils import logging as hf_logging

    from toolrl_analysis.envs.sandbox import Sandbox

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    warnings.filterwarnings("ignore", category=FutureWarning)
    say = (lambda *a, **k: None) if args.json else functools.partial(print, flush=True)

    result: dict[str, Any] = {}
    trl_version = None
    if not args.skip_trl:
        try:
            import trl

            trl_version = trl.__version__
        except ImportError as exc:
            result["trl_error"] = f"trl is not importable ({exc}); install the extra toolrl-analysis[trl]"
            say(f"{result['trl_error']}: running our side only")

    start = time.perf_counter()
    fixture = build_fixture(args)
    lengths = [len(p) for p in fixture["prompt_ids"][: args.steps * args.prompts_per_step]]
    settings = result["settings"] = {
        "steps": args.steps, "rounds": args.rounds, "prompts_per_step": args.prompts_per_step,
        "group_size": args.group_size, "samples_per_step": args.prompts_per_step * args.group_size,
        "max_completion_length": args.max_completion_length, "beta": args.beta,
        "entropy_coef": args.entropy_coef, "lr": args.lr, "torch_threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(), "parameters": sum(p.numel() for p in fixture["model"].parameters()),
        "prompt_tokens_mean": statistics.fmean(lengths), "prompt_tokens_max": max(lengths),
        "torch": torch.__version__, "trl": trl_version, "load_average_start": load_average(),
        "setup_s": time.perf_counter() - start,
    }  # fmt: skip
    say(f"tiny qwen2 ({settings['parameters']:,} parameters, float32); per step {args.prompts_per_step} prompts "
        f"x G={args.group_size} = {settings['samples_per_step']} completions of <= {args.max_completion_length} "
        f"tokens; {args.steps} steps x {args.rounds} rounds per side; prompts {settings['prompt_tokens_mean']:.0f} "
        f"tokens on average (max {settings['prompt_tokens_max']}); beta {args.beta}, entropy coef "
        f"{args.entropy_coef}, lr {args.lr}; {settings['torch_threads']} torch threads on {settings['cpu_count']} "
        f"cpus; torch {torch.__version__}, trl {trl_version}; setup {settings['setup_s']:.1f}s; "
        f"load average {settings['load_average_start']}")  # fmt: skip
    say("reward (both sides): our f1 step reward in the initial state, tool calls in one shared Sandbox")
    if args.threads > 1 and os.getloadavg()[0] + args.threads > (os.cpu_count() or 1) + 0.5:
        say(f"note: load average {os.getloadavg()[0]:.1f} + {args.threads} torch threads exceeds "
            f"{os.cpu_count()} cpus; expect noisy, slow steps (try --threads 1)")  # fmt: skip

    runs: dict[str, list[dict[str, Any]]] = {"ours": [], "trl": []}
    with Sandbox(workers=args.sandbox_workers) as sandbox:
        for round_index in range(args.rounds):
            order = ["ours", "trl"] if (round_index % 2 == 0) != args.trl_first else ["trl", "ours"]
            for side in order:
                if side == "ours":
                    runs["ours"].append(run_ours(args, fixture, sandbox))
                    say(f"  round {round_index + 1} ours: {runs['ours'][-1]['steady_samples_per_s']:.2f} "
                        f"samples/s steady, load {runs['ours'][-1]['load_average']}")  # fmt: skip
                elif trl_version is not None and "trl_error" not in result:
                    try:
                        runs["trl"].append(run_trl(args, fixture, sandbox))
                    except Exception as exc:  # report the exact failure, keep our figures
                        result["trl_error"] = f"{type(exc).__name__}: {exc}"
                        result["trl_traceback"] = traceback.format_exc()
                        say(f"TRL's GRPOTrainer failed: {result['trl_error']}\n{result['trl_traceback']}")
                    else:
                        say(f"  round {round_index + 1} TRL:  {runs['trl'][-1]['steady_samples_per_s']:.2f} "
                            f"samples/s steady, load {runs['trl'][-1]['load_average']}")  # fmt: skip
        multiturn = [run_multiturn(args, fixture, sandbox) for _ in range(args.rounds)]

    result["ours"] = runs["ours"]
    if not args.json:
        print_side("ours", runs["ours"], args.steps)
    if runs["trl"]:
        result["trl"] = runs["trl"]
        ours, theirs = best(runs["ours"]), best(runs["trl"])
        result["ratio"] = ours["samples_per_s"] / theirs["samples_per_s"]
        result["steady_ratio"] = ours["steady_samples_per_s"] / theirs["steady_samples_per_s"]
        result["fastest_step_ratio"] = max(r["fastest_step_samples_per_s"] for r in runs["ours"]) / max(
            r["fastest_step_samples_per_s"] for r in runs["trl"]
        )
        result["round_ratios"] = [
            a["steady_samples_per_s"] / b["steady_samples_per_s"]
            for a, b in zip(runs["ours"], runs["trl"], strict=False)
        ]
        if not args.json:
            print_side(f"TRL {trl_version} GRPOTrainer", runs["trl"], args.steps)
        say(f"\nratio ours/TRL (best rounds): {result['ratio']:.2f}x over all steps, {result['steady_ratio']:.2f}x "
            f"steady, {result['fastest_step_ratio']:.2f}x fastest step against fastest step; per round (steady): "
            f"{', '.join(f'{r:.2f}x' for r in result['round_ratios'])}; target: at least 2x")  # fmt: skip
    elif "trl_error" in result:
        say(f"\nno TRL figures: {result['trl_error']}")
    result["multiturn"] = multiturn
    fastest = max(multiturn, key=lambda m: m["episodes_per_s"])
    say(f"\nmulti-turn run_episodes, {fastest['episodes']} environments, temperature 1, <= "
        f"{args.max_completion_length} tokens/turn, <= {args.max_turns} turns: best {fastest['episodes_per_s']:.2f} "
        f"episodes/s ({fastest['seconds']:.2f}s; all rounds "
        f"{', '.join(format(m['episodes_per_s'], '.2f') for m in multiturn)}); {fastest['turns']} turns, "
        f"{fastest['generated_tokens']} tokens, {fastest['tool_calls']} tool calls, stops {fastest['stop_reasons']}; "
        f"load average {fastest['load_average']}")  # fmt: skip
    if args.json:
        print(json.dumps(result, indent=2, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
