"""Held-out user splits: a seeded subset, Profile-to-PEFT's diverse random split and its out-of-distribution split.

P2P (appendix H) tests on two kinds of unseen users. The random split should look like the whole population, so
it samples every k-means cluster of user embeddings in proportion to its size instead of sampling users uniformly
(which can miss small groups when the test set is 200 users). The OOD split should look as unlike the training
users as possible, so it hands whole small, isolated clusters to test and keeps every other cluster in train.

Embeddings come from elsewhere (one row per user, same order); here they are only L2-normalised, so clustering
works on direction (cosine geometry), as with sentence embeddings.
"""

from __future__ import annotations

import dataclasses
import random
from typing import Any, Sequence

import numpy as np

from tailor.data.lamp import DataError
from tailor.tasks.lamp import Task
from tailor.tasks.records import HistoryItem, Query, User

# Default test size (appendix H): 200 users, or 20% of a dataset smaller than this.
LARGE_DATASET = 1000
LARGE_TEST_SIZE = 200
SMALL_TEST_FRACTION = 0.2

# Random split: about this many users per cluster, with the number of clusters kept within the bounds.
USERS_PER_CLUSTER = 50
MIN_CLUSTERS = 2
MAX_CLUSTERS = 20

# OOD split: the silhouette search tries 2..MAX_OOD_CLUSTERS clusters, on at most this many sampled users.
MAX_OOD_CLUSTERS = 15
SILHOUETTE_SAMPLE = 2000
KMEANS_RESTARTS = 4
# k-means runs single-threaded on inputs with at most this many numbers (users x dims), see `_kmeans`.
SINGLE_THREAD_LIMIT = 1_000_000


def subset_positions(count: int, n: int | None, seed: int) -> list[int]:
    """The positions, in order, of a seeded sample of `n` of `count` users; all of them when n is None or not
    smaller. A streamed run picks its users by position with this before it reads any profile."""
    if n is None or n >= count:
        return list(range(count))
    if n < 0:
        raise ValueError(f"subset size must be >= 0, got {n}")
    return sorted(random.Random(seed).sample(range(count), n))


def subset(users: Sequence[User], n: int | None, seed: int) -> list[User]:
    """A seeded sample of `n` users, kept in their original order (the same users `subset_positions` picks)."""
    return [users[i] for i in subset_positions(len(users), n, seed)]


def chronological(profile: Sequence[HistoryItem]) -> tuple[HistoryItem, ...]:
    """The items oldest first: by date when every item has one (numeric dates as numbers), else in file order, which
    LaMP's files keep in time order (dateless items keep their order)."""
    if not profile or any(item.date is None for item in profile):
        return tuple(profile)

    def when(item: HistoryItem) -> tuple[int, float | str]:
        text = str(item.date)
        try:
            return 0, float(text)
        except ValueError:
            return 1, text

    return tuple(sorted(profile, key=when))


def history_queries(user: User, task: Task, per_user: int) -> User:
    """tailor's own protocol of more queries per user: the user's last `per_user` history items (at most all but one)
    become queries, asked as the task's questions with the items' own outputs as golds, beside the user's LaMP query;
    the history keeps only the items before the first of them, so no query sees its own or a later item.

    The history is put in time order first (`chronological`), so "the last" are the newest. A task whose items hold
    only an output (LaMP-7's tweets: `Task.history_prompt`) has no question to ask of them and is refused.
    """
    if task.history_prompt is not None:
        raise ValueError(f"{task.name}'s history items hold only the user's output, so they cannot be asked as "
                         "queries; run it with LaMP's one query per user")
    profile = chronological(user.profile)
    taken = min(per_user, len(profile) - 1)
    if taken <= 0:
        return user
    history, asked = profile[:-taken], profile[-taken:]
    extra = tuple(Query(f"{user.id}/h{item.id}", task.question(item), task.item_output(item)) for item in asked)
    return dataclasses.replace(user, profile=history, queries=(*user.queries, *extra))


