"""Benchmark `toolrl-analyze compare`: streaming diff vs the naive load-everything baseline.

Generates a synthetic sharded pair of HF checkpoints with Qwen2-7B names and shapes (real vocabulary,
width and depth scaled down so each checkpoint is >= 1.5 GB), in bf16 and fp32, in a temporary directory
that is removed afterwards. Each approach runs in its own subprocess, so their peak RSS (VmHWM from
/proc, cross-checked with getrusage) cannot contaminate each other. Input throughput counts the bytes of
both checkpoints, with a warm page cache.

To say what bounds the throughput it also measures, separately: reading the tensors into our buffers
without computing (page cache -> memory copy), the metric arithmetic on in-memory chunks without
reading, a plain memory copy (memory bandwidth), and a cold-cache read (disk, our files evicted with
posix_fadvise(DONTNEED)).

    .venv/bin/python benchmarks/bench_compare.py               # both dtypes, ~1.6 GB per checkpoint
    .venv/bin/python benchmarks/bench_compare.py --dtype bf16 --target-gb 0.3   # quick look
"""

from __future__ import annotations

import argparse
import json
import math
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

# Qwen2-7B: hidden 3584, intermediate 18944, 28 heads / 4 KV heads of 128, vocab 152064, untied head.
# Scaled: same vocabulary (the largest tensors stay realistically large), width 1024, ratio ~5.5.
DEFAULT_SHAPE = {"hidden": 1024, "intermediate": 5632, "heads": 8, "kv_heads": 2, "vocab": 152064}
DTYPES = {"bf16": "bfloat16", "fp32": "float32"}


# ---------------------------------------------------------------------------------------------
# Synthetic checkpoints
# ---------------------------------------------------------------------------------------------
def qwen2_shapes(layers: int, hidden: int, intermediate: int, heads: int, kv_heads: int, vocab: int):
    head_dim = hidden // heads
    kv = kv_heads * head_dim
    shapes = {"model.embed_tokens.weight": (vocab, hidden)}
    for i in range(layers):
        p = f"model.layers.{i}."
        shapes |= {
            p + "self_attn.q_proj.weight": (hidden, hidden),
            p + "self_attn.q_proj.bias": (hidden,),
            p + "self_attn.k_proj.weight": (kv, hidden),
            p + "self_attn.k_proj.bias": (kv,),
            p + "self_attn.v_proj.weight": (kv, hidden),
            p + "self_attn.v_proj.bias": (kv,),
            p + "self_attn.o_proj.weight": (hidden, hidden),
            p + "mlp.gate_proj.weight": (intermediate, hidden),
            p + "mlp.up_proj.weight": (intermediate, hidden),
            p + "mlp.down_proj.weight": (hidden, intermediate),
            p + "input_layernorm.weight": (hidden,),
            p + "post_attention_layernorm.weight": (hidden,),
        }
    shapes |= {"model.norm.weight": (hidden,), "lm_head.weight": (vocab, hidden)}
    return shapes


def layers_for_target(target_bytes: float, itemsize: int, shape: dict) -> int:
    fixed = qwen2_shapes(0, **shape)
    one = qwen2_shapes(1, **shape)
    fixed_bytes = sum(math.prod(s) for s in fixed.values()) * itemsize
    layer_bytes = sum(math.prod(s) for s in one.values()) * itemsize - fixed_bytes
    return max(1, math.ceil((target_bytes - fixed_bytes) / layer_bytes))


