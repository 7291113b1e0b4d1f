"""A disk cache for text the backbone writes (profile summaries, insights, synthetic answers).

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

from tailor.backbone.loading import cache_root


def text_key(*parts: object) -> str:
    """A stable key for whatever determines a generated text."""
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()


class TextCache:
    def __init__(self, path: str | Path | None = None):
        self.path = Path(path) if path else cache_root() / "text-cache.sqlite"
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._local = threading.local()

    @property
    def _db(self) -> sqlite3.Connection:
        db = getattr(self._local, "db", None)
        if db is None:
            db = sqlite3.connect(self.path, timeout=30)
            db.execute("PRAGMA journal_mode=WAL")
            db.execute("CREATE TABLE IF NOT EXISTS text (key TEXT PRIMARY KEY, value TEXT NOT NULL)")
            self._local.db = db
        return db

    def get(self, key: str) -> str | None:
        row = self._db.execute("SELECT value FROM text WHERE key = ?", (key,)).fetchone()
        return row[0] if row else None

    def get_many(self, keys: list[str]) -> dict[str, str]:
        found: dict[str, str] = {}
        for start in range(0, len(keys), 500):
            chunk = keys[start:start + 500]
            marks = ",".join("?" * len(chunk))
            found.update(self._db.execute(f"SELECT key, value FROM text WHERE key IN ({marks})", chunk).fetchall())
        return found

    def put_many(self, items: dict[str, str]) -> None:
        with self._db:
            self._db.executemany("INSERT OR REPLACE INTO text (key, value) VALUES (?, ?)", items.items())
