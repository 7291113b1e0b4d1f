"""Other users' answers to the same item: the label counts per item, from the training users.

Some tasks ask many users about the same items: on ../shared/lamp, 53 of LaMP-2M's 59 dev queries tag a movie that
some training user has tagged too (`python -m benchmarks.item_overlap`). What those users answered is evidence about
the query that needs no model, the item-based half of collaborative filtering: for an item x, c_x(y) is how often
training users gave x the label y, in their histories or as the gold of their queries. An item is its text as the
task's retrieval sees it (a history item's `document`, a query's `retrieval_query`), case and whitespace folded; items
are keyed by a hash of that text, so the table holds no training text.

While weights are learned on the training users' own queries, each user's own contributions are taken out
(`without`): a user is scored as a new user would be, from the other users' answers.
"""

from __future__ import annotations

import hashlib
import json
from collections import Counter
from pathlib import Path
from typing import Iterable, Iterator, Sequence

from tailor.tasks.records import User
from tailor.tasks.task import Task


def item_key(text: str) -> str:
    """The item's identity: a hash of its text with case and runs of whitespace folded."""
    return hashlib.sha1(" ".join(text.lower().split()).encode()).hexdigest()[:16]


def crowd_answers(task: Task, user: User) -> Iterator[tuple[str, str]]:
    """(item key, label) for each of the user's history items and each of their queries with a gold."""
    for item in user.profile:
        yield item_key(task.document(item)), task.item_output(item)
    for query in user.queries:
        if query.gold is not None:
            yield item_key(task.retrieval_query(query.input)), query.gold


class ItemLabels:
    """Label counts per item key."""

    def __init__(self, task: Task, counts: dict[str, Counter[str]] | None = None):
        self.task = task
        self.counts: dict[str, Counter[str]] = counts or {}

    @classmethod
    def of(cls, task: Task, users: Iterable[User]) -> ItemLabels:
        table = cls(task)
        for user in users:
            for key, label in crowd_answers(task, user):
                table.counts.setdefault(key, Counter())[label] += 1
        return table

    def for_query(self, query_input: str, labels: Sequence[str], without: User | None = None) -> list[float]:
        """c_x(y) for each label y of the query's item x, less `without`'s own answers to x."""
        key = item_key(self.task.retrieval_query(query_input))
        found = Counter(self.counts.get(key, {}))
        if without is not None:
            found.subtract(label for own, label in crowd_answers(self.task, without) if own == key)
        return [float(max(found[label], 0)) for label in labels]

    def save(self, path: Path) -> None:
        path.write_text(json.dumps({key: dict(found) for key, found in sorted(self.counts.items())}))

    @classmethod
    def load(cls, task: Task, path: Path) -> ItemLabels:
        return cls(task, {key: Counter(found) for key, found in json.loads(path.read_text()).items()})
