"""A Qwen2.5-0.5B-shaped pair through the commands a researcher runs on a real pair: peak RSS and time.

The pair is built in this process from Qwen2.5-0.5B's configuration (24 blocks, hidden 896, 14 heads, 2 KV
heads, MLP 4,864, vocabulary 151,936, tied embeddings) with random weights in bfloat16, and saved as two
Hugging Face directories (safetensors, ~1 GB each); the trained side is the base plus a small update on every
matrix, larger in the lower third's MLPs. The tokenizer is the embedded one (its ids are a subset of the
vocabulary), and the environments are a small fresh build. Each command runs as the CLI in its own
subprocess, so the peak RSS (VmHWM) of one cannot leak into another:

  compare            the streamed diff (--json), and with --spectral (each matrix's SVDs against the base)
  ablate --save      revert mlp@lower, written as a sharded HF directory
  ablate --envs      revert mlp@lower, evaluated (base, trained and the hybrid: Solve-F1 and the
                     teacher-forced metric), bfloat16
  probe (x3)         hf, transformer-lens and nnsight, bfloat16, on a few environments
  evaluate           greedy episodes of the trained side, bfloat16

The ratio printed beside each RSS is against the baseline of the same table: the bytes of one checkpoint, so
"2.1x" means the command held about two models' worth of memory. Pass --device cuda to run the model-loading
commands on a GPU (compare and ablate --save stream files and have no device).

    .venv/bin/python benchmarks/bench_real_scale.py                    # ~10 minutes on 2 cores
    .venv/bin/python benchmarks/bench_real_scale.py --device cuda      # on a GPU machine
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

# Qwen2.5-0.5B's config.json, the fields that set the shapes
QWEN25_05B = dict(
    vocab_size=151936, hidden_size=896, intermediate_size=4864, num_hidden_layers=24, num_attention_heads=14,
    num_key_value_heads=2, max_position_embeddings=32768, rope_theta=1000000.0, rms_norm_eps=1e-6,
    tie_word_embeddings=True,
)  # fmt: skip


def build_pair(root: Path) -> tuple[Path, Path, Path, int]:
    """(base dir, trained dir, environments, bytes of one checkpoint)."""
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from toolrl_analysis.envs.pipeline import EnvBuildConfig, build_envsets, write_envset
    from toolrl_analysis.models.checkpoint import load_policy, save_hf_dir

    _, tokenizer = load_policy("embedded")
    config = Qwen2Config(
        **QWEN25_05B, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
        dtype="bfloat16",
    )  # fmt: skip
    torch.manual_seed(0)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)  # never materialise the float32 model (2 GB more)
    try:
        model = Qwen2ForCausalLM(config).eval()
    finally:
        torch.set_default_dtype(previous)
    base = save_hf_dir(model, tokenizer, root / "base")
    lower = QWEN25_05B["num_hidden_layers"] // 3
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if parameter.dim() != 2:
                continue
            size = 3e-3 if ".mlp." in name and int(name.split(".")[2]) < lower else 5e-4
            parameter.add_(torch.randn_like(parameter) * size)
    trained = save_hf_dir(model, tokenizer, root / "trained")
    del model
    build = build_envsets(
        EnvBuildConfig(seed=11, train_size=16, test_per_scenario=2, analysis_per_scenario=1)
    )
    write_envset(build, root / "envs")
    size = sum(f.stat().st_size for f in base.glob("*.safetensors"))
    return base, trained, root / "envs", size


def run(name: str, arguments: list[str], timeout: float) -> dict:
    """One CLI command in a fresh process under /usr/bin/time: its wall time, peak RSS and exit status."""
    command = ["/usr/bin/time", "-f", "%e %M", sys.executable, "-m", "toolrl_analysis.cli", *arguments]
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_NO_ADVISORY_WARNINGS="1")
    started = time.perf_counter()
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=timeout, env=env)
    except subprocess.TimeoutExpired:
        return {"command": name, "status": f"timed out after {timeout:.0f} s"}
    seconds = time.perf_counter() - started
    last = done.stderr.strip().splitlines()[-1].split()
    row = {
        "command": name,
        "seconds": seconds,
        "peak_rss_bytes": int(last[1]) * 1024,
        "status": done.returncode,
    }
    if done.returncode:
        errors = [line for line in done.stderr.splitlines() if "error" in line.lower()]
        row["error"] = (errors or done.stderr.strip().splitlines() or ["?"])[-1]
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu", help="for the commands that load a model")
    parser.add_argument("--envs", type=int, default=2, help="environments per command that plays or probes")
    parser.add_argument("--timeout", type=float, default=900, help="seconds per command")
    parser.add_argument("--keep", default=None, help="build the pair in this directory and keep it")
    parser.add_argument("--json", action="store_true", help="print the rows as JSON too")
    args = parser.parse_args()
    root = Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix="bench-real-scale-"))
    root.mkdir(parents=True, exist_ok=True)
    try:
        started = time.perf_counter()
        base, trained, envs, size = build_pair(root)
        print(
            f"built the 0.5B-shaped pair in {time.perf_counter() - started:.0f} s: {size / 1e9:.2f} GB each"
        )
        placed = ["--device", args.device, "--dtype", "bfloat16"]
        limit = ["--limit", str(args.envs)]
        play = ["--max-turns", "2", "--max-new-tokens", "16", "--batch-size", "4"]
        probe = ["--tasks", "call_or_answer", "--set", "rollout_envs=0", "--set", "min_class_count=2",
                 "--seeds", "2", "--layers", "all", *limit, *placed]  # fmt: skip
        pair, hybrid = [str(base), str(trained)], str(root / "hybrid")
        test = str(envs / "test.jsonl")
        # fmt: off
        commands = [
            ("compare", ["compare", *pair, "--json"]),
            ("compare --spectral", ["compare", *pair, "--spectral", "--json"]),
            ("ablate --save", ["ablate", *pair, "--revert", "mlp@lower", "--save", hybrid, "--json", *placed]),
            ("ablate --envs", ["ablate", *pair, "--revert", "mlp@lower", "--envs", str(envs), "--analysis-limit",
                               str(args.envs), "--no-general", "--json", *limit, *play, *placed]),
            *[(f"probe ({backend})", ["probe", *pair, "--envs", test, "--backend", backend, "--json", *probe])
              for backend in ("hf", "transformer-lens", "nnsight")],
            ("evaluate", ["evaluate", str(trained), "--envs", str(envs), "--no-general", "--no-roles", "--json",
                          *limit, *play, *placed]),
        ]
        # fmt: on
        rows = [run(name, arguments, args.timeout) for name, arguments in commands]
    finally:
        if not args.keep:
            shutil.rmtree(root, ignore_errors=True)
    print(f"\n| command | time (s) | peak RSS (GB) | RSS / one checkpoint ({size / 1e9:.2f} GB) |")
    print("|---|---|---|---|")
    for row in rows:
        if "peak_rss_bytes" not in row or row["status"]:
            print(f"| {row['command']} | failed: {row.get('error', row['status'])} | | |")
            continue
        rss = row["peak_rss_bytes"]
        print(f"| {row['command']} | {row['seconds']:.0f} | {rss / 1e9:.2f} | {rss / size:.2f}x |")
    if args.json:
        print(json.dumps({"checkpoint_bytes": size, "device": args.device, "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
