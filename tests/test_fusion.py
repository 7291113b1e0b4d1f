"""Prior fusion on the tiny model: weights learned on training users' queries, the user's counts in the state, a
rating answered with the fused distribution's median, and a refusal for tasks without labels."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from benchmarks.leaderboard import learned_numbers
from tailor.backbone.model import Backbone
from tailor.data.lamp import load_users
from tailor.methods.fusion import SCALES, Fusion
from tailor.runs.fits import fit_method
from tailor.tasks import get_task
from tailor.tasks.records import HistoryItem, Query, User

pytestmark = pytest.mark.usefixtures("private_cache", "one_thread")

BASE = "r=4,lr=0.02,max_total=16,epochs=1,max_examples=4,history_tokens=48,max_target_tokens=8"


def test_users_with_a_clear_favourite_are_answered_with_it(backbone: Backbone, lamp_dir: Path) -> None:
    """The synthetic users pick their favourite category 70% of the time and their query is about it, while the tiny
    model knows nothing: the learned weights lean on the user's counts, and the answers follow them."""
    task = get_task("lamp2n")
    method = Fusion(task, backbone, base_options=BASE)
    method.fit(load_users(task, "train", lamp_dir))
    weights = method.fit_log["weights"]
    assert weights["user"] + weights["recent"] > abs(weights["model"])
    assert set(method.fit_log["by_scale"]) == {str(s) for s in SCALES}
    favourite = User("fan", task.name, tuple(HistoryItem(str(i), {"text": "x", "title": "t", "category": "sports"})
                                             for i in range(6)))
    dev = load_users(task, "dev", lamp_dir)
    states = method.personalize_many([favourite, *dev])
    answers = method.predict([(s, q) for s, q in zip(states, [dev[0].queries[0], *(u.queries[0] for u in dev)])])
    assert answers[0].text == "sports" and answers[0].mode == "fusion"
    assert all(len(a.scores) == len(task.labels) for a in answers)
    assert sum(np.exp(answers[0].scores)) == pytest.approx(1.0)


def test_a_rating_is_the_median_of_the_fused_distribution(backbone: Backbone) -> None:
    method = Fusion(get_task("lamp3"), backbone, base_options=BASE)
    assert method._answer(np.array([0.1, 0.1, 0.1, 0.2, 0.5])) == "4"  # mean 3.9, median 4: MAE's minimiser
    assert method._answer(np.array([0.05, 0.05, 0.1, 0.1, 0.7])) == "5"


def _rater(task, index: int) -> User:
    """Scores around a centre m in 2..4 but never m itself (m - 1 and m + 1 in turn), and the query's gold is m:
    the counts tie between the two neighbours, the user's mean is exactly the answer."""
    centre = 2 + index % 3
    history = tuple(HistoryItem(f"r{index}-{i}", {"text": f"review {i}", "score": str(centre + (-1) ** i)})
                    for i in range(6))
    return User(f"r{index}", task.name, history, (Query(f"r{index}-q", task.ask("a review"), str(centre)),))


def test_a_raters_mean_score_is_fused_when_asked(backbone: Backbone) -> None:
    task = get_task("lamp3")
    raters = [_rater(task, i) for i in range(24)]
    fitted = {}
    for user_mean in (False, True):
        method = Fusion(task, backbone, base_options=BASE, user_mean=user_mean)
        method.fit(raters)
        fitted[user_mean] = method
    assert "mean" in fitted[True].fit_log["weights"] and "mean" not in fitted[False].fit_log["weights"]
    assert fitted[True].fit_log["cross_validated"]["mae"] < 0.5 < fitted[False].fit_log["cross_validated"]["mae"]
    method = fitted[True]
    state = method.personalize(_rater(task, 100))  # centre 3: scores 4 and 2
    column = method._features(np.zeros(5), state, "a review")[:, method.features.index("mean")]
    mean = (4 * 3 + 2 * 3 + float(method.global_share @ np.arange(1, 6))) / 7  # six items and one pseudo-item
    assert column == pytest.approx(-np.abs(np.arange(1, 6) - mean))
    with pytest.raises(ValueError, match="user_mean needs scores"):
        Fusion(get_task("lamp2n"), backbone, user_mean=True)


