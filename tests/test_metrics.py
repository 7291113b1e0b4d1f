"""LaMP's metrics on hand-worked examples, their edge cases, and agreement with sklearn's macro-F1."""

from __future__ import annotations

import math

import numpy as np
import pytest
from sklearn.metrics import f1_score

from tailor.tasks.lamp import MOVIE_TAGS, NEWS_CATEGORIES, get_task
from tailor.tasks.metrics import (NO_LABEL, compute_metrics, higher_is_better, metric_names, regression_value,
                                  score_items)

LAMP3_RANGE = get_task("lamp3").score_range


def test_metric_names_and_directions() -> None:
    assert metric_names("LaMP-1") == ["accuracy", "f1"]
    assert metric_names(get_task("LaMP-2M")) == ["accuracy", "f1"]
    assert metric_names("LaMP-3") == ["mae", "rmse"]
    assert metric_names("LaMP-7") == ["rouge1", "rougeL"]
    assert [higher_is_better(m) for m in ("accuracy", "f1", "rouge1", "rougeL")] == [True] * 4
    assert not higher_is_better("mae") and not higher_is_better("rmse")
    with pytest.raises(ValueError, match="unknown metric"):
        higher_is_better("bleu")


# --- classification ------------------------------------------------------------------------------------------------
def test_classification_hand_worked_with_unmatched_predictions() -> None:
    predictions = ["politics", "Politics", "politics.", "", " sports ", "sports"]
    golds = ["politics", "politics", "politics", "women", "sports", "politics"]
    # Matched: 1 politics==politics, 5 " sports " strips to sports==sports. "Politics" (case), "politics." (dot) and ""
    # match no label. accuracy = 2/6.
    # politics: tp=1 (item 1), fp=0, fn=3 (items 2, 3, 6)  -> F1 = 2*1 / (2*1 + 0 + 3) = 2/5
    # sports:   tp=1 (item 5), fp=1 (item 6), fn=0          -> F1 = 2 / (2 + 1)         = 2/3
    # women:    tp=0, fp=0, fn=1 (item 4)                    -> F1 = 0
    # the other 12 news categories are neither predicted nor gold -> 0 each
    # macro-F1 = (2/5 + 2/3) / 15 = (16/15) / 15 = 16/225
    result = compute_metrics("LaMP-2N", predictions, golds)
    assert result["accuracy"] == pytest.approx(2 / 6)
    assert result["f1"] == pytest.approx(16 / 225)


def test_unmatched_prediction_is_a_false_positive_for_no_label() -> None:
    scores = score_items("LaMP-2N", ["Politics", "politics.", ""], ["politics", "sports", "women"])
    assert scores.predicted.tolist() == [NO_LABEL] * 3
    # Every item is wrong and no label has a true positive, so every label's F1 is 0.
    assert compute_metrics("LaMP-2N", ["Politics", "politics.", ""], ["politics", "sports", "women"]) == {
        "accuracy": 0.0, "f1": 0.0,
    }


def test_lamp1_macro_f1_over_two_labels() -> None:
    # items: ([1],[1]) right, ([2],[1]) wrong, ("1",[2]) unmatched.  accuracy = 1/3
    # [1]: tp=1, fp=0, fn=1 -> 2/3;  [2]: tp=0, fp=1, fn=1 -> 0;  macro = (2/3 + 0) / 2 = 1/3
    result = compute_metrics("LaMP-1", ["[1]", "[2]", "1"], ["[1]", "[1]", "[2]"])
    assert result == pytest.approx({"accuracy": 1 / 3, "f1": 1 / 3})


def test_macro_f1_counts_labels_absent_from_gold() -> None:
    # All correct, but only 2 of the 15 movie tags occur: macro-F1 = (1 + 1 + 13 * 0) / 15.
    result = compute_metrics("LaMP-2M", ["comedy", "action"], ["comedy", "action"])
    assert result["accuracy"] == 1.0
    assert result["f1"] == pytest.approx(2 / 15)


def _indices(texts: list[str], labels: tuple[str, ...]) -> list[int]:
    return [labels.index(t) if t in labels else -1 for t in texts]


@pytest.mark.parametrize("seed", range(5))
def test_macro_f1_matches_sklearn_on_random_data(seed: int) -> None:
    rng = np.random.default_rng(seed)
    n = int(rng.integers(5, 60))
    vocabulary = list(MOVIE_TAGS) + ["Comedy", "not a tag", ""]  # the last three match no label
    golds = [MOVIE_TAGS[i] for i in rng.integers(0, 6, n)]  # few distinct golds: many labels absent
    predictions = [vocabulary[i] for i in rng.integers(0, len(vocabulary), n)]
    expected = f1_score(
        _indices(golds, MOVIE_TAGS), _indices(predictions, MOVIE_TAGS),
        labels=list(range(len(MOVIE_TAGS))), average="macro", zero_division=0,
    )
    assert compute_metrics("LaMP-2M", predictions, golds)["f1"] == pytest.approx(expected)


def test_unknown_gold_label_is_an_error() -> None:
    with pytest.raises(ValueError, match="not in LaMP-2N's label set"):
        compute_metrics("LaMP-2N", ["politics"], ["Politics"])


# --- regression ----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("gold", "expected"),
    [
        (1.0, 5.0),  # |1-1|=0 > |5-1|=4? no -> 5
        (2.0, 5.0),  # 1 > 3? no -> 5
        (3.0, 5.0),  # 2 > 2? no (tie) -> 5, as LaMP does
        (4.0, 1.0),  # 3 > 1? yes -> 1
        (5.0, 1.0),  # 4 > 0? yes -> 1
    ],
)
def test_unparseable_score_takes_the_farther_end(gold: float, expected: float) -> None:
    assert regression_value("five stars", gold, LAMP3_RANGE) == expected


