"""Evaluation in this process (`run_eval`) and reports comparing finished runs (`compare_runs`)."""

from tailor.eval.report import CompareError, Pairing, compare_runs, cost_table

__all__ = ["CompareError", "Pairing", "compare_runs", "cost_table"]
