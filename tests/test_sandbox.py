"""The sandbox with real worker processes: results, isolation, hostile code, clean-up."""

from __future__ import annotations

import gc
import os
import socket
import textwrap
import time
from pathlib import Path

import pytest

from toolrl_analysis.envs.sandbox import DEFAULT_ALLOWED_MODULES, Sandbox, ToolResult
from toolrl_analysis.errors import ConfigError

TIMEOUT = 2.0


def tool(body: str, name: str = "f", params: str = "") -> str:
    """Source of a tool function `name(params)` whose body is `body`."""
    return f"def {name}({params}):\n" + textwrap.indent(textwrap.dedent(body).strip(), "    ") + "\n"


def process_table() -> dict[int, tuple[int, str]]:
    """pid -> (parent pid, state) for every process we can see."""
    table = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                stat = Path(f"/proc/{entry}/stat").read_text()
            except OSError:
                continue
            fields = stat.rsplit(")", 1)[1].split()
            table[int(entry)] = (int(fields[1]), fields[0])
    return table


def descendants(pid: int) -> set[int]:
    table = process_table()
    found, frontier = set(), {pid}
    while frontier:
        frontier = {child for child, (parent, _) in table.items() if parent in frontier} - found
        found |= frontier
    return found


def worker_pids(sandbox: Sandbox) -> set[int]:
    return {w.pid for w in sandbox._pool.workers}


def assert_nothing_stray(sandbox: Sandbox, before: set[int]) -> None:
    """Since `before`, no process appeared but the sandbox's own (replacement) workers; they have no children
    and none of them is a zombie. (Other tests' sandboxes may live in this process too, hence `before`.)"""
    table = process_table()
    workers = worker_pids(sandbox)
    new = descendants(os.getpid()) - before - workers
    assert not new, f"stray processes: {new}"
    assert not set().union(*(descendants(pid) for pid in workers)), "the workers have children"
    assert not [pid for pid in workers if table[pid][1] == "Z"], "zombie workers"


@pytest.fixture(scope="module")
def sandbox():
    with Sandbox(workers=2, timeout=TIMEOUT, memory_mb=512) as box:
        yield box


# -- ordinary calls ---------------------------------------------------------------------------------------------
def test_return_values_are_converted_like_ftrl(sandbox):
    code = tool("return value", params="value")
    cases = [
        ({"a": "é", "b": [1, 2]}, '{"a": "é", "b": [1, 2]}'),  # JSON, non-ASCII kept
        ([1, "x"], '[1, "x"]'),
        (3, "3"),
        (None, "None"),
        ("text", "text"),
    ]
    results = sandbox.call_many([(code, "f", {"value": value}) for value, _ in cases])
    assert [r.content for r in results] == [expected for _, expected in cases]
    assert all(r.ok and r.error is None and r.elapsed > 0 for r in results)
    # Exact types, as FTRL checks them: a dict subclass is str()-ed, a tuple too.
    ordered = sandbox.call(tool("import collections\nreturn collections.OrderedDict(a=1)"), "f", {})
    assert ordered.content == "OrderedDict([('a', 1)])"
    assert sandbox.call(tool("return (1, 2)"), "f", {}).content == "(1, 2)"


def test_every_call_gets_a_fresh_namespace(sandbox):
    code = "calls = []\n" + tool("calls.append(1)\nreturn len(calls)")
    assert {r.content for r in sandbox.call_many([(code, "f", {})] * 6)} == {"1"}


def test_allowed_modules_work_and_others_are_refused(sandbox):
    code = tool(
        """
        import datetime, json, math, re, calendar, decimal, fractions, statistics, random, itertools, os
        import pytz, dateutil.parser
        from dateutil.relativedelta import relativedelta
        day = dateutil.parser.parse("2020-02-28") + relativedelta(days=1)
        zone = pytz.timezone("Europe/Paris").localize(datetime.datetime(2020, 1, 1)).tzname()
        return [day.strftime("%Y-%m-%d"), zone, calendar.isleap(2020), os.path.join("a", "b")]
        """
    )
    assert sandbox.call(code, "f", {}).content == '["2020-02-29", "CET", true, "a/b"]'
    for module in ("sys", "socket", "subprocess", "ctypes", "toolrl_analysis", "importlib", "gc"):
        result = sandbox.call(tool(f"import {module}"), "f", {})
        assert result.error == "forbidden", (module, result)
        assert f"import of '{module}' is not allowed" in result.content


