"""`toolrl-analyze reproduce`: the whole chain on the embedded default, stage by stage, from files.

settings  what each stage runs with (the TOML configs, the default and `--quick` sizes, `--set` overrides);
stages    a stage's record of its inputs and configuration, and when it may be skipped or resumed;
chain     the stages in order, each calling the library function its command calls;
progress  the display across stages, with an ETA from stage timings, and the plain-line log;
run       `reproduce(...)`: the loop, then the figures and report.md.
"""

from toolrl_analysis.reproduce.run import EXPECTED_SECONDS, LOG_FILE, RUN_FILE, reproduce
from toolrl_analysis.reproduce.settings import AblateSettings, EvalSettings, load_settings
from toolrl_analysis.reproduce.stages import Decision, Stage, decide

__all__ = [
    "EXPECTED_SECONDS",
    "LOG_FILE",
    "RUN_FILE",
    "AblateSettings",
    "Decision",
    "EvalSettings",
    "Stage",
    "decide",
    "load_settings",
    "reproduce",
]
