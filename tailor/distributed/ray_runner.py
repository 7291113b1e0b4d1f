"""Personalize and evaluate users on a Ray cluster, with the local runner's own unit of work.

A `WorkerPool` is a set of Ray actors that each load the backbone and the fitted method once (actor 0 fits, or loads
the cached fit; the others only load it) and then run many chunks. The driver draws chunks lazily from
`pending_chunks` (the same boundaries as the local path) over users streamed from the data file (`run_users`), keeps
at most `in_flight` chunks queued per worker, so the driver holds a few chunks of users, never every profile; it is
the only writer of the run folder's jsonl files: each returned chunk is appended and fsynced exactly as the local
runner does, so a killed driver resumes like a killed local run. Workers write each user's state into the run
folder's states/ (the same files the local path writes), which on a multi-node cluster must be on a filesystem all
nodes see, like $TAILOR_CACHE.

Faults: a killed worker process is restarted by Ray (`restarts`) and its unfinished chunks are run again
(`task_retries`); finished chunks are already on disk. A chunk whose code raises is split into single users, so only
the users that fail are reported, in failures.jsonl, and the others are answered; the run then stops short of
scoring and the same command retries exactly those users.
"""

from __future__ import annotations

import logging
import os
import time
from collections import deque
from contextlib import contextmanager
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Sequence

import ray
from ray.exceptions import GetTimeoutError, RayActorError, RayTaskError

from tailor.backbone.loading import resolve_model
from tailor.data.lamp import resolve_data_dir
from tailor.methods.base import Personalizer
from tailor.runs.chunks import (PERSONALIZED, Chunk, pending_chunks, personalize_chunks, personalize_rows,
                                personalize_summary, personalized_users, process_chunk)
from tailor.runs.borrow import borrow_states
from tailor.runs.fits import Fitted, ProgressFactory, fit_for_spec
from tailor.runs.folder import Appender, answered_queries, method_identity, open_run, record_fit_time
from tailor.runs.scoring import finalize
from tailor.runs.spec import EvalSpec, run_users
from tailor.tasks.records import User

FAILURES = "failures.jsonl"
@dataclass
class RayOptions:
    """Where and how wide a Ray run is. Retries are bounded: Ray restarts a dead worker at most `restarts` times and
    runs a chunk whose worker died at most `task_retries` more times."""

    address: str | None = None
    """An existing cluster to join ("auto", "ray://host:10001", "host:6379"); None starts a local one."""
    workers: int = 2
    threads: int = 1
    """Torch threads (and Ray CPUs) per worker; more threads than cores only slows every worker down."""
    gpus: float = 0.0
    """GPUs per worker (Ray's num_gpus; a fraction packs several workers on one GPU). With GPUs, `--device auto`
    puts each worker's backbone on the GPU Ray assigns it."""
    in_flight: int = 2
    """Chunks queued per worker: enough to keep it busy, few enough that memory does not grow with the run."""
    task_retries: int = 2
    restarts: int = 4
    object_store_mb: int = 256
    """Object store of a local cluster; chunks of users and their rows are small, the backbone never goes there."""


class UsersFailed(RuntimeError):
    """Some users could not be processed; they are listed in the run folder's failures.jsonl."""

    def __init__(self, out: Path, count: int, examples: list["Failure"], done: int):
        named = "; ".join(f"{f.user_id} ({f.error})" for f in examples)
        super().__init__(f"{count} user(s) failed, e.g. {named}. All are listed in {out / FAILURES}; "
                         f"{done} chunk(s) finished and are saved. Run the same command again to retry the failed "
                         f"users.")
        self.out = out
        self.count = count


class WorkerStartError(RuntimeError):
    """A Ray worker could not build the backbone or the method, or could not fit it."""


