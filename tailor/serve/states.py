"""The states the server answers from: loaded from the store once, checked, and kept while they are the user's latest.

A state is immutable once saved (a new one has a new checksum and is written atomically by the personalize worker),
so a cache keyed by checksum can never be out of date: the request that first reads a user's row naming a new
checksum loads the new state, and until then the previous one answers.
"""

from __future__ import annotations

import threading
from collections import OrderedDict

from tailor.methods.base import LMPersonalizer, Personalizer
from tailor.store.state import StateError, UserState
from tailor.store.store import Store, UserRecord


class StateCache:
    """Loaded and checked states by (tenant, user, checksum), least recently used dropped first.

    Keeping the object also keeps what methods derive from it at first use (a BM25 index, stacked tensors) in
    `state.runtime`.
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