def write_pair(
    root: Path, dtype_name: str, layers: int, shape: dict, shard_bytes: int, seed: int = 0
) -> dict:
    """Base and trained HF directories (sharded safetensors + index). The planted update is larger in
    the lower third's MLPs, as in the paper's finding, and absent from the norms."""
    import torch
    from safetensors.torch import save_file

    dtype = getattr(torch, DTYPES[dtype_name])
    shapes = qwen2_shapes(layers, **shape)
    generator = torch.Generator().manual_seed(seed)
    # Slices of one pool of normal samples at random offsets: as good as fresh randn for timing, and
    # generation no longer dominates the benchmark's run time.
    pool = torch.randn(1 << 26, generator=generator)

    def noise(tensor_shape) -> torch.Tensor:
        numel = math.prod(tensor_shape)
        if numel > pool.numel():
            return pool.repeat(math.ceil(numel / pool.numel()))[:numel].view(tensor_shape)
        offset = int(torch.randint(0, pool.numel() - numel + 1, (), generator=generator))
        return pool[offset : offset + numel].view(tensor_shape)

    dirs = {side: root / f"{dtype_name}-{side}" for side in ("base", "trained")}
    for d in dirs.values():
        d.mkdir(parents=True)
    shards: dict[str, list[dict]] = {"base": [{}], "trained": [{}]}
    sizes = [0]

    def flush() -> None:
        index = len(sizes)
        for side in ("base", "trained"):
            save_file(
                shards[side][-1],
                str(dirs[side] / f"model-{index:05d}.safetensors"),
                metadata={"format": "pt"},
            )
            shards[side][-1] = {n: None for n in shards[side][-1]}  # keep names for the index, drop data
            shards[side].append({})
        sizes.append(0)

    for name, tensor_shape in shapes.items():
        numel = math.prod(tensor_shape)
        nbytes = numel * torch.empty((), dtype=dtype).element_size()
        if sizes[-1] and sizes[-1] + nbytes > shard_bytes:
            flush()
        is_norm = name.endswith("norm.weight")
        base = torch.ones(tensor_shape) if is_norm else noise(tensor_shape) * 0.02
        base = base.to(dtype)
        layer = int(name.split(".")[2]) if ".layers." in name else None
        if is_norm:
            trained = base.clone()
        else:
            scale = 0.05 if (layer is not None and layer < layers / 3 and ".mlp." in name) else 0.01
            update = noise(tensor_shape) * (0.02 * scale)
            trained = (base.float() + update).to(dtype)
        shards["base"][-1][name] = base.contiguous()
        shards["trained"][-1][name] = trained.contiguous()
        sizes[-1] += nbytes
    flush()
    for side, directory in dirs.items():
        weight_map = {}
        for index, shard in enumerate(shards[side][:-1], start=1):
            weight_map |= dict.fromkeys(shard, f"model-{index:05d}.safetensors")
        total = sum(math.prod(s) for s in shapes.values()) * torch.empty((), dtype=dtype).element_size()
        (directory / "model.safetensors.index.json").write_text(
            json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map})
        )
        (directory / "config.json").write_text(
            json.dumps({"model_type": "qwen2", "num_hidden_layers": layers})
        )
    largest = max(math.prod(s) for s in shapes.values()) * torch.empty((), dtype=dtype).element_size()
    return {
        "base": str(dirs["base"]),
        "trained": str(dirs["trained"]),
        "bytes_per_checkpoint": sum(f.stat().st_size for f in dirs["base"].glob("*.safetensors")),
        "largest_tensor_bytes": largest,
        "n_tensors": len(shapes),
        "layers": layers,
        "shards": len(sizes) - 1,
    }


def checkpoint_files(pair: dict) -> list[Path]:
    return sorted(Path(pair["base"]).glob("*.safetensors")) + sorted(
        Path(pair["trained"]).glob("*.safetensors")
    )


def warm_cache(files: list[Path]) -> None:
    buffer = bytearray(16 << 20)
    for file in files:
        with open(file, "rb", buffering=0) as handle:
            while handle.readinto(buffer):
                pass


def evict_cache(files: list[Path]) -> None:
    for file in files:
        fd = os.open(file, os.O_RDONLY)
        try:
            os.fsync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


