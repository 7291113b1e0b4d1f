"""One run folder read back: its config, predictions and metrics (`load_run`), and its own report.md.

A run dir, as the runner writes it, holds config.json (task, method, optional display label, model, mode, ...),
predictions.jsonl (one {"user_id", "query_id", "prediction", "gold"} object per query) and metrics.json ({"metrics":
{name: {"value", "ci"}}, "wall_time_s", ...}). Reading one names the offending file, and line, when anything is
missing or malformed. The markdown helpers here are shared with the comparison reports of `tailor.eval.report`.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

from tailor.tasks.lamp import Task
from tailor.tasks.metrics import higher_is_better, metric_names, resolve_task

_PREDICTION_KEYS = ("user_id", "query_id", "prediction", "gold")


class RunDirError(ValueError):
    """A run dir is missing a file, or one of its files is not what the eval runner writes."""


@dataclass(frozen=True)
class Run:
    """One evaluation run dir, loaded."""

    path: Path
    config: dict[str, Any]
    predictions: list[dict[str, Any]]
    metrics: dict[str, Any]

    @property
    def task(self) -> Task:
        return resolve_task(self.config["task"])

    @property
    def label(self) -> str:
        """The name to show for the run: its configured display label, else its method."""
        return str(self.config.get("label") or self.config["method"])

    @property
    def mode(self) -> str:
        return str(self.config.get("mode") or self.metrics.get("mode") or "?")

    def metric(self, name: str) -> tuple[float | None, tuple[float, float] | None]:
        """A metric's recorded value and CI; None for whatever metrics.json does not hold."""
        entry = self.metrics["metrics"].get(name) or {}
        ci = entry.get("ci")
        return entry.get("value"), (float(ci[0]), float(ci[1])) if ci else None


def _read_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise RunDirError(f"{path}: file is missing")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise RunDirError(f"{path}: not valid JSON ({err})") from None
    if not isinstance(data, dict):
        raise RunDirError(f"{path}: expected a JSON object, got {type(data).__name__}")
    return data


def _read_predictions(path: Path) -> list[dict[str, Any]]:
    if not path.is_file():
        raise RunDirError(f"{path}: file is missing")
    records = []
    seen: set[str] = set()
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as err:
            raise RunDirError(f"{path}, line {number}: not valid JSON ({err})") from None
        missing = [k for k in _PREDICTION_KEYS if not isinstance(record, dict) or k not in record]
        if missing:
            raise RunDirError(f"{path}, line {number}: missing {', '.join(missing)}")
        query_id = str(record["query_id"])
        if query_id in seen:
            raise RunDirError(f"{path}, line {number}: query_id {query_id!r} appears twice")
        seen.add(query_id)
        records.append(record)
    if not records:
        raise RunDirError(f"{path}: holds no predictions")
    return records


def _require(data: dict[str, Any], keys: Sequence[str], path: Path) -> None:
    missing = [k for k in keys if k not in data]
    if missing:
        raise RunDirError(f"{path}: missing {', '.join(missing)}")


def load_run(run_dir: str | Path, predictions: bool = True) -> Run:
    """Read a run dir, naming the offending file when it is missing or malformed. Without `predictions` the run's
    predictions list is left empty: a one-run report needs only the config and the metrics, and a run of many users
    has many prediction lines."""
    path = Path(run_dir)
    if not path.is_dir():
        raise RunDirError(f"{path}: run dir does not exist")
    config = _read_json(path / "config.json")
    _require(config, ("task", "method"), path / "config.json")
    try:
        resolve_task(config["task"])
    except KeyError as err:
        raise RunDirError(f"{path / 'config.json'}: {err.args[0]}") from None
    if not (path / "metrics.json").is_file():
        raise RunDirError(f"{path}: the run is not finished (no metrics.json yet); rerun its `tailor eval` command, "
                          "which resumes it, or wait for the process writing it")
    metrics = _read_json(path / "metrics.json")
    _require(metrics, ("metrics",), path / "metrics.json")
    if not isinstance(metrics["metrics"], dict):
        raise RunDirError(f"{path / 'metrics.json'}: \"metrics\" must map metric names to {{value, ci}}")
    rows = _read_predictions(path / "predictions.jsonl") if predictions else []
    return Run(path=path, config=config, predictions=rows, metrics=metrics)



# --- formatting -------------------------------------------------------------------------------------------------------
def cell(text: object) -> str:
    """Text safe inside a markdown table cell."""
    return str(text).replace("|", "\\|").replace("\n", " ")


def metric_header(metric: str) -> str:
    return f"{metric} {'↑' if higher_is_better(metric) else '↓'}"


def value_with_ci(run: Run, metric: str) -> str:
    value, ci = run.metric(metric)
    if value is None:
        return "n/a"
    return f"{value:.4f} [{ci[0]:.4f}, {ci[1]:.4f}]" if ci else f"{value:.4f}"


def wall_time(run: Run) -> str:
    """The run's seconds: its fit, its users' personalize and its queries' predict seconds (`wall_time_s`). Not the
    elapsed time: a resumed run counts every part once, and a swapped control that borrowed its states counts the
    personalize seconds their lender measured, what the control would cost on its own."""
    seconds = run.metrics.get("wall_time_s")
    return "n/a" if seconds is None else f"{float(seconds):.1f} s"


def table(header: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(cell(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def write_run_report(run_dir: str | Path) -> Path:
    """Write run_dir/report.md (configuration, metrics with CIs, size and run seconds) and return its path."""
    run = load_run(run_dir, predictions=False)
    settings = [(key, json.dumps(value) if isinstance(value, (dict, list)) else value)
                for key, value in run.config.items()]
    sizes = [("users", run.metrics.get("n_users", "n/a")), ("queries", run.metrics.get("n_queries", "n/a")),
             ("run s (fit + personalize + predict)", wall_time(run))]
    metric_rows = [(metric_header(m), value_with_ci(run, m)) for m in metric_names(run.task)]
    text = "\n\n".join([
        f"# {run.task.name}: {run.label}",
        "## Configuration", table(["setting", "value"], settings),
        "## Metrics", table(["metric", "value [CI]"], metric_rows),
        "## Run", table(["measure", "value"], sizes),
    ]) + "\n"
    out = run.path / "report.md"
    out.write_text(text, encoding="utf-8")
    return out