def test_error_kinds(sandbox):
    results = sandbox.call_many(
        [
            (tool("raise ValueError('boom')"), "f", {}),
            (tool("return x", params="x"), "f", {}),  # missing argument
            (tool("return x", params="x"), "f", {"x": 1, "y": 2}),  # unexpected argument
            (tool("return len(5)"), "f", {}),  # a TypeError inside the tool is an exception
            (tool("return 1"), "g", {}),
            ("g = 5\n", "g", {}),
            ("def f(:\n", "f", {}),
            (tool("raise SystemExit(3)"), "f", {}),
            (tool("return 1"), "f", ["not", "a", "dict"]),
            (tool("return 1", params="x"), "f", {"x": object()}),
        ]
    )
    kinds = [r.error for r in results]
    assert kinds == [
        "exception", "bad_arguments", "bad_arguments", "exception", "not_defined", "not_defined", "exception",
        "exception", "bad_arguments", "bad_arguments",
    ]  # fmt: skip
    assert results[0].content == "an error occured when call f: boom"  # FTRL's text, typo included
    assert (
        results[1].content == "an error occured when call f: f() missing 1 required positional argument: 'x'"
    )
    assert results[4].content == "an error occured when call g: name g is not defined"
    assert all(not r.ok for r in results)


def test_print_output_never_reaches_the_caller(sandbox, capfd):
    code = tool(
        """
        import os
        print("MARKER-stdout")
        os.write(1, b"MARKER-fd1")
        os.write(2, b"MARKER-fd2")
        return "done"
        """
    )
    code_stderr = "import os\n" + tool("raise RuntimeError('MARKER-traceback')")
    results = sandbox.call_many([(code, "f", {}), (code_stderr, "f", {})])
    assert results[0].content == "done"
    out, err = capfd.readouterr()
    assert "MARKER" not in out and "MARKER" not in err


def test_calls_run_concurrently_and_keep_their_order(sandbox):
    sandbox.call_many([(tool("return 0"), "f", {})] * 2)  # both workers warm
    code = tool("import time\ntime.sleep(0.4)\nreturn i", params="i")
    start = time.monotonic()
    results = sandbox.call_many([(code, "f", {"i": i}) for i in range(4)])
    assert [r.content for r in results] == ["0", "1", "2", "3"]
    assert time.monotonic() - start < 1.4  # two at a time, not one


def test_scratch_directory_is_the_only_writable_place(sandbox):
    code = tool(
        """
        import os
        with open("note.txt", "w") as handle:
            handle.write("kept")
        os.mkdir("sub")
        os.rename("note.txt", "sub/note.txt")
        with open(os.path.join(os.getcwd(), "sub", "note.txt")) as handle:
            text = handle.read()
        os.remove("sub/note.txt")
        os.rmdir("sub")
        return text
        """
    )
    assert sandbox.call(code, "f", {}).content == "kept"


def test_calls_are_deterministic(sandbox):
    code = tool("import random\nreturn random.random()")
    assert len({r.content for r in sandbox.call_many([(code, "f", {})] * 4)}) == 1


