"""Wall time of `toolrl-analyze envs build` on the default config (2,000 train + 200 test), on 2 cores.

    .venv/bin/python benchmarks/bench_envs_build.py [--repeats 3] [--cores 2] [--check] [--json]

Each run is a fresh CLI process (interpreter start, build, writing the three files), pinned to the first
`--cores` CPUs. With --check the oracle check of test.jsonl and train.jsonl is timed separately.
Target: build <= 60 s.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
CLI = [sys.executable, "-m", "toolrl_analysis.cli"]


def pinned(cores: int):
    available = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else []
    chosen = set(available[:cores])
    if not chosen or not hasattr(os, "sched_setaffinity"):
        return None
    return lambda: os.sched_setaffinity(0, chosen)


def timed(argv: list[str], cores: int) -> tuple[float, str]:
    start = time.perf_counter()
    result = subprocess.run(argv, cwd=REPO, capture_output=True, text=True, preexec_fn=pinned(cores))
    elapsed = time.perf_counter() - start
    if result.returncode != 0:
        raise SystemExit(f"command failed ({result.returncode}): {' '.join(argv)}\n{result.stderr}")
    return elapsed, result.stdout


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--cores", type=int, default=2)
    parser.add_argument("--config", default=None, help="a TOML of overrides (default: the shipped build)")
    parser.add_argument("--check", action="store_true", help="also time `envs check` on both files")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()

    builds, check_times, manifest = [], {}, {}
    with tempfile.TemporaryDirectory() as tmp:
        for i in range(args.repeats):
            out = Path(tmp) / f"run{i}"
            seconds, stdout = timed(
                [
                    *CLI,
                    "envs",
                    "build",
                    *(["--config", args.config] if args.config else []),
                    "--out",
                    str(out),
                    "--json",
                ],
                args.cores,
            )
            builds.append(seconds)
            manifest = json.loads(stdout)["manifest"]
        if args.check:
            for name in ("test.jsonl", "train.jsonl"):
                seconds, stdout = timed(
                    [*CLI, "envs", "check", str(Path(tmp) / "run0" / name), "--json"], args.cores
                )
                check_times[name] = {
                    "seconds": round(seconds, 2),
                    "overall": json.loads(stdout)["scenarios"]["overall"],
                }
    result = {
        "cores": args.cores,
        "environments": manifest["totals"],
        "build_seconds": [round(s, 2) for s in builds],
        "build_median_seconds": round(statistics.median(builds), 2),
        "target_seconds": 60,
        "check": check_times or None,
    }
    if args.json:
        print(json.dumps(result))
    else:
        print(
            f"envs build ({result['environments']}) on {args.cores} cores: {result['build_seconds']} s "
            f"(median {result['build_median_seconds']} s, target <= 60 s)"
        )
        for name, info in check_times.items():
            print(f"envs check {name}: {info['seconds']} s, oracle Solve-F1 {info['overall']['solve_f1']}")


if __name__ == "__main__":
    main()
