"""Bootstrap over users: interval sanity, paired comparison, determinism, grouping and speed."""

from __future__ import annotations

import time

import numpy as np
import pytest

from tailor.tasks.lamp import NEWS_CATEGORIES
from tailor.tasks.metrics import compute_metrics, score_items
from tailor.tasks.stats import bootstrap_ci, bootstrap_distribution, paired_bootstrap, two_sided_p


def _classification_data(n_users: int, accuracy: float, seed: int) -> tuple[list[str], list[str], list[str]]:
    """One query per user; each prediction is right with probability `accuracy`, else a wrong label."""
    rng = np.random.default_rng(seed)
    golds = [NEWS_CATEGORIES[i] for i in rng.integers(0, 5, n_users)]
    right = rng.random(n_users) < accuracy
    predictions = [g if ok else NEWS_CATEGORIES[(NEWS_CATEGORIES.index(g) + 1) % 5] for g, ok in zip(golds, right)]
    return predictions, golds, [f"u{i}" for i in range(n_users)]


def test_ci_contains_the_point_estimate() -> None:
    predictions, golds, users = _classification_data(200, 0.6, seed=1)
    point = compute_metrics("LaMP-2N", predictions, golds)
    for metric, (low, high) in bootstrap_ci("LaMP-2N", predictions, golds, users).items():
        assert low <= point[metric] <= high
        assert low < high


def test_ci_narrows_with_more_users() -> None:
    def width(n_users: int) -> float:
        predictions, golds, users = _classification_data(n_users, 0.6, seed=2)
        low, high = bootstrap_ci("LaMP-2N", predictions, golds, users)["accuracy"]
        return high - low

    # The width scales like 1/sqrt(n): 16x the users should give about a quarter of the width.
    assert width(800) < 0.5 * width(50)


def test_lower_level_gives_a_narrower_interval() -> None:
    predictions, golds, users = _classification_data(100, 0.5, seed=3)
    wide = bootstrap_ci("LaMP-2N", predictions, golds, users, level=0.99)["accuracy"]
    narrow = bootstrap_ci("LaMP-2N", predictions, golds, users, level=0.5)["accuracy"]
    assert wide[0] <= narrow[0] and narrow[1] <= wide[1]


def test_deterministic_under_a_seed() -> None:
    predictions, golds, users = _classification_data(60, 0.5, seed=4)
    first = bootstrap_ci("LaMP-2N", predictions, golds, users, seed=7)
    assert bootstrap_ci("LaMP-2N", predictions, golds, users, seed=7) == first
    assert bootstrap_ci("LaMP-2N", predictions, golds, users, seed=8) != first


def test_identical_systems_have_zero_delta_and_p_one() -> None:
    predictions, golds, users = _classification_data(50, 0.5, seed=5)
    for result in paired_bootstrap("LaMP-2N", predictions, predictions, golds, users).values():
        assert result.delta == 0.0
        assert result.ci == (0.0, 0.0)
        assert result.p_value == 1.0


def test_a_clearly_better_system_is_significant() -> None:
    rng = np.random.default_rng(6)
    golds = [str(v) for v in rng.integers(1, 6, 100)]
    users = [f"u{i // 2}" for i in range(100)]
    good = [str(min(5, int(g) + int(rng.integers(0, 2)))) for g in golds]  # off by at most 1
    bad = [str(6 - int(g)) for g in golds]  # mirrored: off by up to 4
    results = paired_bootstrap("LaMP-3", good, bad, golds, users)
    for metric, result in results.items():
        assert result.delta < 0, metric  # lower error is better: a - b is negative
        assert result.ci[1] < 0
        assert result.p_value < 0.01
    # and the other way round, the sign flips but not the evidence
    flipped = paired_bootstrap("LaMP-3", bad, good, golds, users)
    assert flipped["mae"].delta == pytest.approx(-results["mae"].delta)
    assert flipped["mae"].p_value < 0.01


def test_two_sided_p_definition() -> None:
    # 1000 resamples all > 0: P(d<=0) = (0+1)/1001 -> p = 2/1001
    assert two_sided_p(np.full(1000, 0.3)) == pytest.approx(2 / 1001)
    # 30 of 100 <= 0: p = 2 * (30+1)/101
    deltas = np.concatenate([-np.ones(30), np.ones(70)])
    assert two_sided_p(deltas) == pytest.approx(2 * 31 / 101)
    assert two_sided_p(np.zeros(10)) == 1.0


