"""The user store: every tenant's users, their history, their personalized states and personalize jobs, in one folder.

Layout: `root/index.sqlite` (WAL) indexes tenants, users, history items, states and jobs; each state is one
safetensors file `root/tenants/<tenant>/users/<user>/state-<slot>-<checksum>.safetensors`, written by
`UserState.save` (temporary file, fsync, rename), its folder fsynced, and only then recorded in the index. The index
therefore always names a complete file, and a process killed at any point leaves at worst an unreferenced file
(removed by `sweep`). The index keeps the state's sha256 (the one `UserState.checksum` computes), so a file replaced
or damaged behind the store's back is refused with the user's name instead of answering with somebody else's state.

A user holds one state per *slot*: the server keeps one slot per deployment, so the same history backs a RAG
deployment and a LoRA one. History is append-only per user and idempotent by item id: an item whose id is already
stored is not stored again, and one stored with other content is refused (`ItemConflict`). A state records how many
history items it was built from, so it is stale exactly when items were appended after the snapshot it was built
from. Writers of one user (append, save a state, delete) are serialised across threads and processes by a file lock
(one of 64 stripes, so forgotten users leave no lock file behind) held around a `BEGIN IMMEDIATE` transaction; a
state built from an older snapshot than the saved one is not written over it.

Tenants authenticate with an API key `tailor-<tenant id>-<secret>`; only a salted scrypt hash of the key is stored. A
key can be revoked or rotated (a new secret) from another process: every check reads the tenant's row, so a running
server refuses a revoked key at its next request. Personalize jobs are rows too, so the process that answers and the
one that trains share them through the store: the server queues a job, the worker claims it (`claim_jobs`), and both
read its status here. User ids are checked against a strict pattern here, at the boundary, so no id can name a path
outside its folder.
"""

from __future__ import annotations

import fcntl
import hashlib
import hmac
import json
import os
import re
import secrets
import shutil
import sqlite3
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Sequence

from tailor.store.paths import is_safe_user_id
from tailor.store.state import StateError, UserState
from tailor.tasks.records import HistoryItem, User

SCHEMA_VERSION = 2
LOCK_STRIPES = 64
DEFAULT_SLOT = "default"
"""The state slot of a store that one method uses, and where a version 1 store's states are kept."""
_SCRYPT = {"n": 2 ** 14, "r": 8, "p": 1, "dklen": 32}