# -- hostile code -------------------------------------------------------------------------------------------------
HOSTILE = {
    "infinite_loop": (tool("while True:\n    pass"), {"timeout"}),
    "sleep_forever": (tool("import time\ntime.sleep(60)"), {"timeout"}),
    "memory_bomb": (tool("blocks = []\nwhile True:\n    blocks.append(bytearray(50 * 2**20))"), {"memory"}),
    "one_huge_allocation": (tool("return ' ' * 10**10"), {"memory"}),
    "deep_recursion": (tool("return f(depth + 1)", params="depth=0"), {"exception"}),
    "os_exit": (tool("import os\nos._exit(0)"), {"crashed"}),
    "huge_return_value": (tool("return 'x' * (100 * 2**20)"), {"output_too_large"}),
    "huge_json_return_value": (tool("return ['y' * 2**20] * 100"), {"output_too_large"}),
    "os_fork": (tool("import os\nreturn os.fork()"), {"forbidden"}),
    "os_system": (tool("import os\nreturn os.system('touch {marker}')"), {"forbidden"}),
    "os_spawn": (
        tool("import os\nreturn os.spawnv(os.P_WAIT, '/bin/touch', ['touch', '{marker}'])"),
        {"forbidden"},
    ),
    "os_posix_spawn": (
        tool("import os\nreturn os.posix_spawn('/bin/touch', ['touch', '{marker}'], {{}})"),
        {"forbidden"},
    ),
    "os_popen": (tool("import os\nreturn os.popen('touch {marker}').read()"), {"forbidden"}),
    "os_exec": (tool("import os\nos.execv('/bin/touch', ['touch', '{marker}'])"), {"forbidden"}),
    "subprocess": (tool("import subprocess\nsubprocess.run(['touch', '{marker}'])"), {"forbidden"}),
    "multiprocessing": (
        tool("import multiprocessing\nmultiprocessing.Process(target=print).start()"),
        {"forbidden"},
    ),
    "os_kill_parent": (tool("import os\nos.kill(os.getppid(), 9)"), {"forbidden"}),
    "write_outside_scratch": (tool("open('{marker}', 'w').write('x')"), {"forbidden"}),
    "append_outside_scratch": (tool("open('{marker}', 'a')"), {"forbidden"}),
    "create_outside_scratch": (
        tool("import os\nos.close(os.open('{marker}', os.O_CREAT | os.O_RDONLY))"),
        {"forbidden"},
    ),
    "escape_scratch_with_dotdot": (tool("open('../../../../../../{marker}', 'w')"), {"forbidden"}),
    "mkdir_outside_scratch": (tool("import os\nos.mkdir('{marker}')"), {"forbidden"}),
    "mkfifo_outside_scratch": (tool("import os\nos.mkfifo('{marker}')"), {"exception"}),
    "symlink_out_of_scratch": (
        tool("import os\nos.symlink('{marker}', 'link')\nopen('link', 'w')"),
        {"forbidden"},
    ),
    "chdir_away": (tool("import os\nos.chdir('/')"), {"forbidden"}),
    "remove_outside_scratch": (tool("import os\nos.remove('{victim}')"), {"forbidden"}),
    "rename_outside_scratch": (tool("import os\nos.rename('{victim}', 'stolen')"), {"forbidden"}),
    "socket_import": (tool("import socket\nsocket.create_connection(('127.0.0.1', {port}))"), {"forbidden"}),
    "import_via_builtins": (tool("__builtins__['__import__']('socket')"), {"forbidden"}),
    "exec_escape": (tool("exec('import subprocess')"), {"forbidden"}),
}

# The classic escape: walk object.__subclasses__() to code that holds the real os, builtins and importer.
_SUBCLASSES = "().__class__.__base__.__subclasses__()"
ESCAPES = {
    "escape_os_system": f"""
        for cls in {_SUBCLASSES}:
            if cls.__name__ == "_wrap_close":
                return cls.__init__.__globals__["system"]("touch {{marker}}")
        """,
    "escape_real_import_subprocess": f"""
        for cls in {_SUBCLASSES}:
            if cls.__name__ == "catch_warnings":
                real_import = cls()._module.__builtins__["__import__"]
                return real_import("subprocess").Popen(["touch", "{{marker}}"]).wait()
        """,
    "escape_real_import_socket": f"""
        for cls in {_SUBCLASSES}:
            if cls.__name__ == "catch_warnings":
                s = cls()._module.__builtins__["__import__"]("socket")
                return s.create_connection(("127.0.0.1", {{port}}))
        """,
    "escape_builtins_open": f"""
        for cls in {_SUBCLASSES}:
            init = getattr(cls.__init__, "__globals__", None)
            if init and "__builtins__" in init:
                builtins = init["__builtins__"]
                real_open = builtins["open"] if isinstance(builtins, dict) else builtins.open
                return real_open("{{marker}}", "w").write("pwned")
        """,
    "escape_sys_modules_ctypes": f"""
        for cls in {_SUBCLASSES}:
            g = getattr(cls.__init__, "__globals__", None)
            if g and "sys" in g:
                return g["sys"].modules["__main__"].__builtins__.__import__("ctypes")
        """,
    "escape_fork_via_real_os": f"""
        for cls in {_SUBCLASSES}:
            if cls.__name__ == "_wrap_close":
                return cls.__init__.__globals__["fork"]()
        """,
    "escape_add_audit_hook": f"""
        for cls in {_SUBCLASSES}:
            g = getattr(cls.__init__, "__globals__", None)
            if g and "sys" in g:
                g["sys"].addaudithook(lambda *a: None)  # refused silently: CPython drops the new hook
                import os
                return os.system("touch {{marker}}")
        """,
    "escape_setrlimit": f"""
        for cls in {_SUBCLASSES}:
            g = getattr(cls.__init__, "__globals__", None)
            if g and "sys" in g and "resource" in g["sys"].modules:
                r = g["sys"].modules["resource"]
                return r.setrlimit(r.RLIMIT_AS, (-1, -1))
        raise PermissionError("sandbox: no route to resource")
        """,
    "escape_audit_with_a_str_subclass": f"""
        class Sneaky(str):
            def __eq__(self, other):
                return str.__eq__(self, other)
            __hash__ = str.__hash__
        for cls in {_SUBCLASSES}:
            g = getattr(cls.__init__, "__globals__", None)
            if g and "sys" in g:
                return g["sys"].audit(Sneaky("open"), "{{marker}}", "w", 577)
        """,
    # Tool code that gets the hook's exception class or its frame must not be able to change what it does.
    "tamper_with_the_refusal_class": """
        try:
            open("{marker}", "w")
        except PermissionError as refusal:
            type(refusal).__init__ = lambda self, *args: None  # a built-in class: TypeError
        """,
    "tamper_with_the_guarded_import": f"""
        for cls in {_SUBCLASSES}:
            if cls.__name__ == "catch_warnings":
                __builtins__["__import__"] = cls()._module.__builtins__["__import__"]
        import socket
        return socket.create_connection(("127.0.0.1", {{port}}))
        """,
    "walk_the_traceback_into_the_hook": """
        try:
            open("{marker}", "w")
        except PermissionError as refusal:
            tb = refusal.__traceback__
            while tb.tb_next:
                tb = tb.tb_next
            return tb.tb_frame.f_locals
        """,
    "pathlike_that_changes_its_answer": """
        class Shifty:
            calls = 0
            def __fspath__(self):
                Shifty.calls += 1
                return "inside.txt" if Shifty.calls == 1 else "{marker}"
        open(Shifty(), "w").write("x")  # open asks once, and the hook sees that answer
        raise RuntimeError("wrote inside.txt, in scratch")
        """,
}
for _name, _body in ESCAPES.items():
    HOSTILE[_name] = (tool(_body), {"forbidden"})
