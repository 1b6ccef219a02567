"""Import of FTRL files, export to FTRL JSONL or a verl parquet, and verl's custom reward entry point.

Import keeps every record as it is and adds only provenance under `meta.imported_from`; export to
FTRL drops that provenance again (and, unless asked to keep it, the rest of `meta`), so an imported
FTRL file round-trips field for field.

verl: `export_verl` writes the columns verl's RL dataset reads (prompt, data_source, ability,
reward_model, extra_info), with `tools`, `codes` and `unsolved_set` as JSON strings so every row has
the same arrow type. Point verl's `custom_reward_function.path` at this module and `name` at
`compute_score`: it scores one assistant turn with our parser, sandbox and step reward.
"""

from __future__ import annotations

import atexit
import contextlib
import json
import re
import threading
from pathlib import Path
from typing import Any

from toolrl_analysis.envs.schema import EnvRecord, read_envs, write_envs
from toolrl_analysis.envs.toolcalls import TOOL_CALL_CLOSE, TOOL_CALL_OPEN
from toolrl_analysis.errors import EnvFormatError, UserError

EXPORT_FORMATS = ("ftrl", "verl")
PROVENANCE_KEY = "imported_from"


# -- import ----------------------------------------------------------------------------------------
def import_ftrl(path: str | Path, out_dir: str | Path) -> dict[str, Any]:
    """FTRL JSONL or parquet -> DIR/<split>.jsonl (records unchanged, provenance in meta)."""
    path = Path(path)
    records = read_envs(path)
    by_split: dict[str, list[EnvRecord]] = {}
    for index, record in enumerate(records):
        record.meta = {**record.meta, PROVENANCE_KEY: {"file": path.name, "index": index}}
        by_split.setdefault(_split_name(record.split), []).append(record)
    out = Path(out_dir)
    files = {}
    for split, rows in sorted(by_split.items()):
        target = write_envs(rows, out / f"{split}.jsonl")
        files[split] = {"path": str(target), "records": len(rows)}
    scenarios: dict[str, int] = {}
    for record in records:
        scenarios[record.data_source] = scenarios.get(record.data_source, 0) + 1
    return {
        "source": str(path),
        "records": len(records),
        "files": files,
        "data_sources": dict(sorted(scenarios.items())),
    }


def _split_name(split: str) -> str:
    """A split becomes a file name: keep it to letters, digits, '-' and '_'."""
    name = re.sub(r"[^A-Za-z0-9_-]+", "_", split.strip()) or "unknown"
    return name


# -- export ----------------------------------------------------------------------------------------
def load_source(source: str | Path) -> list[EnvRecord]:
    """An EnvSet directory (train.jsonl then test.jsonl) or one .jsonl/.parquet file."""
    source = Path(source)
    if source.is_dir():
        files = [source / "train.jsonl", source / "test.jsonl"]
        files = [f for f in files if f.is_file()] or sorted(source.glob("*.jsonl"))
        if not files:
            raise EnvFormatError(f"{source} holds no train.jsonl, test.jsonl or other .jsonl file")
        return [record for f in files for record in read_envs(f)]
    return read_envs(source)


def ftrl_row(record: EnvRecord, keep_meta: bool = False) -> dict[str, Any]:
    """The record in FTRL's encoding; import provenance is never written back."""
    row = record.to_ftrl(keep_meta=keep_meta)
    if "meta" in row:
        meta = {k: v for k, v in row["meta"].items() if k != PROVENANCE_KEY}
        if meta:
            row["meta"] = meta
        else:
            row.pop("meta")
    return row


def export_ftrl(records: list[EnvRecord], out_path: str | Path, keep_meta: bool = False) -> Path:
    out = Path(out_path)
    out.parent.mkdir(parents=True, exist_ok=True)
    with out.open("w", encoding="utf-8") as handle:
        for record in records:
            handle.write(json.dumps(ftrl_row(record, keep_meta), ensure_ascii=False) + "\n")
    return out


def verl_message(message: dict[str, Any], parse_string_arguments: bool = True) -> dict[str, str]:
    """{role, content} only, as verl's parquet holds it; an assistant's tool calls become Qwen-style text in its
    content (a per-step state's history has them).

    Arguments given as a JSON string (OpenAI style, as FTRL's sampler writes them) are written as the object
    they encode, or, with `parse_string_arguments=False`, as the string itself (what `tojson` in Qwen's
    templates does with a string)."""
    role = str(message.get("role", ""))
    content = message.get("content")
    content = "" if content is None else str(content)
    calls = message.get("tool_calls") or []
    if role == "assistant" and calls:
        blocks = []
        for call in calls:
            function = call.get("function", call)
            arguments = function.get("arguments", {})
            if isinstance(arguments, str) and parse_string_arguments:
                with contextlib.suppress(json.JSONDecodeError):
                    arguments = json.loads(arguments)
            body = json.dumps({"name": function.get("name"), "arguments": arguments}, ensure_ascii=False)
            blocks.append(f"{TOOL_CALL_OPEN}\n{body}\n{TOOL_CALL_CLOSE}")
        content = (content + "\n" if content else "") + "\n".join(blocks)
    return {"role": role, "content": content}


