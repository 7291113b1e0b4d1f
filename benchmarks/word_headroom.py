"""How much can a word selection gain on a generation task, and how much of that is personal? Oracle ceilings for
lexical fusion's kind of answer, on training users only, with no model: starting from the copied input, ROUGE-1 of

- deleting exactly the input words the gold lacks;
- adding exactly the gold words the input lacks that the user's own past outputs contain;
- the same additions from another training user's past outputs (each user's history swapped with another's, a
  seeded derangement): what a user's vocabulary offers that anyone's would;
- both, from the user's own and from the swapped history;
- no oracle: a word-substitution table learned from the other training users' (input, gold) pairs (aligned word for
  word, e.g. "you" -> "u"), each substitution applied only where the user's own (or the swapped) history uses the
  substitute more often than the input's word: the personal use of a user's spelling habits, cross-validated over
  FOLDS folds of users.

An oracle knows the gold, so these bound what any method choosing among the same words can reach. The gap between
the own and the swapped additions bounds the personal part of that gain: a small gap means the user's vocabulary
carries little that the task's common words do not.

    .venv/bin/python -m benchmarks.word_headroom --tasks lamp4 lamp7

Dev users are never read.
"""

from __future__ import annotations

import argparse
import difflib
import random
import re
from collections import Counter

from benchmarks.common import machine
from tailor.data.lamp import load_users
from tailor.methods.lexical import items_using, output_words, words_of
from tailor.tasks import get_task
from tailor.tasks.metrics import compute_metrics
from tailor.tasks.records import User
from tailor.tasks.task import Task


def usage(task: Task, user: User) -> Counter:
    """How many of the user's past outputs use each word; its keys are the user's vocabulary."""
    return items_using(output_words(task, user))


def handles_in(text: str) -> set[str]:
    return {h.lower() for h in re.findall(r"@(\w+)", text)}


def handles(task: Task, users: list[User]) -> tuple[int, int]:
    """Golds naming an @handle, and those naming one that the user's own past outputs name too."""
    named = known = 0
    for user in users:
        past = set().union(*(handles_in(task.item_output(item)) for item in user.profile))
        for query in user.queries:
            gold = handles_in(query.gold or "")
            named += bool(gold)
            known += bool(gold & past)
    return named, known


FOLDS = 5
MIN_PAIRS = 2
"""A substitution enters the table when the other folds' pairs align it at least this often."""


def aligned(source: list[str], target: list[str]) -> list[tuple[str, str]]:
    """Word-for-word replacements between an input and its gold: the equal-length replaced spans of a diff."""
    pairs = []
    for op, i1, i2, j1, j2 in difflib.SequenceMatcher(a=source, b=target, autojunk=False).get_opcodes():
        if op == "replace" and i2 - i1 == j2 - j1:
            pairs += zip(source[i1:i2], target[j1:j2])
    return pairs


def substitutions(task: Task, users: list[User]) -> dict[str, str]:
    """Each input word's most frequent aligned substitute among these users' queries (MIN_PAIRS at least)."""
    counts = Counter(pair for user in users for query in user.queries if query.gold
                     for pair in aligned(words_of(task.retrieval_query(query.input)), words_of(query.gold)))
    table: dict[str, str] = {}
    for (source, target), n in counts.most_common():
        if source != target and n >= MIN_PAIRS:
            table.setdefault(source, target)
    return table


def substituted(words: list[str], table: dict[str, str], habits: Counter) -> list[str]:
    """The input with each word the table knows replaced where the history uses its substitute more than the word."""
    return [table[w] if w in table and habits[table[w]] > habits[w] else w for w in words]


def ceilings(task: Task, users: list[User], seed: int) -> dict[str, float]:
    """Each oracle's ROUGE-1 over the users' queries with a gold output, and the learned substitutions'."""
    order = list(range(len(users)))
    random.Random(seed).shuffle(order)
    shifted = order[1:] + order[:1]  # a derangement: each user borrows the history of the next in a seeded order
    lender = {users[i].id: users[j] for i, j in zip(order, shifted)}
    fold = {users[i].id: k % FOLDS for k, i in enumerate(order)}
    tables = [substitutions(task, [u for u in users if fold[u.id] != k]) for k in range(FOLDS)]
    answers: dict[str, list[str]] = {name: [] for name in (
        "copy the input", "oracle: delete", "oracle: add from own history", "oracle: add from swapped history",
        "oracle: delete + add own", "oracle: delete + add swapped", "learned substitutions, own history",
        "learned substitutions, swapped history")}
    golds = []
    for user in users:
        own, swapped = usage(task, user), usage(task, lender[user.id])
        table = tables[fold[user.id]]
        for query in user.queries:
            if not query.gold:
                continue
            x = words_of(task.retrieval_query(query.input))
            gold = set(words_of(query.gold))
            kept = [w for w in x if w in gold]
            missing = sorted(gold - set(x))
            add_own = [w for w in missing if w in own]
            add_swapped = [w for w in missing if w in swapped]
            for name, words in (("copy the input", x), ("oracle: delete", kept),
                                ("oracle: add from own history", x + add_own),
                                ("oracle: add from swapped history", x + add_swapped),
                                ("oracle: delete + add own", kept + add_own),
                                ("oracle: delete + add swapped", kept + add_swapped),
                                ("learned substitutions, own history", substituted(x, table, own)),
                                ("learned substitutions, swapped history", substituted(x, table, swapped))):
                answers[name].append(" ".join(words))
            golds.append(query.gold)
    return {name: compute_metrics(task, a, golds)["rouge1"] for name, a in answers.items()} | {"queries": len(golds)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tasks", nargs="+", default=["lamp4", "lamp7"])
    parser.add_argument("--data", default="../shared/lamp")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    tasks = [get_task(name) for name in args.tasks]
    for task in tasks:
        if task.family != "generation":
            parser.error(f"--tasks {task.name}: a generation task is needed (its answers are words)")
    print(f"Training users' LaMP queries, ROUGE-1; seed {args.seed}; {machine()}\n")
    for task in tasks:
        users = load_users(task, "train", args.data)
        scores = ceilings(task, users, args.seed)
        print(f"{task.name}: {len(users)} training users, {scores.pop('queries')} queries\n")
        print("| answer | ROUGE-1 | Δ vs copy |\n|---|---|---|")
        copy = scores["copy the input"]
        for name, value in scores.items():
            print(f"| {name} | {value:.4f} | {value - copy:+.4f} |")
        named, known = handles(task, users)
        print(f"\nGolds naming an @handle: {named}; naming one the user's past outputs name: {known}\n")


if __name__ == "__main__":
    main()
