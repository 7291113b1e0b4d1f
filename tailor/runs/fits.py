"""The fit cache: what a method learns from training users, fitted once and reused by every run, worker and server.

A fitted method is kept in one folder per (what the fit depends on, backbone, dtype, the task's whole definition, the
training users' content) under
$TAILOR_CACHE/fits/<method>/. The fit runs with that folder as its workdir, so a killed fit resumes from its
checkpoint (`tailor.methods.checkpoint`); `DONE` marks a folder whose fit is complete, with its seconds and the cores
other processes used meanwhile (`tailor.runs.contention`: seconds measured while they did are not speed figures). A
method that builds on another fitted method (OPPU on MT-LoRA) names it in `prerequisites()`, and that one is fitted,
or loaded, from its own folder first: runs of both methods share one fit.
"""

from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path
from typing import Callable, NamedTuple, Sequence

from tailor.backbone.loading import cache_root
from tailor.backbone.textcache import text_key
from tailor.methods.base import Personalizer
from tailor.methods.checkpoint import Checkpoint
from tailor.runs.contention import Watch
from tailor.runs.spec import EvalSpec, fit_users
from tailor.tasks.records import User

ProgressFactory = Callable[[str, int, int], Callable[[int], None]]
"""`progress(description, done, total)` returns a callback told how many more units finished (a progress bar)."""


def fit_folder(method: Personalizer, users: Sequence[User]) -> Path:
    """Where a fitted method is kept. The key holds the task's every field and a digest of the users' records, not
    just their names, so that an edited task file or users file is fitted afresh rather than served a stale fit.
    Links are resolved: a run whose cache links `fits/` to a shared one (the leaderboard's) records the folder that
    outlives it."""
    backbone = method.backbone
    content = hashlib.sha256()
    for user in users:
        content.update(repr(user).encode())
    key = text_key("fit", method.fit_settings(), method.model_id, str(backbone.dtype) if backbone else None,
                   repr(method.task), content.hexdigest())
    return (cache_root() / "fits").resolve() / method.name / key[:20]


def fit_method(method: Personalizer, users: Sequence[User], progress: ProgressFactory | None = None) -> list[Path]:
    """Fit on the training users, or load the fit an earlier run cached for exactly this configuration. Returns the
    cache folders of every fit the method uses, its prerequisites' first (none for a method that fits nothing)."""
    folders = [f for needed in method.prerequisites() for f in fit_method(needed, users, progress)]
    if not method.fits:
        method.fit(users)
        return folders
    folder = fit_folder(method, users)
    folders.append(folder)
    if (folder / "DONE").exists():
        method.load_fit(folder)
        return folders
    folder.mkdir(parents=True, exist_ok=True)
    bar = progress(f"fit {method.name}", 0, len(users)) if progress else None
    ticked = 0

    def tick(n: int) -> None:
        nonlocal ticked
        ticked += n
        bar(n)  # type: ignore[misc]

    watch = Watch()
    method.fit(users, progress=tick if bar else None, workdir=folder)
    if bar and ticked < len(users):  # a fit whose work was cached elsewhere ticks less or not at all
        bar(len(users) - ticked)
    method.save_fit(folder)
    Checkpoint.discard(folder)
    seconds, others = watch.seconds(), watch.others()
    done = {"users": len(users), "method": method.describe(), "seconds": round(seconds, 3),
            "other_cores": None if others is None else round(others, 3)}
    if (numbers := method.fitted_numbers()) is not None:
        done["parameters"] = numbers
    (folder / "DONE").write_text(json.dumps(done, indent=2))
    return folders


def made_seconds(folders: Sequence[str | Path]) -> float | None:
    """What fitting once cost: the seconds the fits in `folders` took when they were made (a run that loads them
    spends only the loading, which is what its own fit seconds measure). A fit resumed from its checkpoint counts
    the last process only. None when a folder is gone or was made before its seconds were recorded."""
    total = 0.0
    for folder in folders:
        done = Path(folder) / "DONE"
        seconds = json.loads(done.read_text()).get("seconds") if done.exists() else None
        if seconds is None:
            return None
        total += seconds
    return total


class Fitted(NamedTuple):
    """A run's fit: the seconds it took (or loading it) and the cache folders of every fit the method uses, which the
    run records (fit_time.json) so a report can count what was learned without rebuilding the method."""

    seconds: float
    folders: list[str]


def fit_for_spec(method: Personalizer, spec: EvalSpec, progress: ProgressFactory | None = None) -> Fitted:
    """Fit `method` on the spec's training users (or load the cached fit)."""
    started = time.perf_counter()
    folders = fit_method(method, fit_users(spec), progress)
    return Fitted(time.perf_counter() - started, [str(f) for f in folders])
