"""Run untrusted tool code in a pool of reusable worker processes (docs/architecture.md, "The sandbox").

Tool code (ours, or LLM-written code from an FTRL file) never runs in the caller's process. Layers, outermost first:

- parent:  wall-clock timeout (kill the worker's process group, start a fresh worker), a per-call CPU budget set
           with prlimit, a cap on response size, and a JSON-only protocol, so that a tool can never make the
           parent unpickle or execute anything;
- process: a fresh interpreter started with subprocess (no fork of a torch-laden parent), a minimal environment,
           no inherited descriptors, its own session, RLIMIT_AS/CPU/FSIZE/CORE, cwd in a scratch directory that
           close() removes, stdout/stderr on /dev/null;
- audit:   a `sys.addaudithook` installed before any tool code runs and enforcing from then on (there is no
           on/off flag a tool could reach): no writing or creating files outside scratch, no processes,
           sockets, ctypes, signals to other processes, rlimit changes, tracing, or imports outside the list;
- names:   tool code gets builtins whose `__import__` admits only `allowed_modules`.

This file is the parent side. The worker's program is `sandbox_worker.py`, which each worker runs by path
(`python -c BOOTSTRAP sandbox_worker.py CONFIG`); `subprocess` is imported only where the parent needs it.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import resource
import select
import shutil
import signal
import sys
import tempfile
import threading
import time
import weakref
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from toolrl_analysis.envs import sandbox_worker
from toolrl_analysis.envs.sandbox_worker import REFUSAL as REFUSAL  # part of this module's interface
from toolrl_analysis.errors import ConfigError

DEFAULT_ALLOWED_MODULES: tuple[str, ...] = (
    "abc", "array", "base64", "bisect", "calendar", "cmath", "collections", "copy", "dataclasses", "datetime",
    "dateutil", "decimal", "difflib", "enum", "fractions", "functools", "hashlib", "heapq", "itertools", "json",
    "math", "numbers", "operator", "os", "pprint", "pytz", "random", "re", "statistics", "string", "textwrap",
    "time", "typing", "unicodedata", "zoneinfo",
)  # fmt: skip

ERROR_KINDS = (
    "timeout", "memory", "forbidden", "exception", "crashed", "output_too_large", "not_defined", "bad_arguments",
)  # fmt: skip

WORKER_STARTUP_TIMEOUT = 60.0  # seconds; a loaded CI machine can be slow to import dateutil and friends
_MAX_START_FAILURES = 3  # consecutive failed worker starts before the sandbox gives up
_MAX_DISPATCH_ATTEMPTS = 3  # a call whose worker died while idle is retried on a fresh one
_BOOTSTRAP = (
    "import sys; del sys.path[0]; import runpy; "  # drop '' (the scratch cwd) from the import path
    f"runpy.run_path(sys.argv[1], run_name={sandbox_worker.RUN_NAME!r})"
)


@dataclass(frozen=True)
class ToolResult:
    """The outcome of one tool call; `content` is what the model sees as the tool message."""

    content: str
    error: str | None = None  # None on success, else one of ERROR_KINDS
    elapsed: float = 0.0

    @property
    def ok(self) -> bool:
        return self.error is None


def error_result(name: str, kind: str, reason: str, elapsed: float = 0.0) -> ToolResult:
    """FTRL's error text ("an error occured when call NAME: REASON", sic) with our error kind."""
    return ToolResult(f"an error occured when call {name}: {reason}", kind, elapsed)


