"""Run untrusted tool code in a pool of reusable worker processes (DESIGN §6).

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

Each call execs the (cached) compiled code into a fresh namespace and calls the named function, as FTRL's
`call_function` does, and converts the return value the same way (dict/list -> JSON, anything else -> str).

This file is also the worker's program: `Sandbox` starts `python -c BOOTSTRAP sandbox.py CONFIG`, which runs this
file under the name `__toolrl_sandbox_worker__`. So the module-level imports below must stay harmless inside a
worker; `subprocess` in particular is imported only where the parent needs it, because it would load
`_posixsubprocess`, whose fork_exec raises no audit event.
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
_RUN_NAME = "__toolrl_sandbox_worker__"
_BOOTSTRAP = (
    "import sys; del sys.path[0]; import runpy; "  # drop '' (the scratch cwd) from the import path
    f"runpy.run_path(sys.argv[1], run_name={_RUN_NAME!r})"
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


# Every refusal says this. The worker raises plain PermissionError / ImportError (for imports, so that
# `try: import x` fallbacks work): built-in classes, which tool code cannot change the way it could change ours.
REFUSAL = "is not allowed in the sandbox"


# =============================================================================================================
# Parent side
# =============================================================================================================
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
        # Imported here, not at the top: workers run this file by path and need nothing from the package.
        from toolrl_analysis.errors import ConfigError

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
                [sys.executable, "-s", "-B", "-c", _BOOTSTRAP, os.path.abspath(__file__), config],
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


# =============================================================================================================
# Worker side (runs in the child process only)
# =============================================================================================================
# Modules whose import would hand tool code an unaudited escape (fork_exec, raw sockets, foreign calls);
# dateutil.tz, for one, tries `ctypes` for Windows support. Refused while the worker warms up, and by the hook.
_NEVER_LOAD = frozenset(
    {"ctypes", "_ctypes", "subprocess", "_posixsubprocess", "multiprocessing", "_multiprocessing", "socket",
     "_socket", "gc", "mmap", "fcntl", "pty", "_xxsubinterpreters"}
)  # fmt: skip
# Modules the allowed ones import lazily (codecs, strptime, zoneinfo data); the hook admits these too.
_LAZY_INTERNALS = ("encodings", "_strptime", "stringprep", "unicodedata", "locale", "_locale", "tzdata")
# os functions that create files or reach other processes without raising an audit event: removed outright.
_UNAUDITED_OS = ("mkfifo", "mknod", "chroot", "pidfd_open", "setns", "unshare")


def _worker_main(config_json: str) -> None:
    import builtins
    import random

    config = json.loads(config_json)
    scratch = os.path.realpath(config["scratch"])
    os.chdir(scratch)
    # Keep the pipes on private descriptors; 0/1/2 become /dev/null so print() goes nowhere (2 only after the
    # warm-up, so that a failed start leaves its traceback in the log).
    channel = _Channel(request_fd=os.dup(0), reply_fd=os.dup(1))
    devnull = os.open(os.devnull, os.O_RDWR)
    os.dup2(devnull, 0)
    os.dup2(devnull, 1)

    megabyte = 1 << 20
    _set_limit(resource.RLIMIT_AS, config["memory_mb"] * megabyte)
    _set_limit(resource.RLIMIT_FSIZE, 64 * megabyte)  # files in scratch stay small
    _set_limit(resource.RLIMIT_CORE, 0)
    # The parent moves this soft limit before every call (RLIMIT_CPU counts the whole life of the process).
    _set_limit(resource.RLIMIT_CPU, config["cpu_seconds"] + 60, soft_only=True)
    if os.geteuid() != 0:  # RLIMIT_NPROC binds everyone but root
        _set_limit(resource.RLIMIT_NPROC, 0)
    # An oversized file write then fails with EFBIG instead of killing the worker.
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)

    allowed = frozenset(config["allowed_modules"])
    sys.meta_path.insert(0, _RefuseImports(_NEVER_LOAD))
    _warm_up(allowed)
    for module in (os, sys.modules.get("posix"), sys.modules.get("_signal"), signal):
        for attr in (*_UNAUDITED_OS, "pidfd_send_signal"):
            if module is not None:
                module.__dict__.pop(attr, None)

    tool_builtins = dict(builtins.__dict__)
    tool_builtins["__import__"] = _make_guarded_import(allowed, builtins.__import__)
    runner = _ToolRunner(tool_builtins, config["max_output_chars"], config["seed"], random.seed)
    sys.addaudithook(_make_audit_hook(scratch, allowed | frozenset(_LAZY_INTERNALS)))
    os.dup2(devnull, 2)
    channel.serve(runner)


def _set_limit(which: int, value: int, soft_only: bool = False) -> None:
    _soft, hard = resource.getrlimit(which)
    value = value if hard == resource.RLIM_INFINITY else min(value, hard)
    resource.setrlimit(which, (value, hard if soft_only else value))


class _Channel:
    """The worker's end of the pipes. Binds os/json functions at start-up: tool code may replace module attributes
    (`os.write = ...`), and that must not break the replies of later calls."""

    def __init__(self, request_fd: int, reply_fd: int):
        self.request_fd, self.reply_fd = request_fd, reply_fd
        self.read, self.write, self.times, self.exit = os.read, os.write, os.times, os._exit
        self.loads, self.dumps = json.loads, json.dumps

    def serve(self, runner: _ToolRunner) -> None:
        self.send({"ready": True})
        while True:
            header = self.read_exact(4)
            frame = None if header is None else self.read_exact(int.from_bytes(header, "big"))
            if frame is None:  # the parent went away
                self.exit(0)
            try:
                serial, _, body = frame.partition(b"\n")
                request = self.loads(body)
                outcome = runner.run(request["code"], request["name"], request["arguments"])
                reply = {"id": int(serial), **outcome}
            except BaseException:  # not even an error report could be made (out of memory?): get replaced
                self.exit(70)
            self.send(reply)

    def send(self, message: dict[str, Any]) -> None:
        try:
            times = self.times()
            message["cpu"] = times.user + times.system
            payload = self.dumps(message).encode()  # ASCII: lone surrogates in tool output survive as escapes
            view = memoryview(len(payload).to_bytes(4, "big") + payload)
            while view:
                view = view[self.write(self.reply_fd, view) :]
        except BaseException:
            self.exit(71)

    def read_exact(self, size: int) -> bytes | None:
        chunks, remaining = [], size
        while remaining:
            chunk = self.read(self.request_fd, min(remaining, 1 << 20))
            if not chunk:
                return None
            chunks.append(chunk)
            remaining -= len(chunk)
        return b"".join(chunks)


class _RefuseImports:
    """A meta-path finder that makes some modules unimportable while the worker warms up (and after)."""

    def __init__(self, refused: frozenset[str]):
        self.refused = refused

    def find_spec(self, name: str, path: Any = None, target: Any = None) -> None:
        if name.partition(".")[0] in self.refused:
            raise ImportError(f"import of '{name}' {REFUSAL}")
        return None


def _warm_up(allowed: frozenset[str]) -> None:
    """Import everything tool code may use before the hook is on, including what those modules import lazily."""
    import importlib

    for name in sorted(allowed):
        with contextlib.suppress(Exception):  # not installed: then tool code gets an ImportError, as anywhere
            importlib.import_module(name)
    warmers = [
        lambda: __import__("datetime").datetime.strptime("2020-01-02", "%Y-%m-%d"),
        lambda: __import__("time").strptime("2020", "%Y"),
        lambda: "x".encode("idna"),
    ]
    if "dateutil" in allowed:
        for sub in ("easter", "parser", "relativedelta", "rrule", "tz", "utils", "zoneinfo"):
            warmers.append(lambda sub=sub: importlib.import_module(f"dateutil.{sub}"))
        warmers.append(lambda: __import__("dateutil.parser").parser.parse("2020-01-02 10:00"))
    if "pytz" in allowed:
        warmers.append(lambda: __import__("pytz").timezone("America/New_York"))
    if "zoneinfo" in allowed:
        warmers.append(lambda: __import__("zoneinfo").ZoneInfo("America/New_York"))
    for warm in warmers:
        with contextlib.suppress(Exception):
            warm()


def _make_guarded_import(allowed: frozenset[str], real_import: Any) -> Any:
    def guarded_import(name, globals=None, locals=None, fromlist=(), level=0):  # the builtin's signature
        if level != 0 or not isinstance(name, str) or name.partition(".")[0] not in allowed:
            raise ImportError(f"import of '{name}' {REFUSAL}")
        return real_import(name, globals, locals, fromlist, level)

    return guarded_import


def _inside(
    path: Any, scratch_prefix: str, getcwd: Any, type_of: Any, str_type: type, bytes_type: type
) -> bool:
    """Whether `path` names something inside scratch. Lexical, which is enough because links cannot be made
    (os.symlink and os.link are refused). Anything but an exact str or bytes is outside: a PathLike's __fspath__
    could answer differently when the file is really opened. Takes everything as arguments and reads no globals
    or builtins, so nothing reachable from tool code changes what it answers."""
    if type_of(path) is bytes_type:
        path = path.decode("utf-8", "surrogateescape")
    if type_of(path) is not str_type:
        return False
    if not path.startswith("/"):
        path = getcwd() + "/" + path
    parts: list[str] = []
    for part in path.split("/"):
        if part == "..":
            if parts:
                parts.pop()
        elif part and part != ".":
            parts.append(part)
    return ("/" + "/".join(parts) + "/").startswith(scratch_prefix)


# Audit events the hook refuses outright (beyond the checks on open, import and path events below).
_REFUSED_EVENTS = frozenset(
    {"os.system", "os.fork", "os.forkpty", "os.kill", "os.killpg", "os.chdir", "os.chflags", "os.lchflags",
     "os.chown", "os.link", "os.symlink", "os.setxattr", "os.removexattr", "os.startfile", "pty.spawn",
     "sys.addaudithook", "sys.settrace", "sys.setprofile", "sys._current_frames", "sys._current_exceptions",
     "builtins.input", "builtins.breakpoint", "code.__new__", "signal.pthread_kill", "webbrowser.open",
     "urllib.Request", "pdb.Pdb", "ensurepip.bootstrap", "setopencodehook"}
)  # fmt: skip
_REFUSED_PREFIXES = (
    "os.exec", "os.spawn", "os.posix_spawn", "subprocess.", "socket.", "ctypes.", "shutil.", "resource.", "gc.",
    "mmap.", "fcntl.", "syslog.", "http.", "ftplib.", "smtplib.", "poplib.", "imaplib.", "nntplib.", "telnetlib.",
    "sqlite3.", "cpython.", "winreg.", "msvcrt.", "_winapi.",
)  # fmt: skip
# Events that change the file system at the paths they name: allowed inside scratch only.
_PATH_EVENTS = frozenset(
    {"os.remove", "os.rmdir", "os.mkdir", "os.rename", "os.truncate", "os.chmod", "os.utime"}
)
_FUNCTION_INTERNALS = frozenset({"__code__", "__defaults__", "__kwdefaults__", "__globals__", "__closure__"})
_FRAME_ATTRIBUTES = frozenset({"tb_frame", "gi_frame", "cr_frame", "ag_frame"})


def _make_audit_hook(scratch: str, importable: frozenset[str]) -> Any:
    """The audit hook. Tool code can reach module globals and builtins, and change them, so the hook uses neither:
    what it needs is bound here, in closure cells that tool code cannot reach, and it calls no builtin by name.
    It compares types by identity and uses only exact-str methods, so no tool code ever runs inside it; and any
    exception it raises refuses the event, so tampering that does get through fails closed."""
    getcwd, type_of = os.getcwd, type
    str_type, bytes_type, tuple_type = str, bytes, tuple
    int_type, float_type, none_type = int, float, type(None)
    violation, forbidden_import, inside = PermissionError, ImportError, _inside
    refused_events, refused_prefixes, path_events = _REFUSED_EVENTS, _REFUSED_PREFIXES, _PATH_EVENTS
    function_internals, frame_attributes = _FUNCTION_INTERNALS, _FRAME_ATTRIBUTES
    write_flags = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND
    prefix = scratch.rstrip("/") + "/"

    def is_text(value: Any) -> bool:
        return type_of(value) is str_type or type_of(value) is bytes_type

    def audit_hook(event: str, args: tuple) -> None:
        if type_of(event) is not str_type or type_of(args) is not tuple_type:
            raise violation("a malformed audit event is not allowed in the sandbox")
        if event == "open":
            path, mode, flags = args
            if type_of(flags) is not int_type or (mode is not None and type_of(mode) is not str_type):
                raise violation("an open() with unusual arguments is not allowed in the sandbox")
            writing = flags & write_flags or (
                mode is not None and ("w" in mode or "a" in mode or "x" in mode or "+" in mode)
            )
            if writing and not inside(path, prefix, getcwd, type_of, str_type, bytes_type):
                shown = f"{path!r}" if is_text(path) else "that path"
                raise violation(
                    f"writing {shown} outside the scratch directory is not allowed in the sandbox"
                )
        elif event == "import":
            name = args[0] if args else None
            if type_of(name) is not str_type or name.partition(".")[0] not in importable:
                shown = name if type_of(name) is str_type else "?"
                raise forbidden_import(f"import of '{shown}' is not allowed in the sandbox")
        elif event in path_events:
            for arg in args:
                kind = type_of(arg)
                if kind is str_type or kind is bytes_type:
                    if not inside(arg, prefix, getcwd, type_of, str_type, bytes_type):
                        raise violation(f"'{event}' on {arg!r} is not allowed in the sandbox")
                    continue
                harmless = kind is int_type or kind is float_type or kind is tuple_type or kind is none_type
                if not harmless:  # modes, times and descriptors are harmless; a PathLike is not
                    raise violation(f"'{event}' with that path is not allowed in the sandbox")
            dir_fds = args[2:] if event == "os.rename" else () if event == "os.truncate" else args[-1:]
            for fd in dir_fds:
                if fd is not None and (type_of(fd) is not int_type or fd != -1):
                    raise violation(
                        f"'{event}' relative to a directory descriptor is not allowed in the sandbox"
                    )
        elif event == "object.__setattr__" or event == "object.__delattr__":
            attribute = (args + (None, None))[1]
            if type_of(attribute) is not str_type or attribute in function_internals:
                raise violation("changing a function's code or closure is not allowed in the sandbox")
        elif event == "object.__getattr__":
            attribute = (args + (None, None))[1]
            if type_of(attribute) is not str_type or attribute in frame_attributes:
                raise violation(
                    "reaching into frames is not allowed in the sandbox"
                )  # none may reach the hook's
        elif event in refused_events or event.startswith(refused_prefixes):
            raise violation(f"'{event}' is not allowed in the sandbox")

    return audit_hook


class _ToolRunner:
    """Executes one request: exec the cached code into a fresh namespace, call the function, convert the result."""

    def __init__(self, tool_builtins: dict[str, Any], max_output_chars: int, seed: int | None, reseed: Any):
        self.tool_builtins = tool_builtins
        self.max_output_chars = max_output_chars
        self.seed = seed
        self.reseed = reseed
        self.dumps = json.dumps  # bound now: tool code may replace json.dumps in the shared module
        self.compiled: dict[str, Any] = {}

    def run(self, source: str, name: str, arguments: dict[str, Any]) -> dict[str, Any]:
        kind, text = self._call(source, name, arguments)
        if kind is None:
            return {"content": text, "error": None}
        # After a MemoryError the worker asks to be replaced: a fresh process beats a fragmented heap.
        recycle = kind == "memory"
        return {"content": "", "error": kind, "reason": text[: self.max_output_chars], "recycle": recycle}

    def _call(self, source: str, name: str, arguments: dict[str, Any]) -> tuple[str | None, str]:
        try:
            code = self.compiled.get(source)
            if code is None:
                code = compile(source, f"<tool {name}>", "exec")
                if len(self.compiled) >= 1024:
                    self.compiled.clear()
                self.compiled[source] = code
            if self.seed is not None:
                self.reseed(self.seed)  # the same call gives the same output in every run
            # A fresh namespace and a fresh copy of the builtins: calls are independent, as in FTRL.
            namespace: dict[str, Any] = {"__builtins__": dict(self.tool_builtins)}
            exec(code, namespace)
            if name not in namespace:
                return "not_defined", f"name {name} is not defined"
            function = namespace[name]
            if not callable(function):
                return "not_defined", f"{name} is not a function"
            try:
                value = function(**arguments)
            except TypeError as exc:
                if exc.__traceback__ is not None and exc.__traceback__.tb_next is None:
                    return "bad_arguments", _exception_text(exc)  # raised by the call itself, not inside it
                raise
            # FTRL's conversion, exact types included: a dict subclass is str()-ed, not JSON-encoded.
            if type(value) is dict or type(value) is list:
                text = self.dumps(value, ensure_ascii=False)
            else:
                text = str.__str__(str(value))  # an exact str, whatever the value's __str__ returned
        except BaseException as exc:  # SystemExit and friends are tool errors too
            return _classify(exc), _exception_text(exc)
        limit = self.max_output_chars
        if len(text) > limit:
            return "output_too_large", f"the output has {len(text)} characters; the limit is {limit}"
        return None, text


def _classify(exc: BaseException) -> str:
    # Follow the chain: a refusal the tool caught and re-raised as something else is still a refusal.
    seen = 0
    cause: BaseException | None = exc
    while cause is not None and seen < 8:
        if type(cause) in (PermissionError, ImportError) and _is_refusal(cause.args):
            return "forbidden"
        if isinstance(cause, MemoryError):
            return "memory"
        cause, seen = cause.__cause__ or cause.__context__, seen + 1
    return "exception"


def _is_refusal(args: tuple) -> bool:
    return len(args) == 1 and type(args[0]) is str and args[0].endswith(REFUSAL)


def _exception_text(exc: BaseException) -> str:
    """str(exc) as FTRL reports it; its __str__ is tool code, so it may fail or be huge."""
    try:
        text = str.__str__(str(exc))
    except BaseException:
        text = ""
    return text[:20000] or type(exc).__name__  # MemoryError() and friends have no message


if __name__ == _RUN_NAME:
    _worker_main(sys.argv[-1])
