"""Mixed-user micro-batching: predict requests that arrive within a few milliseconds of each other share one forward.

Each HTTP request brings a few (state, query) rows. They wait in one bounded queue; a single model thread takes the
oldest request, then keeps gathering until `max_batch` rows are in hand or `max_wait_ms` has passed since that request
arrived, and answers them with one `predict` call per method (a server has the personalized method and the
non-personalized one). `LMPersonalizer.predict` already gives each row its own user's edit or adapter inside that one
forward, so a batch of sixteen users costs about what a batch of sixteen queries of one user costs.

The queue is bounded in rows: when it is full a request is refused at once (`QueueFull`, a 503) instead of waiting
without end. The model thread holds `model_lock` while it runs, which the personalize worker also takes: the backbone's
hooks are installed per forward, so two forwards at once would see each other's edits.

A failing batch is retried request by request, so a request that cannot be answered fails alone.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections import deque
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Callable, Sequence

from tailor.methods.base import Prediction
from tailor.store.state import UserState
from tailor.tasks.records import Query

Row = tuple[str, UserState, Query]
"""(method key, state, query): the key picks which method answers the row."""
Runner = Callable[[str, list[tuple[UserState, Query]]], list[Prediction]]


class QueueFull(Exception):
    """The queue holds `max_queue` rows already; the client should retry later."""


@dataclass
class _Pending:
    rows: Sequence[Row]
    future: Future
    arrived: float = field(default_factory=time.monotonic)


@dataclass
class BatchStats:
    batches: int = 0
    rows: int = 0
    largest: int = 0
    refused: int = 0

    def to_json(self) -> dict[str, float]:
        return {"batches": self.batches, "rows": self.rows, "largest_batch": self.largest, "refused": self.refused,
                "mean_batch": round(self.rows / self.batches, 3) if self.batches else 0.0}


class MicroBatcher:
    def __init__(self, run: Runner, model_lock: threading.Lock, max_batch: int = 16, max_wait_ms: float = 5.0,
                 max_queue: int = 256):
        if max_batch < 1 or max_queue < max_batch:
            raise ValueError(f"need 1 <= max_batch <= max_queue, got max_batch={max_batch}, max_queue={max_queue}")
        self.run = run
        self.model_lock = model_lock
        self.max_batch = max_batch
        self.max_wait = max_wait_ms / 1000
        self.max_queue = max_queue
        self.stats = BatchStats()
        self._pending: deque[_Pending] = deque()
        self._queued_rows = 0
        self._ready = threading.Condition()
        self._stopping = False
        self._thread = threading.Thread(target=self._loop, name="tailor-batcher", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        with self._ready:
            self._stopping = True
            self._ready.notify_all()
        self._thread.join(timeout=30)

    def submit(self, rows: Sequence[Row]) -> Future:
        """Queue rows for the model thread; raises QueueFull when they do not fit."""
        pending = _Pending(rows, Future())
        with self._ready:
            if self._queued_rows + len(rows) > self.max_queue:
                self.stats.refused += 1
                raise QueueFull(f"the predict queue is full ({self._queued_rows} rows waiting, at most "
                                f"{self.max_queue}); retry shortly")
            self._pending.append(pending)
            self._queued_rows += len(rows)
            self._ready.notify_all()
        return pending.future

    async def predict(self, rows: Sequence[Row]) -> list[Prediction]:
        return await asyncio.wrap_future(self.submit(rows))

    def _take(self) -> list[_Pending] | None:
        """The next batch: wait for a first request, then gather until full or its wait is over."""
        with self._ready:
            while not self._pending and not self._stopping:
                self._ready.wait()
            if not self._pending:  # stopping, and every queued request was answered
                return None
            deadline = self._pending[0].arrived + self.max_wait
            while (self._queued_rows < self.max_batch and not self._stopping
                   and (left := deadline - time.monotonic()) > 0):
                self._ready.wait(left)
            taken = [self._pending.popleft()]
            size = len(taken[0].rows)
            while self._pending and size + len(self._pending[0].rows) <= self.max_batch:
                taken.append(self._pending.popleft())
                size += len(taken[-1].rows)
            self._queued_rows -= size
            self.stats.batches += 1
            self.stats.rows += size
            self.stats.largest = max(self.stats.largest, size)
            return taken

    def _answer(self, batch: Sequence[_Pending]) -> list[list[Prediction]]:
        """Predictions per request; one predict call per method key over the rows of every request."""
        rows = [row for pending in batch for row in pending.rows]
        answers: dict[int, Prediction] = {}
        for key in dict.fromkeys(key for key, _, _ in rows):
            where = [i for i, (k, _, _) in enumerate(rows) if k == key]
            answers.update(zip(where, self.run(key, [(rows[i][1], rows[i][2]) for i in where])))
        out, start = [], 0
        for pending in batch:
            out.append([answers[i] for i in range(start, start + len(pending.rows))])
            start += len(pending.rows)
        return out

    def _resolve(self, batch: Sequence[_Pending]) -> None:
        try:
            results = self._answer(batch)
        except Exception as error:
            if len(batch) == 1:
                batch[0].future.set_exception(error)
            else:  # isolate the request that failed
                for pending in batch:
                    self._resolve([pending])
            return
        for pending, predictions in zip(batch, results):
            pending.future.set_result(predictions)

    def _loop(self) -> None:
        while (batch := self._take()) is not None:
            live = [p for p in batch if p.future.set_running_or_notify_cancel()]  # drop requests whose client left
            if live:
                with self.model_lock:
                    self._resolve(live)
