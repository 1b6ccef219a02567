"""How every command writes its results: each table as CSV (and parquet where asked), then one JSON document,
made valid JSON by one cleaner. Evaluation, comparison, ablation and probing all write through here."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pandas as pd

from toolrl_analysis.errors import CheckpointError


def json_clean(value: Any) -> Any:
    """Plain JSON data: NaN and inf become null, numpy and pandas scalars Python numbers, tuples lists, and
    anything else JSON has no type for (a path, a dataclass) its text."""
    if isinstance(value, dict):
        return {str(k): json_clean(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [json_clean(v) for v in value]
    if value is None or value is pd.NA:
        return None
    if hasattr(value, "item") and not isinstance(value, str | bytes):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, str | int | float | bool):
        return value
    return str(value)


def json_records(frame: pd.DataFrame) -> list[dict[str, Any]]:
    """A table as a list of cleaned rows, for a JSON document."""
    return [json_clean(record) for record in frame.astype(object).to_dict(orient="records")]


def output_directory(out_dir: str | Path) -> Path:
    """`out_dir`, created if needed; a one-line error when it cannot be."""
    out = Path(out_dir)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise CheckpointError(f"cannot create output directory {out}: {exc.strerror or exc}") from None
    return out


def write_results(
    out_dir: str | Path,
    frames: dict[str, pd.DataFrame | None],
    document: dict[str, Any] | None = None,
    name: str = "results.json",
    parquet: bool = False,
) -> list[Path]:
    """Each frame that is not None as `<stem>.csv` (and `<stem>.parquet` with `parquet`), then `document`,
    cleaned, as `name`; the paths written, in that order."""
    out = output_directory(out_dir)
    written = []
    for stem, frame in frames.items():
        if frame is None:
            continue
        frame.to_csv(out / f"{stem}.csv", index=False)
        written.append(out / f"{stem}.csv")
        if parquet:
            frame.to_parquet(out / f"{stem}.parquet", index=False)
            written.append(out / f"{stem}.parquet")
    if document is not None:
        (out / name).write_text(json.dumps(json_clean(document), indent=1) + "\n", encoding="utf-8")
        written.append(out / name)
    return written
