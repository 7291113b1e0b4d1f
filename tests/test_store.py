"""The user store: tenants and keys (revoked, rotated), history (idempotent by item id) and staleness, checksummed
versioned states in slots, deletion, jobs claimed across processes, concurrent writers, and a version 1 store
migrated."""

from __future__ import annotations

import os
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from tailor.store.state import StateError, UserState
from tailor.store.store import (InvalidId, ItemConflict, Store, StoreError, TaskMismatch, UnknownTenant,
                                UnknownUser)
from tailor.tasks.records import HistoryItem

pytestmark = pytest.mark.usefixtures("one_thread")


def items(*texts: str) -> list[HistoryItem]:
    return [HistoryItem("", {"text": t, "category": "sports"}) for t in texts]


def state_for(user_id: str, n: int, method: str = "rag", version: int = 1) -> UserState:
    return UserState(method, version, user_id, "tiny/2x32", {"n": n}, {"v": torch.arange(n, dtype=torch.float32)})


@pytest.fixture()
def store(tmp_path: Path) -> Store:
    return Store(tmp_path / "store")


@pytest.fixture()
def tenant(store: Store) -> str:
    return store.create_tenant("acme")[0]


def test_api_keys_are_stored_hashed_and_checked(store: Store) -> None:
    tenant, key = store.create_tenant("acme")
    other, other_key = store.create_tenant("globex")
    assert store.authenticate(key) == tenant and store.authenticate(other_key) == other
    secret = key.split("-", 2)[2]  # the secret itself may contain "-"
    assert store.authenticate(key[:-1] + ("A" if key[-1] != "A" else "B")) is None
    assert store.authenticate(f"tailor-{tenant}-{other_key.split('-', 2)[2]}") is None  # a key is bound to its tenant
    assert store.authenticate("") is None and store.authenticate("Bearer nonsense") is None
    index = (store.root / "index.sqlite").read_bytes() + (store.root / "index.sqlite-wal").read_bytes()
    assert secret.encode() not in index
    with pytest.raises(StoreError, match="already exists"):
        store.create_tenant("acme")


def test_revoked_and_rotated_keys_are_refused_at_once_in_every_process(store: Store) -> None:
    tenant, key = store.create_tenant("acme")
    server = Store(store.root)  # another process's view (its own connection and cache of checked keys)
    assert server.authenticate(key) == tenant
    assert store.tenant_id("acme") == tenant == store.tenant_id(tenant)
    assert store.revoke_key(tenant) and not store.revoke_key(tenant)
    assert server.authenticate(key) is None
    listed = {t["name"]: t for t in store.tenants()}
    assert listed["acme"]["revoked"] is not None and listed["acme"]["users"] == 0
    new_key = store.rotate_key(tenant)
    assert server.authenticate(new_key) == tenant and server.authenticate(key) is None
    assert store.tenants()[0]["revoked"] is None
    with pytest.raises(UnknownTenant, match="'nobody'"):
        store.tenant_id("nobody")


def test_history_is_idempotent_by_item_id(store: Store, tenant: str) -> None:
    first = [HistoryItem("a1", {"text": "x", "category": "sports"}),
             HistoryItem("a2", {"text": "y", "category": "crime"})]
    assert store.add_history(tenant, "u", "LaMP-2N", first).added == 2
    again = store.add_history(tenant, "u", "LaMP-2N", [first[1], HistoryItem("a3", {"text": "z", "category": "food"}),
                                                       HistoryItem("a3", {"text": "z", "category": "food"})])
    assert (again.added, again.duplicates, again.record.items) == (1, ("a2", "a3"), 3)
    store.save_state(tenant, "u", state_for("u", 3), 3)
    resent = store.add_history(tenant, "u", "LaMP-2N", first)
    assert (resent.added, resent.record.items, resent.record.stale) == (0, 3, False)  # a retry leaves it fresh
    with pytest.raises(ItemConflict, match="'a1' of user 'u'.*other content"):
        store.add_history(tenant, "u", "LaMP-2N", [HistoryItem("b", {"text": "new", "category": "food"}),
                                                   HistoryItem("a1", {"text": "changed", "category": "sports"})])
    assert [i.id for i in store.history(tenant, "u")] == ["a1", "a2", "a3"]  # nothing of the refused call


