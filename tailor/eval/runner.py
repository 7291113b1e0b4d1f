"""Evaluate a method on LaMP users: fit, personalize, predict in batches across users, score, report.

A run lives in one folder: config.json (what was asked), states/ (each user's saved UserState), predictions.jsonl
(one line per answered query, appended and fsynced chunk by chunk), metrics.json and report.md. Running the same
command again on the same folder resumes: users whose state is saved are not personalized again, answered queries
are skipped, a line torn by a kill is cut off, and the final predictions equal an uninterrupted run's. Wall time is
recorded per prediction line, so it survives resumes too.

The work is cut into chunks of users fixed by the user list and `chunk_users` alone, and each chunk is answered by
`process_chunk`. The local path calls it here, in-process; tailor.distributed calls the same function inside Ray
workers and writes the rows through the same `Appender`. So both paths batch identically and give the same
predictions, and a resumed run re-forms the chunks it had started with instead of shifting every later boundary.

Users are streamed, not loaded: a run knows its users' ids from one pass over the data file's ids (`RunUsers`), and
the chunks draw the users themselves from a second, streamed pass, so memory holds the chunks being worked on, not
every profile of a run over more users than fit in memory.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import re
import time
from contextlib import contextmanager
from dataclasses import MISSING, asdict, dataclass, field, fields
from functools import lru_cache
from itertools import count, islice
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Sequence

from tailor.atomic import write_json
from tailor.backbone.loading import cache_root
from tailor.backbone.model import Backbone
from tailor.data.lamp import SPLITS, VARIANTS, iter_users, load_users, question_ids, resolve_data_dir
from tailor.data.schema import User
from tailor.data.splits import ood_split, random_split, subset, subset_positions, swap_histories
from tailor.eval.metrics import compute_metrics
from tailor.eval.report import write_run_report
from tailor.eval.stats import bootstrap_ci
from tailor.methods import build_method, method_class
from tailor.methods.base import Personalizer
from tailor.store.state import UserState
from tailor.tasks.lamp import get_task
from tailor.textcache import text_key


class RunConflict(ValueError):
    """The output folder holds a run with a different configuration."""


USER_SPLITS = ("random", "ood")
"""Profile-to-PEFT's splits of the training file's users (paper section 4.1): fit on one part, answer the other."""
HISTORIES = ("own", "swapped")
"""Whose history a run's users are answered with (EvalSpec.histories)."""


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
    histories: str = "own"
    """"own", or "swapped": each user answered with another user's history (a seeded derangement of the run's users;
    `tailor.data.splits.swap_histories`), the control that must not help."""

    def check(self) -> None:
        """Fail on a bad task, split, variant, user count or data folder before a model loads or a folder is made.

        An unknown task raises KeyError and a missing data folder DataError (both name what exists); the rest
        raise ValueError."""
        get_task(self.task)
        if self.split not in SPLITS + USER_SPLITS:
            raise ValueError(f"unknown split {self.split!r}; expected one of {', '.join(SPLITS + USER_SPLITS)}")
        if self.variant not in VARIANTS:
            raise ValueError(f"unknown variant {self.variant!r}; expected one of {', '.join(VARIANTS)}")
        if self.histories not in HISTORIES:
            raise ValueError(f"{self.histories!r} is not one of {', '.join(HISTORIES)}")
        if self.users is not None and self.users < 1:
            raise ValueError(f"users must be at least 1 (or unset for all users), not {self.users}")
        resolve_data_dir(self.data_dir)


def _defaults(cls: type) -> dict[str, Any]:
    return {f.name: f.default for f in fields(cls) if f.default is not MISSING}


