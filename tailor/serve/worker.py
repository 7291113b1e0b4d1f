"""Personalize jobs, run in a process of their own, so that answering never waits for training.

The server records a job in the store (`Store.create_job`); the worker process (`python -m tailor.serve.worker`,
started and watched by `PersonalizeWorker`) builds its own copy of every deployment's method and backbone from the
same config, claims queued jobs from the store (`Store.claim_jobs`), and saves each new state atomically in the
deployment's slot. The store is the only thing the two processes share: the server sees a new state at the next
request that reads the user's row, and until then answers from the previous one, marked stale. The worker runs at a
lower CPU priority and with its own (few) torch threads, so on a CPU the answering process keeps its cores.

A job first asks the method to `update` the user's old state with the items added since it was built; a method that
cannot (or an old state it cannot use) has the user rebuilt, and every user of a deployment waiting to be rebuilt
goes through one `personalize_many` call, which some methods batch. The job record says which happened and why, in
the method's own words (`Personalizer.update_note`).

A server killed with -9 takes its worker with it (Linux's parent-death signal; elsewhere the worker notices between
jobs), so no state is written after the server is gone; the jobs it was running are marked interrupted when the next
server starts, and can simply be posted again. A worker that dies on its own is restarted, its running jobs marked
interrupted.
"""

from __future__ import annotations

import ctypes
import json
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from typing import Any, Literal, Sequence

import torch

from tailor.methods.base import Personalizer
from tailor.serve.build import build_methods
from tailor.serve.config import ServerConfig, parse_config
from tailor.store.state import StateError, UserState
from tailor.store.store import Store, UserRecord
from tailor.tasks.records import User

log = logging.getLogger(__name__)
PR_SET_PDEATHSIG = 1


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


class JobRunner:
    """Runs claimed jobs, each with its deployment's method, and records how each ended."""

    def __init__(self, store: Store, methods: dict[str, Personalizer]):
        self.store, self.methods = store, methods

    def run(self, jobs: Sequence[dict[str, Any]]) -> None:
        for slot in dict.fromkeys(job["slot"] for job in jobs):
            self._run(self.methods[slot], [job for job in jobs if job["slot"] == slot])

    def _old_state(self, method: Personalizer, record: UserRecord) -> UserState | None:
        if not record.has_state:
            return None
        try:
            return self.store.load_state(record.tenant, record.user_id, method.name, method.version, method.model_id,
                                         record)
        except StateError:
            return None  # an unusable old state is rebuilt from scratch

    def _run(self, method: Personalizer, jobs: list[dict[str, Any]]) -> None:
        rebuild: list[tuple[dict[str, Any], User, UserRecord, str, float]] = []
        for job in jobs:
            started = time.perf_counter()
            try:
                user, record = self.store.snapshot(job["tenant"], job["user_id"], job["slot"])
                old = self._old_state(method, record)
                update = update_state(method, old, user, record.state_items or 0)
            except Exception as error:
                self._fail(job, error)
                continue
            if update is not None:
                self._finish(job, record.items, update.state, update.mode, update.reason, started)
            else:
                rebuild.append((job, user, record, rebuild_reason(method, old), started))
        if not rebuild:
            return
        try:
            states = method.personalize_many([user for _, user, _, _, _ in rebuild])
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
        if self.store.save_state(job["tenant"], job["user_id"], state, items, job["slot"]):
            self.store.set_job(job["job_id"], "done", mode=mode, reason=reason, seconds=seconds)
        else:  # deleted meanwhile (the job row went with the user) or a newer state was saved first
            self.store.set_job(job["job_id"], "done", mode=mode, seconds=seconds,
                               reason="a state built from newer history was saved meanwhile; kept that one")


class PersonalizeWorker:
    """The server's side of the worker: starts the process, restarts it when it dies, stops it with the server."""

    def __init__(self, config: ServerConfig, store: Store):
        self.config, self.store = config, store
        self.slots = [d.name for d in config.deployments]
        self.process: subprocess.Popen | None = None
        self._stopping = threading.Event()
        self._watcher = threading.Thread(target=self._watch, name="tailor-worker-watch", daemon=True)

    @property
    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def start(self) -> None:
        self.store.interrupt_running(self.slots, "the server stopped during this job; POST personalize again")
        self._spawn()
        self._watcher.start()

    def stop(self) -> None:
        self._stopping.set()
        self._watcher.join(timeout=5)
        if self.alive:
            assert self.process is not None
            self.process.terminate()
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self.store.interrupt_running(self.slots, "the server stopped during this job; POST personalize again")

    def _spawn(self) -> None:
        self.process = subprocess.Popen([sys.executable, "-m", "tailor.serve.worker", str(os.getpid())],
                                        stdin=subprocess.PIPE, text=True)
        assert self.process.stdin is not None
        self.process.stdin.write(json.dumps(self.config.to_raw()))
        self.process.stdin.close()

    def _watch(self) -> None:
        """Restart a worker that died (waiting longer after each quick death), marking its running jobs."""
        delay = 1.0
        while not self._stopping.wait(1.0):
            assert self.process is not None
            code = self.process.poll()
            if code is None:
                continue
            log.error("the personalize worker exited with code %s; restarting it in %.0f s", code, delay)
            self.store.interrupt_running(self.slots, f"the personalize worker exited with code {code} during this "
                                                     "job; POST personalize again")
            started = time.monotonic()
            if self._stopping.wait(delay):
                return
            self._spawn()
            delay = min(delay * 2, 60.0) if time.monotonic() - started < 30 else 1.0


def _die_with(parent: int) -> None:
    """End this process when `parent` ends, however it ends (Linux); elsewhere `main` checks between jobs."""
    if sys.platform.startswith("linux"):
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    if os.getppid() != parent:  # it ended before the signal was asked for
        os._exit(0)


def main(parent: int) -> None:
    """The worker process: its config on stdin, its parent's pid as argument."""
    _die_with(parent)
    config = parse_config(json.loads(sys.stdin.read()))
    os.nice(config.worker.nice)
    torch.set_num_threads(config.worker.threads)
    store = Store(config.store)
    runner = JobRunner(store, build_methods(config))
    slots = [d.name for d in config.deployments]
    log.warning("personalize worker ready (pid %d, %d torch threads, nice %d)", os.getpid(), config.worker.threads,
                config.worker.nice)
    while os.getppid() == parent:
        jobs = store.claim_jobs(slots, config.worker.group)
        if jobs:
            runner.run(jobs)
        else:
            time.sleep(config.worker.poll_s)


if __name__ == "__main__":
    logging.basicConfig(level=logging.WARNING, format="worker: %(message)s")
    main(int(sys.argv[1]))