HOSTILE["pathlike_that_changes_its_answer"] = (
    tool(ESCAPES["pathlike_that_changes_its_answer"]),
    {"exception"},
)


@pytest.fixture
def listener():
    server = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    server.bind(("127.0.0.1", 0))
    server.listen(8)
    server.setblocking(False)
    yield server
    server.close()


@pytest.mark.parametrize("case", sorted(HOSTILE))
def test_hostile_code_is_contained(sandbox, case, tmp_path, listener):
    marker, victim = tmp_path / "pwned", tmp_path / "victim.txt"
    victim.write_text("keep me")
    template, expected_kinds = HOSTILE[case]
    code = template.replace("{marker}", str(marker)).replace("{victim}", str(victim))
    code = code.replace("{port}", str(listener.getsockname()[1])).replace("{{}}", "{}")

    before = descendants(os.getpid())
    start = time.monotonic()
    result = sandbox.call(code, "f", {})
    elapsed = time.monotonic() - start

    assert isinstance(result, ToolResult) and not result.ok
    assert result.error in expected_kinds, result
    assert result.content.startswith("an error occured when call f: ")
    assert elapsed < TIMEOUT + 1.0
    # The effect did not happen ...
    assert not marker.exists() and not marker.is_symlink()
    assert victim.read_text() == "keep me"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["victim.txt"]
    with pytest.raises(BlockingIOError):
        listener.accept()
    # ... nothing was left behind, and the sandbox still works.
    assert sandbox.call(tool("return 'still fine'"), "f", {}).content == "still fine"
    assert_nothing_stray(sandbox, before)


def test_forged_replies_do_not_confuse_the_parent(sandbox):
    code = tool(
        """
        import os, json
        fake = json.dumps({"id": 1, "content": "forged", "error": None}).encode()
        for fd in range(3, 30):
            for frame in (len(fake).to_bytes(4, "big") + fake, b"\\x00\\x00\\x00\\x05junk!", b"\\xff" * 8):
                try:
                    os.write(fd, frame)
                except OSError:
                    pass
        return "real"
        """
    )
    result = sandbox.call(code, "f", {})
    assert "forged" not in result.content
    assert result.content == "real" or result.error == "crashed"  # junk on the pipe: the worker is replaced
    assert sandbox.call(tool("return 'ok'"), "f", {}).content == "ok"


