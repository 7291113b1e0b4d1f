"""`tailor report`: finished runs compared in one table, with paired significance against a baseline."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer


def report_command(
    runs: Annotated[list[Path], typer.Argument(help="run folders to compare")],
    baseline: Annotated[Optional[str], typer.Option(help="label or method of the baseline (default: first)")] = None,
    out: Annotated[Optional[Path], typer.Option(help="write comparison.md and comparison.png here")] = None,
    costs: Annotated[bool, typer.Option(help="add a table of each run's fit seconds and per-user cost "
                                             "(personalize mean/p95/max, state bytes, predict seconds)")] = False,
) -> None:
    """Compare runs in one table with paired-bootstrap significance against a baseline."""
    from tailor.eval.report import compare_runs

    print(compare_runs(runs, baseline=baseline, out_dir=out, costs=costs))
