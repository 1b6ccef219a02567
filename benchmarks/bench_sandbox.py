"""Sandboxed tool calls per second on a warm pool, next to FTRL's in-process exec, in the same process.

    .venv/bin/python benchmarks/bench_sandbox.py [--calls 5000] [--workers 2]

FTRL runs tool code with `exec` in the trainer's own process (utils.call_function: exec into a fresh namespace,
call, JSON-encode), under func_timeout, which starts one thread per call. Both are measured: plain exec, and exec
plus a thread per call as the timeout costs. The sandbox figures include everything a caller pays: encoding,
two pipe hops, exec in the worker, the reply.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import threading
import time
from pathlib import Path

from toolrl_analysis.envs.sandbox import Sandbox

TRIVIAL_TOOL = (
    "def echo(text, times=1):\n    return {'echo': text * times}\n",
    "echo",
    {"text": "hi", "times": 2},
)
FTRL_TEST_SET = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "ftrl-test.jsonl"


def ftrl_in_process(code: str, name: str, arguments: dict) -> str:
    """FTRL's call_function without its timeout decorator."""
    namespace: dict = {}
    exec(code, namespace, namespace)
    value = namespace[name](**arguments)
    return json.dumps(value, ensure_ascii=False) if type(value) in (dict, list) else str(value)


def ftrl_in_process_with_timeout_thread(code: str, name: str, arguments: dict) -> str:
    """... and with a thread per call, as func_timeout's @func_set_timeout runs it."""
    box: list[str] = []
    thread = threading.Thread(target=lambda: box.append(ftrl_in_process(code, name, arguments)), daemon=True)
    thread.start()
    thread.join(10)
    return box[0]


def rate(run, n_calls: int) -> float:
    start = time.perf_counter()
    run()
    return n_calls / (time.perf_counter() - start)


def real_ftrl_calls(limit: int) -> list[tuple[str, str, dict]]:
    """The first tool of each FTRL test environment, its required arguments filled with enum[0] or a string."""
    if not FTRL_TEST_SET.is_file():
        return []
    from toolrl_analysis.envs.schema import read_envs

    calls = []
    for record in read_envs(FTRL_TEST_SET)[:limit]:
        function = record.tools[0].get("function", record.tools[0])
        parameters = function.get("parameters") or {}
        properties = parameters.get("properties") or {}
        arguments = {
            key: (properties.get(key, {}).get("enum") or ["example"])[0]
            for key in parameters.get("required", [])
        }
        calls.append((record.codes[function["name"]], function["name"], arguments))
    return calls


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=5000)
    parser.add_argument("--workers", type=int, default=2)
    args = parser.parse_args()
    n = args.calls
    trivial = [TRIVIAL_TOOL] * n
    print(f"cpu cores: {os.cpu_count()}, sandbox workers: {args.workers}, calls per figure: {n}")

    with Sandbox(workers=args.workers, timeout=5.0) as sandbox:
        sandbox.call_many(trivial[: 20 * args.workers])  # warm: workers started, code compiled
        assert all(r.ok for r in sandbox.call_many(trivial[:100]))
        rows = [
            ("trivial tool, call_many (concurrent)", rate(lambda: sandbox.call_many(trivial), n)),
            (
                "trivial tool, call() one at a time",
                rate(lambda: [sandbox.call(*c) for c in trivial[: n // 5]], n // 5),
            ),
        ]
        baseline = rate(lambda: [ftrl_in_process(*c) for c in trivial], n)
        threaded = rate(lambda: [ftrl_in_process_with_timeout_thread(*c) for c in trivial[: n // 5]], n // 5)

        real = real_ftrl_calls(200)
        if real:
            batch = (real * (n // len(real) + 1))[:n]
            sandbox.call_many(real)
            rows.append(("200 real FTRL tools, call_many", rate(lambda: sandbox.call_many(batch), n)))
            real_baseline = rate(lambda: [_quiet(ftrl_in_process, c) for c in batch], n)

    print(f"\n{'':42s} {'calls/s':>10s}")
    for label, value in rows:
        print(f"{'sandbox: ' + label:42s} {value:10.0f}")
    print(f"{'in-process exec (FTRL, no timeout)':42s} {baseline:10.0f}")
    print(f"{'in-process exec + thread (FTRL timeout)':42s} {threaded:10.0f}")
    if real:
        print(f"{'in-process exec, real FTRL tools':42s} {real_baseline:10.0f}")
    print(f"\nsandbox call_many / in-process exec:          {rows[0][1] / baseline:.3f}")
    print(f"sandbox call_many / in-process exec + thread: {rows[0][1] / threaded:.3f}")
    if real:
        print(f"real FTRL tools, sandbox / in-process:        {rows[-1][1] / real_baseline:.3f}")


def _quiet(function, call):
    """Run in-process as FTRL would, keeping the tools' prints off our report."""
    with contextlib.redirect_stdout(io.StringIO()):
        try:
            return function(*call)
        except Exception as exc:  # FTRL's get_feedback turns these into error text
            return str(exc)


if __name__ == "__main__":
    main()
