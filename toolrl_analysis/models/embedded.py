"""The shipped embedded base: a small policy made by our own recipe, installed with the package.

Real tool-use research starts from an instruct model that someone else trained; the embedded default works the
same way. `toolrl_analysis/data/embedded/` holds `base.pt` (a self-contained policy: weights, config, tokenizer)
and `manifest.json` (the recipe's config, fingerprints of the tokenizer and chat template it was made with, the
environment seed, the validation role curves and Solve-F1). Wherever a MODEL, `--init` or checkpoint path is
accepted, the name `embedded` stands for that `base.pt`.

The manifest is how staleness is caught: if the code's tokenizer recipe or chat template changes, the shipped
weights no longer fit the code, and `stale_reasons` says to regenerate the base (`make base`).
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

from toolrl_analysis.errors import CheckpointError
from toolrl_analysis.io import read_json_object

EMBEDDED = "embedded"
EMBEDDED_DIR = Path(__file__).resolve().parent.parent / "data" / "embedded"
BASE_FILE = "base.pt"
MANIFEST_FILE = "manifest.json"
REGENERATE = "regenerate the base (make base)"


def is_embedded(spec: Any) -> bool:
    return isinstance(spec, str | Path) and str(spec) == EMBEDDED


def embedded_base_path(directory: Path = EMBEDDED_DIR) -> Path:
    path = directory / BASE_FILE
    if not path.is_file():
        raise CheckpointError(f"the embedded base is not installed ({path} is missing); {REGENERATE}")
    return path


def resolve_model(spec: str | Path) -> Path:
    """`embedded` -> the shipped base.pt; anything else unchanged."""
    return embedded_base_path() if is_embedded(spec) else Path(spec)


def read_manifest(directory: Path = EMBEDDED_DIR) -> dict[str, Any]:
    path = directory / MANIFEST_FILE
    if not path.is_file():
        raise CheckpointError(f"the embedded base has no manifest ({path}); {REGENERATE}")
    return read_json_object(path)


def _sha256(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def tokenizer_fingerprint(tokenizer: Any) -> dict[str, str]:
    """Hashes that change whenever the tokenizer's vocabulary, merges, pre-tokenizer or template change."""
    backend = tokenizer.backend_tokenizer.to_str() if hasattr(tokenizer, "backend_tokenizer") else ""
    return {
        "tokenizer_sha256": _sha256(backend),
        "chat_template_sha256": _sha256(str(getattr(tokenizer, "chat_template", "") or "")),
    }


def stale_reasons(manifest: dict[str, Any], current: dict[str, str]) -> list[str]:
    """What no longer matches between the shipped base's manifest and the code's current fingerprint."""
    recorded = manifest.get("fingerprint") or {}
    reasons = []
    for key, label in (("chat_template_sha256", "chat template"), ("tokenizer_sha256", "tokenizer")):
        if recorded.get(key) != current.get(key):
            reasons.append(f"the code's {label} no longer matches the shipped base: {REGENERATE}")
    return reasons
