"""Ship a train-base run as the embedded base: `python -m toolrl_analysis.training.ship_base RUN/base`.

Copies the run's chosen `base.pt` into the package (`toolrl_analysis/data/embedded/`, see models/embedded.py),
stored in `dtype` (bf16 halves the file; stored in bf16, the shipped base's validation Solve-F1 and role NLLs
moved by under 0.001, but it ships in float32, the weights every committed result was measured with), and writes
`manifest.json`: the recipe, the environment build it followed, fingerprints of the tokenizer and chat
template, the validation curves, the chosen step and why, and the run's wall time.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from toolrl_analysis.errors import UserError
from toolrl_analysis.io import file_sha256, read_json_object
from toolrl_analysis.models.embedded import BASE_FILE, EMBEDDED_DIR, MANIFEST_FILE

MANIFEST_FORMAT = "toolrl-analysis.embedded/1"


def ship(run_dir: str | Path, dest: Path = EMBEDDED_DIR, dtype: str = "float32") -> dict[str, Any]:
    """Write `dest/base.pt` and `dest/manifest.json` from a finished train-base run directory."""
    import pandas as pd
    import torch

    from toolrl_analysis.models.checkpoint import load_policy, save_policy

    run_dir = Path(run_dir)
    summary_path = run_dir / "train_base.json"
    if not summary_path.is_file():
        raise UserError(f"{run_dir} is not a finished train-base run (no train_base.json)")
    summary = read_json_object(summary_path, UserError)
    if dtype not in ("float32", "bfloat16"):
        raise UserError(f"dtype must be float32 or bfloat16, got {dtype!r}")
    model, tokenizer = load_policy(run_dir / "base.pt")
    model.to(getattr(torch, dtype))
    dest.mkdir(parents=True, exist_ok=True)
    save_policy(model, tokenizer, dest / BASE_FILE)
    build = {}
    manifest_path = run_dir.parent / "envs" / "manifest.json"
    if manifest_path.is_file():
        build = read_json_object(manifest_path, UserError).get("config", {})
    validation = run_dir / "validation.csv"
    manifest = {
        "format": MANIFEST_FORMAT,
        "recipe": summary["config"],
        "envs_seed": summary.get("envs_seed"),
        "envs_config": build,
        "fingerprint": summary["fingerprint"],
        "parameters": summary["parameters"],
        "dtype": dtype,
        "chosen_step": summary["chosen_step"],
        "chosen_because": summary["chosen_because"],
        "chosen_validation": summary["chosen_validation"],
        "validation": json.loads(pd.read_csv(validation).to_json(orient="records"))
        if validation.is_file()
        else [],
        "train_seconds": summary["train_seconds"],
        "total_seconds": summary["seconds"],
        "torch": torch.__version__,
        "base_sha256": file_sha256(dest / BASE_FILE),
    }
    (dest / MANIFEST_FILE).write_text(json.dumps(manifest, indent=1) + "\n", encoding="utf-8")
    return manifest


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m toolrl_analysis.training.ship_base", description=__doc__)
    parser.add_argument("run", help="a finished train-base run directory (holding base.pt, train_base.json)")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    args = parser.parse_args(argv)
    try:
        manifest = ship(args.run, dtype=args.dtype)
    except UserError as exc:
        print(f"ship_base: error: {exc}", file=sys.stderr)
        return 2
    print(f"shipped step {manifest['chosen_step']} ({manifest['dtype']}) to {EMBEDDED_DIR}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