def _check_config(path: Path, config: dict) -> None:
    # A spec field or method option added after a run was made is absent from its config.json: absent means default.
    old = {**_defaults(EvalSpec), **json.loads(path.read_text())}
    if isinstance(old.get("method_config"), dict):
        try:
            defaults = _defaults(method_class(str(old.get("method"))).config_class)
        except KeyError:  # a method this install cannot import: compare the options as written
            defaults = {}
        old["method_config"] = {**defaults, **old["method_config"]}
    volatile = {"data_dir", "label"}
    diffs = [k for k in sorted(set(old) | set(config)) if k not in volatile and old.get(k) != config.get(k)]
    if diffs:
        detail = "; ".join(f"{k}: {old.get(k)!r} -> {config.get(k)!r}" for k in diffs)
        raise RunConflict(f"{path.parent} holds a run with another configuration ({detail}); use a new --out")


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


@dataclass(frozen=True)
class Chunk:
    """Users answered together: chunk `index` of the run's user list, minus users with nothing left to answer.

    `answered` holds the ids of this chunk's queries that are already in predictions.jsonl (from a resumed run).
    """

    index: int
    users: tuple[User, ...]
    answered: frozenset[str] = frozenset()


@dataclass(frozen=True)
class RunUsers:
    """The users of a run, in run order, without their profiles: the ids are known up front and every iteration
    streams the users again from the data file.

    LaMP gives each user one query with the user's id, so `query_ids` equals `ids` for streamed users. Runs that need
    every profile at once anyway hold a list (`RunUsers.of`): P2P's random and OOD splits cluster all training
    profiles, and swapped histories take each user's history from another user.
    """

    ids: tuple[str, ...]
    query_ids: tuple[str, ...]
    stream: Callable[[], Iterator[User]]

    def __iter__(self) -> Iterator[User]:
        return self.stream()

    def __len__(self) -> int:
        return len(self.ids)

    @classmethod
    def of(cls, users: Sequence[User]) -> "RunUsers":
        held = list(users)
        return cls(tuple(u.id for u in held), tuple(q.id for u in held for q in u.queries), lambda: iter(held))


def run_users(spec: EvalSpec) -> RunUsers:
    """The users a run answers (the same users, in the same order, as `eval_users`), streamed where they can be."""
    _check_histories(spec)
    if spec.split in USER_SPLITS or spec.histories == "swapped":
        return RunUsers.of(eval_users(spec))
    index = question_ids(spec.task, spec.split, spec.data_dir, spec.variant)
    positions = subset_positions(len(index.ids), spec.users, spec.seed)
    chosen = frozenset(positions)
    ids = tuple(index.ids[i] for i in positions)
    return RunUsers(ids, ids, lambda: iter_users(index, chosen))


def _check_histories(spec: EvalSpec) -> None:
    if spec.histories not in HISTORIES:
        raise ValueError(f"histories must be one of {', '.join(HISTORIES)}, not {spec.histories!r}")


def eval_users(spec: EvalSpec) -> list[User]:
    """The users a run answers, in file order, all in memory: the seeded subset of the split (with swapped histories
    if asked). Runs use `run_users`, which streams them."""
    _check_histories(spec)
    if spec.split in USER_SPLITS:
        users = subset(_user_split(spec.task, spec.data_dir, spec.variant, spec.split, spec.seed)[1], spec.users,
                       spec.seed)
    else:
        users = subset(load_users(spec.task, spec.split, spec.data_dir, spec.variant), spec.users, spec.seed)
    return swap_histories(users, spec.seed) if spec.histories == "swapped" else users


def fit_users(spec: EvalSpec) -> list[User]:
    """The users a method is fitted on: the training file, less the held-out users of a random or OOD split."""
    if spec.split in USER_SPLITS:
        return _user_split(spec.task, spec.data_dir, spec.variant, spec.split, spec.seed)[0]
    return load_users(spec.task, "train", spec.data_dir, spec.variant)