def verl_rows(records: list[EnvRecord]) -> list[dict[str, Any]]:
    rows = []
    for index, record in enumerate(records):
        meta = {k: v for k, v in record.meta.items() if k != PROVENANCE_KEY}
        rows.append(
            {
                "prompt": [verl_message(m) for m in record.messages],
                "data_source": record.data_source,
                "ability": "tool_use",
                "reward_model": {"style": "rule", "ground_truth": record.answer},
                "extra_info": {
                    "index": index,
                    "split": record.split,
                    "env_id": record.env_id,
                    "tools": json.dumps(record.tools, ensure_ascii=False),
                    "codes": json.dumps(record.codes, ensure_ascii=False),
                    "unsolved_set": json.dumps(record.unsolved_set, ensure_ascii=False),
                    "solve_rate": float(record.solve_rate),
                    "meta": json.dumps(meta, ensure_ascii=False),
                },
            }
        )
    return rows


def export_verl(records: list[EnvRecord], out_path: str | Path) -> Path:
    import pyarrow as pa
    import pyarrow.parquet as pq

    message = pa.struct([("role", pa.string()), ("content", pa.string())])
    schema = pa.schema(
        [
            ("prompt", pa.list_(message)),
            ("data_source", pa.string()),
            ("ability", pa.string()),
            ("reward_model", pa.struct([("style", pa.string()), ("ground_truth", pa.string())])),
            (
                "extra_info",
                pa.struct(
                    [
                        ("index", pa.int64()),
                        ("split", pa.string()),
                        ("env_id", pa.string()),
                        ("tools", pa.string()),
                        ("codes", pa.string()),
                        ("unsolved_set", pa.string()),
                        ("solve_rate", pa.float64()),
                        ("meta", pa.string()),
                    ]
                ),
            ),
        ]
    )
    out = Path(out_path)
    out.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pylist(verl_rows(records), schema=schema), out)
    return out


def export(source: str | Path, fmt: str, out_path: str | Path, keep_meta: bool = False) -> dict[str, Any]:
    if fmt not in EXPORT_FORMATS:
        raise UserError(f"unknown export format '{fmt}' (choose one of: {', '.join(EXPORT_FORMATS)})")
    records = load_source(source)
    if fmt == "ftrl":
        out = export_ftrl(records, out_path, keep_meta=keep_meta)
    else:
        out = export_verl(records, out_path)
    splits: dict[str, int] = {}
    for record in records:
        splits[record.split] = splits.get(record.split, 0) + 1
    return {"source": str(source), "format": fmt, "out": str(out), "records": len(records), "splits": splits}


# -- verl reward entry point -----------------------------------------------------------------------
_SANDBOX = None
_SANDBOX_LOCK = threading.Lock()


def _sandbox():
    """One sandbox per process, created on first use (verl calls compute_score many times, from several
    threads at once: without the lock, concurrent first calls each started a pool of workers)."""
    global _SANDBOX
    if _SANDBOX is None:
        with _SANDBOX_LOCK:
            if _SANDBOX is None:  # another thread may have made it while this one waited
                from toolrl_analysis.envs.sandbox import Sandbox

                made = Sandbox()
                atexit.register(made.close)
                _SANDBOX = made
    return _SANDBOX


def verl_environment(
    data_source: str, ground_truth: str, extra_info: Any, row: int | None = None
) -> EnvRecord:
    """The environment state one verl row describes (`extra_info` as `export_verl` writes it: tools, codes,
    unsolved_set as JSON strings or objects, solve_rate, split). A row whose `extra_info` cannot be read
    raises EnvFormatError naming the row (`row`, else `extra_info.index`, and the environment): read as `{}`,
    as it once was, it would score every turn <= 0, silently."""
    info = extra_info if isinstance(extra_info, dict) else {}
    name = (
        f"verl row {row if row is not None else info.get('index', '?')} ({info.get('env_id') or data_source})"
    )
    if not isinstance(extra_info, dict):
        kind = type(extra_info).__name__
        raise EnvFormatError(
            f"{name}: extra_info must be an object holding codes and unsolved_set, got {kind}"
        )
    missing = [key for key in ("codes", "unsolved_set") if info.get(key) is None]
    if missing:
        raise EnvFormatError(f"{name}: extra_info lacks {' and '.join(missing)}")
    try:
        return EnvRecord.from_dict(
            {
                "messages": [],
                "tools": info.get("tools") or [],
                "codes": info["codes"],
                "unsolved_set": info["unsolved_set"],
                "answer": str(ground_truth),
                "data_source": str(data_source),
                "split": str(info.get("split", "train")),
                "solve_rate": info.get("solve_rate", 0.0),
            }
        )
    except EnvFormatError as exc:
        raise EnvFormatError(f"{name}: extra_info {exc}") from None


def score_breakdown(
    data_source: str,
    solution_str: str,
    ground_truth: str,
    extra_info: dict | None = None,
    variant: str = "f1",
) -> dict[str, Any]:
    """The step reward of one assistant turn, with its breakdown (see `compute_score`)."""
    from toolrl_analysis.envs.reward import score_step

    record = verl_environment(data_source, ground_truth, extra_info)
    step, _ = score_step(solution_str, record, _sandbox(), variant=variant)
    return step.as_dict()


def compute_score(
    data_source: str, solution_str: str, ground_truth: str, extra_info: dict | None = None
) -> float:
    """verl custom reward: FTRL's step reward (f1 variant) of `solution_str` as one assistant turn."""
    return float(score_breakdown(data_source, solution_str, ground_truth, extra_info)["score"])
