"""The unit of work of every run: a chunk of users, personalized (or reloaded) and answered.

The work is cut into chunks of users fixed by the user list and `chunk_users` alone, and each chunk is answered by
`process_chunk`. The local evaluation calls it in-process; tailor.distributed calls the same function inside Ray
workers and writes the rows through the same `Appender`. So both paths batch identically and give the same
predictions, and a resumed run re-forms the chunks it had started with instead of shifting every later boundary.

Each user's state is saved in the run's states/ as soon as its group is personalized, and a state found there is
loaded instead of made again, so a killed run keeps every user it finished. A personalize-only run (`tailor
personalize`) writes the same states and records each user in personalized.jsonl. Every row records the size of the
user's saved state file as `state_bytes`: what storing the user costs, header (a history kept as text) and tensors
together.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from itertools import count, islice
from pathlib import Path
from typing import Iterable, Iterator, Sequence

from tailor.methods.base import Personalizer
from tailor.runs.fits import ProgressFactory, fit_for_spec
from tailor.runs.folder import Appender, iter_predictions, method_identity, open_run, read_predictions, run_lock
from tailor.runs.spec import EvalSpec, run_users
from tailor.store.paths import state_path
from tailor.store.state import UserState
from tailor.tasks.lamp import get_task
from tailor.tasks.records import User

PERSONALIZED = "personalized.jsonl"


@dataclass(frozen=True)
class Chunk:
    """Users answered together: chunk `index` of the run's user list, minus users with nothing left to answer.

    `answered` holds the ids of this chunk's queries that are already in predictions.jsonl (from a resumed run).
    """

    index: int
    users: tuple[User, ...]
    answered: frozenset[str] = frozenset()


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
                                             model_id=method.model_id, device=method.device)
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
    sizes = {s.user_id: state_bytes(states_dir, u.id) for s, u in zip(states, users)}
    return [{"user_id": state.user_id, "query_id": query.id, "prediction": prediction.text, "gold": query.gold,
             "mode": prediction.mode, "predict_s": round(per_query, 5),
             "personalize_s": round(state.header["personalize_s"] / queries_of[state.user_id], 5),
             "state_bytes": sizes[state.user_id]}
            for (state, query), prediction in zip(requests, predictions)]


def state_bytes(states_dir: Path, user_id: str) -> int:
    """The size of a user's saved state file: header and tensors, what the user costs to store (`UserState.nbytes`
    counts the tensors alone, nothing for a method that keeps the history in the header)."""
    return state_path(states_dir, user_id).stat().st_size


def personalized_users(out: Path) -> set[str]:
    """Users whose state a personalize run has already recorded in personalized.jsonl."""
    return {row["user_id"] for row in iter_predictions(out / PERSONALIZED)}


def personalize_chunks(users: Iterable[User], chunk_users: int, done: set[str]) -> Iterator[Chunk]:
    """Chunks of users without a recorded state, with the boundaries of the evaluation chunks (made lazily)."""
    for index, group in user_groups(users, chunk_users):
        todo = tuple(u for u in group if u.id not in done)
        if todo:
            yield Chunk(index, todo)


def personalize_rows(method: Personalizer, users: Sequence[User], states_dir: Path) -> list[dict]:
    """Personalize (or reload) the users' states into `states_dir`: one summary row per user."""
    states = personalize_with_states(method, users, states_dir)
    return [{"user_id": s.user_id, "state": state_path(states_dir, u.id).name,
             "state_bytes": state_bytes(states_dir, u.id), "personalize_s": s.header["personalize_s"]}
            for s, u in zip(states, users)]


def personalize_run(spec: EvalSpec, out_dir: str | Path, method: Personalizer, chunk_users: int = 16,
                    progress: ProgressFactory | None = None) -> dict:
    """Personalize the spec's users in this process into `out_dir`/states; resumable like an evaluation.

    The folder's config.json is an evaluation's, so `tailor eval` on the same folder reuses the states and only
    predicts. Returns a summary (users, bytes and seconds per user).
    """
    out = Path(out_dir)
    users = run_users(spec)
    with run_lock(out):
        open_run(spec, out, method_identity(method), len(users))
        done = personalized_users(out)
        finished = sum(u in done for u in users.ids)
        if finished < len(users):
            fit_for_spec(method, spec, progress)
            tick = progress(f"personalize {get_task(spec.task).name} {spec.method}", finished, len(users)) \
                if progress else None
            appender = Appender(out / PERSONALIZED)
            try:
                for chunk in personalize_chunks(users, chunk_users, done):
                    rows = personalize_rows(method, chunk.users, out / "states")
                    appender.write(rows)
                    if tick:
                        tick(len(rows))
            finally:
                appender.close()
        return personalize_summary(out, len(users))


def personalize_summary(out: Path, n_users: int) -> dict:
    rows = read_predictions(out / PERSONALIZED)
    return {"users": n_users, "personalized": len(rows),
            "state_bytes_per_user": round(sum(r["state_bytes"] for r in rows) / max(len(rows), 1)),
            "personalize_s_per_user": round(sum(r["personalize_s"] for r in rows) / max(len(rows), 1), 5),
            "states": str(out / "states")}

