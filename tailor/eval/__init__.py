"""Evaluation: LaMP's metrics, bootstrap uncertainty over users, and reports comparing runs."""

from tailor.eval.metrics import (
    NO_LABEL,
    ErrorScores,
    ItemScores,
    LabelScores,
    RougeScores,
    compute_metrics,
    higher_is_better,
    lamp3_value,
    metric_names,
    resolve_task,
    score_items,
)
from tailor.eval.report import Pairing, Run, RunDirError, compare_runs, load_run, write_run_report
from tailor.eval.stats import PairedResult, bootstrap_ci, bootstrap_distribution, paired_bootstrap, two_sided_p

__all__ = [
    "NO_LABEL",
    "ErrorScores",
    "ItemScores",
    "LabelScores",
    "Pairing",
    "PairedResult",
    "RougeScores",
    "Run",
    "RunDirError",
    "bootstrap_ci",
    "bootstrap_distribution",
    "compare_runs",
    "compute_metrics",
    "higher_is_better",
    "lamp3_value",
    "load_run",
    "metric_names",
    "paired_bootstrap",
    "resolve_task",
    "score_items",
    "two_sided_p",
    "write_run_report",
]