# ---------------------------------------------------------------------------------------------
# Workers (each runs in its own process)
# ---------------------------------------------------------------------------------------------
def peak_rss_bytes() -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def worker_streaming(base: str, trained: str, workers: int | None = None) -> dict:
    from toolrl_analysis.analysis.diff import compare_checkpoints

    started = time.perf_counter()
    comparison = compare_checkpoints(base, trained, workers=workers)
    elapsed = time.perf_counter() - started
    return {
        "seconds": elapsed,
        "changed_rows": comparison.summary["n_changed_rows"],
        "rows": len(comparison.parameters),
    }


def worker_naive(base: str, trained: str) -> dict:
    """The obvious approach: load both state dicts entirely, then diff tensor by tensor."""
    import torch
    from safetensors.torch import load_file

    from toolrl_analysis.analysis.diff import SPARSITY_TOLERANCES

    started = time.perf_counter()

    def load(directory: str) -> dict:
        state = {}
        for file in sorted(Path(directory).glob("*.safetensors")):
            state.update(load_file(file))
        return state

    base_state, trained_state = load(base), load(trained)
    changed = 0
    for name, w in base_state.items():
        w = w.float()
        t = trained_state[name].float()
        d = t - w
        metrics = {
            "relative_frobenius_change": float(d.norm() / w.norm()),
            "mean_abs_update": float(d.abs().mean()),
            "max_abs_update": float(d.abs().max()),
            "cosine_similarity": float(
                torch.nn.functional.cosine_similarity(w.reshape(1, -1), t.reshape(1, -1))
            ),
            **{f"sparsity_{tol}": float((d.abs() <= tol).float().mean()) for tol in SPARSITY_TOLERANCES},
        }
        changed += metrics["relative_frobenius_change"] > 0
    elapsed = time.perf_counter() - started
    return {"seconds": elapsed, "changed_rows": changed, "rows": len(base_state)}