def test_each_slot_keeps_its_own_state(store: Store, tenant: str) -> None:
    store.add_history(tenant, "u", "LaMP-2N", items("a", "b"))
    assert store.save_state(tenant, "u", state_for("u", 2), 2, slot="rag")
    assert store.save_state(tenant, "u", state_for("u", 2, method="lora"), 1, slot="lora")
    assert store.slots(tenant, "u") == ["lora", "rag"]
    assert store.record(tenant, "u", "rag").method == "rag" and not store.record(tenant, "u", "rag").stale
    assert store.record(tenant, "u", "lora").stale and not store.record(tenant, "u").has_state
    assert store.load_state(tenant, "u", record=store.record(tenant, "u", "lora")).method == "lora"
    # the same state in two slots is two files: replacing one leaves the other intact
    assert store.save_state(tenant, "u", state_for("u", 2), 2, slot="lora")
    assert store.save_state(tenant, "u", state_for("u", 3), 2, slot="rag")
    assert store.check() == [] and len(list((store.root / "tenants" / tenant / "users" / "u").iterdir())) == 2


def test_workers_claim_each_queued_job_once(store: Store, tenant: str) -> None:
    jobs = [store.create_job(tenant, f"u{i}", slot)[0] for i, slot in enumerate(["a", "a", "b", "a"])]
    other = Store(store.root)
    first, second = store.claim_jobs(["a"], 2), other.claim_jobs(["a", "b"], 10)
    assert [j["job_id"] for j in first] == [jobs[0]["job_id"], jobs[1]["job_id"]]
    assert [j["job_id"] for j in second] == [jobs[2]["job_id"], jobs[3]["job_id"]]
    assert store.claim_jobs(["a", "b"], 10) == [] and store.job(tenant, jobs[0]["job_id"])["status"] == "running"
    store.set_job(jobs[0]["job_id"], "done")
    assert store.interrupt_running(["a"], "the worker died") == 2
    assert store.job(tenant, jobs[1]["job_id"])["error"] == "the worker died"
    assert store.job_counts() == {("a", "done"): 1, ("a", "interrupted"): 2, ("b", "running"): 1}


def test_history_state_round_trip_and_staleness(store: Store, tenant: str) -> None:
    record = store.add_history(tenant, "u1", "LaMP-2N", items("a", "b")).record
    assert (record.items, record.has_state, record.stale) == (2, False, False)
    user, record = store.snapshot(tenant, "u1")
    assert [i.id for i in user.profile] == ["u1-1", "u1-2"] and user.profile[1]["text"] == "b"
    assert store.save_state(tenant, "u1", state_for("u1", 2), record.items)
    loaded = store.load_state(tenant, "u1", "rag", 1, "tiny/2x32")
    assert torch.equal(loaded.tensors["v"], torch.arange(2.0)) and loaded.header == {"n": 2}
    assert not store.record(tenant, "u1").stale

    store.add_history(tenant, "u1", "LaMP-2N", items("c"))
    assert store.record(tenant, "u1").stale
    assert not store.save_state(tenant, "u1", state_for("u1", 1), 1)  # older snapshot than the saved state
    assert store.save_state(tenant, "u1", state_for("u1", 3), 3)
    assert not store.record(tenant, "u1").stale
    assert len(list((store.root / "tenants" / tenant / "users" / "u1").iterdir())) == 1  # the old file is gone
    with pytest.raises(TaskMismatch, match="LaMP-2N"):
        store.add_history(tenant, "u1", "LaMP-3", items("d"))