class Sandbox:
    """A pool of worker processes that run tool code. Use as a context manager, or call close()."""

    def __init__(
        self,
        workers: int = 2,
        timeout: float = 5.0,
        memory_mb: int = 1024,
        cpu_seconds: int | None = None,
        max_output_chars: int = 20000,
        allowed_modules: Sequence[str] = DEFAULT_ALLOWED_MODULES,
        seed: int | None = 0,
    ):
        if not isinstance(workers, int) or workers < 1:
            raise ConfigError(f"sandbox workers must be a positive integer, got {workers!r}")
        if not isinstance(timeout, int | float) or not timeout > 0 or not math.isfinite(timeout):
            raise ConfigError(f"sandbox timeout must be a positive number of seconds, got {timeout!r}")
        if not isinstance(memory_mb, int) or memory_mb < 128:
            raise ConfigError(f"sandbox memory_mb must be an integer >= 128, got {memory_mb!r}")
        if cpu_seconds is not None and (not isinstance(cpu_seconds, int) or cpu_seconds < 1):
            raise ConfigError(f"sandbox cpu_seconds must be a positive integer or None, got {cpu_seconds!r}")
        if not isinstance(max_output_chars, int) or max_output_chars < 1:
            raise ConfigError(
                f"sandbox max_output_chars must be a positive integer, got {max_output_chars!r}"
            )
        if isinstance(allowed_modules, str) or not all(isinstance(m, str) and m for m in allowed_modules):
            raise ConfigError("sandbox allowed_modules must be a list of module names")
        self.timeout = float(timeout)
        self.max_output_chars = max_output_chars
        self._pool = _Pool(
            size=workers,
            timeout=self.timeout,
            cpu_seconds=cpu_seconds if cpu_seconds is not None else math.ceil(self.timeout) + 1,
            worker_config={
                "memory_mb": memory_mb,
                "max_output_chars": max_output_chars,
                "allowed_modules": sorted({m.split(".")[0] for m in allowed_modules}),
                "seed": seed,
            },
        )
        self._lock = threading.Lock()
        # Runs at close(), garbage collection or interpreter exit, whichever comes first; holds no reference to self.
        self._finalizer = weakref.finalize(self, self._pool.shutdown)

    def call(self, code: str, name: str, arguments: dict[str, Any]) -> ToolResult:
        return self.call_many([(code, name, arguments)])[0]

    def call_many(self, calls: Sequence[tuple[str, str, dict[str, Any]]]) -> list[ToolResult]:
        """Run calls concurrently across the pool; results come back in the order of `calls`."""
        with self._lock:
            if not self._finalizer.alive:
                raise RuntimeError("this Sandbox is closed")
            return self._pool.run(list(calls))

    def close(self) -> None:
        """Kill all workers and remove the scratch directory. Safe to call twice."""
        with self._lock:
            self._finalizer()

    def __enter__(self) -> Sandbox:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


class _Job:
    __slots__ = ("index", "name", "body", "attempts")

    def __init__(self, index: int, name: str, body: bytes):
        self.index, self.name, self.body, self.attempts = index, name, body, 0


class _Worker:
    """One worker process and the parent's view of it (starting -> idle <-> busy)."""

    def __init__(self, proc: Any, scratch: str, log_path: str, deadline: float):
        self.proc = proc
        self.pid: int = proc.pid
        self.scratch = scratch
        self.log_path = log_path
        self.request_fd: int = proc.stdin.fileno()
        self.reply_fd: int = proc.stdout.fileno()
        os.set_blocking(self.reply_fd, False)
        self.buffer = bytearray()
        self.state = "starting"
        self.deadline = deadline
        self.job: _Job | None = None
        self.serial = 0
        self.dispatched_at = 0.0
        self.cpu = 0.0  # CPU seconds the worker has used, as it last reported

    def startup_log(self) -> str:
        """The last line the worker wrote to stderr before it was ready (a traceback's summary, usually)."""
        try:
            with open(self.log_path, encoding="utf-8", errors="replace") as handle:
                lines = [line for line in handle.read().splitlines() if line.strip()]
        except OSError:
            return ""
        return lines[-1][:500] if lines else ""


