"""The environment record (FTRL-compatible) and JSONL/parquet IO.

FTRL stores `tools`, `codes` and `unsolved_set` as JSON *strings*; we accept strings or objects on input,
keep objects in memory, and write FTRL's encoding back with `to_ftrl()`. Our own extras live under `meta`.
"""

from __future__ import annotations

import copy
import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from toolrl_analysis.errors import EnvFormatError

SCENARIOS = ("single_hop", "parallel_single_hop", "multi_hop", "parallel_multi_hop")
FTRL_FIELDS = ("messages", "tools", "codes", "unsolved_set", "solve_rate", "data_source", "split", "answer")
_JSON_STRING_FIELDS = ("tools", "codes", "unsolved_set")


def _decode(name: str, value: Any, expected: type) -> Any:
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError as exc:
            raise EnvFormatError(f"field '{name}' is not valid JSON: {exc.msg}") from None
    if not isinstance(value, expected):
        raise EnvFormatError(f"field '{name}' must be a {expected.__name__}, got {type(value).__name__}")
    return value


@dataclass
class EnvRecord:
    messages: list[dict[str, Any]]
    tools: list[dict[str, Any]]
    codes: dict[str, str]
    unsolved_set: dict[str, list[str]]
    answer: str
    data_source: str
    split: str = "test"
    solve_rate: float = 0.0
    meta: dict[str, Any] = field(default_factory=dict)
    # Unknown top-level fields of an imported file, kept so that export round-trips them.
    extra: dict[str, Any] = field(default_factory=dict)

    # -- derived views -------------------------------------------------------------------------
    @property
    def scenario(self) -> str:
        """`single_hop`, ... for `self/<scenario>` sources; the whole source otherwise."""
        return self.data_source.split("/", 1)[1] if self.data_source.startswith("self/") else self.data_source

    @property
    def question(self) -> str:
        for message in self.messages:
            if message.get("role") == "user":
                return str(message.get("content", ""))
        return ""

    @property
    def n_subquestions(self) -> int:
        return sum(len(v) for v in self.unsolved_set.values())

    @property
    def tool_names(self) -> list[str]:
        return [t.get("function", t).get("name", "") for t in self.tools]

    @property
    def env_id(self) -> str:
        return str(self.meta.get("env_id", ""))

    # -- (de)serialisation ---------------------------------------------------------------------
    @classmethod
    def from_dict(cls, data: Any) -> EnvRecord:
        if not isinstance(data, dict):
            raise EnvFormatError(f"an environment record must be a JSON object, got {type(data).__name__}")
        missing = [k for k in ("messages", "tools", "codes", "unsolved_set") if k not in data]
        if missing:
            raise EnvFormatError(f"environment record lacks field(s): {', '.join(missing)}")
        messages = data["messages"]
        if isinstance(messages, str):
            messages = _decode("messages", messages, list)
        if not isinstance(messages, list) or not all(isinstance(m, dict) for m in messages):
            raise EnvFormatError("field 'messages' must be a list of message objects")
        tools = _decode("tools", data["tools"], list)
        codes = _decode("codes", data["codes"], dict)
        unsolved = _decode("unsolved_set", data["unsolved_set"], dict)
        if not all(isinstance(v, str) for v in codes.values()):
            raise EnvFormatError("field 'codes' must map tool names to Python source strings")
        unsolved = {
            str(k): [str(a) for a in (v if isinstance(v, list) else [v])] for k, v in unsolved.items()
        }
        meta = data.get("meta") or {}
        if not isinstance(meta, dict):
            raise EnvFormatError("field 'meta' must be an object")
        try:
            solve_rate = float(data.get("solve_rate", 0.0) or 0.0)
        except (TypeError, ValueError):
            raise EnvFormatError(
                f"field 'solve_rate' must be a number, got {data.get('solve_rate')!r}"
            ) from None
        known = set(FTRL_FIELDS) | {"meta"}
        return cls(
            messages=messages,
            tools=tools,
            codes=codes,
            unsolved_set=unsolved,
            answer=str(data.get("answer", "")),
            data_source=str(data.get("data_source", "unknown")),
            split=str(data.get("split", "test")),
            solve_rate=solve_rate,
            meta=meta,
            extra={k: v for k, v in data.items() if k not in known},
        )

    def to_dict(self) -> dict[str, Any]:
        """Our encoding: objects, not strings, plus `meta`."""
        out: dict[str, Any] = {
            "messages": self.messages,
            "tools": self.tools,
            "codes": self.codes,
            "unsolved_set": self.unsolved_set,
            "solve_rate": self.solve_rate,
            "data_source": self.data_source,
            "split": self.split,
            "answer": self.answer,
        }
        out.update(self.extra)
        if self.meta:
            out["meta"] = self.meta
        return out

    def to_ftrl(self, keep_meta: bool = True) -> dict[str, Any]:
        """FTRL's encoding: `tools`, `codes`, `unsolved_set` as JSON strings, field order as in FTRL's files."""
        out = self.to_dict()
        for name in _JSON_STRING_FIELDS:
            out[name] = json.dumps(out[name], ensure_ascii=False)
        if not keep_meta:
            out.pop("meta", None)
        return out

    def copy(self) -> EnvRecord:
        return copy.deepcopy(self)


