"""Regenerate every figure of a reproduce run from its saved tables alone (no model runs), into figures/ (or
--out), and redraw the run's own figures and report.md. The same run gives byte-identical PNGs.

python figures/make_figures.py --run runs/embedded
"""

import argparse
import sys
import time
from pathlib import Path

from toolrl_analysis.report import write_figures, write_report


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", required=True, help="a directory written by `toolrl-analyze reproduce`")
    parser.add_argument("--out", default=str(Path(__file__).parent), help="where the PNGs go")
    args = parser.parse_args()
    if not Path(args.run).is_dir():
        parser.exit(2, f"make_figures: error: no run directory at {args.run}\n")
    started = time.perf_counter()
    written = write_figures(args.run, args.out)
    for path in written:
        print(path)
    write_figures(args.run)  # the run's own copy, which report.md links to
    print(write_report(args.run))
    print(f"{len(written)} figures in {time.perf_counter() - started:.1f}s", file=sys.stderr)


if __name__ == "__main__":
    main()
