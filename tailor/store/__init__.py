"""Persistence of per-user state."""

from tailor.store.state import StateError, UserState

__all__ = ["StateError", "UserState"]