_SCHEMA = """
CREATE TABLE tenants (
    id TEXT PRIMARY KEY, name TEXT NOT NULL UNIQUE, key_salt BLOB NOT NULL, key_hash BLOB NOT NULL,
    created REAL NOT NULL, key_created REAL, revoked REAL);
CREATE TABLE users (
    tenant TEXT NOT NULL REFERENCES tenants(id), user_id TEXT NOT NULL, task TEXT NOT NULL,
    items INTEGER NOT NULL, updated REAL NOT NULL, PRIMARY KEY (tenant, user_id));
CREATE TABLE history (
    tenant TEXT NOT NULL, user_id TEXT NOT NULL, seq INTEGER NOT NULL, item TEXT NOT NULL, item_id TEXT NOT NULL,
    PRIMARY KEY (tenant, user_id, seq));
CREATE INDEX history_ids ON history (tenant, user_id, item_id);
CREATE TABLE states (
    tenant TEXT NOT NULL, user_id TEXT NOT NULL, slot TEXT NOT NULL, state_file TEXT NOT NULL, checksum TEXT NOT NULL,
    method TEXT, version INTEGER, model_id TEXT, state_items INTEGER NOT NULL, state_bytes INTEGER,
    updated REAL NOT NULL, PRIMARY KEY (tenant, user_id, slot));
CREATE TABLE jobs (
    id TEXT PRIMARY KEY, tenant TEXT NOT NULL, user_id TEXT NOT NULL, status TEXT NOT NULL, detail TEXT NOT NULL,
    created REAL NOT NULL, updated REAL NOT NULL, slot TEXT NOT NULL);
CREATE INDEX jobs_by_user ON jobs (tenant, user_id, status);
CREATE INDEX jobs_by_status ON jobs (status, created)
"""
_FROM_V1 = """
ALTER TABLE tenants ADD COLUMN key_created REAL;
ALTER TABLE tenants ADD COLUMN revoked REAL;
UPDATE tenants SET key_created = created;
ALTER TABLE history ADD COLUMN item_id TEXT NOT NULL DEFAULT '';
CREATE INDEX history_ids ON history (tenant, user_id, item_id);
CREATE TABLE states (
    tenant TEXT NOT NULL, user_id TEXT NOT NULL, slot TEXT NOT NULL, state_file TEXT NOT NULL, checksum TEXT NOT NULL,
    method TEXT, version INTEGER, model_id TEXT, state_items INTEGER NOT NULL, state_bytes INTEGER,
    updated REAL NOT NULL, PRIMARY KEY (tenant, user_id, slot));
INSERT INTO states SELECT tenant, user_id, 'default', state_file, checksum, method, version, model_id,
    COALESCE(state_items, 0), state_bytes, updated FROM users WHERE state_file IS NOT NULL;
ALTER TABLE users DROP COLUMN state_file;
ALTER TABLE users DROP COLUMN checksum;
ALTER TABLE users DROP COLUMN method;
ALTER TABLE users DROP COLUMN version;
ALTER TABLE users DROP COLUMN model_id;
ALTER TABLE users DROP COLUMN state_items;
ALTER TABLE users DROP COLUMN state_bytes;
ALTER TABLE jobs ADD COLUMN slot TEXT NOT NULL DEFAULT 'default';
CREATE INDEX jobs_by_status ON jobs (status, created)
"""
"""Version 1 kept one state per user in its `users` row: it moves to the `default` slot, and each history item's id
is copied out of its JSON into `item_id` (by `_migrate`)."""
UNFINISHED = ("queued", "running")
_RECORDS = ("SELECT u.tenant, u.user_id, u.task, u.items, ? AS slot, s.state_file, s.checksum, s.method, s.version, "
            "s.model_id, s.state_items, s.state_bytes, MAX(u.updated, COALESCE(s.updated, 0)) AS updated FROM users u "
            "LEFT JOIN states s ON s.tenant = u.tenant AND s.user_id = u.user_id AND s.slot = ? WHERE u.tenant = ?")


class StoreError(Exception):
    """A request the store cannot carry out; the message says why and names the user."""


class InvalidId(StoreError, ValueError):
    """A user id or tenant name outside the allowed pattern."""


class UnknownUser(StoreError, KeyError):
    def __str__(self) -> str:
        return str(self.args[0])


class UnknownTenant(StoreError, KeyError):
    def __str__(self) -> str:
        return str(self.args[0])


class TaskMismatch(StoreError):
    """History for a user of another task (a store may hold several tasks; one user belongs to one)."""


class ItemConflict(StoreError):
    """A history item whose id is already stored with other content."""


def check_user_id(user_id: str) -> str:
    if not is_safe_user_id(user_id):
        raise InvalidId(f"invalid user id {str(user_id)[:140]!r}: use 1-128 letters, digits, '_', '.' or '-', "
                        "not starting with '.' or '-'")
    return user_id


@dataclass(frozen=True)
class UserRecord:
    """One user's row of the index, with their state in one slot (if any): how much history they have and how much
    of it the state was built from."""

    tenant: str
    user_id: str
    task: str
    items: int
    slot: str
    state_file: str | None
    checksum: str | None
    method: str | None
    version: int | None
    model_id: str | None
    state_items: int | None
    state_bytes: int | None
    updated: float

    @property
    def has_state(self) -> bool:
        return self.state_file is not None

    @property
    def stale(self) -> bool:
        """History was appended after the snapshot the state was built from."""
        return self.has_state and (self.state_items or 0) < self.items

    def to_json(self) -> dict[str, Any]:
        state = None if not self.has_state else {
            "method": self.method, "version": self.version, "model_id": self.model_id, "checksum": self.checksum,
            "items": self.state_items, "bytes": self.state_bytes}
        return {"user_id": self.user_id, "task": self.task, "items": self.items, "state": state,
                "stale": self.stale, "updated": self.updated}