class _Pool:
    def __init__(self, size: int, timeout: float, cpu_seconds: int, worker_config: dict[str, Any]):
        self.size = size
        self.timeout = timeout
        self.cpu_seconds = cpu_seconds
        self.worker_config = worker_config
        # JSON escapes can make a character up to 6 bytes (\uXXXX); the rest is the envelope and error text.
        self.max_frame = 6 * worker_config["max_output_chars"] + 65536
        self.scratch = os.path.realpath(tempfile.mkdtemp(prefix="toolrl-sandbox-"))
        self.owner_pid = os.getpid()
        self.workers: list[_Worker] = []
        self.by_fd: dict[int, _Worker] = {}
        self.poller = select.poll()
        self.serial = 0
        self.spawned = 0
        self.start_failures = 0
        self.closed = False
        try:
            for _ in range(size):
                self._spawn()
        except BaseException:
            self.shutdown()
            raise

    # -- worker lifecycle ---------------------------------------------------------------------------------------
    def _spawn(self) -> None:
        import subprocess  # parent only; see the module docstring

        self.spawned += 1
        scratch = os.path.join(self.scratch, f"w{self.spawned}")
        os.mkdir(scratch, 0o700)
        log_path = os.path.join(self.scratch, f"w{self.spawned}.log")
        config = json.dumps({**self.worker_config, "scratch": scratch, "cpu_seconds": self.cpu_seconds})
        env = {
            "PATH": os.defpath,
            "HOME": scratch,
            "LANG": "C.UTF-8",
            "PYTHONHASHSEED": "0",  # the same set/dict-of-str ordering in every worker and every run
            "PYTHONDONTWRITEBYTECODE": "1",
        }
        if "TZ" in os.environ:
            env["TZ"] = os.environ["TZ"]
        with open(log_path, "wb") as log:
            proc = subprocess.Popen(
                [
                    sys.executable,
                    "-s",
                    "-B",
                    "-c",
                    _BOOTSTRAP,
                    os.path.abspath(sandbox_worker.__file__),
                    config,
                ],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=log,
                cwd=scratch,
                env=env,
                close_fds=True,
                start_new_session=True,  # its own process group, so one killpg reaches anything it left behind
                bufsize=0,
            )
        worker = _Worker(proc, scratch, log_path, time.monotonic() + WORKER_STARTUP_TIMEOUT)
        self.workers.append(worker)
        self.by_fd[worker.reply_fd] = worker
        self.poller.register(worker.reply_fd, select.POLLIN | select.POLLERR | select.POLLHUP)

    def _retire(self, worker: _Worker) -> int | None:
        """Kill a worker (and its process group), reap it, and remove its scratch. Returns its exit status."""
        if worker not in self.workers:
            return worker.proc.returncode
        self.workers.remove(worker)
        self.by_fd.pop(worker.reply_fd, None)
        with contextlib.suppress(KeyError, ValueError):
            self.poller.unregister(worker.reply_fd)
        status = worker.proc.poll()
        for kill in (os.killpg, os.kill):
            with contextlib.suppress(ProcessLookupError, PermissionError):
                kill(worker.pid, signal.SIGKILL)
        status = worker.proc.wait() if status is None else status
        for stream in (worker.proc.stdin, worker.proc.stdout):
            with contextlib.suppress(OSError):
                stream.close()
        shutil.rmtree(worker.scratch, ignore_errors=True)
        with contextlib.suppress(OSError):
            os.unlink(worker.log_path)
        return status

    def shutdown(self) -> None:
        if self.closed or os.getpid() != self.owner_pid:  # a forked child must not kill its parent's workers
            return
        self.closed = True
        for worker in list(self.workers):
            self._retire(worker)
        shutil.rmtree(self.scratch, ignore_errors=True)

    # -- running calls ------------------------------------------------------------------------------------------
    def run(self, calls: list[tuple[str, str, dict[str, Any]]]) -> list[ToolResult]:
        results: list[ToolResult | None] = [None] * len(calls)
        queue: deque[_Job] = deque()
        for index, call in enumerate(calls):
            job_or_result = _prepare(index, call)
            if isinstance(job_or_result, ToolResult):
                results[index] = job_or_result
            else:
                queue.append(job_or_result)
        for worker in [w for w in self.workers if w.state == "busy"]:
            self._retire(worker)  # left over from a run that was interrupted (e.g. KeyboardInterrupt)
        while queue or any(w.state == "busy" for w in self.workers):
            while len(self.workers) < self.size:
                self._spawn()
            for worker in list(self.workers):  # _dispatch may retire a worker
                if worker.state == "idle" and queue:
                    self._dispatch(worker, queue.popleft(), queue, results)
            waiting = [w.deadline for w in self.workers if w.state != "idle"]
            if not waiting:
                continue
            wait_ms = max(0, math.ceil((min(waiting) - time.monotonic()) * 1000))
            for fd, _event in self.poller.poll(wait_ms):
                worker = self.by_fd.get(fd)
                if worker is not None:
                    self._on_readable(worker, results)
            self._expire(results)
        return results  # type: ignore[return-value]

    def _dispatch(self, worker: _Worker, job: _Job, queue: Any, results: list[ToolResult | None]) -> None:
        self.serial += 1
        frame = b"%d\n" % self.serial + job.body
        self._set_cpu_budget(worker)
        try:
            _write_frame(worker.request_fd, frame)
        except OSError:  # it died while idle: not this call's fault, so retry on a fresh worker
            self._retire(worker)
            job.attempts += 1
            if job.attempts < _MAX_DISPATCH_ATTEMPTS:
                queue.appendleft(job)
            else:
                reason = "the sandbox worker died before the call"
                results[job.index] = error_result(job.name, "crashed", reason)
            return
        worker.state, worker.job, worker.serial = "busy", job, self.serial
        worker.dispatched_at = time.monotonic()
        worker.deadline = worker.dispatched_at + self.timeout

    def _set_cpu_budget(self, worker: _Worker) -> None:
        """RLIMIT_CPU counts a process's whole life, so move the soft limit to `used + budget` before each call."""
        # Without prlimit (not Linux) or the right to use it, the wall clock still applies.
        with contextlib.suppress(AttributeError, OSError, ValueError):
            _soft, hard = resource.prlimit(worker.pid, resource.RLIMIT_CPU)
            soft = math.ceil(worker.cpu) + self.cpu_seconds
            if hard != resource.RLIM_INFINITY:
                soft = min(soft, hard)
            resource.prlimit(worker.pid, resource.RLIMIT_CPU, (soft, hard))

    def _on_readable(self, worker: _Worker, results: list[ToolResult | None]) -> None:
        closed = False
        while True:
            try:
                chunk = os.read(worker.reply_fd, 1 << 20)
            except BlockingIOError:
                break
            except OSError:
                chunk = b""
            if not chunk:
                closed = True
                break
            worker.buffer += chunk
        self._read_frames(worker, results)
        if closed and worker in self.workers:
            self._on_exit(worker, results)

    def _read_frames(self, worker: _Worker, results: list[ToolResult | None]) -> None:
        while len(worker.buffer) >= 4:
            size = int.from_bytes(worker.buffer[:4], "big")
            if size > self.max_frame:
                self._on_exit(worker, results, "the sandbox worker sent an oversized response")
                return
            if len(worker.buffer) < 4 + size:
                return
            frame = bytes(worker.buffer[4 : 4 + size])
            del worker.buffer[: 4 + size]
            try:
                message = json.loads(frame)
            except ValueError:
                message = None
            if not isinstance(message, dict):
                self._on_exit(worker, results, "the sandbox worker sent an invalid response")
                return
            self._on_message(worker, message, results)
            if worker not in self.workers:
                return

    def _on_message(self, worker: _Worker, message: dict[str, Any], results: list[ToolResult | None]) -> None:
        cpu = message.get("cpu")
        if isinstance(cpu, int | float) and math.isfinite(cpu):
            worker.cpu = float(cpu)
        if worker.state == "starting" and message.get("ready") is True:
            worker.state = "idle"
            self.start_failures = 0
            return
        if worker.state != "busy" or message.get("id") != worker.serial:
            return  # stale or forged (a tool can write to the reply pipe); the real reply is still coming
        job = worker.job
        assert job is not None
        elapsed = time.monotonic() - worker.dispatched_at
        content, kind, reason = message.get("content"), message.get("error"), message.get("reason")
        limit = self.worker_config["max_output_chars"]
        if kind is None and isinstance(content, str) and len(content) <= limit:
            results[job.index] = ToolResult(content, None, elapsed)
        elif isinstance(kind, str) and kind in ERROR_KINDS and isinstance(reason, str):
            results[job.index] = error_result(job.name, kind, reason, elapsed)
        else:
            self._on_exit(worker, results, "the sandbox worker sent an invalid response")
            return
        worker.state, worker.job = "idle", None
        if message.get("recycle"):
            self._retire(worker)

    def _on_exit(self, worker: _Worker, results: list[ToolResult | None], reason: str | None = None) -> None:
        """The worker closed its pipe (it died) or broke the protocol: account for its call and replace it."""
        state, job, log = worker.state, worker.job, worker.startup_log()
        if reason is None:  # it exited on its own: give it a moment to finish dying, then ask why
            with contextlib.suppress(Exception):  # subprocess.TimeoutExpired: _retire kills it
                worker.proc.wait(timeout=1.0)
        status = self._retire(worker)
        if state == "starting":
            self._start_failed(f"exit status {status}", log)
        elif state == "busy" and job is not None:
            elapsed = time.monotonic() - worker.dispatched_at
            if reason is not None:
                results[job.index] = error_result(job.name, "crashed", reason, elapsed)
            elif status == -signal.SIGXCPU:
                limit = f"its CPU time limit of {self.cpu_seconds} seconds"
                results[job.index] = error_result(job.name, "timeout", f"the call exceeded {limit}", elapsed)
            else:
                results[job.index] = error_result(job.name, "crashed", _describe_exit(status), elapsed)

    def _expire(self, results: list[ToolResult | None]) -> None:
        now = time.monotonic()
        for worker in list(self.workers):
            if worker.state == "idle" or now < worker.deadline:
                continue
            state, job, log = worker.state, worker.job, worker.startup_log()
            self._retire(worker)
            if state == "starting":
                self._start_failed(f"not ready after {WORKER_STARTUP_TIMEOUT:.0f} seconds", log)
            elif job is not None:
                reason = f"the call timed out after {self.timeout:g} seconds"
                results[job.index] = error_result(job.name, "timeout", reason, now - worker.dispatched_at)

    def _start_failed(self, why: str, log: str) -> None:
        self.start_failures += 1
        if self.start_failures >= _MAX_START_FAILURES:
            self.start_failures = 0
            raise RuntimeError(f"sandbox worker failed to start ({why}): {log or 'no output'}")


