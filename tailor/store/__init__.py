"""Persistence of per-user state: UserState files and the multi-tenant Store."""

from tailor.store.state import StateError, UserState
from tailor.store.store import Store, StoreError

__all__ = ["StateError", "Store", "StoreError", "UserState"]
