"""The records every part of tailor passes around: a user, their history, their queries.

LaMP stores one "question" per user: an input, the user's profile (their history) and a gold output. tailor keeps
the same shape but lets a user carry several queries, because the server and incremental history need that, and
official LaMP files simply give each user one.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterator, Mapping


@dataclass(frozen=True)
class HistoryItem:
    """One past interaction of a user: the task's fields (text, title, category, score, ...) as strings."""

    id: str
    fields: Mapping[str, str]
    date: str | None = None

    def __getitem__(self, key: str) -> str:
        return self.fields[key]

    def get(self, key: str, default: str = "") -> str:
        return self.fields.get(key, default)

    def to_json(self) -> dict:
        out = {**self.fields, "id": self.id}
        if self.date is not None:
            out["date"] = self.date
        return out


@dataclass(frozen=True)
class Query:
    """A request to answer for a user: the full LaMP input text and, when known, the gold output."""

    id: str
    input: str
    gold: str | None = None


@dataclass(frozen=True)
class User:
    """A user of one task with their history (oldest first when dates are unknown) and their queries."""

    id: str
    task: str
    profile: tuple[HistoryItem, ...]
    queries: tuple[Query, ...] = field(default_factory=tuple)

    def __iter__(self) -> Iterator[HistoryItem]:
        return iter(self.profile)

    def __len__(self) -> int:
        return len(self.profile)