@contextmanager
def ray_session(options: RayOptions) -> Iterator[None]:
    """Join the cluster at `options.address`, or start a local one sized for the workers; leave it as found.

    An already connected driver (a test, a notebook) is used as is and not shut down.
    """
    if ray.is_initialized():
        yield
        return
    if options.address is None:
        ray.init(num_cpus=max(os.cpu_count() or 1, options.workers * options.threads), include_dashboard=False,
                 object_store_memory=options.object_store_mb << 20, log_to_driver=False,
                 logging_level=logging.ERROR)  # a private cluster: Ray's start-up notices are noise
    else:
        ray.init(address=options.address, log_to_driver=False, logging_level=logging.WARNING)
    try:
        yield
    finally:
        ray.shutdown()


class Worker:
    """One Ray actor: a backbone and a fitted method built once, then chunk after chunk.

    The fit happens on first use, not in `__init__`, so the pool can load every worker's backbone at once while
    worker 0 fits. Ray re-runs `__init__` when it restarts a killed worker, whose first chunk then loads the fit
    from the fit cache: a restart costs a model load, not a fit.
    """

    def __init__(self, spec: EvalSpec, threads: int, env: dict[str, str]):
        import torch

        from tailor.backbone.model import Backbone
        from tailor.methods import build_method, method_class
        from tailor.tasks.lamp import get_task

        os.environ.update(env)  # the driver's TAILOR_* settings: where caches and data are
        torch.set_num_threads(threads)
        backbone = Backbone.load(spec.model, device=spec.device, dtype=spec.dtype) \
            if method_class(spec.method).needs_backbone and spec.model else None  # type: ignore[arg-type]
        self.spec = spec
        self.method: Personalizer = build_method(spec.method, get_task(spec.task), backbone, **spec.options)
        self.fitted: Fitted | None = None

    def _fitted(self) -> Personalizer:
        if self.fitted is None:
            self.fitted = fit_for_spec(self.method, self.spec)
        return self.method

    def pid(self) -> int:
        return os.getpid()

    def identity(self) -> dict[str, Any]:
        """What config.json records about the method, how long the fit (or loading it) took and which fits it used."""
        method = self._fitted()
        assert self.fitted is not None
        return {**method_identity(method), "fit_s": self.fitted.seconds, "fits": self.fitted.folders}

    def evaluate(self, users: Sequence[User], answered: frozenset[str], states_dir: str) -> list[dict]:
        return process_chunk(self._fitted(), users, Path(states_dir), answered)

    def personalize(self, users: Sequence[User], states_dir: str) -> list[dict]:
        return personalize_rows(self._fitted(), users, Path(states_dir))


def _for_workers(spec: EvalSpec) -> EvalSpec:
    """The spec with paths made absolute (workers need not share the driver's working directory) and the model
    resolved here first, so a packaged model is converted once, not by every worker at the same time."""
    model = spec.model
    if model is not None:
        resolve_model(model)
        if Path(model).expanduser().is_dir():
            model = str(Path(model).expanduser().resolve())
    spec = replace(spec.portable(), model=model)
    if spec.data is not None:  # users files of one's own: no LaMP folder is read
        return spec
    return replace(spec, data_dir=str(resolve_data_dir(spec.data_dir)))


class WorkerPool:
    """`options.workers` Ray actors built from one spec. Use as a context manager: leaving it ends the actors."""

    def __init__(self, spec: EvalSpec, options: RayOptions):
        self.spec = spec
        worker_spec = _for_workers(spec)
        env = {k: v for k, v in os.environ.items() if k.startswith("TAILOR_")}
        remote = ray.remote(Worker).options(num_cpus=options.threads, num_gpus=options.gpus,
                                            max_restarts=options.restarts,
                                            max_task_retries=options.task_retries)
        self.actors = [remote.remote(worker_spec, options.threads, env) for _ in range(options.workers)]
        try:
            self.info = ray.get(self.actors[0].identity.remote())  # worker 0 fits; the others then load its fit
            ray.get([actor.identity.remote() for actor in self.actors[1:]])
        except (RayActorError, RayTaskError) as error:
            self.close()
            raise WorkerStartError(f"a Ray worker could not start: {_describe(error)}") from error
        except BaseException:
            self.close()
            raise

    @property
    def identity(self) -> dict[str, Any]:
        return {k: v for k, v in self.info.items() if k not in ("fit_s", "fits")}

    @property
    def fit_s(self) -> float:
        return float(self.info["fit_s"])

    @property
    def fits(self) -> list[str]:
        """The fit cache folders the method uses (`tailor.runs.fits.Fitted`)."""
        return list(self.info["fits"])

    def pids(self) -> list[int]:
        return ray.get([actor.pid.remote() for actor in self.actors])

    def close(self) -> None:
        for actor in self.actors:
            ray.kill(actor, no_restart=True)

    def __enter__(self) -> "WorkerPool":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