@lru_cache(maxsize=8)
def _user_split(task: str, data_dir: str | None, variant: str, split: str,
                seed: int) -> tuple[list[User], list[User]]:
    """(fit users, held-out users), clustered on an embedding of each user's whole history as the paper clusters
    profiles; the packaged sentence encoder keeps the split independent of the backbone under test."""
    from tailor.retrieval.embed import default_embedder

    users = load_users(task, "train", data_dir, variant)
    definition = get_task(task)
    texts = ["\n".join(definition.document(item) for item in user.profile) for user in users]
    splitter = random_split if split == "random" else ood_split
    return splitter(users, default_embedder()(texts), seed=seed)


def user_groups(users: Iterable[User], chunk_users: int) -> Iterator[tuple[int, tuple[User, ...]]]:
    """(index, users) for consecutive groups of `chunk_users`, read from `users` only as each group is asked for."""
    if chunk_users < 1:
        raise ValueError(f"chunk_users must be >= 1, got {chunk_users}")
    stream = iter(users)
    for index in count():
        group = tuple(islice(stream, chunk_users))
        if not group:
            return
        yield index, group


def pending_chunks(users: Iterable[User], chunk_users: int, answered: set[str]) -> Iterator[Chunk]:
    """The chunks that still have unanswered queries, made lazily (a driver draws them as workers free up).

    Chunk boundaries depend only on `users` and `chunk_users`, never on how many workers run them or on what a
    previous run finished, so every chunk's batches, and hence its predictions, are the same on every path.
    """
    for index, group in user_groups(users, chunk_users):
        todo = tuple(u for u in group if any(q.id not in answered for q in u.queries))
        if todo:
            yield Chunk(index, todo, frozenset(q.id for u in todo for q in u.queries if q.id in answered))


def method_identity(method: Personalizer) -> dict[str, Any]:
    """What config.json records about a built method; computed wherever the method lives (here or in a worker)."""
    return {"method": method.name, "method_config": method.describe(), "mode": getattr(method, "mode", "prior"),
            "model": method.model_id}


@contextmanager
def run_lock(out: Path) -> Iterator[None]:
    """Let one process at a time write a run folder: two appending answers to one predictions file would leave
    duplicates that the run cannot be finalized from."""
    out.mkdir(parents=True, exist_ok=True)
    with open(out / ".lock", "w") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise RunConflict(f"{out} is being written by another running evaluation; wait for it or use a new --out") \
                from None
        yield


def open_run(spec: EvalSpec, out: Path, identity: dict[str, Any], n_users: int) -> None:
    """Create the run folder and its config.json, or check that the folder holds a run of the same configuration."""
    out.mkdir(parents=True, exist_ok=True)
    config = {**asdict(spec), "task": get_task(spec.task).name, **identity, "users": n_users}
    if ":" in spec.method:  # a method outside tailor: keep the import path that builds it again, not just its name
        config["method"] = spec.method
    config_path = out / "config.json"
    if config_path.exists():
        _check_config(config_path, config)
    else:
        write_json(config_path, config)


def answered_queries(out: Path) -> set[str]:
    """Query ids already in the run's predictions.jsonl (cutting a torn last line)."""
    return {row["query_id"] for row in iter_predictions(out / "predictions.jsonl")}


def fit_for_spec(method: Personalizer, spec: EvalSpec,
                 progress: Callable[[str, int, int], Callable[[int], None]] | None = None) -> float:
    """Fit `method` on the spec's training users (or load the cached fit); returns the seconds it took."""
    started = time.perf_counter()
    fit_method(method, fit_users(spec), progress)
    return time.perf_counter() - started


def run_eval(spec: EvalSpec, out_dir: str | Path, backbone: Backbone | None = None,
             method: Personalizer | None = None, chunk_users: int = 16,
             progress: Callable[[str, int, int], Callable[[int], None]] | None = None) -> dict:
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
                progress: Callable[[str, int, int], Callable[[int], None]] | None) -> dict:
    task = get_task(spec.task)
    answered = answered_queries(out)
    done = sum(q in answered for q in users.query_ids)
    if done < len(users.query_ids):
        record_fit_time(out, fit_for_spec(method, spec, progress))
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
    bar = progress(f"fit {method.name}", 0, len(users)) if progress else None
    ticked = 0

    def tick(n: int) -> None:
        nonlocal ticked
        ticked += n
        bar(n)  # type: ignore[misc]

    method.fit(users, progress=tick if bar else None, workdir=folder)
    if bar and ticked < len(users):  # a fit whose work was cached elsewhere (OPPU's base) ticks less or not at all
        bar(len(users) - ticked)
    method.save_fit(folder)
    (folder / "DONE").write_text(json.dumps({"users": len(users), "method": method.describe()}, indent=2))
    return folder