def _prepare(index: int, call: Any) -> _Job | ToolResult:
    """Validate one (code, name, arguments) triple and encode its request body; bad input is a result, not a raise."""
    try:
        code, name, arguments = call
    except (TypeError, ValueError):
        return error_result("?", "bad_arguments", "a call must be a (code, name, arguments) triple")
    name = name if isinstance(name, str) else str(name)
    if not isinstance(code, str):
        return error_result(name, "not_defined", f"no code for {name}")
    if not isinstance(arguments, dict):
        reason = f"arguments must be an object, got {type(arguments).__name__}"
        return error_result(name, "bad_arguments", reason)
    try:
        body = json.dumps({"code": code, "name": name, "arguments": arguments}).encode()
    except (TypeError, ValueError) as exc:
        return error_result(name, "bad_arguments", f"arguments are not JSON: {exc}")
    return _Job(index, name, body)


def _describe_exit(status: int | None) -> str:
    if status is not None and status < 0:
        try:
            return f"the sandbox worker was killed by {signal.Signals(-status).name}"
        except ValueError:
            return f"the sandbox worker was killed by signal {-status}"
    return f"the sandbox worker exited with status {status}"


def _write_frame(fd: int, payload: bytes) -> None:
    view = memoryview(len(payload).to_bytes(4, "big") + payload)
    while view:
        view = view[os.write(fd, view) :]
