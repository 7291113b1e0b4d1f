"""Bootstrap uncertainty over users.

The unit of LaMP's population is the user, and one user's queries are not independent (same history, same model
adaptation), so a resample draws users with replacement and keeps all of a drawn user's items together. Resampling
items instead would understate the variance whenever a method helps some users and not others.

A resample is represented as a count per item (the number of times its user was drawn), and metrics are computed from
those counts by `ItemScores.aggregate_weighted`, so a whole batch of resamples is a few matrix products.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator, Sequence

import numpy as np

from tailor.tasks.lamp import Task
from tailor.tasks.metrics import ItemScores, score_items

_MAX_WEIGHT_CELLS = 4_000_000
"""Resamples are processed in batches of at most this many (resample, item) weights, to bound memory."""


@dataclass(frozen=True)
class PairedResult:
    """System a against system b on one metric.

    `delta` is metric(a) − metric(b) on the full set, in the metric's own direction (for MAE a negative delta means a
    is better). `ci` is the percentile interval of the bootstrapped delta. `p_value` is the two-sided paired-bootstrap
    p-value for "no difference", defined in `paired_bootstrap`.
    """

    delta: float
    ci: tuple[float, float]
    p_value: float


def _check_level(level: float) -> None:
    if not 0 < level < 1:
        raise ValueError(f"level must lie strictly between 0 and 1, got {level}")


def _resample_weights(user_ids: Sequence[str], n_resamples: int, seed: int) -> Iterator[np.ndarray]:
    """Batches of item weights (shape (batch, items)): each row draws as many users as there are, with replacement."""
    _, user_of_item = np.unique([str(u) for u in user_ids], return_inverse=True)
    n_users = int(user_of_item.max()) + 1
    batch = max(1, min(n_resamples, _MAX_WEIGHT_CELLS // len(user_ids)))
    rng = np.random.default_rng(seed)
    for start in range(0, n_resamples, batch):
        rows = min(batch, n_resamples - start)
        drawn = rng.integers(0, n_users, size=(rows, n_users))
        flat = (drawn + n_users * np.arange(rows)[:, None]).ravel()
        user_counts = np.bincount(flat, minlength=rows * n_users).reshape(rows, n_users)
        yield user_counts[:, user_of_item].astype(float)


def bootstrap_distribution(
    systems: Sequence[ItemScores], user_ids: Sequence[str], n_resamples: int = 1000, seed: int = 0
) -> list[dict[str, np.ndarray]]:
    """Each system's metrics over the same user resamples: one {metric: array of n_resamples values} per system.

    All systems see identical resamples, which is what makes a comparison between them paired.
    """
    if not systems:
        raise ValueError("no systems to resample")
    n_items = len(systems[0])
    if any(len(s) != n_items for s in systems):
        raise ValueError("all systems must score the same items")
    if len(user_ids) != n_items:
        raise ValueError(f"got {len(user_ids)} user ids for {n_items} items")
    if n_resamples < 1:
        raise ValueError(f"n_resamples must be at least 1, got {n_resamples}")
    batches: list[list[dict[str, np.ndarray]]] = [[] for _ in systems]
    for weights in _resample_weights(user_ids, n_resamples, seed):
        for collected, system in zip(batches, systems):
            collected.append(system.aggregate_weighted(weights))
    return [{m: np.concatenate([b[m] for b in collected]) for m in collected[0]} for collected in batches]


def _percentile_interval(values: np.ndarray, level: float) -> tuple[float, float]:
    tail = (1 - level) / 2
    low, high = np.quantile(values, [tail, 1 - tail])
    return float(low), float(high)


def bootstrap_ci(
    task: Task | str,
    predictions: Sequence[str],
    golds: Sequence[str],
    user_ids: Sequence[str],
    n_resamples: int = 1000,
    seed: int = 0,
    level: float = 0.95,
) -> dict[str, tuple[float, float]]:
    """Percentile confidence interval of each metric, resampling users."""
    _check_level(level)
    scores = score_items(task, predictions, golds)
    (replicates,) = bootstrap_distribution([scores], user_ids, n_resamples, seed)
    return {metric: _percentile_interval(values, level) for metric, values in replicates.items()}


def two_sided_p(deltas: np.ndarray) -> float:
    """Two-sided bootstrap p-value that the true delta is 0: 2·min(P(δ* ≤ 0), P(δ* ≥ 0)), capped at 1.

    Each tail is estimated as (count + 1) / (R + 1) over the R resamples, so the p-value is never exactly 0 (its floor
    is 2/(R+1)) and identical systems, whose every δ* is 0, get p = 1. It is the smallest α for which the (1 − α)
    percentile interval of δ* excludes 0.
    """
    n = len(deltas)
    at_most_zero = (np.count_nonzero(deltas <= 0) + 1) / (n + 1)
    at_least_zero = (np.count_nonzero(deltas >= 0) + 1) / (n + 1)
    return float(min(1.0, 2 * min(at_most_zero, at_least_zero)))


def paired_bootstrap(
    task: Task | str,
    preds_a: Sequence[str],
    preds_b: Sequence[str],
    golds: Sequence[str],
    user_ids: Sequence[str],
    n_resamples: int = 1000,
    seed: int = 0,
    level: float = 0.95,
) -> dict[str, PairedResult]:
    """Compare systems a and b on the same items: delta a − b, its percentile CI and p-value, per metric.

    Both systems are scored on the same user resamples (paired), so the between-user variance they share cancels.
    The p-value is `two_sided_p` of the bootstrapped deltas.
    """
    _check_level(level)
    a = score_items(task, preds_a, golds)
    b = score_items(task, preds_b, golds)
    replicates_a, replicates_b = bootstrap_distribution([a, b], user_ids, n_resamples, seed)
    full_a, full_b = a.aggregate(), b.aggregate()
    results = {}
    for metric in full_a:
        deltas = replicates_a[metric] - replicates_b[metric]
        results[metric] = PairedResult(
            delta=full_a[metric] - full_b[metric],
            ci=_percentile_interval(deltas, level),
            p_value=two_sided_p(deltas),
        )
    return results
