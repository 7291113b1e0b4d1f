"""A run folder on disk: its config.json, its one writer, its append-only predictions file and its fit time.

A run lives in one folder: config.json (what was asked), states/ (each user's saved UserState), predictions.jsonl
(one line per answered query, appended and fsynced chunk by chunk), metrics.json and report.md. Running the same
command again on the same folder resumes: answered queries are skipped, a line torn by a kill is cut off, and a
folder holding a run of another configuration is refused instead of mixed. A run that fails before it writes
anything (a fit that raises) takes the folder it made away again: only runs that started leave one.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
from contextlib import contextmanager
from dataclasses import asdict
from pathlib import Path
from typing import Any, Iterator, Sequence

from tailor.atomic import write_json
from tailor.backbone.device import describe_device, dtype_name
from tailor.methods import method_class
from tailor.methods.base import Personalizer
from tailor.runs.spec import EvalSpec, spec_defaults
from tailor.tasks.lamp import get_task, task_file

UNSTARTED = {".lock", "config.json"}
"""What a run folder holds before the run has written anything of its own."""


class RunConflict(ValueError):
    """The output folder holds a run with a different configuration."""


VOLATILE = frozenset({"data_dir", "data", "train_data", "label", "device", "hardware"})
"""config.json keys that may differ between two processes of one run: a run may resume elsewhere."""
LENDER_ONLY = frozenset({"histories", "states_from"})
"""config.json keys in which a run that lends its states differs from its swapped-histories control."""


def recorded_config(path: Path) -> dict:
    """A run's config.json, with the default of every spec field and method option added after the run was made
    (absent means default)."""
    old = {**spec_defaults(EvalSpec), **json.loads(path.read_text())}
    if isinstance(old.get("method_config"), dict):
        try:
            defaults = spec_defaults(method_class(str(old.get("method"))).config_class)
        except KeyError:  # a method this install cannot import: compare the options as written
            defaults = {}
        old["method_config"] = {**defaults, **old["method_config"]}
    return old


def config_differences(old: dict, new: dict, ignore: frozenset[str] = frozenset()) -> list[str]:
    """The keys in which two run configurations differ, beyond VOLATILE ones and `ignore`."""
    volatile = VOLATILE | ignore
    if new.get("model") is None:
        volatile |= {"dtype"}  # a method without a backbone computes in no precision
    return [k for k in sorted(set(old) | set(new)) if k not in volatile and old.get(k) != new.get(k)]


def _check_config(path: Path, config: dict) -> None:
    old = recorded_config(path)
    diffs = config_differences(old, config)
    if diffs:
        detail = "; ".join(f"{k}: {old.get(k)!r} -> {config.get(k)!r}" for k in diffs)
        raise RunConflict(f"{path.parent} holds a run with another configuration ({detail}); use a new --out")


def _check_lender(lender: Path, config: dict) -> None:
    """A swapped-histories control may borrow states (`tailor.runs.borrow`) only from the run with own histories of
    its own configuration."""
    theirs = recorded_config(lender / "config.json")
    if theirs.get("histories") != "own":
        raise RunConflict(f"--states-from {lender}: that run answers with {theirs.get('histories')!r} "
                          "histories; lend states from the run with own histories")
    diffs = config_differences(theirs, config, LENDER_ONLY)
    if diffs:
        detail = "; ".join(f"{k}: {theirs.get(k)!r} there, {config.get(k)!r} here" for k in diffs)
        raise RunConflict(f"--states-from {lender} is another configuration ({detail})")


def iter_predictions(path: Path) -> Iterator[dict]:
    """The complete lines of a jsonl file, one at a time; a torn last line (from a kill) is first cut off the file."""
    if not path.exists():
        return
    with path.open("r+b") as handle:
        end = handle.seek(0, os.SEEK_END)
        good = end
        while good > 0:  # back to the last newline, a block at a time
            start = max(0, good - 65536)
            handle.seek(start)
            block = handle.read(good - start)
            if b"\n" in block:
                good = start + block.rindex(b"\n") + 1
                break
            good = start
        if good < end:
            handle.truncate(good)
    with path.open("rb") as handle:
        for line in handle:
            if line.strip():
                yield json.loads(line)


def read_predictions(path: Path) -> list[dict]:
    """The complete lines of a predictions file as a list (see `iter_predictions`)."""
    return list(iter_predictions(path))


class Appender:
    """The single writer of a predictions file: each write is one chunk's lines, flushed and fsynced, so a kill loses
    at most the chunk being written (and `read_predictions` cuts its torn line)."""

    def __init__(self, path: Path):
        self.handle = path.open("a", encoding="utf-8")

    def write(self, rows: Sequence[dict]) -> None:
        self.handle.write("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
        self.handle.flush()
        os.fsync(self.handle.fileno())

    def close(self) -> None:
        self.handle.close()


def method_identity(method: Personalizer) -> dict[str, Any]:
    """What config.json records about a built method, computed wherever the method lives (here or in a worker): the
    device and precision its backbone resolved to, and the hardware behind the device."""
    backbone = method.backbone
    return {"method": method.name, "method_config": method.describe(), "mode": getattr(method, "mode", "prior"),
            "model": method.model_id, "device": str(backbone.device) if backbone else None,
            "dtype": dtype_name(backbone.dtype) if backbone else None,
            "hardware": describe_device(backbone.device) if backbone else None}


@contextmanager
def run_lock(out: Path) -> Iterator[None]:
    """Let one process at a time write a run folder: two appending answers to one predictions file would leave
    duplicates that the run cannot be finalized from. A folder made here is removed again if the run fails before
    writing anything into it (config.json aside), so a run that cannot start leaves no folder behind."""
    made = not out.exists()
    out.mkdir(parents=True, exist_ok=True)
    try:
        with open(out / ".lock", "w") as handle:
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                raise RunConflict(f"{out} is being written by another running evaluation; wait for it or use a new "
                                  "--out") from None
            yield
    except BaseException:
        if made and {p.name for p in out.iterdir()} <= UNSTARTED:
            for name in UNSTARTED:
                (out / name).unlink(missing_ok=True)
            out.rmdir()
        raise


def task_identity(name: str) -> dict[str, Any]:
    """How config.json names a run's task: LaMP's by name; a task file by its absolute path, which `tailor report`
    reads it back from, and a digest of what it defines, so a resumed run whose file was edited is refused."""
    task = get_task(name)
    path = task_file(name)
    if path is None:
        return {"task": task.name}
    digest = hashlib.sha256(json.dumps(asdict(task), sort_keys=True).encode()).hexdigest()[:16]
    return {"task": str(path.resolve()), "task_digest": digest}


def open_run(spec: EvalSpec, out: Path, identity: dict[str, Any], n_users: int) -> None:
    """Create the run folder and its config.json, or check that the folder holds a run of the same configuration;
    for a control that borrows states (`spec.states_from`), first check that the lender is the same run."""
    config = {**asdict(spec), **task_identity(spec.task), **identity, "users": n_users}
    if ":" in spec.method:  # a method outside tailor: keep the import path that builds it again, not just its name
        config["method"] = spec.method
    if spec.states_from:
        _check_lender(Path(spec.states_from), config)
    out.mkdir(parents=True, exist_ok=True)
    config_path = out / "config.json"
    if config_path.exists():
        _check_config(config_path, config)
    else:
        write_json(config_path, config)


def answered_queries(out: Path) -> set[str]:
    """Query ids already in the run's predictions.jsonl (cutting a torn last line)."""
    return {row["query_id"] for row in iter_predictions(out / "predictions.jsonl")}


def record_fit_time(out: Path, seconds: float, folders: Sequence[str] = ()) -> None:
    """Add one process's fit time to the run's fit_time.json, with the fit cache folders the method used
    (`tailor.runs.fits.Fitted`): a resumed run, or the same command run again after it finished, keeps the time
    the first process spent fitting instead of replacing it."""
    write_json(out / "fit_time.json", {"seconds": round(recorded_fit_time(out) + seconds, 3), "fits": list(folders)})


def recorded_fit_time(out: Path) -> float:
    """The fit seconds the run's processes have recorded so far (0 for a method that fits nothing)."""
    path = out / "fit_time.json"
    return float(json.loads(path.read_text())["seconds"]) if path.exists() else 0.0

