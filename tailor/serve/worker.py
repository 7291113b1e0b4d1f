"""Users' states behind the server: a cache of loaded states, and the personalize worker that builds new ones.

Personalize jobs run in `Personalizing`, a background thread that records each job's progress in the store, so a
killed server leaves jobs marked "interrupted" (on the next start) and the user's previous state untouched, and the
job can simply be posted again. A job first asks the method to `update` the user's old state with the items added
since it was built; a method that cannot (or an old state it cannot use) has the user rebuilt, and every user
waiting to be rebuilt goes through one `personalize_many` call, which some methods batch. The job record says which
happened and why, in the method's own words (`Personalizer.update_note`).
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any, Literal

from tailor.methods.base import LMPersonalizer, Personalizer
from tailor.store.state import StateError, UserState
from tailor.store.store import Store, UserRecord
from tailor.tasks.records import User

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Update:
    state: UserState
    mode: Literal["incremental", "rebuilt"]
    reason: str


def update_state(method: Personalizer, old: UserState | None, user: User, old_items: int) -> Update | None:
    """The user's state updated from `old` (built from their first `old_items` items), or None when the method must
    rebuild it with `personalize` (the caller may then batch several users through `personalize_many`)."""
    if old is None or old_items <= 0:
        return None
    state = method.update(old, user, user.profile[old_items:])
    return Update(state, "incremental", method.update_note) if state is not None else None


def rebuild_reason(method: Personalizer, old: UserState | None) -> str:
    """Why `update_state` gave None for this method and old state."""
    if old is None:
        return "no earlier state"
    if type(method).update is not Personalizer.update or method.state_is_history:
        return "the earlier state was made with other settings; rebuilt from the whole history"
    return f"{method.name}: {method.update_note}"


class StateCache:
    """Loaded and checked states by (tenant, user, checksum), least recently used dropped first.

    A state is immutable once saved (a new one has a new checksum), so a hit can never be out of date; keeping the
    object also keeps what methods derive from it at first use (a BM25 index, stacked tensors) in `state.runtime`.
    """

    def __init__(self, store: Store, method: Personalizer, capacity: int = 4096):
        self.store, self.method, self.capacity = store, method, capacity
        self._states: OrderedDict[tuple[str, str, str], UserState] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, tenant: str, record: UserRecord) -> UserState:
        key = (tenant, record.user_id, str(record.checksum))
        with self._lock:
            if key in self._states:
                self._states.move_to_end(key)
                return self._states[key]
        m = self.method
        state = self.store.load_state(tenant, record.user_id, m.name, m.version, m.model_id, record).to(m.device)
        if isinstance(m, LMPersonalizer):
            try:  # a state this method cannot apply fails here, alone, instead of inside a shared batch
                m.edits([state])
            except (ValueError, KeyError, RuntimeError) as error:
                raise StateError(f"user {record.user_id!r}: {error}") from error
        with self._lock:
            self._states[key] = state
            while len(self._states) > self.capacity:
                self._states.popitem(last=False)
        return state


class Personalizing:
    """The personalize worker: one thread that runs queued jobs, updating states incrementally where the method can
    and otherwise rebuilding every waiting user in one `personalize_many` call (which some methods batch)."""

    def __init__(self, store: Store, method: Personalizer, model_lock: threading.Lock, group: int = 16):
        self.store, self.method, self.model_lock, self.group = store, method, model_lock, group
        self._jobs: queue.Queue[dict[str, Any] | None] = queue.Queue()
        self._thread = threading.Thread(target=self._loop, name="tailor-personalize", daemon=True)

    def start(self) -> None:
        for job in self.store.unfinished_jobs():
            self.store.set_job(job["job_id"], "interrupted",
                               error="the server stopped during this job; POST personalize again")
        self._thread.start()

    def stop(self) -> None:
        self._jobs.put(None)
        self._thread.join(timeout=5)

    def submit(self, job: dict[str, Any]) -> None:
        self._jobs.put(job)

    def _loop(self) -> None:
        while (job := self._jobs.get()) is not None:
            jobs = [job]
            while len(jobs) < self.group and not self._jobs.empty():
                nxt = self._jobs.get()
                if nxt is None:
                    self._jobs.put(None)
                    break
                jobs.append(nxt)
            with self.model_lock:
                self._run(jobs)

    def _old_state(self, tenant: str, record: UserRecord) -> UserState | None:
        if not record.has_state:
            return None
        m = self.method
        try:
            return self.store.load_state(tenant, record.user_id, m.name, m.version, m.model_id, record)
        except StateError:
            return None  # an unusable old state is rebuilt from scratch

    def _run(self, jobs: list[dict[str, Any]]) -> None:
        rebuild: list[tuple[dict[str, Any], User, UserRecord, str, float]] = []
        for job in jobs:
            started = time.perf_counter()
            self.store.set_job(job["job_id"], "running")
            try:
                user, record = self.store.snapshot(job["tenant"], job["user_id"])
                old = self._old_state(job["tenant"], record)
                update = update_state(self.method, old, user, record.state_items or 0)
            except Exception as error:
                self._fail(job, error)
                continue
            if update is not None:
                self._finish(job, record.items, update.state, update.mode, update.reason, started)
            else:
                rebuild.append((job, user, record, rebuild_reason(self.method, old), started))
        if not rebuild:
            return
        try:
            states = self.method.personalize_many([user for _, user, _, _, _ in rebuild])
        except Exception as error:
            for job, *_ in rebuild:
                self._fail(job, error)
            return
        for (job, _, record, reason, started), state in zip(rebuild, states):
            self._finish(job, record.items, state, "rebuilt", reason, started)

    def _fail(self, job: dict[str, Any], error: Exception) -> None:
        log.exception("personalize job %s of user %r failed", job["job_id"], job["user_id"], exc_info=error)
        self.store.set_job(job["job_id"], "failed", error=f"{type(error).__name__}: {error}")

    def _finish(self, job: dict[str, Any], items: int, state: UserState, mode: str, reason: str,
                started: float) -> None:
        seconds = round(time.perf_counter() - started, 4)
        if self.store.save_state(job["tenant"], job["user_id"], state, items):
            self.store.set_job(job["job_id"], "done", mode=mode, reason=reason, seconds=seconds)
        else:  # deleted meanwhile (the job row went with the user) or a newer state was saved first
            self.store.set_job(job["job_id"], "done", mode=mode, seconds=seconds,
                               reason="a state built from newer history was saved meanwhile; kept that one")