@dataclass(frozen=True)
class Failure:
    """A user that could not be processed, and why."""

    user_id: str
    chunk: int
    kind: str
    """"error" (the method raised for this user) or "worker-died" (its worker died more often than retried)."""
    error: str


def _describe(error: Exception) -> str:
    cause = getattr(error, "cause", None) or error
    return f"{type(cause).__name__}: {str(cause).strip().splitlines()[-1] if str(cause).strip() else ''}"


def _alive(actor: Any, timeout: float) -> bool:
    """False only if the actor is dead for good; a restarting actor answers once it is back."""
    try:
        ray.get(actor.pid.remote(), timeout=timeout)
    except RayActorError:
        return False
    except GetTimeoutError:
        return True
    return True


def dispatch(actors: Sequence[Any], submit: Callable[[Any, Chunk], Any], chunks: Iterable[Chunk],
             on_rows: Callable[[Chunk, list[dict]], None], on_failure: Callable[[Failure], None],
             in_flight: int = 2, restart_timeout: float = 600.0) -> int:
    """Run chunks on actors with bounded queues; return how many chunks finished.

    `submit(actor, chunk)` starts a remote call and returns its ObjectRef. At most `in_flight` chunks wait on each
    live actor, and `chunks` is only read when a slot frees up, so neither the driver nor the object store holds
    more than that many chunks. A chunk that raises is re-run one user at a time (its other users are answered, in
    smaller batches) so that failures name users. A chunk lost with its worker (after Ray's own retries) is
    reported; an actor that is dead for good gets no more work, and if none is left the run stops.
    """
    source = iter(chunks)
    retry: deque[Chunk] = deque()
    live = list(range(len(actors)))
    load = [0] * len(actors)
    running: dict[Any, tuple[Chunk, int]] = {}
    finished = 0
    exhausted = False
    while True:
        for a in list(live):
            while load[a] < in_flight:
                chunk = retry.popleft() if retry else None
                if chunk is None and not exhausted:
                    chunk = next(source, None)
                    exhausted = chunk is None
                if chunk is None:
                    break
                running[submit(actors[a], chunk)] = (chunk, a)
                load[a] += 1
        if not running:
            break
        (ref,), _ = ray.wait(list(running), num_returns=1)
        chunk, a = running.pop(ref)
        load[a] -= 1
        try:
            rows = ray.get(ref)
        except RayTaskError as error:
            if len(chunk.users) > 1:
                retry.extendleft(reversed([replace(chunk, users=(u,)) for u in chunk.users]))
            else:
                on_failure(Failure(chunk.users[0].id, chunk.index, "error", _describe(error)))
            continue
        except RayActorError as error:
            for user in chunk.users:
                on_failure(Failure(user.id, chunk.index, "worker-died", _describe(error)))
            if a in live and not _alive(actors[a], restart_timeout):
                live.remove(a)
            if not live:
                raise RuntimeError(f"every Ray worker died; {finished} chunk(s) finished and are saved") from error
            continue
        on_rows(chunk, rows)
        finished += 1
    return finished


class _FailureLog:
    """failures.jsonl of the current attempt: rewritten by each run, so it lists what is still failing."""

    def __init__(self, out: Path):
        self.path = out / FAILURES
        self.path.unlink(missing_ok=True)
        self.count = 0
        self.examples: list[Failure] = []
        """The first few failures, for the summary; the file has them all."""
        self.appender: Appender | None = None

    def __call__(self, failure: Failure) -> None:
        if self.appender is None:
            self.appender = Appender(self.path)
        self.appender.write([{**asdict(failure), "time": time.strftime("%Y-%m-%dT%H:%M:%S")}])
        self.count += 1
        if len(self.examples) < 3:
            self.examples.append(failure)

    def close(self) -> None:
        if self.appender is not None:
            self.appender.close()


