"""Evaluate a method on LaMP users: fit, personalize, predict in batches across users, score, report.

A run lives in one folder: config.json (what was asked), states/ (each user's saved UserState), predictions.jsonl
(one line per answered query, appended and fsynced chunk by chunk), metrics.json and report.md. Running the same
command again on the same folder resumes: users whose state is saved are not personalized again, answered queries
are skipped, a line torn by a kill is cut off, and the final predictions equal an uninterrupted run's. Wall time is recorded per prediction line, so it survives resumes too.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

from tailor.backbone.loading import cache_root
from tailor.backbone.model import Backbone
from tailor.data.lamp import load_users
from tailor.data.schema import User
from tailor.data.splits import subset
from tailor.eval.metrics import compute_metrics
from tailor.eval.report import write_run_report
from tailor.eval.stats import bootstrap_ci
from tailor.methods import build_method
from tailor.methods.base import Personalizer
from tailor.store.state import UserState
from tailor.tasks.lamp import get_task
from tailor.textcache import text_key


class RunConflict(ValueError):
    """The output folder holds a run with a different configuration."""


@dataclass
class EvalSpec:
    """Everything that determines a run's predictions. Two runs with equal specs give equal predictions."""

    task: str
    method: str
    options: dict[str, Any] = field(default_factory=dict)
    model: str | None = "smollm2-135m"
    dtype: str = "float32"
    split: str = "dev"
    variant: str = "user"
    users: int | None = None
    seed: int = 0
    label: str | None = None
    data_dir: str | None = None


def _write_json(path: Path, data: dict) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")
    os.replace(tmp, path)


def _check_config(path: Path, config: dict) -> None:
    old = json.loads(path.read_text())
    volatile = {"data_dir", "label"}
    diffs = [k for k in sorted(set(old) | set(config)) if k not in volatile and old.get(k) != config.get(k)]
    if diffs:
        detail = "; ".join(f"{k}: {old.get(k)!r} -> {config.get(k)!r}" for k in diffs)
        raise RunConflict(f"{path.parent} holds a run with another configuration ({detail}); use a new --out")


def read_predictions(path: Path) -> list[dict]:
    """The complete lines of a predictions file; a torn last line (from a kill) is cut off the file."""
    if not path.exists():
        return []
    raw = path.read_bytes()
    good = raw.rfind(b"\n") + 1
    if good < len(raw):
        with path.open("r+b") as handle:
            handle.truncate(good)
    return [json.loads(line) for line in raw[:good].splitlines() if line.strip()]


