"""Disk caches for what the frozen backbone produces: text it writes, and (tailor.backbone.hidden_cache) its hidden
states.

Generating a summary costs seconds per user and its result depends only on the model, the prompt and the history, so
it is stored under a hash of exactly those and reused by every later run, method and process. SQLite gives atomic
writes and safe concurrent readers for free.
"""

from __future__ import annotations

import hashlib
import json
import sqlite3
import threading
from pathlib import Path
from typing import Generic, TypeVar

from tailor.backbone.loading import cache_root

V = TypeVar("V", str, bytes)


def text_key(*parts: object) -> str:
    """A stable key for whatever determines a generated text."""
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()


class KeyValueStore(Generic[V]):
    """One SQLite table of key -> value, safe to share between threads and processes."""

    def __init__(self, path: Path, table: str, value_type: str):
        self.path = path
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.table = table
        self.value_type = value_type
        self._local = threading.local()

    @property
    def _db(self) -> sqlite3.Connection:
        db = getattr(self._local, "db", None)
        if db is None:
            db = sqlite3.connect(self.path, timeout=30)
            db.execute("PRAGMA journal_mode=WAL")
            db.execute(f"CREATE TABLE IF NOT EXISTS {self.table} (key TEXT PRIMARY KEY, value {self.value_type} "
                       "NOT NULL)")
            self._local.db = db
        return db

    def get_many(self, keys: list[str]) -> dict[str, V]:
        found: dict[str, V] = {}
        for start in range(0, len(keys), 500):
            chunk = keys[start:start + 500]
            marks = ",".join("?" * len(chunk))
            found.update(self._db.execute(f"SELECT key, value FROM {self.table} WHERE key IN ({marks})",
                                          chunk).fetchall())
        return found

    def put_many(self, items: dict[str, V]) -> None:
        with self._db:
            self._db.executemany(f"INSERT OR REPLACE INTO {self.table} (key, value) VALUES (?, ?)", items.items())


class TextCache(KeyValueStore[str]):
    def __init__(self, path: str | Path | None = None):
        super().__init__(Path(path) if path else cache_root() / "text-cache.sqlite", "text", "TEXT")

    def get(self, key: str) -> str | None:
        return self.get_many([key]).get(key)