def test_tampering_with_shared_modules_does_not_break_the_worker():
    tamper = tool(
        f"""
        import os, json
        os.write = os.read = None
        json.dumps = json.loads = None
        for cls in {_SUBCLASSES}:
            if cls.__name__ == "catch_warnings":
                __builtins__["__import__"] = cls()._module.__builtins__["__import__"]
        return "done"
        """
    )
    with Sandbox(workers=1, timeout=TIMEOUT) as box:  # its own: the module changes stay in the worker
        assert [r.content for r in box.call_many([(tamper, "f", {})] * 2)] == ["done", "done"]
        assert box.call(tool("return {'a': 1}"), "f", {}).content == '{"a": 1}'
        # Each call gets a fresh copy of the guarded builtins: the importer swap did not outlive its call.
        assert box.call(tool("import sys"), "f", {}).error == "forbidden"


# -- limits, lifecycle ------------------------------------------------------------------------------------------
def test_cpu_limit_stops_a_busy_tool_before_the_wall_clock():
    with Sandbox(workers=1, timeout=60, cpu_seconds=1) as box:
        box.call(tool("return 0"), "f", {})
        start = time.monotonic()
        result = box.call(tool("while True:\n    pass"), "f", {})
        # ~2 CPU seconds (the budget starts from the next whole second); on a loaded machine more wall time.
        assert result.error == "timeout" and "CPU time limit" in result.content
        assert time.monotonic() - start < 30
        assert box.call(tool("return 1"), "f", {}).content == "1"


def test_close_leaves_no_processes_and_no_scratch():
    box = Sandbox(workers=2, timeout=TIMEOUT)
    box.call_many([(tool("open('file.txt', 'w').write('x')\nreturn 1"), "f", {})] * 4)
    pids, scratch = worker_pids(box), Path(box._pool.scratch)
    assert len(pids) == 2 and scratch.is_dir()
    box.close()
    box.close()  # idempotent
    assert not scratch.exists()
    assert not (pids & set(process_table()))
    with pytest.raises(RuntimeError, match="closed"):
        box.call(tool("return 1"), "f", {})


def test_garbage_collection_cleans_up():
    box = Sandbox(workers=1, timeout=TIMEOUT)
    assert box.call(tool("return 1"), "f", {}).ok
    pids, scratch = worker_pids(box), Path(box._pool.scratch)
    del box
    gc.collect()
    assert not scratch.exists()
    assert not (pids & set(process_table()))


def test_context_manager_and_pool_replacement():
    with Sandbox(workers=1, timeout=TIMEOUT) as box:
        first = worker_pids(box)
        assert box.call(tool("import os\nos._exit(3)"), "f", {}).error == "crashed"
        assert box.call(tool("return 2"), "f", {}).content == "2"
        assert worker_pids(box) and worker_pids(box) != first
    assert not (worker_pids(box) & set(process_table()))


def test_files_in_scratch_are_size_limited(sandbox):
    result = sandbox.call(tool("open('big.bin', 'wb').write(b'x' * (65 * 2**20))"), "f", {})
    assert result.error == "exception" and "File too large" in result.content


def test_a_worker_that_cannot_start_is_reported(monkeypatch):
    from toolrl_analysis.envs import sandbox as sandbox_module

    broken = "import sys; sys.stderr.write('the worker cannot start\\n'); sys.exit(3)"
    monkeypatch.setattr(sandbox_module, "_BOOTSTRAP", broken)
    with Sandbox(workers=1, timeout=TIMEOUT) as box:
        with pytest.raises(RuntimeError, match="failed to start .*the worker cannot start"):
            box.call(tool("return 1"), "f", {})
        scratch = Path(box._pool.scratch)
    assert not scratch.exists()


@pytest.mark.parametrize(
    "kwargs",
    [{"workers": 0}, {"timeout": 0}, {"timeout": float("inf")}, {"memory_mb": 10}, {"cpu_seconds": 0},
     {"max_output_chars": 0}, {"allowed_modules": "json"}],
)  # fmt: skip
def test_bad_configuration_is_a_config_error(kwargs):
    with pytest.raises(ConfigError):
        Sandbox(**kwargs)


def test_default_modules_cover_ftrl_imports():
    ftrl_imports = {
        "datetime",
        "re",
        "json",
        "math",
        "calendar",
        "os",
        "dateutil",
        "pytz",
        "cmath",
        "operator",
    }
    ftrl_imports |= {
        "decimal",
        "fractions",
        "random",
        "collections",
        "itertools",
        "string",
        "functools",
        "time",
    }
    ftrl_imports |= {"typing", "statistics", "copy"}
    assert ftrl_imports <= set(DEFAULT_ALLOWED_MODULES)