def run_chunks(actors: Sequence[Any], out: Path, sink: Path, chunks: Iterable[Chunk],
               submit: Callable[[Any, Chunk], Any], tick: Callable[[int], None] | None, in_flight: int = 2) -> None:
    """Dispatch chunks, append each chunk's rows to `sink` (single writer, fsync per chunk) and each failed user to
    out/failures.jsonl; raise UsersFailed at the end if any user failed."""
    appender = Appender(sink)
    failures = _FailureLog(out)

    def on_rows(_chunk: Chunk, rows: list[dict]) -> None:
        appender.write(rows)
        if tick:
            tick(len(rows))

    try:
        finished = dispatch(actors, submit, chunks, on_rows, failures, in_flight)
    finally:
        appender.close()
        failures.close()
    if failures.count:
        raise UsersFailed(out, failures.count, failures.examples, finished)


@contextmanager
def _pool(spec: EvalSpec, options: RayOptions, pool: WorkerPool | None) -> Iterator[WorkerPool]:
    if pool is not None:
        if pool.spec != spec:
            raise ValueError("the worker pool was built for another spec")
        yield pool
        return
    with ray_session(options), WorkerPool(spec, options) as built:
        yield built


def ray_eval(spec: EvalSpec, out_dir: str | Path, options: RayOptions | None = None, chunk_users: int = 16,
             progress: ProgressFactory | None = None, pool: WorkerPool | None = None) -> dict:
    """`run_eval` on a Ray cluster: same run folder, same resume, same predictions; returns metrics.json content.

    `pool` reuses running workers (built for this spec); otherwise workers are started, and the cluster joined or
    started, for this call. Raises UsersFailed (after saving every other user) if some users failed.
    """
    options = options or RayOptions()
    out = Path(out_dir).resolve()
    users = run_users(spec)
    with _pool(spec, options, pool) as workers:
        open_run(spec, out, workers.identity, len(users))
        answered = answered_queries(out)
        done = sum(q in answered for q in users.query_ids)
        if done < len(users.query_ids):
            if spec.states_from:
                borrow_states(spec, out)
            tick = progress(f"{spec.task} {spec.method} (ray, {len(workers.actors)} workers)", done,
                            len(users.query_ids)) if progress else None
            states = str(out / "states")
            run_chunks(workers.actors, out, out / "predictions.jsonl", pending_chunks(users, chunk_users, answered),
                       lambda actor, chunk: actor.evaluate.remote(chunk.users, chunk.answered, states), tick,
                       options.in_flight)
            record_fit_time(out, workers.fit_s, workers.fits)
    return finalize(out, spec, users.query_ids)


def ray_personalize(spec: EvalSpec, out_dir: str | Path, options: RayOptions | None = None, chunk_users: int = 16,
                    progress: ProgressFactory | None = None, pool: WorkerPool | None = None) -> dict:
    """`personalize_run` on a Ray cluster (same folder, same states); raises UsersFailed if some users failed."""
    options = options or RayOptions()
    out = Path(out_dir).resolve()
    users = run_users(spec)
    with _pool(spec, options, pool) as workers:
        open_run(spec, out, workers.identity, len(users))
        done = personalized_users(out)
        tick = progress(f"personalize {spec.task} {spec.method} (ray, {len(workers.actors)} workers)",
                        sum(u in done for u in users.ids), len(users)) if progress else None
        states = str(out / "states")
        run_chunks(workers.actors, out, out / PERSONALIZED, personalize_chunks(users, chunk_users, done),
                   lambda actor, chunk: actor.personalize.remote(chunk.users, states), tick, options.in_flight)
    return personalize_summary(out, len(users))


