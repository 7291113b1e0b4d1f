"""How many queries ask about an item (same text, case and spacing folded) that the training users answered: where
the item prior (tailor/methods/priors.py) and prior fusion's `items` feature have anything to say.

    .venv/bin/python -m benchmarks.item_overlap [--tasks lamp2n lamp2m lamp3]

Counts LaMP's queries of the dev users (split dev) and, for the training users, their queries against the other
training users' answers (as prior fusion learns its weights). Reads data only; no model.
"""

from __future__ import annotations

import argparse
from typing import Sequence

from tailor.data.lamp import load_users
from tailor.methods.crowd import ItemLabels
from tailor.tasks.lamp import get_task


def overlap(task_name: str) -> tuple[int, int, int, int]:
    """(dev queries whose item the training users answered, dev queries, the same for training users without their
    own answers, training queries)."""
    task = get_task(task_name)
    train, dev = load_users(task, "train"), load_users(task, "dev")
    table = ItemLabels.of(task, train)
    labels = list(task.labels)
    known = sum(any(table.for_query(q.input, labels)) for u in dev for q in u.queries)
    known_train = sum(any(table.for_query(q.input, labels, without=u)) for u in train for q in u.queries)
    return known, sum(len(u.queries) for u in dev), known_train, sum(len(u.queries) for u in train)


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tasks", nargs="+", default=["lamp2n", "lamp2m", "lamp3"])
    args = parser.parse_args(argv)
    print("| task | dev queries with a known item | training queries with an item others answered |")
    print("|---|---|---|")
    for name in args.tasks:
        known, asked, known_train, asked_train = overlap(name)
        print(f"| {get_task(name).name} | {known} of {asked} | {known_train} of {asked_train} |")


if __name__ == "__main__":
    main()
