"""Mixed-user micro-batching: rows that arrive within a few milliseconds of each other share one forward.

Each HTTP request brings a few rows, each a (key, payload) pair: the key says what answers the row (a deployment, its
personalized method or the base one, label scoring or generation with a token budget), the payload what to answer
((state, query), and how to sample). Rows wait in one bounded queue; a single model thread takes the oldest, then
keeps gathering until `max_batch` rows are in hand or `max_wait_ms` has passed since that row arrived, and answers them
with one call per key. `LMPersonalizer.predict` already gives each row its own user's edit or adapter inside that one
forward, so a batch of sixteen users costs about what a batch of sixteen queries of one user costs.

The queue is bounded in rows: when a request's rows do not fit it is refused at once (`QueueFull`, a 503) instead of
waiting without end. A server has one batcher per backbone, whose thread is the only one running that backbone's
forwards: its hooks are installed per forward, so two forwards at once would see each other's edits (personalize jobs
run in another process, with their own copy).

Every row has its own future, and a failing call is retried row by row, so a row that cannot be answered fails alone.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections import deque
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any, Callable, Hashable, Sequence

Row = tuple[Hashable, Any]
"""(key, payload): rows of one key are answered by one call."""
Runner = Callable[[Any, list[Any]], list[Any]]
"""Answers for the payloads of one key, in order."""


class QueueFull(Exception):
    """The queue holds `max_queue` rows already; the client should retry later."""


@dataclass
class _Pending:
    key: Hashable
    payload: Any
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
    def __init__(self, run: Runner, max_batch: int = 16, max_wait_ms: float = 5.0, max_queue: int = 256,
                 on_batch: Callable[[int], None] | None = None):
        if max_batch < 1 or max_queue < max_batch:
            raise ValueError(f"need 1 <= max_batch <= max_queue, got max_batch={max_batch}, max_queue={max_queue}")
        self.run = run
        self.on_batch = on_batch
        """Told the size of every batch taken (the server's batch-size histogram)."""
        self.max_batch = max_batch
        self.max_wait = max_wait_ms / 1000
        self.max_queue = max_queue
        self.stats = BatchStats()
        self._pending: deque[_Pending] = deque()
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

    @property
    def queued_rows(self) -> int:
        return len(self._pending)

    def submit(self, rows: Sequence[Row]) -> list[Future]:
        """Queue rows for the model thread, a future for each; raises QueueFull (queuing none) when they do not
        all fit."""
        pending = [_Pending(key, payload, Future()) for key, payload in rows]
        with self._ready:
            if len(self._pending) + len(pending) > self.max_queue:
                self.stats.refused += 1
                raise QueueFull(f"the predict queue is full ({len(self._pending)} rows waiting, at most "
                                f"{self.max_queue}); retry shortly")
            self._pending.extend(pending)
            self._ready.notify_all()
        return [p.future for p in pending]

    async def answer(self, rows: Sequence[Row]) -> list[Any]:
        """Each row's answer, or the exception that row failed with."""
        futures = [asyncio.wrap_future(f) for f in self.submit(rows)]
        return await asyncio.gather(*futures, return_exceptions=True)

    def _take(self) -> list[_Pending] | None:
        """The next batch: wait for a first row, then gather until full or its wait is over."""
        with self._ready:
            while not self._pending and not self._stopping:
                self._ready.wait()
            if not self._pending:  # stopping, and every queued row was answered
                return None
            deadline = self._pending[0].arrived + self.max_wait
            while (len(self._pending) < self.max_batch and not self._stopping
                   and (left := deadline - time.monotonic()) > 0):
                self._ready.wait(left)
            taken = [self._pending.popleft() for _ in range(min(self.max_batch, len(self._pending)))]
            self.stats.batches += 1
            self.stats.rows += len(taken)
            self.stats.largest = max(self.stats.largest, len(taken))
        if self.on_batch:
            self.on_batch(len(taken))
        return taken

    def _resolve(self, batch: Sequence[_Pending]) -> None:
        """One call per key over the batch's rows; a call that fails is retried row by row."""
        for key in dict.fromkeys(p.key for p in batch):
            rows = [p for p in batch if p.key == key]
            try:
                answers = self.run(key, [p.payload for p in rows])
            except Exception as error:
                if len(rows) == 1:
                    rows[0].future.set_exception(error)
                else:  # isolate the row that failed
                    for row in rows:
                        self._resolve([row])
                continue
            for row, answer in zip(rows, answers):
                row.future.set_result(answer)

    def _loop(self) -> None:
        while (batch := self._take()) is not None:
            live = [p for p in batch if p.future.set_running_or_notify_cancel()]  # drop rows whose client left
            if live:
                self._resolve(live)
