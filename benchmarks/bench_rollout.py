"""Rollout throughput of the tiny preset: episodes/s and generated tokens/s, with and without the KV cache.

    .venv/bin/python benchmarks/bench_rollout.py [--batch 32] [--max-new-tokens 128] [--json]

A batch of generated environments (equal numbers per scenario) is rolled out greedily by an untrained tiny
Qwen2 whose tokenizer is trained on those environments. Greedy decoding makes the cached and uncached runs
produce the same tokens, so their token counts match and the ratio compares equal work. Times include
prompt rendering, tool execution in the sandbox and reward computation; `generate_only` times the first
turn's batched generation alone.

On a busy machine pass `--threads 1`: with more torch threads than free cores, small decode steps spend
their time waiting for each other (we measured a tenfold slowdown on 2 loaded cores).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def build_fixture(batch: int, seed: int):
    from toolrl_analysis.envs.pipeline import EnvBuildConfig, build_envsets
    from toolrl_analysis.envs.schema import SCENARIOS
    from toolrl_analysis.models.factory import build_model
    from toolrl_analysis.models.general import general_text
    from toolrl_analysis.models.tokenizer import tokenizer_corpus, train_tokenizer

    per_scenario = -(-batch // len(SCENARIOS))
    config = EnvBuildConfig(seed=seed, train_size=0, test_per_scenario=per_scenario)
    records = build_envsets(config).test[:batch]
    tokenizer = train_tokenizer(
        tokenizer_corpus(records, general_text("train", max_chars=100_000)), vocab_size=4096
    )
    model = build_model("tiny", family="qwen2", tokenizer=tokenizer, seed=seed)
    return records, tokenizer, model


def time_rollouts(model, tokenizer, records, *, max_new_tokens: int, use_cache: bool, max_turns: int):
    from toolrl_analysis.envs.sandbox import Sandbox
    from toolrl_analysis.rollout import ModelPolicy, run_episodes

    policy = ModelPolicy(
        model, tokenizer, max_new_tokens=max_new_tokens, batch_size=len(records), use_cache=use_cache
    )
    with Sandbox(workers=2) as sandbox:
        start = time.perf_counter()
        episodes = run_episodes(policy, records, sandbox, max_turns=max_turns)
        seconds = time.perf_counter() - start
    turns = [t for e in episodes for t in e.turns]
    tokens = sum(len(t.completion_ids) for t in turns)
    return {
        "use_cache": use_cache,
        "seconds": seconds,
        "episodes": len(episodes),
        "turns": len(turns),
        "generated_tokens": tokens,
        "episodes_per_s": len(episodes) / seconds,
        "tokens_per_s": tokens / seconds,
        "completions": [t.completion_ids for t in turns],
    }


def time_generate(model, tokenizer, records, *, max_new_tokens: int, use_cache: bool):
    from toolrl_analysis.rollout import generate, pad_token_id_for, render_prompt

    prompts = [render_prompt(tokenizer, r.messages, r.tools) for r in records]
    start = time.perf_counter()
    # No stop token: every row generates exactly max_new_tokens.
    completions = generate(
        model,
        prompts,
        max_new_tokens=max_new_tokens,
        eos_token_ids=[-1],
        pad_token_id=pad_token_id_for(tokenizer),
        use_cache=use_cache,
    )
    seconds = time.perf_counter() - start
    tokens = sum(len(c.ids) for c in completions)
    return {
        "use_cache": use_cache,
        "seconds": seconds,
        "generated_tokens": tokens,
        "tokens_per_s": tokens / seconds,
        "mean_prompt_tokens": sum(map(len, prompts)) / len(prompts),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--max-new-tokens", type=int, default=128)
    parser.add_argument("--max-turns", type=int, default=20)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)

    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    start = time.perf_counter()
    records, tokenizer, model = build_fixture(args.batch, args.seed)
    setup_seconds = time.perf_counter() - start

    options = {"max_new_tokens": args.max_new_tokens, "max_turns": args.max_turns}
    cached = time_rollouts(model, tokenizer, records, use_cache=True, **options)
    uncached = time_rollouts(model, tokenizer, records, use_cache=False, **options)
    if cached.pop("completions") != uncached.pop("completions"):
        print("warning: cached and uncached greedy rollouts differ", file=sys.stderr)
    gen_cached = time_generate(model, tokenizer, records, max_new_tokens=args.max_new_tokens, use_cache=True)
    gen_uncached = time_generate(
        model, tokenizer, records, max_new_tokens=args.max_new_tokens, use_cache=False
    )

    result = {
        "batch": len(records),
        "max_new_tokens": args.max_new_tokens,
        "torch_threads": torch.get_num_threads(),
        "parameters": sum(p.numel() for p in model.parameters()),
        "setup_seconds": setup_seconds,
        "rollout": {
            "kv_cache": cached,
            "no_cache": uncached,
            "speedup": uncached["seconds"] / cached["seconds"],
        },
        "generate_only": {
            "kv_cache": gen_cached,
            "no_cache": gen_uncached,
            "speedup": gen_uncached["seconds"] / gen_cached["seconds"],
        },
    }
    if args.json:
        print(json.dumps(result, indent=2))
        return 0
    print(f"tiny preset ({result['parameters']:,} parameters), batch {len(records)}, "
          f"max_new_tokens {args.max_new_tokens}, {result['torch_threads']} torch threads, setup {setup_seconds:.1f}s")  # fmt: skip
    for name, run in (("rollout, KV cache", cached), ("rollout, no cache", uncached)):
        print(f"  {name:20s} {run['seconds']:7.2f}s  {run['episodes_per_s']:6.2f} episodes/s  "
              f"{run['tokens_per_s']:8.1f} tokens/s  ({run['turns']} turns, {run['generated_tokens']} tokens)")  # fmt: skip
    print(f"  rollout speedup from the KV cache: {result['rollout']['speedup']:.2f}x")
    for name, run in (("generate, KV cache", gen_cached), ("generate, no cache", gen_uncached)):
        print(f"  {name:20s} {run['seconds']:7.2f}s  {run['tokens_per_s']:8.1f} tokens/s  "
              f"(mean prompt {run['mean_prompt_tokens']:.0f} tokens)")  # fmt: skip
    print(f"  generate speedup from the KV cache: {result['generate_only']['speedup']:.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