class _Appender:
    def __init__(self, path: Path):
        self.handle = path.open("a", encoding="utf-8")

    def write(self, rows: Sequence[dict]) -> None:
        self.handle.write("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
        self.handle.flush()
        os.fsync(self.handle.fileno())

    def close(self) -> None:
        self.handle.close()


def _eval_users(spec: EvalSpec) -> list[User]:
    return subset(load_users(spec.task, spec.split, spec.data_dir, spec.variant), spec.users, spec.seed)


def run_eval(spec: EvalSpec, out_dir: str | Path, backbone: Backbone | None = None,
             method: Personalizer | None = None, chunk_users: int = 16,
             progress: Callable[[str, int, int], Callable[[int], None]] | None = None) -> dict:
    """Run (or resume) one evaluation and return its metrics.json content.

    `progress(description, done, total)` may return a callback that is told how many queries finished.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    task = get_task(spec.task)
    users = _eval_users(spec)
    config = {**asdict(spec), "task": task.name}
    if method is None:
        method = build_method(spec.method, task, backbone, **spec.options)
    config.update(method=method.name, method_config=method.describe(), mode=getattr(method, "mode", "prior"),
                  model=method.model_id, users=len(users))
    config_path = out / "config.json"
    if config_path.exists():
        _check_config(config_path, config)
    else:
        _write_json(config_path, config)

    predictions_path = out / "predictions.jsonl"
    done = {row["query_id"] for row in read_predictions(predictions_path)}
    todo = [u for u in users if any(q.id not in done for q in u.queries)]
    total = sum(len(u.queries) for u in users)
    fit_s = 0.0
    if todo:
        started = time.perf_counter()
        fit_method(method, load_users(task, "train", spec.data_dir, spec.variant), progress)
        fit_s = time.perf_counter() - started
        tick = progress(f"{task.name} {method.name}", total - sum(len(u.queries) for u in todo), total) \
            if progress else None
        appender = _Appender(predictions_path)
        try:
            for start in range(0, len(todo), chunk_users):
                _run_chunk(method, todo[start:start + chunk_users], done, appender, tick, out / "states")
        finally:
            appender.close()
    return finalize(out, spec, fit_s)


def fit_folder(method: Personalizer, users: Sequence[User]) -> Path:
    """Where a fitted method is kept: one folder per (method config, backbone, task, training users)."""
    key = text_key("fit", method.describe(), method.model_id, method.task.name, [u.id for u in users])
    return cache_root() / "fits" / method.name / key[:20]


def fit_method(method: Personalizer, users: Sequence[User],
               progress: Callable[[str, int, int], Callable[[int], None]] | None = None) -> Path | None:
    """Fit on the training users, or load the fit a previous run cached for exactly this configuration."""
    if not method.fits:
        method.fit(users)
        return None
    folder = fit_folder(method, users)
    if (folder / "DONE").exists():
        method.load_fit(folder)
        return folder
    folder.mkdir(parents=True, exist_ok=True)
    tick = progress(f"fit {method.name}", 0, len(users)) if progress else None
    method.fit(users, progress=tick, workdir=folder)
    method.save_fit(folder)
    (folder / "DONE").write_text(json.dumps({"users": len(users), "method": method.describe()}, indent=2))
    return folder


def state_path(folder: Path, user_id: str) -> Path:
    """A file name for a user's state that no user id can escape from (ids are not trusted to be path-safe)."""
    safe = user_id if re.fullmatch(r"[A-Za-z0-9_.-]{1,80}", user_id) and not user_id.startswith(".") \
        else "u-" + hashlib.sha256(user_id.encode()).hexdigest()[:32]
    return folder / f"{safe}.safetensors"


def personalize_with_states(method: Personalizer, users: Sequence[User], folder: Path) -> list[UserState]:
    """States for users, reusing those saved in `folder` by an earlier (perhaps killed) run and saving new ones.

    Each new state records its own personalize time in its header, so wall time survives a resume.
    """
    states: dict[str, UserState] = {}
    for user in users:
        path = state_path(folder, user.id)
        if path.exists():
            states[user.id] = UserState.load(path, method=method.name, version=method.version,
                                             model_id=method.model_id)
    missing = [u for u in users if u.id not in states]
    if missing:
        started = time.perf_counter()
        fresh = method.personalize_many(missing)
        per_user = (time.perf_counter() - started) / len(missing)
        for user, state in zip(missing, fresh):
            state.header["personalize_s"] = round(per_user, 5)
            state.save(state_path(folder, user.id))
            states[user.id] = state
    return [states[u.id] for u in users]


def _run_chunk(method: Personalizer, users: Sequence[User], done: set[str], appender: _Appender,
               tick: Callable[[int], None] | None, states_dir: Path) -> None:
    states = personalize_with_states(method, users, states_dir)
    requests = [(state, q) for state, u in zip(states, users) for q in u.queries if q.id not in done]
    started = time.perf_counter()
    predictions = method.predict(requests, progress=None)
    per_query = (time.perf_counter() - started) / max(len(requests), 1)
    queries_of = {s.user_id: sum(1 for t, _ in requests if t is s) for s in states}
    rows = []
    for (state, query), prediction in zip(requests, predictions):
        rows.append({"user_id": state.user_id, "query_id": query.id, "prediction": prediction.text,
                     "gold": query.gold, "mode": prediction.mode, "predict_s": round(per_query, 5),
                     "personalize_s": round(state.header["personalize_s"] / queries_of[state.user_id], 5),
                     "state_bytes": state.nbytes})
    appender.write(rows)
    if tick:
        tick(len(rows))


def finalize(out: Path, spec: EvalSpec, fit_s: float = 0.0) -> dict:
    """Score the predictions of a finished run, write metrics.json and report.md."""
    task = get_task(spec.task)
    rows = read_predictions(out / "predictions.jsonl")
    expected = {q.id for u in _eval_users(spec) for q in u.queries}
    seen = [r["query_id"] for r in rows]
    if len(seen) != len(set(seen)):
        raise RuntimeError(f"{out}/predictions.jsonl has duplicate query ids")
    missing = expected - set(seen)
    if missing:
        raise RuntimeError(f"{out}: {len(missing)} queries have no prediction yet; run the same command again")
    rows = [r for r in rows if r["query_id"] in expected]
    preds, golds, user_ids = [r["prediction"] for r in rows], [r["gold"] for r in rows], [r["user_id"] for r in rows]
    values = compute_metrics(task, preds, golds)
    cis = bootstrap_ci(task, preds, golds, user_ids, seed=spec.seed)
    n_users = len(set(user_ids))
    metrics = {
        "task": task.name, "method": spec.method, "label": spec.label or spec.method,
        "mode": rows[0]["mode"] if rows else None, "n_users": n_users, "n_queries": len(rows),
        "metrics": {k: {"value": v, "ci": list(cis[k])} for k, v in values.items()},
        "wall_time_s": round(sum(r["predict_s"] + r["personalize_s"] for r in rows) + fit_s, 3),
        "predict_s_per_query": round(sum(r["predict_s"] for r in rows) / max(len(rows), 1), 5),
        "personalize_s_per_user": round(sum(r["personalize_s"] for r in rows) / max(n_users, 1), 5),
        "state_bytes_per_user": round(sum(r["state_bytes"] for r in rows) / max(len(rows), 1)),
        "fit_s": round(fit_s, 3),
    }
    _write_json(out / "metrics.json", metrics)
    write_run_report(out)
    return metrics