def test_corrupt_or_truncated_state_is_refused_naming_the_user(store: Store, tenant: str) -> None:
    store.add_history(tenant, "alice", "LaMP-2N", items("a"))
    store.save_state(tenant, "alice", state_for("alice", 64), 1)
    path = next((store.root / "tenants" / tenant / "users" / "alice").glob("state-*.safetensors"))
    raw = bytearray(path.read_bytes())
    raw[-5] ^= 0xFF  # flip a bit of tensor data
    path.write_bytes(bytes(raw))
    with pytest.raises(StateError, match="'alice'.*(checksum|corrupt)"):
        store.load_state(tenant, "alice")
    assert any("alice" in p for p in store.check())
    path.write_bytes(bytes(raw[: len(raw) // 2]))
    with pytest.raises(StateError, match="'alice'.*truncated"):
        store.load_state(tenant, "alice")


def test_a_valid_file_that_is_not_the_indexed_one_is_refused(store: Store, tenant: str) -> None:
    store.add_history(tenant, "bob", "LaMP-2N", items("a"))
    store.save_state(tenant, "bob", state_for("bob", 2), 1)
    path = next((store.root / "tenants" / tenant / "users" / "bob").glob("state-*.safetensors"))
    state_for("bob", 5).save(path)  # intact and self-consistent, but not what was recorded
    with pytest.raises(StateError, match="'bob'.*not the one the index recorded"):
        store.load_state(tenant, "bob")


def test_states_of_another_method_version_or_backbone_are_refused_with_the_reason(store: Store, tenant: str) -> None:
    store.add_history(tenant, "u", "LaMP-2N", items("a"))
    store.save_state(tenant, "u", state_for("u", 2, version=1), 1)
    with pytest.raises(StateError, match="'u'.*version 1.*needs version 2"):
        store.load_state(tenant, "u", "rag", 2)
    with pytest.raises(StateError, match="'u'.*method 'rag', expected 'chameleon'"):
        store.load_state(tenant, "u", "chameleon", 1)
    with pytest.raises(StateError, match="'u'.*backbone 'tiny/2x32', not 'smollm2/30x576'"):
        store.load_state(tenant, "u", "rag", 1, "smollm2/30x576")


@pytest.mark.parametrize("bad", ["../x", "..", ".hidden", "a/b", "a\\b", "", "x" * 129, "-rf", "a b", "ü", "a\x00"])
def test_user_ids_that_could_escape_the_store_are_rejected(store: Store, tenant: str, bad: str) -> None:
    with pytest.raises(InvalidId):
        store.add_history(tenant, bad, "LaMP-2N", items("a"))
    with pytest.raises(InvalidId):
        store.record(tenant, bad)


def test_allowed_user_ids(store: Store, tenant: str) -> None:
    for good in ("a", "u.1-2_3", "x" * 128, "1"):
        store.add_history(tenant, good, "LaMP-2N", items("a"))
    assert {r.user_id for r in store.users(tenant)} == {"a", "u.1-2_3", "x" * 128, "1"}


def test_delete_forgets_history_state_and_files(store: Store, tenant: str) -> None:
    store.add_history(tenant, "u", "LaMP-2N", items("a", "b"))
    store.save_state(tenant, "u", state_for("u", 2), 2)
    assert store.delete_user(tenant, "u")
    with pytest.raises(UnknownUser, match="'u'"):
        store.record(tenant, "u")
    assert store.history(tenant, "u") == []
    assert not (store.root / "tenants" / tenant / "users" / "u").exists()
    assert not store.delete_user(tenant, "u")
    assert not store.save_state(tenant, "u", state_for("u", 2), 2)  # a job finishing after the delete keeps nothing
    assert not (store.root / "tenants" / tenant / "users" / "u").exists()


def test_tenants_see_only_their_own_users(store: Store) -> None:
    a, b = store.create_tenant("a")[0], store.create_tenant("b")[0]
    store.add_history(a, "shared-name", "LaMP-2N", items("secret of a"))
    assert store.users(b) == []
    with pytest.raises(UnknownUser):
        store.snapshot(b, "shared-name")
    assert not store.delete_user(b, "shared-name")
    assert store.record(a, "shared-name").items == 1
    job, _ = store.create_job(a, "shared-name")
    assert store.job(b, job["job_id"]) is None and store.job(a, job["job_id"]) is not None


def test_jobs_are_deduplicated_while_unfinished(store: Store, tenant: str) -> None:
    first, new = store.create_job(tenant, "u")
    again, new_again = store.create_job(tenant, "u")
    assert new and not new_again and again["job_id"] == first["job_id"]
    store.set_job(first["job_id"], "done", mode="rebuilt")
    assert store.job(tenant, first["job_id"])["mode"] == "rebuilt"
    assert store.create_job(tenant, "u")[1]


def test_sweep_removes_only_old_unreferenced_files(store: Store, tenant: str) -> None:
    store.add_history(tenant, "u", "LaMP-2N", items("a"))
    store.save_state(tenant, "u", state_for("u", 2), 1)
    folder = store.root / "tenants" / tenant / "users" / "u"
    orphan, young, tmp = folder / "state-orphan.safetensors", folder / "state-young.safetensors", folder / ".x.tmp"
    for path in (orphan, young, tmp):
        path.write_bytes(b"x")
    old = time.time() - 7200
    os.utime(orphan, (old, old))
    os.utime(tmp, (old, old))
    assert sorted(p.name for p in store.sweep()) == sorted([orphan.name, tmp.name])
    assert young.exists() and store.check() == []


def test_a_newer_store_schema_is_refused(tmp_path: Path) -> None:
    Store(tmp_path / "s")
    with sqlite3.connect(tmp_path / "s" / "index.sqlite") as db:
        db.execute("PRAGMA user_version = 99")
    with pytest.raises(StoreError, match="schema version 99"):
        Store(tmp_path / "s")


WRITER = """
import sys
import torch
from tailor.tasks.records import HistoryItem
from tailor.store.state import UserState
from tailor.store.store import Store

torch.set_num_threads(1)
root, tenant, rounds, tag = sys.argv[1:]
store = Store(root)
for i in range(int(rounds)):
    store.add_history(tenant, "same", "LaMP-2N", [HistoryItem("", {"text": f"{tag}{i}", "category": "sports"})])
    user, record = store.snapshot(tenant, "same")
    n = len(user.profile)
    state = UserState("rag", 1, "same", "tiny/2x32", {"n": n}, {"v": torch.arange(n, dtype=torch.float32)})
    store.save_state(tenant, "same", state, record.items)
"""


def test_two_processes_writing_the_same_user_are_serialised(store: Store, tenant: str) -> None:
    workers = [subprocess.Popen([sys.executable, "-c", WRITER, str(store.root), tenant, "25", tag]) for tag in "ab"]
    assert [worker.wait(120) for worker in workers] == [0, 0]
    user, record = store.snapshot(tenant, "same")
    assert record.items == 50 and len(user.profile) == 50
    assert sorted(i["text"] for i in user.profile) == sorted(f"{t}{i}" for t in "ab" for i in range(25))
    assert [i.id for i in user.profile] == [f"same-{n}" for n in range(1, 51)]
    assert record.state_items == 50 and not record.stale  # the last writer saw every item
    assert store.load_state(tenant, "same").header == {"n": 50}
    assert store.check() == []
    assert len(list((store.root / "tenants" / tenant / "users" / "same").glob("*"))) == 1


V1_SCHEMA = """
CREATE TABLE tenants (id TEXT PRIMARY KEY, name TEXT NOT NULL UNIQUE, key_salt BLOB NOT NULL, key_hash BLOB NOT NULL,
    created REAL NOT NULL);
CREATE TABLE users (tenant TEXT NOT NULL REFERENCES tenants(id), user_id TEXT NOT NULL, task TEXT NOT NULL,
    items INTEGER NOT NULL, state_file TEXT, checksum TEXT, method TEXT, version INTEGER, model_id TEXT,
    state_items INTEGER, state_bytes INTEGER, updated REAL NOT NULL, PRIMARY KEY (tenant, user_id));
CREATE TABLE history (tenant TEXT NOT NULL, user_id TEXT NOT NULL, seq INTEGER NOT NULL, item TEXT NOT NULL,
    PRIMARY KEY (tenant, user_id, seq));
CREATE TABLE jobs (id TEXT PRIMARY KEY, tenant TEXT NOT NULL, user_id TEXT NOT NULL, status TEXT NOT NULL,
    detail TEXT NOT NULL, created REAL NOT NULL, updated REAL NOT NULL);
CREATE INDEX jobs_by_user ON jobs (tenant, user_id, status);
PRAGMA user_version = 1;
"""


def test_a_version_1_store_is_migrated_with_its_states_and_keys(tmp_path: Path) -> None:
    """A store written by the previous tailor (one state per user, item ids only inside the JSON) opens with its
    keys, history and states: the state in the default slot, its item ids known for idempotent appends."""
    import hashlib
    import json

    root = tmp_path / "old"
    (root / "tenants" / "0123456789ab" / "users" / "u").mkdir(parents=True)
    state = state_for("u", 2)
    checksum = state.checksum()
    state.save(root / "tenants" / "0123456789ab" / "users" / "u" / f"state-{checksum[:24]}.safetensors")
    salt, secret = b"s" * 16, "k" * 43
    with sqlite3.connect(root / "index.sqlite") as db:
        db.executescript(V1_SCHEMA)
        db.execute("INSERT INTO tenants VALUES ('0123456789ab', 'acme', ?, ?, 1.0)",
                   (salt, hashlib.scrypt(secret.encode(), salt=salt, n=2 ** 14, r=8, p=1, dklen=32)))
        db.execute("INSERT INTO users VALUES ('0123456789ab', 'u', 'LaMP-2N', 2, ?, ?, 'rag', 1, 'tiny/2x32', 2, 8, "
                   "2.0)", (f"state-{checksum[:24]}.safetensors", checksum))
        for seq, text in ((1, "a"), (2, "b")):
            db.execute("INSERT INTO history VALUES ('0123456789ab', 'u', ?, ?)",
                       (seq, json.dumps({"text": text, "category": "sports", "id": f"i{seq}"})))
    store = Store(root)
    assert store.authenticate(f"tailor-0123456789ab-{secret}") == "0123456789ab"
    record = store.record("0123456789ab", "u")
    assert (record.items, record.state_items, record.stale, record.method) == (2, 2, False, "rag")
    assert store.load_state("0123456789ab", "u", "rag", 1).header == {"n": 2}
    again = store.add_history("0123456789ab", "u", "LaMP-2N", [HistoryItem("i1", {"text": "a", "category": "sports"})])
    assert (again.added, again.duplicates) == (0, ("i1",))
    assert store.check() == [] and Store(root).record("0123456789ab", "u").has_state  # opened twice: migrated once