def worker_read_only(base: str, trained: str) -> dict:
    """Our reader at the diff's chunk size, no arithmetic: the cost of getting bytes into memory."""
    from toolrl_analysis.analysis.checkpoints import open_checkpoint
    from toolrl_analysis.analysis.diff import DEFAULT_CHUNK_ELEMENTS, ScratchBuffers

    buffers = ScratchBuffers()
    started = time.perf_counter()
    for key, path in (("base", base), ("trained", trained)):
        with open_checkpoint(path) as checkpoint:
            for name in checkpoint.names():
                info = checkpoint.info(name)
                row = max(1, info.numel // info.rows)
                step = max(1, DEFAULT_CHUNK_ELEMENTS // row)
                for start in range(0, info.rows, step):
                    stop = min(info.rows, start + step)
                    checkpoint.read(name, start, stop, out=buffers.get(key, (stop - start) * row * 8))
    return {"seconds": time.perf_counter() - started}


def worker_compute_only(numel: int, dtype_name: str, precision: int = 0) -> dict:
    """The per-chunk arithmetic (conversion to float32 and all metrics) on chunks already in memory, with
    the streaming diff's default threading (torch single-threaded in each thread); with `precision` also
    the bf16 columns that `compare --spectral` adds (UpdateStats(precision=True))."""
    from concurrent.futures import ThreadPoolExecutor

    import torch

    from toolrl_analysis.analysis.diff import (
        DEFAULT_CHUNK_ELEMENTS,
        ScratchBuffers,
        UpdateStats,
        default_workers,
        torch_threads,
    )

    dtype = getattr(torch, DTYPES[dtype_name])
    chunk = DEFAULT_CHUNK_ELEMENTS
    threads = max(1, default_workers())
    base = (torch.randn(chunk) * 0.02).to(dtype)
    trained = (base.float() + torch.randn(chunk) * 1e-4).to(dtype)
    chunks = max(1, numel // chunk)

    def run(count: int) -> None:
        buffers, raw = ScratchBuffers(), trained.clone()
        for _ in range(count):
            if dtype == torch.float32:
                raw.copy_(trained)  # the streaming path reads into a buffer it may overwrite; so do we
            UpdateStats(precision=bool(precision)).add(
                buffers.float32("base32", base), buffers.float32("trained32", raw), None, buffers
            )

    started = time.perf_counter()
    with torch_threads(1):
        if threads == 1:
            run(chunks)
        else:
            with ThreadPoolExecutor(threads) as pool:
                list(pool.map(run, [chunks // threads + (i < chunks % threads) for i in range(threads)]))
    return {"seconds": time.perf_counter() - started, "threads": threads}


def worker_memcpy(nbytes: int) -> dict:
    """Memory bandwidth: copy a 256 MiB buffer until `nbytes` have been copied (read + write)."""
    import torch

    size = 256 << 20
    source, target = torch.ones(size, dtype=torch.uint8), torch.empty(size, dtype=torch.uint8)
    target.copy_(source)
    started = time.perf_counter()
    for _ in range(max(1, nbytes // size)):
        target.copy_(source)
    return {"seconds": time.perf_counter() - started}


WORKERS = {
    "streaming": worker_streaming,
    "streaming-2-threads": lambda base, trained: worker_streaming(base, trained, workers=2),
    "naive": worker_naive,
    "read-only": worker_read_only,
    "compute-only": worker_compute_only,
    "compute-only-precision": lambda numel, dtype_name: worker_compute_only(numel, dtype_name, 1),
    "memcpy": worker_memcpy,
}


def run_worker(kind: str, *args) -> dict:
    """Run one measurement in a fresh interpreter; it reports wall time and its own peak RSS."""
    command = [sys.executable, __file__, "--worker", kind, *map(str, args)]
    done = subprocess.run(command, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise SystemExit(f"worker {kind} failed:\n{done.stderr}")
    result = json.loads(done.stdout.strip().splitlines()[-1])
    # Cross-check of the child's own VmHWM: the kernel's record of the largest child so far.
    result["children_max_rss"] = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024
    return result


# ---------------------------------------------------------------------------------------------
# Report
# ---------------------------------------------------------------------------------------------
def measure(pair: dict, dtype_name: str, repeats: int) -> dict:
    files = checkpoint_files(pair)
    input_bytes = 2 * pair["bytes_per_checkpoint"]
    numel = pair["bytes_per_checkpoint"] // (2 if dtype_name == "bf16" else 4)
    results: dict[str, dict] = {}
    evict_cache(files)
    results["cold-read"] = run_worker("read-only", pair["base"], pair["trained"])
    warm_cache(files)
    for kind in ("streaming", "streaming-2-threads", "naive", "read-only"):
        runs = [run_worker(kind, pair["base"], pair["trained"]) for _ in range(repeats)]
        best = min(runs, key=lambda r: r["seconds"])
        best["peak_rss"] = max(r["peak_rss"] for r in runs)
        results[kind] = best
    results["compute-only"] = run_worker("compute-only", numel, dtype_name)
    results["compute-only-precision"] = run_worker("compute-only-precision", numel, dtype_name)
    results["memcpy"] = run_worker("memcpy", input_bytes)
    for result in results.values():
        result["gb_per_s"] = input_bytes / result["seconds"] / 1e9
    return results


def print_report(dtype_name: str, pair: dict, results: dict) -> None:
    gb = 1e9
    input_bytes = 2 * pair["bytes_per_checkpoint"]
    budget = 2 * pair["largest_tensor_bytes"] + 500 * 2**20
    streaming, naive = results["streaming"], results["naive"]
    print(
        f"\n== {dtype_name}: 2 x {pair['bytes_per_checkpoint'] / gb:.2f} GB, {pair['n_tensors']} tensors, "
        f"{pair['layers']} layers, {pair['shards']} shards; largest tensor {pair['largest_tensor_bytes'] / 2**20:.0f} MiB"
    )
    # GB per CPU-second does not depend on how many cores other processes leave us.
    print(f"{'':20}{'wall s':>9}{'input GB/s':>12}{'peak RSS MiB':>14}{'CPU s':>8}{'GB/CPU-s':>10}")
    for name in ("streaming", "streaming-2-threads", "naive"):
        r = results[name]
        print(
            f"{name:20}{r['seconds']:9.2f}{r['gb_per_s']:12.2f}{r['peak_rss'] / 2**20:14.0f}"
            f"{r['cpu_seconds']:8.2f}{input_bytes / gb / r['cpu_seconds']:10.2f}"
        )
    print(
        f"speed-up streaming vs naive: {naive['seconds'] / streaming['seconds']:.2f}x;  "
        f"peak RSS naive / streaming: {naive['peak_rss'] / streaming['peak_rss']:.2f}x"
    )
    print(
        f"targets: throughput >= 1 GB/s: {streaming['gb_per_s']:.2f} GB/s "
        f"({'met' if streaming['gb_per_s'] >= 1 else 'MISSED'}); peak RSS <= 2 x largest + 500 MiB = "
        f"{budget / 2**20:.0f} MiB: {streaming['peak_rss'] / 2**20:.0f} MiB "
        f"({'met' if streaming['peak_rss'] <= budget else 'MISSED'}; ratio {streaming['peak_rss'] / budget:.2f})"
    )
    print("where the time goes (same input bytes):")
    for name, label in (
        ("cold-read", "read, cold page cache (disk)"),
        ("read-only", "read, warm page cache (copy)"),
        ("compute-only", "arithmetic on in-memory chunks"),
        ("compute-only-precision", "  the same with the bf16 columns"),
        ("memcpy", "plain memory copy"),
    ):
        r = results[name]
        print(f"  {label:34}{r['seconds']:7.2f} s {r['gb_per_s']:8.2f} GB/s   CPU {r['cpu_seconds']:6.2f} s")
    parts = results["read-only"]["seconds"] + results["compute-only"]["seconds"]
    print(
        f"  read + arithmetic = {parts:.2f} s vs streaming {streaming['seconds']:.2f} s "
        f"(input {input_bytes / gb:.2f} GB)"
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
    parser.add_argument("--keep", action="store_true", help="keep the generated checkpoints")
    parser.add_argument("--worker", nargs="+", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    if args.worker:
        kind, *rest = args.worker
        values = [int(v) if v.isdigit() else v for v in rest]
        # Imports first, so that the CPU count below is the measured work's alone.
        import safetensors.torch  # noqa: F401
        import torch  # noqa: F401

        import toolrl_analysis.analysis.diff  # noqa: F401

        cpu_started = time.process_time()
        result = WORKERS[kind](*values)
        # CPU of the measured work only (all threads), not of starting Python and importing torch.
        result["cpu_seconds"] = time.process_time() - cpu_started
        result["peak_rss"] = peak_rss_bytes()
        print(json.dumps(result))
        return 0

    import signal

    import torch

    # Turn SIGTERM into SystemExit so that the finally clause below removes the temporary checkpoints.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    load = os.getloadavg()
    print(
        f"torch {torch.__version__}, {os.cpu_count()} CPUs, {torch.get_num_threads()} torch threads; "
        f"load average {load[0]:.2f} {load[1]:.2f} {load[2]:.2f} (other processes share these CPUs)"
    )
    root = Path(tempfile.mkdtemp(prefix="bench_compare_", dir=args.tmp))
    try:
        for dtype_name in ("bf16", "fp32") if args.dtype == "both" else (args.dtype,):
            itemsize = 2 if dtype_name == "bf16" else 4
            layers = layers_for_target(args.target_gb * 1e9, itemsize, DEFAULT_SHAPE)
            started = time.perf_counter()
            pair = write_pair(root, dtype_name, layers, DEFAULT_SHAPE, args.shard_mb << 20)
            print(f"generated {dtype_name} pair in {time.perf_counter() - started:.1f} s under {root}")
            results = measure(pair, dtype_name, args.repeats)
            print_report(dtype_name, pair, results)
            if not args.keep:
                for side in ("base", "trained"):
                    shutil.rmtree(pair[side])
    finally:
        if not args.keep:
            shutil.rmtree(root, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