@dataclass(frozen=True)
class Appended:
    """What `add_history` did: the user's record after it, how many items it stored, and the ids it did not store
    again because they were stored already."""

    record: UserRecord
    added: int
    duplicates: tuple[str, ...]


def _item_from_json(raw: str) -> HistoryItem:
    data = json.loads(raw)
    return HistoryItem(str(data.pop("id")), {k: v for k, v in data.items() if k != "date"}, data.get("date"))


def _hash_key(secret: str, salt: bytes) -> bytes:
    return hashlib.scrypt(secret.encode(), salt=salt, **_SCRYPT)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _statements(script: str) -> list[str]:
    return [part.strip() for part in script.split(";\n") if part.strip()]


class Store:
    """The embedded store: SQLite index plus safetensors blobs under `root`; safe across threads and processes."""

    def __init__(self, root: str | Path):
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        (self.root / "locks").mkdir(exist_ok=True)
        self._local = threading.local()
        self._verified: dict[str, bytes] = {}
        """sha256 of API keys already checked -> the key hash they matched: scrypt costs ~50 ms a call."""
        with self._write() as db:  # creating or migrating, one process at a time
            version = db.execute("PRAGMA user_version").fetchone()[0]
            if version > SCHEMA_VERSION:
                raise StoreError(f"{self.root}: store schema version {version}, this tailor reads up to "
                                 f"{SCHEMA_VERSION}; upgrade tailor")
            if version < SCHEMA_VERSION:
                self._migrate(db, version)
                db.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")

    @staticmethod
    def _migrate(db: sqlite3.Connection, version: int) -> None:
        if version == 0:
            for statement in _statements(_SCHEMA):
                db.execute(statement)
            return
        for statement in _statements(_FROM_V1):
            db.execute(statement)
        for rowid, item in db.execute("SELECT rowid, item FROM history").fetchall():
            db.execute("UPDATE history SET item_id = ? WHERE rowid = ?", (str(json.loads(item)["id"]), rowid))

    @property
    def _db(self) -> sqlite3.Connection:
        db = getattr(self._local, "db", None)
        if db is None:
            db = sqlite3.connect(self.root / "index.sqlite", timeout=60, isolation_level=None)
            db.execute("PRAGMA journal_mode=WAL")
            db.execute("PRAGMA synchronous=FULL")
            db.row_factory = sqlite3.Row
            self._local.db = db
        return db

    @contextmanager
    def _write(self) -> Iterator[sqlite3.Connection]:
        """One write transaction, taking SQLite's write lock at the start (no upgrade deadlocks between writers)."""
        db = self._db
        db.execute("BEGIN IMMEDIATE")
        try:
            yield db
        except BaseException:
            db.execute("ROLLBACK")
            raise
        db.execute("COMMIT")

    @contextmanager
    def _user_lock(self, tenant: str, user_id: str) -> Iterator[None]:
        stripe = int(hashlib.sha256(f"{tenant}/{user_id}".encode()).hexdigest()[:8], 16) % LOCK_STRIPES
        with open(self.root / "locks" / f"{stripe:02d}.lock", "a+") as handle:
            fcntl.flock(handle, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(handle, fcntl.LOCK_UN)

    def _user_dir(self, tenant: str, user_id: str) -> Path:
        return self.root / "tenants" / tenant / "users" / check_user_id(user_id)

    # --- tenants ---------------------------------------------------------------------------------------------------
    def create_tenant(self, name: str) -> tuple[str, str]:
        """A new tenant; returns (tenant id, API key). The key is shown once: only its salted hash is kept."""
        if not is_safe_user_id(name):
            raise InvalidId(f"invalid tenant name {name!r}: use 1-128 letters, digits, '_', '.' or '-'")
        tenant = secrets.token_hex(6)
        secret, salt = secrets.token_urlsafe(32), secrets.token_bytes(16)
        try:
            with self._write() as db:
                now = time.time()
                db.execute("INSERT INTO tenants VALUES (?, ?, ?, ?, ?, ?, NULL)",
                           (tenant, name, salt, _hash_key(secret, salt), now, now))
        except sqlite3.IntegrityError as error:
            raise StoreError(f"a tenant named {name!r} already exists") from error
        return tenant, f"tailor-{tenant}-{secret}"

    def authenticate(self, api_key: str) -> str | None:
        """The tenant an API key belongs to, or None (also for a revoked key, or one replaced by `rotate_key`)."""
        match = re.fullmatch(r"tailor-([0-9a-f]{12})-([A-Za-z0-9_-]{20,100})", api_key)
        if not match:
            return None
        row = self._db.execute("SELECT key_salt, key_hash, revoked FROM tenants WHERE id = ?", (match[1],)).fetchone()
        if row is None or row["revoked"] is not None:
            return None
        digest = hashlib.sha256(api_key.encode()).hexdigest()
        if self._verified.get(digest) != row["key_hash"]:
            if not hmac.compare_digest(_hash_key(match[2], row["key_salt"]), row["key_hash"]):
                return None
            self._verified[digest] = row["key_hash"]
        return match[1]

    def tenants(self) -> list[dict[str, Any]]:
        """Every tenant: id, name, when it and its key were created, when the key was revoked (or None), its users."""
        rows = self._db.execute("SELECT t.id, t.name, t.created, t.key_created, t.revoked, (SELECT count(*) FROM users "
                                "u WHERE u.tenant = t.id) AS users FROM tenants t ORDER BY t.created").fetchall()
        return [dict(row) for row in rows]

    def tenant_id(self, name_or_id: str) -> str:
        """The id of the tenant with this name or id."""
        row = self._db.execute("SELECT id FROM tenants WHERE name = ? OR id = ?", (name_or_id, name_or_id)).fetchone()
        if row is None:
            raise UnknownTenant(f"no tenant named {name_or_id!r} in {self.root}")
        return row["id"]

    def revoke_key(self, tenant: str) -> bool:
        """Refuse the tenant's key from now on (its users stay); False when it was revoked already."""
        with self._write() as db:
            return bool(db.execute("UPDATE tenants SET revoked = ? WHERE id = ? AND revoked IS NULL",
                                   (time.time(), tenant)).rowcount)

    def rotate_key(self, tenant: str) -> str:
        """A new API key for the tenant, returned once; the old one (revoked or not) stops working."""
        secret, salt = secrets.token_urlsafe(32), secrets.token_bytes(16)
        with self._write() as db:
            changed = db.execute("UPDATE tenants SET key_salt = ?, key_hash = ?, key_created = ?, revoked = NULL "
                                 "WHERE id = ?", (salt, _hash_key(secret, salt), time.time(), tenant)).rowcount
        if not changed:
            raise UnknownTenant(f"no tenant {tenant!r} in {self.root}")
        return f"tailor-{tenant}-{secret}"

    # --- users and history -------------------------------------------------------------------------------------
    def _record(self, db: sqlite3.Connection, tenant: str, user_id: str, slot: str) -> UserRecord | None:
        row = db.execute(_RECORDS + " AND u.user_id = ?", (slot, slot, tenant, user_id)).fetchone()
        return UserRecord(**dict(row)) if row is not None else None

    def record(self, tenant: str, user_id: str, slot: str = DEFAULT_SLOT) -> UserRecord:
        found = self._record(self._db, tenant, check_user_id(user_id), slot)
        if found is None:
            raise UnknownUser(f"unknown user {user_id!r}")
        return found

    def records(self, tenant: str, user_ids: Sequence[str], slot: str = DEFAULT_SLOT) -> dict[str, UserRecord]:
        """The rows of several users at once (the predict path looks up a whole batch)."""
        ids = sorted({check_user_id(u) for u in user_ids})
        found: dict[str, UserRecord] = {}
        for start in range(0, len(ids), 500):
            chunk = ids[start:start + 500]
            rows = self._db.execute(_RECORDS + f" AND u.user_id IN ({','.join('?' * len(chunk))})",
                                    (slot, slot, tenant, *chunk)).fetchall()
            found.update({row["user_id"]: UserRecord(**dict(row)) for row in rows})
        return found

    def users(self, tenant: str, slot: str = DEFAULT_SLOT) -> list[UserRecord]:
        rows = self._db.execute(_RECORDS + " ORDER BY u.user_id", (slot, slot, tenant)).fetchall()
        return [UserRecord(**dict(row)) for row in rows]

    def add_history(self, tenant: str, user_id: str, task: str, items: Sequence[HistoryItem],
                    slot: str = DEFAULT_SLOT) -> Appended:
        """Append items to a user's history (creating the user); a state built before becomes stale.

        An item without an id gets `<user>-<position>`. An item whose id is stored already (or given twice) is not
        stored again; if its content differs, nothing of the call is stored and `ItemConflict` names it."""
        check_user_id(user_id)
        with self._user_lock(tenant, user_id), self._write() as db:
            record = self._record(db, tenant, user_id, slot)
            if record is not None and record.task != task:
                raise TaskMismatch(f"user {user_id!r} holds {record.task} history, not {task}")
            start = record.items if record is not None else 0
            known = self._stored_items(db, tenant, user_id, [item.id for item in items if item.id])
            rows, duplicates = [], []
            for item in items:
                seq = start + len(rows) + 1
                stored = HistoryItem(item.id or f"{user_id}-{seq}", item.fields, item.date).to_json()
                if stored["id"] in known:
                    if known[stored["id"]] != stored:
                        raise ItemConflict(f"history item {stored['id']!r} of user {user_id!r} is stored already "
                                           "with other content; give a new item a new id")
                    duplicates.append(stored["id"])
                    continue
                known[stored["id"]] = stored
                rows.append((tenant, user_id, seq, json.dumps(stored), stored["id"]))
            db.executemany("INSERT INTO history (tenant, user_id, seq, item, item_id) VALUES (?, ?, ?, ?, ?)", rows)
            now = time.time()
            if record is None:
                db.execute("INSERT INTO users (tenant, user_id, task, items, updated) VALUES (?, ?, ?, ?, ?)",
                           (tenant, user_id, task, len(rows), now))
            elif rows:
                db.execute("UPDATE users SET items = ?, updated = ? WHERE tenant = ? AND user_id = ?",
                           (start + len(rows), now, tenant, user_id))
            found = self._record(db, tenant, user_id, slot)
        assert found is not None
        return Appended(found, len(rows), tuple(duplicates))

    @staticmethod
    def _stored_items(db: sqlite3.Connection, tenant: str, user_id: str,
                      item_ids: Sequence[str]) -> dict[str, dict[str, Any]]:
        """The stored items among `item_ids`, by id, as JSON."""
        found: dict[str, dict[str, Any]] = {}
        ids = sorted(set(item_ids))
        for start in range(0, len(ids), 500):
            chunk = ids[start:start + 500]
            rows = db.execute(f"SELECT item_id, item FROM history WHERE tenant = ? AND user_id = ? AND item_id IN "
                              f"({','.join('?' * len(chunk))})", (tenant, user_id, *chunk)).fetchall()
            found.update({row["item_id"]: json.loads(row["item"]) for row in rows})
        return found

    def history(self, tenant: str, user_id: str, upto: int | None = None) -> list[HistoryItem]:
        rows = self._db.execute("SELECT item FROM history WHERE tenant = ? AND user_id = ? AND seq <= ? ORDER BY seq",
                                (tenant, check_user_id(user_id), upto if upto is not None else 2 ** 62)).fetchall()
        return [_item_from_json(row["item"]) for row in rows]

    def snapshot(self, tenant: str, user_id: str, slot: str = DEFAULT_SLOT) -> tuple[User, UserRecord]:
        """The user with all their history, and their row, read in one transaction (a consistent snapshot)."""
        db = self._db
        db.execute("BEGIN")
        try:
            record = self._record(db, tenant, check_user_id(user_id), slot)
            items = self.history(tenant, user_id) if record is not None else []
        finally:
            db.execute("COMMIT")
        if record is None:
            raise UnknownUser(f"unknown user {user_id!r}")
        return User(user_id, record.task, tuple(items)), record

    def delete_user(self, tenant: str, user_id: str) -> bool:
        """Forget a user: history, state files, jobs and index rows. False when there was no such user."""
        folder = self._user_dir(tenant, user_id)
        with self._user_lock(tenant, user_id):
            with self._write() as db:
                gone = db.execute("DELETE FROM users WHERE tenant = ? AND user_id = ?", (tenant, user_id)).rowcount
                for table in ("history", "states", "jobs"):
                    db.execute(f"DELETE FROM {table} WHERE tenant = ? AND user_id = ?", (tenant, user_id))
            shutil.rmtree(folder, ignore_errors=True)
        return bool(gone)

    # --- states ------------------------------------------------------------------------------------------------
    def save_state(self, tenant: str, user_id: str, state: UserState, items: int, slot: str = DEFAULT_SLOT) -> bool:
        """Record `state`, built from the user's first `items` history items, as the user's state in `slot`.

        Returns False (and keeps nothing) when the user was deleted meanwhile or already has a state built from more
        history in that slot: a slow job that finishes last must not replace a newer state.
        """
        if state.user_id != user_id:
            raise StoreError(f"state of user {state.user_id!r} offered for user {user_id!r}")
        folder = self._user_dir(tenant, user_id)
        checksum = state.checksum()
        path = folder / f"state-{check_user_id(slot)}-{checksum[:24]}.safetensors"
        with self._user_lock(tenant, user_id):
            record = self._record(self._db, tenant, user_id, slot)
            if record is None or (record.state_items or 0) > items:
                return False
            state.save(path)
            _fsync_dir(folder)
            with self._write() as db:
                db.execute("INSERT OR REPLACE INTO states VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                           (tenant, user_id, slot, path.name, checksum, state.method, state.version, state.model_id,
                            items, state.nbytes, time.time()))
            if record.state_file and record.state_file != path.name:
                (folder / record.state_file).unlink(missing_ok=True)
        return True

    def load_state(self, tenant: str, user_id: str, method: str | None = None, version: int | None = None,
                   model_id: str | None = None, record: UserRecord | None = None) -> UserState:
        """The user's saved state (in `record`'s slot, by default the default one), refused with a StateError naming
        the user if it is missing, corrupt, truncated, not the file the index recorded, or made for another method,
        method version or backbone."""
        record = record or self.record(tenant, user_id)
        if not record.has_state:
            raise StateError(f"user {user_id!r} has no state yet; personalize the user first")
        path = self._user_dir(tenant, user_id) / str(record.state_file)
        try:
            state = UserState.load(path, method, version, model_id)
        except StateError as error:
            raise StateError(f"user {user_id!r}: {error}") from error
        if state.checksum() != record.checksum or state.user_id != user_id:
            raise StateError(f"user {user_id!r}: the state file {path} is not the one the index recorded (sha256 "
                             f"{str(record.checksum)[:12]}...); personalize the user again")
        return state

    def slots(self, tenant: str, user_id: str) -> list[str]:
        """The slots in which the user has a state."""
        rows = self._db.execute("SELECT slot FROM states WHERE tenant = ? AND user_id = ? ORDER BY slot",
                                (tenant, check_user_id(user_id))).fetchall()
        return [row["slot"] for row in rows]

    # --- personalize jobs --------------------------------------------------------------------------------------
    def create_job(self, tenant: str, user_id: str, slot: str = DEFAULT_SLOT) -> tuple[dict[str, Any], bool]:
        """A queued job for the user's state in `slot`, or the unfinished one; the flag says whether it is new."""
        with self._write() as db:
            row = db.execute(f"SELECT * FROM jobs WHERE tenant = ? AND user_id = ? AND slot = ? AND status IN "
                             f"({','.join('?' * len(UNFINISHED))}) ORDER BY created LIMIT 1",
                             (tenant, check_user_id(user_id), slot, *UNFINISHED)).fetchone()
            if row is not None:
                return self._job_json(row), False
            job_id, now = secrets.token_hex(8), time.time()
            db.execute("INSERT INTO jobs VALUES (?, ?, ?, 'queued', '{}', ?, ?, ?)",
                       (job_id, tenant, user_id, now, now, slot))
            new = db.execute("SELECT * FROM jobs WHERE id = ?", (job_id,)).fetchone()
        return self._job_json(new), True

    def claim_jobs(self, slots: Sequence[str], limit: int) -> list[dict[str, Any]]:
        """The oldest queued jobs of these slots (at most `limit`), marked running in the same transaction, so two
        workers never take the same job."""
        with self._write() as db:
            rows = db.execute(f"SELECT * FROM jobs WHERE status = 'queued' AND slot IN ({','.join('?' * len(slots))}) "
                              "ORDER BY created LIMIT ?", (*slots, limit)).fetchall()
            now = time.time()
            db.executemany("UPDATE jobs SET status = 'running', updated = ? WHERE id = ?",
                           [(now, row["id"]) for row in rows])
        return [{**self._job_json(row), "status": "running"} for row in rows]

    def set_job(self, job_id: str, status: str, **detail: Any) -> None:
        with self._write() as db:
            db.execute("UPDATE jobs SET status = ?, detail = ?, updated = ? WHERE id = ?",
                       (status, json.dumps(detail), time.time(), job_id))

    def job(self, tenant: str, job_id: str) -> dict[str, Any] | None:
        row = self._db.execute("SELECT * FROM jobs WHERE id = ? AND tenant = ?", (job_id, tenant)).fetchone()
        return self._job_json(row) if row is not None else None

    def interrupt_running(self, slots: Sequence[str], error: str) -> int:
        """Mark the running jobs of these slots interrupted (their worker is gone); how many there were."""
        with self._write() as db:
            return db.execute(f"UPDATE jobs SET status = 'interrupted', detail = ?, updated = ? WHERE status = "
                              f"'running' AND slot IN ({','.join('?' * len(slots))})",
                              (json.dumps({"error": error}), time.time(), *slots)).rowcount

    def job_counts(self) -> dict[tuple[str, str], int]:
        """How many jobs each (slot, status) has."""
        rows = self._db.execute("SELECT slot, status, count(*) AS n FROM jobs GROUP BY slot, status").fetchall()
        return {(row["slot"], row["status"]): row["n"] for row in rows}

    @staticmethod
    def _job_json(row: sqlite3.Row) -> dict[str, Any]:
        return {"job_id": row["id"], "tenant": row["tenant"], "user_id": row["user_id"], "slot": row["slot"],
                "status": row["status"], "created": row["created"], "updated": row["updated"],
                **json.loads(row["detail"])}

    # --- housekeeping ------------------------------------------------------------------------------------------
    def sweep(self, older_than_s: float = 3600.0) -> list[Path]:
        """Remove temporary and unreferenced state files left by killed writers; returns what was removed.

        Only files older than `older_than_s` go: a younger unreferenced file may be a state another process has
        just written and is about to record.
        """
        referenced = {(row["tenant"], row["user_id"], row["state_file"]) for row in
                      self._db.execute("SELECT tenant, user_id, state_file FROM states")}
        cutoff = time.time() - older_than_s
        removed = []
        for path in (self.root / "tenants").glob("*/users/*/*"):
            tenant, user_id = path.parts[-4], path.parts[-2]
            if (tenant, user_id, path.name) not in referenced and path.stat().st_mtime < cutoff:
                path.unlink(missing_ok=True)
                removed.append(path)
        return removed

    def check(self) -> list[str]:
        """Problems of the store's consistency: index rows whose state file is missing or does not verify."""
        problems = [f"index: {row[0]}" for row in self._db.execute("PRAGMA integrity_check") if row[0] != "ok"]
        for row in self._db.execute("SELECT DISTINCT tenant, user_id, slot FROM states").fetchall():
            record = self.record(row["tenant"], row["user_id"], row["slot"])
            try:
                self.load_state(record.tenant, record.user_id, record=record)
            except StateError as error:
                problems.append(str(error))
        return problems
