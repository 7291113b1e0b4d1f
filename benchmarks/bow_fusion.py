"""Can a bag-of-words classifier give prior fusion the query signal the user prior lacks? A check on training users
only, with no backbone: a TF-IDF logistic regression over the task's labels, trained on the history items of the other
folds' training users (5 folds of users), its log-probabilities for each query stacked with the user's smoothed label
counts and a TF-IDF vote of the user's own history items (weights chosen on the other folds by accuracy on a grid).
Scored on the training users' LaMP queries and, as tailor's protocol asks them, their last 4 history items (answered
from the history before them), beside the user prior on the same queries.

    .venv/bin/python -m benchmarks.bow_fusion --task lamp2n

Dev users are never read.
"""

from __future__ import annotations

import argparse
import itertools
import random

import numpy as np
from sklearn.feature_extraction.text import TfidfVectorizer
from sklearn.linear_model import LogisticRegression

from benchmarks.common import machine
from tailor.data.lamp import load_users
from tailor.data.splits import history_queries
from tailor.tasks import get_task

FOLDS = 5
WEIGHTS = (0.0, 0.25, 0.5, 1.0, 1.5)
"""The grid each of the three weights (classifier, user counts, user vote) is chosen from."""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--task", default="lamp2n")
    parser.add_argument("--data", default="../shared/lamp")
    parser.add_argument("--queries-per-user", type=int, default=4)
    args = parser.parse_args()
    task = get_task(args.task)
    if task.family != "classification":
        parser.error(f"--task {task.name}: a classification task is needed (its labels are what is fused)")
    train = load_users(task, "train", args.data)
    label = {name: i for i, name in enumerate(task.labels)}
    owners = [u.id for u in train]
    random.Random(0).shuffle(owners)
    fold = {owner: i % FOLDS for i, owner in enumerate(owners)}
    asked = [(u, q, "LaMP") for u in train for q in u.queries if q.gold]
    extra = [history_queries(u, task, args.queries_per_user) for u in train]
    asked += [(u, q, "history") for u in extra for q in u.queries[1:] if q.gold]
    vectorizer = TfidfVectorizer(sublinear_tf=True, min_df=2, ngram_range=(1, 2))
    vectorizer.fit([task.document(i) for u in train for i in u.profile])
    counts = np.ones(len(label))
    for item in (i for u in train for i in u.profile):
        counts[label[task.item_output(item)]] += 1
    glob = counts / counts.sum()
    gold = np.array([label[q.gold] for _, q, _ in asked])
    where = np.array([fold[u.id] for u, _, _ in asked])
    model = np.zeros((len(asked), len(label)))
    for f in range(FOLDS):
        items = [i for u in train if fold[u.id] != f for i in u.profile]
        clf = LogisticRegression(C=4, max_iter=3000).fit(vectorizer.transform([task.document(i) for i in items]),
                                                         [label[task.item_output(i)] for i in items])
        rows = np.flatnonzero(where == f)
        p = np.full((len(rows), len(label)), 1e-6)
        p[:, clf.classes_] = clf.predict_proba(vectorizer.transform(
            [task.retrieval_query(asked[r][1].input) for r in rows]))
        model[rows] = np.log(p)
    profiles = {}  # per user (a LaMP user and its history-query twin differ): item labels one-hot, TF-IDF rows
    for user in {id(u): u for u, _, _ in asked}.values():
        onehot = np.zeros((len(user.profile), len(label)))
        onehot[np.arange(len(user.profile)), [label[task.item_output(i)] for i in user.profile]] = 1
        profiles[id(user)] = onehot, vectorizer.transform([task.document(i) for i in user.profile])
    prior, vote = np.zeros_like(model), np.zeros_like(model)
    for r, (user, query, _) in enumerate(asked):
        onehot, documents = profiles[id(user)]
        c = onehot.sum(0)
        prior[r] = np.log((c + glob) / (c.sum() + 1))
        v = np.zeros(len(label))
        if user.profile:
            sims = (documents @ vectorizer.transform([task.retrieval_query(query.input)]).T).toarray().ravel()
            v = sims @ onehot
        vote[r] = np.log((v + 0.5 * glob) / (v.sum() + 0.5))
    hits = {w: (w[0] * model + w[1] * prior + w[2] * vote).argmax(1) == gold
            for w in itertools.product(WEIGHTS, repeat=3)}
    stacked = np.zeros(len(asked), bool)
    for f in range(FOLDS):
        best = max(hits, key=lambda w: hits[w][where != f].mean())
        stacked[where == f] = hits[best][where == f]
    kinds = np.array([k for _, _, k in asked])
    print(f"{task.name}, {len(train)} training users ({args.data}), {FOLDS} folds of users, seed 0; no backbone "
          f"({machine()}).\n")
    print("| queries | n | user prior | TF-IDF classifier alone | stacked, cross-validated |\n|---|---|---|---|---|")
    for kind in ("LaMP", "history"):
        s = kinds == kind
        print(f"| {kind if kind == 'LaMP' else f'last {args.queries_per_user} history items'} | {s.sum()} | "
              f"{(prior.argmax(1) == gold)[s].mean():.4f} | {(model.argmax(1) == gold)[s].mean():.4f} | "
              f"{stacked[s].mean():.4f} |")


if __name__ == "__main__":
    main()