def test_tasks_without_labels_and_bad_base_options_are_refused(backbone: Backbone) -> None:
    with pytest.raises(ValueError, match="no label set"):
        Fusion(get_task("lamp7"), backbone)
    with pytest.raises(ValueError, match="base_options takes KEY=VALUE"):
        Fusion(get_task("lamp2n"), backbone, base_options="max_total")
    with pytest.raises(ValueError, match="max_total=many: max_total must be an integer"):
        Fusion(get_task("lamp2n"), backbone, base_options="max_total=many")
    with pytest.raises(ValueError, match="mt-lora has no option nope"):
        Fusion(get_task("lamp2n"), backbone, base_options="nope=1")
    base = Fusion(get_task("lamp2n"), backbone, base_options="max_total=16, lr=0.5,calibrate=true").base.config
    assert (base.max_total, base.lr, base.calibrate) == (16, 0.5, True)


def test_the_weights_are_learned_on_a_seeded_sample_of_the_training_queries(backbone: Backbone,
                                                                            lamp_dir: Path) -> None:
    task = get_task("lamp2n")
    train = load_users(task, "train", lamp_dir)
    assert sum(len(u.queries) for u in train) > 8  # more than the sample, or the cap is not exercised
    fits = []
    for _ in range(2):
        method = Fusion(task, backbone, base_options=BASE, fit_queries=8)
        method.fit(train)
        fits.append(method.fit_log)
    assert fits[0]["queries"] == 8 and fits[0] == fits[1]
    with pytest.raises(ValueError, match="fit_queries must be at least 8"):
        Fusion(task, backbone, fit_queries=2)


def test_the_fit_cache_counts_its_weights_beside_its_bases_tensors(backbone: Backbone, lamp_dir: Path) -> None:
    task = get_task("lamp2n")
    method = Fusion(task, backbone, base_options=BASE, fit_queries=8)
    base, own = fit_method(method, load_users(task, "train", lamp_dir))
    assert learned_numbers(own) == len(method.features) + len(task.labels)
    assert learned_numbers(base) > 0  # the LoRA's tensors, counted from its files


def _two_topic_user(task, name: str, asks: str, last: str) -> User:
    """Half of the history is about football, half about elections (alternating, ending with `last`); the query asks
    about `asks`. Counts and recency cannot tell the answer; the history items the query retrieves can."""
    words = {"sports": "football match goal striker", "politics": "election senate vote ballot"}
    other = "politics" if last == "sports" else "sports"
    topics = [other, last] * 4
    history = tuple(HistoryItem(f"{name}-{i}", {"text": words[t], "title": words[t].split()[0], "category": t})
                    for i, t in enumerate(topics))
    return User(name, task.name, history, (Query(f"{name}-q", task.ask(words[asks]), asks),))


def test_neighbours_let_the_query_pick_between_a_users_two_habits(backbone: Backbone) -> None:
    task = get_task("lamp2n")
    habits = [("sports", "politics"), ("politics", "sports"), ("sports", "sports"), ("politics", "politics")]
    train = [_two_topic_user(task, f"u{i}", asks, last) for i, (asks, last) in enumerate(habits * 4)]
    plain = Fusion(task, backbone, base_options=BASE, fit_queries=16)
    plain.fit(train)
    fused = Fusion(task, backbone, base_options=BASE, fit_queries=16, neighbours=2)
    fused.fit(train)
    assert set(fused.fit_log["weights"]) == {"model", "user", "recent", "global", "neighbours"}
    assert fused.fit_log["weights"]["neighbours"] > 0
    assert fused.fit_log["cross_validated"]["accuracy"] == 1.0 > plain.fit_log["cross_validated"]["accuracy"]
    dev = [_two_topic_user(task, "d1", "sports", "politics"), _two_topic_user(task, "d2", "politics", "sports")]
    answers = fused.predict(list(zip(fused.personalize_many(dev), (u.queries[0] for u in dev))))
    assert [a.text for a in answers] == ["sports", "politics"]
    with pytest.raises(ValueError, match="neighbours must be >= 0"):
        Fusion(task, backbone, neighbours=-1)


