"""Imports go one way (docs/architecture.md, "the nevers"): lower rooms never import higher ones.

Read with `ast`, so an import inside a function counts as much as one at the top of a module.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "toolrl_analysis"

HIGHER = {
    "rollout", "evaluate", "evaluate_render", "pass_at_k", "training", "analysis", "cli", "report", "reproduce",
}  # fmt: skip
# room -> the rooms it must never import (a room is a subpackage or a top-level module of the package).
NEVER = {
    "errors": {"envs", "models", "config", "io", *HIGHER},  # the foundation imports nothing of ours above it
    "config": {"envs", "models", "io", *HIGHER},
    "io": {"envs", "models", "config", *HIGHER},
    "results": {"envs", "models", "config", "io", *HIGHER},  # every command's writer: frames and JSON only
    "episodes": {"envs", "models", "config", "io", "results", *HIGHER},  # no torch: the CLI's help reads it
    "envs": {"models", *HIGHER},  # envs knows no models
    "models": HIGHER,
    "analysis": {"training", "cli", "reproduce"},  # analysis never imports training
    "pass_at_k": {"rollout", "evaluate", "training", "analysis", "cli", "report", "reproduce"},  # frames only
    "evaluate": {"evaluate_render", "cli"},  # evaluate computes; evaluate_render prints it
    "training": {"analysis", "cli", "reproduce"},  # training never imports analysis
}


def imported_modules(path: Path) -> list[tuple[int, str]]:
    """(line, absolute module name) of every import in the file, relative imports resolved."""
    package = ".".join(path.relative_to(PACKAGE.parent).with_suffix("").parts[:-1])
    found = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), filename=str(path))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                module = ".".join([*base, node.module] if node.module else base)
            else:
                module = node.module or ""
            found.append((node.lineno, module))
            # `from toolrl_analysis import training` names a room as an imported name.
            found += [(node.lineno, f"{module}.{alias.name}") for alias in node.names]
    return found


def room_of(module: str) -> str | None:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 and parts[0] == "toolrl_analysis" else None


def violations(room: str) -> list[str]:
    out = []
    paths = [PACKAGE / f"{room}.py"] if (PACKAGE / f"{room}.py").is_file() else (PACKAGE / room).rglob("*.py")
    for path in sorted(paths):
        for line, module in imported_modules(path):
            if room_of(module) in NEVER[room]:
                out.append(f"{path.relative_to(PACKAGE.parent)}:{line} imports {module}")
    return out


@pytest.mark.parametrize("room", sorted(NEVER))
def test_lower_rooms_never_import_higher_ones(room):
    assert (PACKAGE / f"{room}.py").is_file() or (PACKAGE / room).is_dir(), f"no room named {room}"
    assert violations(room) == []


def test_the_check_sees_function_local_and_relative_imports(tmp_path, monkeypatch):
    fake = tmp_path / "toolrl_analysis"
    (fake / "models").mkdir(parents=True)
    (fake / "models" / "bad.py").write_text(
        "import json\n\ndef load():\n    from ..analysis.checkpoints import open_checkpoint\n"
        "    from toolrl_analysis import training\n    import toolrl_analysis.cli\n"
    )
    monkeypatch.setitem(globals(), "PACKAGE", fake)
    assert violations("models") == [
        "toolrl_analysis/models/bad.py:4 imports toolrl_analysis.analysis.checkpoints",
        "toolrl_analysis/models/bad.py:4 imports toolrl_analysis.analysis.checkpoints.open_checkpoint",
        "toolrl_analysis/models/bad.py:5 imports toolrl_analysis.training",
        "toolrl_analysis/models/bad.py:6 imports toolrl_analysis.cli",
    ]


def test_the_sandbox_worker_needs_nothing_from_the_package():
    """Workers run sandbox_worker.py by path in a bare interpreter: it may import only the standard library,
    and never subprocess (its fork_exec raises no audit event)."""
    modules = [m for _, m in imported_modules(PACKAGE / "envs" / "sandbox_worker.py")]
    assert not [m for m in modules if m.startswith("toolrl_analysis")]
    assert not [
        m for m in modules if m.split(".")[0] in ("subprocess", "_posixsubprocess", "multiprocessing")
    ]