def read_envs(path: str | Path) -> list[EnvRecord]:
    """Read a JSONL (ours or FTRL's) or parquet file of environment records."""
    path = Path(path)
    if not path.exists():
        raise EnvFormatError(f"no such file: {path}")
    if path.is_dir():
        raise EnvFormatError(
            f"{path} is a directory; name a .jsonl or .parquet file (e.g. {path}/test.jsonl)"
        )
    if path.suffix == ".parquet":
        import pandas as pd

        try:
            rows = pd.read_parquet(path).to_dict(orient="records")
        except Exception as exc:  # pyarrow raises many types for a bad file
            raise EnvFormatError(f"{path} is not a readable parquet file: {exc}") from None
        return [EnvRecord.from_dict(_numpy_to_python(row)) for row in rows]
    records = []
    with path.open("rb") as handle:
        for lineno, raw in enumerate(handle, 1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as exc:
                raise EnvFormatError(
                    f"{path}:{lineno}: not UTF-8 text (byte 0x{raw[exc.start]:02x}); environment files are UTF-8 JSON Lines"
                ) from None
            if not line.strip():
                continue
            try:
                data = json.loads(line)
            except json.JSONDecodeError as exc:
                raise EnvFormatError(_not_json_lines(path, lineno, exc)) from None
            try:
                records.append(EnvRecord.from_dict(data))
            except EnvFormatError as exc:
                raise EnvFormatError(f"{path}:{lineno}: {exc}") from None
    if not records:
        raise EnvFormatError(f"{path} holds no environment records")
    return records


def _not_json_lines(path: Path, lineno: int, exc: json.JSONDecodeError) -> str:
    """Why a line did not parse: a whole JSON document (a manifest, a pretty-printed record) is not JSON Lines."""
    try:
        json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError):
        return f"{path}:{lineno}: not valid JSON ({exc.msg})"
    return (
        f"{path} is one JSON document, not JSON Lines (one environment record per line); "
        "name an environment set's test.jsonl or train.jsonl"
    )


def limited(records: Sequence[EnvRecord], limit: int | None) -> list[EnvRecord]:
    """What `--limit N` means in every command: N records balanced over scenarios (`balanced_slice`); all of
    them when `limit` is None or 0. A file's first records are often all of one scenario."""
    return balanced_slice(records, limit) if limit else list(records)


def balanced_slice(records: Sequence[EnvRecord], count: int) -> list[EnvRecord]:
    """The first `count` records taken round-robin over scenarios: a fixed, balanced held-out slice."""
    by_scenario: dict[str, list[EnvRecord]] = {}
    for record in records:
        by_scenario.setdefault(record.scenario, []).append(record)
    out: list[EnvRecord] = []
    queues = [list(v) for _, v in sorted(by_scenario.items())]
    while len(out) < count and any(queues):
        for queue in queues:
            if queue and len(out) < count:
                out.append(queue.pop(0))
    return out


def write_envs(records: Iterable[EnvRecord], path: str | Path, ftrl_encoding: bool = True) -> Path:
    """Write JSONL deterministically (stable key order, no timestamps) so equal seeds give equal bytes."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    with tmp.open("w", encoding="utf-8") as handle:
        for record in records:
            row = record.to_ftrl() if ftrl_encoding else record.to_dict()
            handle.write(json.dumps(row, ensure_ascii=False) + "\n")
    tmp.replace(path)
    return path


def _numpy_to_python(value: Any) -> Any:
    """parquet rows come back with numpy arrays and scalars; turn them into plain JSON types."""
    if isinstance(value, dict):
        return {k: _numpy_to_python(v) for k, v in value.items()}
    if hasattr(value, "tolist"):
        return _numpy_to_python(value.tolist())
    if isinstance(value, list | tuple):
        return [_numpy_to_python(v) for v in value]
    return value
