"""report.md and the figures of a `reproduce` run, from the run's saved files alone (no model runs).

tables    the saved files read back as tables, with bootstrap intervals;
verdicts  the paper's four claims, each judged by a stated rule from the numbers and their intervals;
figures   every figure, byte-identical for the same run;
markdown  report.md, section by section as the paper.
"""

from toolrl_analysis.report.figures import write_figures
from toolrl_analysis.report.markdown import report_document, write_report
from toolrl_analysis.report.verdicts import CLAIMS, RULES, Verdict, judge_all

__all__ = ["CLAIMS", "RULES", "Verdict", "judge_all", "report_document", "write_figures", "write_report"]