def test_parseable_scores_use_python_float() -> None:
    assert regression_value("4.5", 1.0, LAMP3_RANGE) == 4.5
    assert regression_value("4.0", 1.0, LAMP3_RANGE) == 4.0
    assert regression_value(" 3", 1.0, LAMP3_RANGE) == 3.0
    assert regression_value("1e0", 5.0, LAMP3_RANGE) == 1.0


def test_regression_hand_worked() -> None:
    # Unparseable for every gold 1..5 -> 5, 5, 5, 1, 1: errors 4, 3, 2, 3, 4.
    # mae = 16/5;  rmse = sqrt((16 + 9 + 4 + 9 + 16) / 5) = sqrt(54/5)
    result = compute_metrics("LaMP-3", ["?"] * 5, ["1", "2", "3", "4", "5"])
    assert result["mae"] == pytest.approx(16 / 5)
    assert result["rmse"] == pytest.approx(math.sqrt(54 / 5))


def test_regression_mixed_parse() -> None:
    # "4.5" vs 4 -> 0.5;  " 3" vs 3 -> 0;  "five" vs 2 -> 5, error 3;  "1e0" vs 1 -> 0
    # mae = 3.5 / 4;  rmse = sqrt((0.25 + 0 + 9 + 0) / 4)
    result = compute_metrics("LaMP-3", ["4.5", " 3", "five", "1e0"], ["4", "3", "2", "1"])
    assert result["mae"] == pytest.approx(0.875)
    assert result["rmse"] == pytest.approx(math.sqrt(9.25 / 4))


def test_non_numeric_regression_gold_is_an_error() -> None:
    with pytest.raises(ValueError, match="not a number"):
        compute_metrics("LaMP-3", ["3"], ["three"])


# --- generation ----------------------------------------------------------------------------------------------------
def test_rouge_identical_and_disjoint() -> None:
    assert compute_metrics("LaMP-4", ["  a headline here "], ["a headline here"]) == {"rouge1": 1.0, "rougeL": 1.0}
    assert compute_metrics("LaMP-5", ["alpha beta"], ["gamma delta"]) == {"rouge1": 0.0, "rougeL": 0.0}


def test_rouge_partial_overlap_hand_worked() -> None:
    gold = "Police arrest man in downtown robbery."
    prediction = "man arrested after downtown robbery by police"
    # rouge_score lower-cases and drops punctuation; no stemming, so "arrest" != "arrested".
    # gold tokens (6): police arrest man in downtown robbery
    # pred tokens (7): man arrested after downtown robbery by police
    # rouge1: overlap {police, man, downtown, robbery} = 4; P = 4/7, R = 4/6, F = 2*4 / (7 + 6) = 8/13
    # rougeL: LCS = "man downtown robbery" = 3;        P = 3/7, R = 3/6, F = 2*3 / (7 + 6) = 6/13
    result = compute_metrics("LaMP-7", [prediction, "x"], [gold, "x"])
    # averaged with a second, identical item (1.0 each)
    assert result["rouge1"] == pytest.approx((8 / 13 + 1) / 2)
    assert result["rougeL"] == pytest.approx((6 / 13 + 1) / 2)


# --- input checks and resampled aggregation ------------------------------------------------------------------------
@pytest.mark.parametrize("task", ["LaMP-2N", "LaMP-3", "LaMP-4"])
def test_length_mismatch_and_empty_input(task: str) -> None:
    with pytest.raises(ValueError, match="2 predictions but 1 golds"):
        compute_metrics(task, ["a", "b"], ["a"])
    with pytest.raises(ValueError, match="no predictions"):
        compute_metrics(task, [], [])


_EXAMPLES = {
    "LaMP-2N": (["politics", "sports", "Politics", "women", "crime"],
                ["politics", "politics", "women", "women", "food & drink"]),
    "LaMP-3": (["1", "2.5", "x", "5", "4"], ["1", "3", "4", "3", "5"]),
    "LaMP-4": (["big news today", "a b c", "storm hits", "x", "markets fall"],
               ["big news", "a c b", "storm hits coast", "y", "markets rise sharply"]),
}


@pytest.mark.parametrize("task", list(_EXAMPLES))
def test_aggregate_over_a_multiset_equals_metrics_on_the_repeated_items(task: str) -> None:
    predictions, golds = _EXAMPLES[task]
    indices = [0, 0, 3, 4, 4, 4, 1]
    scores = score_items(task, predictions, golds)
    expected = compute_metrics(task, [predictions[i] for i in indices], [golds[i] for i in indices])
    assert scores.aggregate(indices) == pytest.approx(expected)
    assert scores.aggregate() == pytest.approx(compute_metrics(task, predictions, golds))


def test_resampled_macro_f1_comes_from_confusion_counts() -> None:
    predictions, golds = _EXAMPLES["LaMP-2N"]
    scores = score_items("LaMP-2N", predictions, golds)
    # items 0 and 1 twice: politics tp=2, fp=0, fn=2 -> 2*2/(4+0+2) = 2/3; every other label 0 -> macro = (2/3)/15.
    # A mean of per-item F1s would give something else entirely.
    assert scores.aggregate([0, 0, 1, 1])["f1"] == pytest.approx(2 / 3 / len(NEWS_CATEGORIES))


def test_aggregate_rejects_bad_indices() -> None:
    scores = score_items("LaMP-3", ["1", "2"], ["1", "2"])
    with pytest.raises(ValueError, match="empty"):
        scores.aggregate([])
    with pytest.raises(IndexError):
        scores.aggregate([0, 2])
