"""The sandbox worker's program: runs in a fresh interpreter, executes untrusted tool code, answers in JSON.

`Sandbox` (sandbox.py, the parent side) starts `python -c BOOTSTRAP sandbox_worker.py CONFIG`, which runs this
file by path under the name `__toolrl_sandbox_worker__`, so it needs nothing from the package. Its module-level
imports must stay harmless: in particular `subprocess` is never imported here, because it would load
`_posixsubprocess`, whose fork_exec raises no audit event.

Layers set up in `_worker_main`, in order: rlimits (address space, CPU, file size, core), private pipe
descriptors with 0/1/2 on /dev/null, a warm-up that imports every allowed module before anything is refused,
builtins whose `__import__` admits only the allowed modules, and last the audit hook (no writes outside scratch,
no processes, sockets, ctypes, signals, rlimit changes, tracing, or imports outside the list). Each call execs the
(cached) compiled code into a fresh namespace and calls the named function, as FTRL's `call_function` does.
"""

from __future__ import annotations

import contextlib
import json
import os
import resource
import signal
import sys
from typing import Any

RUN_NAME = "__toolrl_sandbox_worker__"

# Every refusal says this. The worker raises plain PermissionError / ImportError (for imports, so that
# `try: import x` fallbacks work): built-in classes, which tool code cannot change the way it could change ours.
REFUSAL = "is not allowed in the sandbox"

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


if __name__ == RUN_NAME:
    _worker_main(sys.argv[-1])