def _overconfident_users(n: int = 200) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """Features (queries, 2 labels, model/user/recent/global) of users whose counts mislead the likelihood: half have
    few items, so extreme log-counts (margin 5) that are right 70% of the time, half have many items, so mild
    log-counts (margin 0.5) right 95% of the time; the model is right 60% of the time (margin 1)."""
    rng = np.random.default_rng(0)
    features, golds = np.zeros((n, 2, 4)), rng.integers(0, 2, n)
    for i, gold in enumerate(golds):
        few = i % 2 == 0
        features[i, gold if rng.random() < (0.7 if few else 0.95) else 1 - gold, 1] = 5.0 if few else 0.5
        features[i, gold if rng.random() < 0.6 else 1 - gold, 0] = 1.0
    return features, golds, [f"u{i}" for i in range(n)]


def test_the_user_features_weight_is_chosen_by_cross_validated_accuracy_not_likelihood(backbone: Backbone) -> None:
    """The likelihood keeps the user's weight small (the few-item users' extreme counts are often wrong), so the
    many-item users' mild counts lose to the model; a larger scale on the user's features answers them right."""
    features, golds, owners = _overconfident_users()
    task = get_task("lamp2n")
    plain = Fusion(task, backbone, base_options=BASE, user_scale="1")
    auto = Fusion(task, backbone, base_options=BASE)
    weights, scale, by_scale = auto._fitted(features, golds, owners)
    likelihood, one, _ = plain._fitted(features, golds, owners)
    assert one == 1.0 and scale > 1.0 and by_scale[str(scale)] == max(by_scale.values(), key=lambda s: s["accuracy"])
    assert weights == pytest.approx(likelihood * np.array([1.0, scale, scale, 1.0]))
    assert (auto._cross_validated(features, golds, owners)["accuracy"]
            > plain._cross_validated(features, golds, owners)["accuracy"] + 0.1)
    with pytest.raises(ValueError, match="user_scale must be 'auto' or a positive number, not 'big'"):
        Fusion(task, backbone, user_scale="big")
    with pytest.raises(ValueError, match="not '0'"):
        Fusion(task, backbone, user_scale="0")


def _movie_fan(task, index: int) -> User:
    """A user who tagged three movies, each with its own tag, and asks about a fourth: their own counts never hold
    the answer, the tags other users gave the fourth movie do."""
    movies = [f"Movie number {m} has a plot." for m in range(6)]
    asks = index % 6
    seen = [(asks + k) % 6 for k in (1, 2, 3)]
    history = tuple(HistoryItem(f"f{index}-{m}", {"description": movies[m], "tag": task.labels[m]}) for m in seen)
    return User(f"f{index}", task.name, history, (Query(f"f{index}-q", task.ask(movies[asks]), task.labels[asks]),))


def test_the_labels_others_gave_the_querys_item_are_fused_when_asked(backbone: Backbone) -> None:
    task = get_task("lamp2m")
    fans = [_movie_fan(task, i) for i in range(24)]
    crowd = Fusion(task, backbone, base_options=BASE, items=True)
    base, own = fit_method(crowd, fans)
    plain = Fusion(task, backbone, base_options=BASE)
    assert fit_method(plain, fans)[0] == base  # the same base, fitted once
    assert crowd.fit_log["weights"]["items"] > 0 and "items" not in plain.fit_log["weights"]
    assert crowd.fit_log["cross_validated"]["accuracy"] == 1.0 > plain.fit_log["cross_validated"]["accuracy"]
    # While learning, a user's own answers are out of the item's counts: f0's query gold is counted once, by f0 alone.
    query = fans[0].queries[0]
    counts = crowd.crowd.for_query(query.input, crowd.labels)
    alone = crowd.crowd.for_query(query.input, crowd.labels, without=fans[0])
    assert counts[0] - alone[0] == 1 and alone[0] > 0
    assert learned_numbers(own) == len(crowd.features) + len(task.labels) + 6  # six movies, one tag each
    again = Fusion(task, backbone, base_options=BASE, items=True)
    assert fit_method(again, fans) == [base, own] and again.crowd.counts == crowd.crowd.counts
    newcomer = _movie_fan(task, 100)
    answer = again.predict([(again.personalize(newcomer), newcomer.queries[0])])[0]
    assert answer.text == newcomer.queries[0].gold