def test_paired_resamples_are_shared() -> None:
    """Against itself, every resample gives the same value for a and b, which only holds if the draws are shared."""
    predictions, golds, users = _classification_data(40, 0.5, seed=8)
    a = score_items("LaMP-2N", predictions, golds)
    b = score_items("LaMP-2N", list(predictions), golds)
    dist_a, dist_b = bootstrap_distribution([a, b], users, n_resamples=200, seed=0)
    np.testing.assert_array_equal(dist_a["f1"], dist_b["f1"])


def test_a_user_moves_as_a_block() -> None:
    """User "big" has 3 wrong items and users a, b, c one right item each. Resampling 4 users keeps big's items
    together, so every replicate accuracy is k / (k + 3m) for k right users and m copies of big, with k + m = 4.
    Resampling items instead would also give values such as 5/6."""
    predictions = ["sports", "sports", "sports", "politics", "politics", "politics"]
    golds = ["politics", "politics", "politics", "politics", "politics", "politics"]
    users = ["big", "big", "big", "a", "b", "c"]
    (dist,) = bootstrap_distribution([score_items("LaMP-2N", predictions, golds)], users, n_resamples=500, seed=0)
    feasible = np.array([k / (k + 3 * (4 - k)) for k in range(5)])
    assert np.all(np.isclose(dist["accuracy"][:, None], feasible[None, :]).any(axis=1))


def test_grouped_resampling_has_the_variance_of_users_not_items() -> None:
    """40 users with 5 items each, all right or all wrong together: the users are the 40 independent draws, so the
    user bootstrap's spread is about sqrt(5) times that of a bootstrap that treats the 200 items as independent."""
    rng = np.random.default_rng(9)
    user_right = rng.random(40) < 0.5
    golds = ["politics"] * 200
    predictions = ["politics" if user_right[i // 5] else "sports" for i in range(200)]
    grouped = [f"u{i // 5}" for i in range(200)]
    per_item = [f"i{i}" for i in range(200)]
    low_g, high_g = bootstrap_ci("LaMP-2N", predictions, golds, grouped, n_resamples=2000)["accuracy"]
    low_i, high_i = bootstrap_ci("LaMP-2N", predictions, golds, per_item, n_resamples=2000)["accuracy"]
    assert 1.7 < (high_g - low_g) / (high_i - low_i) < 3.0


def test_input_checks() -> None:
    predictions, golds, users = _classification_data(10, 0.5, seed=10)
    with pytest.raises(ValueError, match="user ids"):
        bootstrap_ci("LaMP-2N", predictions, golds, users[:-1])
    with pytest.raises(ValueError, match="n_resamples"):
        bootstrap_ci("LaMP-2N", predictions, golds, users, n_resamples=0)
    with pytest.raises(ValueError, match="level"):
        bootstrap_ci("LaMP-2N", predictions, golds, users, level=95)
    with pytest.raises(ValueError, match="predictions but"):
        paired_bootstrap("LaMP-2N", predictions, predictions[:-1], golds, users)


def _timed(call) -> float:
    start = time.perf_counter()
    call()
    return time.perf_counter() - start


@pytest.mark.parametrize("task", ["LaMP-2N", "LaMP-3", "LaMP-5"])
def test_1000_resamples_over_213_users_take_under_a_second(task: str) -> None:
    rng = np.random.default_rng(11)
    n_items = 400  # 213 users, several with more than one query
    users = [f"u{i % 213}" for i in range(n_items)]
    if task == "LaMP-2N":
        golds = [NEWS_CATEGORIES[i] for i in rng.integers(0, 15, n_items)]
        a = [NEWS_CATEGORIES[i] for i in rng.integers(0, 15, n_items)]
    elif task == "LaMP-3":
        golds = [str(v) for v in rng.integers(1, 6, n_items)]
        a = [str(v) for v in rng.integers(1, 6, n_items)]
    else:
        words = np.array("deep learning for language models with personal user history and retrieval".split())
        golds = [" ".join(rng.choice(words, 10)) for _ in range(n_items)]
        a = [" ".join(rng.choice(words, 10)) for _ in range(n_items)]
    b = list(reversed(a))
    score_items(task, a[:1], golds[:1])  # one-off imports (rouge_score loads nltk) are not the bootstrap's cost
    assert _timed(lambda: bootstrap_ci(task, a, golds, users, n_resamples=1000)) < 1.0
    assert _timed(lambda: paired_bootstrap(task, a, b, golds, users, n_resamples=1000)) < 1.0