def state_path(folder: Path, user_id: str) -> Path:
    """A file name for a user's state that no user id can escape from (ids are not trusted to be path-safe)."""
    safe = user_id if re.fullmatch(r"[A-Za-z0-9_.-]{1,80}", user_id) and not user_id.startswith(".") \
        else "u-" + hashlib.sha256(user_id.encode()).hexdigest()[:32]
    return folder / f"{safe}.safetensors"


def personalize_with_states(method: Personalizer, users: Sequence[User], folder: Path) -> list[UserState]:
    """States for users, reusing those saved in `folder` by an earlier (perhaps killed) run and saving new ones as
    each group of `method.personalize_group` users is done.

    Each new state records its own personalize time in its header, so wall time survives a resume.
    """
    states: dict[str, UserState] = {}
    for user in users:
        path = state_path(folder, user.id)
        if path.exists():
            states[user.id] = UserState.load(path, method=method.name, version=method.version,
                                             model_id=method.model_id)
    missing = [u for u in users if u.id not in states]
    size = method.personalize_group or max(len(missing), 1)
    for start in range(0, len(missing), size):
        group = missing[start:start + size]
        started = time.perf_counter()
        fresh = method.personalize_many(group)
        per_user = (time.perf_counter() - started) / len(group)
        for user, state in zip(group, fresh):
            state.header["personalize_s"] = round(per_user, 5)
            state.save(state_path(folder, user.id))
            states[user.id] = state
    return [states[u.id] for u in users]


def process_chunk(method: Personalizer, users: Sequence[User], states_dir: Path,
                  answered: frozenset[str] = frozenset()) -> list[dict]:
    """Personalize (or reload) the users' states and answer their queries not in `answered`: one prediction row each.

    The unit of work of every path: the local runner calls it in-process, Ray workers call it remotely. Users and
    queries keep their order, so the predict batches only depend on the chunk.
    """
    states = personalize_with_states(method, users, states_dir)
    requests = [(state, q) for state, u in zip(states, users) for q in u.queries if q.id not in answered]
    started = time.perf_counter()
    predictions = method.predict(requests, progress=None)
    per_query = (time.perf_counter() - started) / max(len(requests), 1)
    queries_of = {s.user_id: sum(1 for t, _ in requests if t is s) for s in states}
    return [{"user_id": state.user_id, "query_id": query.id, "prediction": prediction.text, "gold": query.gold,
             "mode": prediction.mode, "predict_s": round(per_query, 5),
             "personalize_s": round(state.header["personalize_s"] / queries_of[state.user_id], 5),
             "state_bytes": state.nbytes}
            for (state, query), prediction in zip(requests, predictions)]


def record_fit_time(out: Path, seconds: float) -> None:
    """Add one process's fit time to the run's fit_time.json: a resumed run, or the same command run again after
    it finished, keeps the time the first process spent fitting instead of replacing it."""
    write_json(out / "fit_time.json", {"seconds": round(recorded_fit_time(out) + seconds, 3)})


def recorded_fit_time(out: Path) -> float:
    """The fit seconds the run's processes have recorded so far (0 for a method that fits nothing)."""
    path = out / "fit_time.json"
    return float(json.loads(path.read_text())["seconds"]) if path.exists() else 0.0


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
    metrics = {
        "task": task.name, "method": spec.method, "label": spec.label or spec.method,
        "mode": mode, "n_users": n_users, "n_queries": n_rows,
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