def swap_histories(users: Sequence[User], seed: int) -> list[User]:
    """Each user with another user's history and their own queries: a seeded derangement (no user keeps their own).

    The control for what a method takes from a user's own history. P2P's ablation (section 6, table 5) feeds the
    hypernetwork shuffled profiles and finds it hurts; any method can be run this way.
    """
    donor = history_donors(len(users), seed)
    return [dataclasses.replace(user, profile=users[donor[i]].profile) for i, user in enumerate(users)]


def history_donors(n_users: int, seed: int) -> list[int]:
    """For each of n users, the position of the user whose history `swap_histories` gives them (never their own)."""
    if n_users < 2:
        raise ValueError("swapping histories needs at least two users")
    order = list(range(n_users))
    random.Random(seed).shuffle(order)
    donor = {order[i]: order[(i + 1) % n_users] for i in range(n_users)}
    return [donor[i] for i in range(n_users)]


def random_split(users: Sequence[User], embeddings: Any, test_size: int | None = None,
                 seed: int = 0) -> tuple[list[User], list[User]]:
    """P2P's diverse random split: sample each k-means cluster in proportion to its size; returns (train, test).

    The number of clusters grows with the dataset (about USERS_PER_CLUSTER users each, within MIN/MAX_CLUSTERS)
    so clusters are neither tiny nor one blob. Quotas are rounded with the largest-remainder rule, so the test set
    has exactly `test_size` users (default: 200, or 20% below 1000 users).
    """
    points = _normalised(embeddings, len(users))
    n_test = _test_count(len(users), test_size)
    n_clusters = int(np.clip(len(users) // USERS_PER_CLUSTER, MIN_CLUSTERS, MAX_CLUSTERS))
    labels = _kmeans(points, min(n_clusters, _distinct_rows(points)), seed).labels_
    quotas = _largest_remainder(np.bincount(labels), n_test)
    rng = np.random.default_rng(seed)
    test = [rng.choice(np.flatnonzero(labels == cluster), quota, replace=False)
            for cluster, quota in enumerate(quotas) if quota]
    return _partition(users, np.concatenate(test))


def ood_split(users: Sequence[User], embeddings: Any, test_size: int | None = None,
              seed: int = 0) -> tuple[list[User], list[User]]:
    """P2P's out-of-distribution split: whole small, isolated clusters go to test; returns (train, test).

    The number of clusters maximises the silhouette score. Each cluster is scored by its isolation (mean distance
    of its centroid to the other centroids) divided by (1 + its size). Going down that ranking, a cluster that fits
    in the remaining test budget goes to test whole; the first one that does not fit gives its users farthest from
    its centroid to fill the budget exactly, and the selection stops. So no training user comes from a cluster
    assigned to test whole. (The appendix also mentions compactness; its score does not use it, nor does this.)
    """
    points = _normalised(embeddings, len(users))
    n_test = _test_count(len(users), test_size)
    model = _best_kmeans(points, seed)
    labels, centres = model.labels_, model.cluster_centers_
    sizes = np.bincount(labels, minlength=len(centres))
    gaps = np.linalg.norm(centres[:, None, :] - centres[None, :, :], axis=-1)
    isolation = gaps.sum(axis=1) / (len(centres) - 1)
    ranking = np.argsort(-isolation / (1 + sizes), kind="stable")
    test: list[int] = []
    for cluster in ranking:
        members = np.flatnonzero(labels == cluster)
        room = n_test - len(test)
        if len(members) > room:
            spread = np.linalg.norm(points[members] - centres[cluster], axis=1)
            test.extend(members[np.argsort(-spread, kind="stable")[:room]])
            break
        test.extend(members)
        if len(members) == room:
            break
    return _partition(users, np.asarray(test))


# --- helpers -----------------------------------------------------------------------------------------------------

def _normalised(embeddings: Any, n_users: int) -> np.ndarray:
    """The embeddings as float rows of unit length, after checking they match the users one to one."""
    try:
        points = np.asarray(embeddings, dtype=np.float64)
    except (TypeError, ValueError) as err:
        raise DataError(f"embeddings must be a numeric (n_users, dim) array: {err}") from None
    if points.ndim != 2 or points.shape[1] == 0:
        raise DataError(f"embeddings must be a 2-D (n_users, dim) array, got shape {points.shape}")
    if points.shape[0] != n_users:
        raise DataError(f"embeddings have {points.shape[0]} rows but there are {n_users} users; row i must embed "
                        f"users[i]")
    bad = np.flatnonzero(~np.isfinite(points).all(axis=1))
    if bad.size:
        raise DataError(f"embeddings hold NaN or infinite values in {bad.size} row(s), e.g. rows {bad[:5].tolist()}")
    norms = np.linalg.norm(points, axis=1, keepdims=True)
    return points / np.where(norms > 0, norms, 1.0)


def _test_count(n_users: int, test_size: int | None) -> int:
    if n_users < 2:
        raise ValueError(f"a split needs at least 2 users, got {n_users}")
    if test_size is None:
        test_size = LARGE_TEST_SIZE if n_users >= LARGE_DATASET else max(1, round(n_users * SMALL_TEST_FRACTION))
    if not 1 <= test_size < n_users:
        raise ValueError(f"test_size must be between 1 and {n_users - 1} for {n_users} users, got {test_size}")
    return test_size


def _distinct_rows(points: np.ndarray) -> int:
    """k-means cannot make more clusters than there are distinct points."""
    return len(np.unique(points, axis=0))


def _kmeans(points: np.ndarray, n_clusters: int, seed: int) -> Any:
    """k-means, single-threaded on small inputs.

    Each step on a few thousand users is microseconds of work, so OpenMP threads only add overhead, and on a busy
    machine their spin-waiting made the OOD search 20x slower (3 s instead of 0.15 s on 300 users).
    """
    from sklearn.cluster import KMeans
    from threadpoolctl import threadpool_limits

    model = KMeans(n_clusters=n_clusters, n_init=KMEANS_RESTARTS, random_state=seed)
    if points.size > SINGLE_THREAD_LIMIT:
        return model.fit(points)
    with threadpool_limits(limits=1):
        return model.fit(points)


def _best_kmeans(points: np.ndarray, seed: int) -> Any:
    """The k-means model whose number of clusters has the highest silhouette score (ties: fewer clusters)."""
    from sklearn.metrics import silhouette_score

    largest = min(MAX_OOD_CLUSTERS, _distinct_rows(points), len(points) - 1)
    if largest < 2:
        raise ValueError("an OOD split needs at least 3 users with distinct embeddings to form 2 clusters")
    sample = SILHOUETTE_SAMPLE if len(points) > SILHOUETTE_SAMPLE else None
    best, best_score = None, -np.inf
    for n_clusters in range(2, largest + 1):
        model = _kmeans(points, n_clusters, seed)
        score = silhouette_score(points, model.labels_, sample_size=sample, random_state=seed)
        if score > best_score:
            best, best_score = model, score
    return best


def _largest_remainder(sizes: np.ndarray, total: int) -> np.ndarray:
    """Integer quotas proportional to `sizes` that sum to exactly `total` (and never exceed a size).

    Floors first, then one more for the clusters with the largest fractional parts (ties: the earlier cluster).
    """
    exact = sizes * total / sizes.sum()
    quotas = np.floor(exact).astype(int)
    short = total - int(quotas.sum())
    quotas[np.argsort(-(exact - quotas), kind="stable")[:short]] += 1
    return quotas


def _partition(users: Sequence[User], test_indices: np.ndarray) -> tuple[list[User], list[User]]:
    """(train, test), both in the original user order."""
    in_test = np.zeros(len(users), dtype=bool)
    in_test[test_indices.astype(int)] = True
    return ([u for u, t in zip(users, in_test) if not t], [u for u, t in zip(users, in_test) if t])
