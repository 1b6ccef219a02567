"""`python -m toolrl_analysis.cli`: the same as `toolrl-analyze`."""

import sys

from toolrl_analysis.cli import main

sys.exit(main())
