"""Evaluate a method in this process: fit, personalize, predict in batches across users, score, report.

`run_eval` drives the run's primitives (`tailor.runs`) locally, chunk after chunk, with the run folder locked against
a second writer; `tailor.distributed.ray_eval` drives the same chunks on Ray workers. Running the same command again
on the same folder resumes, and the final predictions equal an uninterrupted run's.
"""

from __future__ import annotations

from pathlib import Path

from tailor.backbone.model import Backbone
from tailor.methods import build_method
from tailor.methods.base import Personalizer
from tailor.runs.borrow import borrow_states
from tailor.runs.chunks import pending_chunks, process_chunk
from tailor.runs.fits import ProgressFactory, fit_for_spec
from tailor.runs.folder import Appender, answered_queries, method_identity, open_run, record_fit_time, run_lock
from tailor.runs.scoring import finalize
from tailor.runs.spec import EvalSpec, RunUsers, run_users
from tailor.tasks.lamp import get_task


def run_eval(spec: EvalSpec, out_dir: str | Path, backbone: Backbone | None = None,
             method: Personalizer | None = None, chunk_users: int = 16,
             progress: ProgressFactory | None = None) -> dict:
    """Run (or resume) one evaluation and return its metrics.json content.

    `progress(description, done, total)` may return a callback that is told how many queries finished.
    """
    spec.check()
    out = Path(out_dir)
    task = get_task(spec.task)
    users = run_users(spec)
    if method is None:
        method = build_method(spec.method, task, backbone, **spec.options)
    with run_lock(out):
        open_run(spec, out, method_identity(method), len(users))
        return _run_locked(spec, out, method, users, chunk_users, progress)


def _run_locked(spec: EvalSpec, out: Path, method: Personalizer, users: RunUsers, chunk_users: int,
                progress: ProgressFactory | None) -> dict:
    task = get_task(spec.task)
    answered = answered_queries(out)
    done = sum(q in answered for q in users.query_ids)
    if done < len(users.query_ids):
        fitted = fit_for_spec(method, spec, progress)
        record_fit_time(out, fitted.seconds, fitted.folders)
        if spec.states_from:
            borrow_states(spec, out)
        tick = progress(f"{task.name} {method.name}", done, len(users.query_ids)) if progress else None
        appender = Appender(out / "predictions.jsonl")
        try:
            for chunk in pending_chunks(users, chunk_users, answered):
                rows = process_chunk(method, chunk.users, out / "states", chunk.answered)
                appender.write(rows)
                if tick:
                    tick(len(rows))
        finally:
            appender.close()
    return finalize(out, spec, users.query_ids)

