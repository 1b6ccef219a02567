"""Benchmark `toolrl-analyze ablate --save`: the streamed hybrid against a load-everything baseline.

Uses the synthetic sharded pair of `bench_compare.py` (Qwen2-7B names and shapes, real vocabulary, scaled
width and depth; >= 1.5 GB per checkpoint; the planted update is larger in the lower third's MLPs), written
to a temporary directory that is removed afterwards. Each run is its own subprocess, so peak RSS (VmHWM)
cannot leak between them. Inputs are in the page cache (warm); outputs go through it.

Throughput is the bytes of the written checkpoint per second. Two splices are timed:
  revert mlp@lower   the paper's question: lower MLPs (the lower third of the blocks) from the base, all else copied from the trained
                     model (only the spliced tensors read both sides);
  scale all 0.5      every tensor read on both sides and blended in float32: the arithmetic's worst case.
The baseline loads both checkpoints whole, splices tensor by tensor and writes the shards with
`safetensors.torch.save_file`.

    .venv/bin/python benchmarks/bench_ablate_save.py              # both dtypes, ~1.6 GB per checkpoint
    .venv/bin/python benchmarks/bench_ablate_save.py --dtype bf16 --target-gb 0.3   # quick look
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))

from bench_compare import (  # noqa: E402 - the same synthetic pair, cache control and RSS reading
    DEFAULT_SHAPE,
    checkpoint_files,
    layers_for_target,
    peak_rss_bytes,
    warm_cache,
    write_pair,
)

SPLICES = {"revert": ("revert", "mlp@lower"), "scale": ("scale", "all", "0.5")}
# Throughput is bounded by writing to the page cache: `write-only` measures that floor for the same bytes.


def directory_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def worker_streaming(base: str, trained: str, out: str, splice: str) -> dict:
    from toolrl_analysis.analysis.ablate import Operation, ablate

    kind, selector, *alpha = SPLICES[splice]
    operation = Operation(kind, selector, float(alpha[0]) if alpha else None)
    started = time.perf_counter()
    ablation = ablate(base, trained, operations=[operation], save=out, force=True, shard_bytes=512 << 20)
    return {"seconds": time.perf_counter() - started, "bytes": directory_bytes(Path(out)), **_saved(ablation)}


def _saved(ablation) -> dict:
    saved = ablation.summary["saved"]
    return {"parameters_changed": saved["parameters_changed"], "tensors": saved["tensors"]}


def worker_naive(base: str, trained: str, out: str, splice: str) -> dict:
    """The obvious approach: load both state dicts whole, splice them, save the shards."""
    from safetensors.torch import load_file, save_file

    kind, selector, *alpha = SPLICES[splice]
    started = time.perf_counter()

    def load(directory: str) -> dict:
        state = {}
        for file in sorted(Path(directory).glob("*.safetensors")):
            state.update(load_file(file))
        return state

    base_state, trained_state = load(base), load(trained)
    hybrid, changed = {}, 0
    for name, weight in base_state.items():
        lower_mlp = ".mlp." in name and ".layers." in name and int(name.split(".")[2]) < _layers(base) // 2
        if kind == "revert":
            hybrid[name] = weight if lower_mlp else trained_state[name]
            changed += weight.numel() if lower_mlp else 0
        else:
            w = weight.float()
            hybrid[name] = (w + float(alpha[0]) * (trained_state[name].float() - w)).to(weight.dtype)
            changed += weight.numel()
    del base_state, trained_state
    Path(out).mkdir(parents=True, exist_ok=True)
    shard, size, index = {}, 0, 1
    for name, tensor in hybrid.items():
        if shard and size + tensor.numel() * tensor.element_size() > 512 << 20:
            save_file(shard, str(Path(out) / f"model-{index:05d}.safetensors"))
            shard, size, index = {}, 0, index + 1
        shard[name] = tensor
        size += tensor.numel() * tensor.element_size()
    save_file(shard, str(Path(out) / f"model-{index:05d}.safetensors"))
    return {
        "seconds": time.perf_counter() - started,
        "bytes": directory_bytes(Path(out)),
        "parameters_changed": changed,
    }


def _layers(directory: str) -> int:
    return json.loads((Path(directory) / "config.json").read_text())["num_hidden_layers"]


def worker_write_only(nbytes: str, out: str) -> dict:
    """The floor of any writer: `nbytes` from one 8 MiB buffer to a new file through the page cache."""
    buffer, size, left = bytearray(8 << 20), 8 << 20, int(nbytes)
    started = time.perf_counter()
    with open(out, "wb") as handle:
        while left > 0:
            handle.write(memoryview(buffer)[: min(size, left)])
            left -= size
    return {"seconds": time.perf_counter() - started, "bytes": int(nbytes), "parameters_changed": 0}


WORKERS = {"streaming": worker_streaming, "naive": worker_naive, "write-only": worker_write_only}


def run_worker(kind: str, *args) -> dict:
    command = [sys.executable, __file__, "--worker", kind, *map(str, args)]
    done = subprocess.run(command, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise SystemExit(f"worker {kind} failed:\n{done.stderr}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def measure(pair: dict, root: Path, repeats: int) -> dict:
    """Each run starts with its inputs in the page cache and no dirty pages left by the previous run
    (`os.sync()`), so writeback of one run does not throttle the next."""
    results = {}
    for kind, splice in (
        ("streaming", "revert"),
        ("naive", "revert"),
        ("streaming", "scale"),
        ("naive", "scale"),
    ):
        runs = []
        for _ in range(repeats):
            out = root / f"out-{kind}-{splice}"
            warm_cache(checkpoint_files(pair))
            os.sync()
            runs.append(run_worker(kind, pair["base"], pair["trained"], out, splice))
            shutil.rmtree(out, ignore_errors=True)
        best = min(runs, key=lambda r: r["seconds"])
        best["peak_rss"] = max(r["peak_rss"] for r in runs)
        results[(kind, splice)] = best
    os.sync()
    floor = [
        run_worker("write-only", results[("streaming", "revert")]["bytes"], root / "floor")
        for _ in range(repeats)
    ]
    results[("write-only", "")] = min(floor, key=lambda r: r["seconds"])
    (root / "floor").unlink()
    for result in results.values():
        result["gb_per_s"] = result["bytes"] / result["seconds"] / 1e9
    return results


def print_report(dtype_name: str, pair: dict, results: dict) -> None:
    mib = 2**20
    budget = 2 * pair["largest_tensor_bytes"] + 500 * mib
    print(
        f"\n== {dtype_name}: 2 x {pair['bytes_per_checkpoint'] / 1e9:.2f} GB, {pair['n_tensors']} tensors, "
        f"{pair['layers']} layers, {pair['shards']} shards; largest tensor {pair['largest_tensor_bytes'] / mib:.0f} MiB; "
        f"RSS budget 2 x largest + 500 MiB = {budget / mib:.0f} MiB"
    )
    print(f"{'':28}{'wall s':>8}{'out GB/s':>10}{'peak RSS MiB':>14}{'RSS/budget':>12}{'CPU s':>8}")
    for (kind, splice), r in results.items():
        label = kind + " " + " ".join(SPLICES.get(splice, ("(same bytes, one buffer)",)))
        print(
            f"{label:28}{r['seconds']:8.2f}{r['gb_per_s']:10.2f}"
            f"{r['peak_rss'] / mib:14.0f}{r['peak_rss'] / budget:12.2f}{r['cpu_seconds']:8.2f}"
        )
    for splice in SPLICES:
        streaming, naive = results[("streaming", splice)], results[("naive", splice)]
        assert streaming["parameters_changed"] == naive["parameters_changed"], (streaming, naive)
        print(
            f"{' '.join(SPLICES[splice])}: streaming {streaming['gb_per_s']:.2f} GB/s "
            f"({'met' if streaming['gb_per_s'] >= 0.5 else 'MISSED'} >= 0.5), peak RSS "
            f"{streaming['peak_rss'] / mib:.0f} MiB ({'met' if streaming['peak_rss'] <= budget else 'MISSED'}; "
            f"{streaming['peak_rss'] / budget:.2f} of the budget); vs load-everything: "
            f"{naive['seconds'] / streaming['seconds']:.2f}x the speed, {naive['peak_rss'] / streaming['peak_rss']:.2f}x "
            f"less memory"
        )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--dtype", choices=["bf16", "fp32", "both"], default="both")
    parser.add_argument(
        "--target-gb", type=float, default=1.6, help="size of each checkpoint (>= 1.5 for the issue)"
    )
    parser.add_argument("--shard-mb", type=int, default=512)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--tmp", default=None, help="directory for the synthetic checkpoints")
    parser.add_argument("--worker", nargs="+", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    if args.worker:
        kind, *rest = args.worker
        import safetensors.torch  # noqa: F401 - imports first: the CPU count below is the work's alone
        import torch  # noqa: F401

        import toolrl_analysis.analysis.ablate  # noqa: F401

        cpu_started = time.process_time()
        result = WORKERS[kind](*rest)
        result["cpu_seconds"] = time.process_time() - cpu_started
        result["peak_rss"] = peak_rss_bytes()
        print(json.dumps(result))
        return 0

    import torch

    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # so that the finally clause cleans up
    load = os.getloadavg()
    print(
        f"torch {torch.__version__}, {os.cpu_count()} CPUs; load average {load[0]:.2f} {load[1]:.2f} {load[2]:.2f} "
        "(other processes share these CPUs)"
    )
    root = Path(tempfile.mkdtemp(prefix="bench_ablate_save_", dir=args.tmp))
    try:
        for dtype_name in ("bf16", "fp32") if args.dtype == "both" else (args.dtype,):
            itemsize = 2 if dtype_name == "bf16" else 4
            layers = layers_for_target(args.target_gb * 1e9, itemsize, DEFAULT_SHAPE)
            started = time.perf_counter()
            pair = write_pair(root, dtype_name, layers, DEFAULT_SHAPE, args.shard_mb << 20)
            print(f"generated {dtype_name} pair in {time.perf_counter() - started:.1f} s under {root}")
            print_report(dtype_name, pair, measure(pair, root, args.repeats))
            for side in ("base", "trained"):
                shutil.rmtree(pair[side])
    finally:
        shutil.rmtree(root, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
