"""Every tool of FTRL's published test set (200 environments, real LLM-written code) runs in the sandbox."""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Any

import pytest
from conftest import FTRL_TEST_SET

from toolrl_analysis.envs.sandbox import Sandbox
from toolrl_analysis.envs.schema import read_envs

REPO_ROOT = Path(__file__).resolve().parents[1]


def example_value(schema: Any) -> Any:
    """A value of the declared JSON-schema type: enum[0] where given, minimal objects and arrays."""
    if not isinstance(schema, dict):
        return "example"
    if schema.get("enum"):
        return schema["enum"][0]
    kind = schema.get("type")
    if isinstance(kind, list):
        kind = next((k for k in kind if k != "null"), "string")
    if kind == "object":
        properties = schema.get("properties") or {}
        return {key: example_value(properties.get(key)) for key in schema.get("required") or []}
    if kind == "integer":
        return int(schema.get("minimum", 1))
    if kind == "number":
        return float(schema.get("minimum", 1))
    return {"boolean": True, "array": []}.get(
        kind, "2020-01-01" if schema.get("format") == "date" else "example"
    )


@pytest.fixture(scope="module")
def ftrl_records():
    assert FTRL_TEST_SET.is_file(), f"FTRL's test set is expected at {FTRL_TEST_SET}"
    return read_envs(FTRL_TEST_SET)


def test_every_ftrl_tool_runs_in_the_sandbox(ftrl_records, record_property):
    assert len(ftrl_records) == 200
    calls, env_of_call = [], []
    for env_index, record in enumerate(ftrl_records):
        for tool in record.tools:
            function = tool.get("function", tool)
            name = function["name"]
            calls.append((record.codes[name], name, example_value(function.get("parameters") or {})))
            env_of_call.append(env_index)

    with Sandbox(workers=2, timeout=5.0) as sandbox:
        results = sandbox.call_many(calls)

    counts = Counter(result.error or "ok" for result in results)
    record_property("ftrl_sandbox_results", dict(counts))
    print(f"\n{len(results)} FTRL tools: {dict(counts)}")
    assert len(results) == len(calls) > 1800
    assert counts["ok"] >= 0.95 * len(results), counts
    # The code itself is fine: nothing is refused, crashes, hangs, or fails to define its function. What fails
    # is the data's own quirks (functions requiring parameters their schema calls optional, and the like).
    assert not {"forbidden", "crashed", "timeout", "memory", "not_defined", "output_too_large"} & set(
        counts
    ), counts
    envs_with_a_working_tool = {env for env, result in zip(env_of_call, results, strict=True) if result.ok}
    assert envs_with_a_working_tool == set(range(len(ftrl_records)))
