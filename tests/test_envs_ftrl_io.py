"""FTRL import/export round trip on the published test set, parquet import, verl export."""

import json

import pytest
from conftest import FTRL_TEST_SET as FTRL_TEST

from toolrl_analysis.envs.ftrl_io import export, import_ftrl, load_source
from toolrl_analysis.envs.schema import read_envs
from toolrl_analysis.errors import UserError


def test_import_loads_all_200_and_export_round_trips_field_for_field(tmp_path):
    result = import_ftrl(FTRL_TEST, tmp_path / "imported")
    assert result["records"] == 200 and result["files"]["test"]["records"] == 200
    assert result["data_sources"] == {
        f"self/{s}": 50 for s in ("multi_hop", "parallel_multi_hop", "parallel_single_hop", "single_hop")
    }
    imported = read_envs(tmp_path / "imported" / "test.jsonl")
    assert imported[3].meta == {"imported_from": {"file": "ftrl-test.jsonl", "index": 3}}

    export(tmp_path / "imported", "ftrl", tmp_path / "round.jsonl")
    original = [
        json.loads(line) for line in FTRL_TEST.read_text(encoding="utf-8").splitlines() if line.strip()
    ]
    again = [json.loads(line) for line in (tmp_path / "round.jsonl").read_text(encoding="utf-8").splitlines()]
    assert len(again) == len(original)
    for before, after in zip(original, again, strict=True):
        assert list(after) == list(before)
        for field, value in before.items():
            assert after[field] == value and type(after[field]) is type(value), field


def test_parquet_ftrl_file_imports_like_the_jsonl(tmp_path):
    import pandas as pd

    rows = [json.loads(line) for line in FTRL_TEST.read_text(encoding="utf-8").splitlines()[:20]]
    pd.DataFrame(rows).to_parquet(tmp_path / "ftrl.parquet")
    result = import_ftrl(tmp_path / "ftrl.parquet", tmp_path / "out")
    assert result["records"] == 20
    records = read_envs(tmp_path / "out" / "test.jsonl")
    assert [r.answer for r in records] == [row["answer"] for row in rows]
    assert [json.dumps(r.tools, ensure_ascii=False) for r in records] == [row["tools"] for row in rows]


def test_verl_export_has_verl_columns_and_uniform_types(tmp_path):
    import pyarrow.parquet as pq

    result = export(FTRL_TEST, "verl", tmp_path / "test.parquet")
    assert result["records"] == 200
    table = pq.read_table(tmp_path / "test.parquet")
    assert table.column_names == ["prompt", "data_source", "ability", "reward_model", "extra_info"]
    rows = table.to_pylist()
    original = [json.loads(line) for line in FTRL_TEST.read_text(encoding="utf-8").splitlines()]
    first = rows[0]
    assert first["ability"] == "tool_use" and first["reward_model"]["style"] == "rule"
    assert first["prompt"] == [{"role": "user", "content": original[0]["messages"][0]["content"]}]
    for row, source in zip(rows, original, strict=True):
        assert row["reward_model"]["ground_truth"] == source["answer"]
        assert row["extra_info"]["tools"] == source["tools"]
        assert row["extra_info"]["unsolved_set"] == source["unsolved_set"]
    assert [row["extra_info"]["index"] for row in rows] == list(range(200))


def test_generated_envset_exports_both_formats(tmp_path):
    from toolrl_analysis.envs.pipeline import EnvBuildConfig, build_envsets, write_envset

    write_envset(build_envsets(EnvBuildConfig(train_size=6, test_per_scenario=1)), tmp_path / "set")
    records = load_source(tmp_path / "set")
    assert [r.split for r in records] == ["train"] * 6 + ["test"] * 4
    export(tmp_path / "set", "ftrl", tmp_path / "plain.jsonl")
    export(tmp_path / "set", "ftrl", tmp_path / "meta.jsonl", keep_meta=True)
    plain = [json.loads(line) for line in (tmp_path / "plain.jsonl").read_text().splitlines()]
    assert all("meta" not in row for row in plain)
    assert read_envs(tmp_path / "meta.jsonl")[0].meta["golden_turns"]
    export(tmp_path / "set", "verl", tmp_path / "set.parquet")
    import pyarrow.parquet as pq

    extra = pq.read_table(tmp_path / "set.parquet").to_pylist()[0]["extra_info"]
    assert json.loads(extra["meta"])["subquestions"] and extra["split"] == "train"


def test_unknown_format_and_missing_source_are_user_errors(tmp_path):
    with pytest.raises(UserError, match="unknown export format 'csv'"):
        export(tmp_path, "csv", tmp_path / "x")
    with pytest.raises(UserError, match="no such file"):
        export(tmp_path / "missing.jsonl", "ftrl", tmp_path / "x.jsonl")
    with pytest.raises(UserError, match="holds no"):
        export(tmp_path, "ftrl", tmp_path / "x.jsonl")


def test_the_reward_sandbox_is_created_once_when_first_calls_come_together(monkeypatch):
    """verl calls reward functions from several threads: eight first calls at once start one pool."""
    import threading
    import time

    from toolrl_analysis.envs import ftrl_io, sandbox

    made = []

    class Slow(sandbox.Sandbox):  # a slow start widens the window in which a second pool could begin
        def __init__(self, *args, **kwargs):
            made.append(self)
            time.sleep(0.2)
            super().__init__(*args, **kwargs)

    monkeypatch.setattr(sandbox, "Sandbox", Slow)
    monkeypatch.setattr(ftrl_io, "_SANDBOX", None)
    barrier, got = threading.Barrier(8), []

    def first_call():
        barrier.wait()
        got.append(ftrl_io._sandbox())

    threads = [threading.Thread(target=first_call) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    try:
        assert len(made) == 1 and len(got) == 8 and all(g is made[0] for g in got)
        assert made[0].call_many([("def f():\n    return 41 + 1\n", "f", {})])[0].ok
    finally:
        made[0].close()
