"""Tables and plots built from run directories only (config.yaml, metrics.jsonl, summary.json).

``smclm table <dir>`` calls :func:`smclm.report.table.make_table`; ``smclm plot <dir>`` calls
:func:`smclm.report.plot.make_plots`.
"""

from smclm.report.table import NoRunsError, Run, find_runs, make_table

__all__ = ["NoRunsError", "Run", "find_runs", "make_table"]
