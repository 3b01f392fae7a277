"""Reporting: results.json (results.py), text tables (tables.py), PNG plots (plots.py), and
the per-run report the trainer writes / the CLI prints (run_report.py).

plots.py imports matplotlib; import it explicitly: `from segpcl_fast.report import plots`.
"""
from .results import build_results, collect_versions, read_results, write_results
from .run_report import format_run_summary, results_row, write_run_report
from .tables import format_accuracy_matrix, format_metrics_table, format_table, mean_std, metric_columns, plus_minus

__all__ = ["build_results", "collect_versions", "read_results", "write_results",
           "format_run_summary", "results_row", "write_run_report",
           "format_accuracy_matrix", "format_metrics_table", "format_table", "mean_std", "metric_columns",
           "plus_minus"]
