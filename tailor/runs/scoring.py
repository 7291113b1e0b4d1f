"""Scoring a finished run: its predictions against the golds, with bootstrap intervals over users, into
metrics.json and report.md.

Only what scoring needs is kept per row, so scoring a run of many users holds a few strings per query. Wall time is
summed from the prediction lines (each records its own predict and personalize seconds) and the recorded fit time,
so it survives resumes.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Iterable

from tailor.atomic import write_json
from tailor.runs.folder import iter_predictions, recorded_fit_time
from tailor.runs.record import write_run_report
from tailor.runs.spec import EvalSpec, run_users
from tailor.tasks.lamp import get_task
from tailor.tasks.metrics import compute_metrics
from tailor.tasks.stats import bootstrap_ci

def finalize(out: Path, spec: EvalSpec, query_ids: Iterable[str] | None = None) -> dict:
    """Score the predictions of a finished run (its `query_ids`, by default read from the data), write metrics.json
    and report.md."""
    task = get_task(spec.task)
    fit_s = recorded_fit_time(out)
    expected = set(run_users(spec).query_ids if query_ids is None else query_ids)
    # Only what scoring needs is kept per row, so scoring a run of many users holds a few strings per query.
    seen: set[str] = set()
    preds, golds, user_ids = [], [], []
    predict_s = personalize_s = state_bytes = 0.0
    mode: str | None = None
    for row in iter_predictions(out / "predictions.jsonl"):
        if row["query_id"] in seen:
            raise RuntimeError(f"{out}/predictions.jsonl has duplicate query ids")
        seen.add(row["query_id"])
        if row["query_id"] not in expected:
            continue
        preds.append(row["prediction"])
        golds.append(row["gold"])
        user_ids.append(row["user_id"])
        predict_s += row["predict_s"]
        personalize_s += row["personalize_s"]
        state_bytes += row["state_bytes"]
        mode = row["mode"]
    missing = expected - seen
    if missing:
        raise RuntimeError(f"{out}: {len(missing)} queries have no prediction yet; run the same command again")
    values = compute_metrics(task, preds, golds)
    cis = bootstrap_ci(task, preds, golds, user_ids, seed=spec.seed)
    n_users = len(set(user_ids))
    n_rows = len(preds)
    config = json.loads((out / "config.json").read_text())
    metrics = {
        "task": task.name, "method": spec.method, "label": spec.label or spec.method,
        "mode": mode, "n_users": n_users, "n_queries": n_rows,
        "protocol": f"tailor: LaMP's query and the last {spec.queries_per_user} history items per user"
                    if spec.queries_per_user else "LaMP: one query per user",
        **{key: config.get(key) for key in ("model", "device", "dtype", "hardware")},
        "metrics": {k: {"value": v, "ci": list(cis[k])} for k, v in values.items()},
        "wall_time_s": round(predict_s + personalize_s + fit_s, 3),
        "predict_s_per_query": round(predict_s / max(n_rows, 1), 5),
        "personalize_s_per_user": round(personalize_s / max(n_users, 1), 5),
        "state_bytes_per_user": round(state_bytes / max(n_rows, 1)),
        "fit_s": round(fit_s, 3),
    }
    write_json(out / "metrics.json", metrics)
    write_run_report(out)
    return metrics

