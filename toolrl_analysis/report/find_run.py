"""Which `reproduce` run a notebook reads: `TOOLRL_RUN`, found wherever Jupyter started the kernel.

The README writes `TOOLRL_RUN=runs/embedded`, relative to the repository; Jupyter runs a notebook's kernel in
`notebooks/`. So a relative path is looked up from the working directory and then from each directory above
it. Unset, the notebook says that it builds a planted pair instead; set but not found, it stops and says
where it looked, rather than silently analysing something else.
"""

from __future__ import annotations

import os
from pathlib import Path

from toolrl_analysis.errors import UserError

VARIABLE = "TOOLRL_RUN"


def notebook_run(needed: str, start: Path | None = None) -> Path | None:
    """The run directory holding `needed` (a file a notebook reads, e.g. "ablate/variants.csv"), or None when
    `TOOLRL_RUN` is unset (the notebook then builds a planted pair, and this says so)."""
    value = os.environ.get(VARIABLE, "").strip()
    if not value:
        print(
            f"{VARIABLE} is not set: this notebook builds a planted pair (a known answer), not a reproduce run."
        )
        return None
    given = Path(value).expanduser()
    start = Path.cwd() if start is None else Path(start)
    candidates = [given] if given.is_absolute() else [base / given for base in (start, *start.parents)]
    for candidate in candidates:
        if (candidate / needed).is_file():
            print(f"reading the run in {candidate.resolve()}")
            return candidate.resolve()
    looked = ", ".join(str(c) for c in candidates[:3]) + (" and above" if len(candidates) > 3 else "")
    raise UserError(
        f"{VARIABLE}={value}: no {needed} in {looked}; run `toolrl-analyze reproduce --out {value}` first"
    )
