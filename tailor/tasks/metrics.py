"""LaMP's official metrics, with the same rules as LaMP's evaluation code (Salemi et al. 2023).

- classification (LaMP-1, 2N, 2M): a stripped prediction counts only if it is exactly (case-sensitively) one of the
  task's labels; anything else is "no label" and wrong. Accuracy, and macro-F1 over the task's FULL label set, so a
  label that is never predicted and never gold still contributes an F1 of 0.
- regression (LaMP-3): Python's float() of the stripped prediction; an unparseable answer is scored as the farther
  end of the task's score range from the gold (LaMP-3: 1 or 5, and 5 for a gold of 3). MAE and RMSE.
- generation (LaMP-4, 5, 7): ROUGE-1 and ROUGE-L F-measure of `rouge_score` without stemming, averaged over items.

A task file's own task is scored by its kind's rules in the same way.

Every metric is computed through `ItemScores`: each item is scored once, and a metric is an aggregate of per-item
quantities under a weighting of the items. The full-set value is the all-ones weighting; a bootstrap resample is a
weighting by how often each item was drawn. Keeping one code path means the bootstrap measures the same metric that
is reported.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Sequence

import numpy as np

from tailor.tasks.lamp import get_task
from tailor.tasks.task import FAMILY_METRICS, Task, score_value

NO_LABEL = -1
"""The label index of a classification prediction that is not exactly one of the task's labels."""

_HIGHER_IS_BETTER = {"accuracy": True, "f1": True, "rouge1": True, "rougeL": True, "mae": False, "rmse": False}


def resolve_task(task: Task | str) -> Task:
    """Accept a `Task` or any of its names, so callers holding a config string need no lookup of their own."""
    return task if isinstance(task, Task) else get_task(task)


def metric_names(task: Task | str) -> list[str]:
    """The metrics LaMP reports for a task, in LaMP's order."""
    return list(FAMILY_METRICS[resolve_task(task).family])


def higher_is_better(metric: str) -> bool:
    """Whether a larger value of `metric` is better (False for the regression errors)."""
    try:
        return _HIGHER_IS_BETTER[metric]
    except KeyError:
        raise ValueError(f"unknown metric {metric!r}; known metrics: {', '.join(_HIGHER_IS_BETTER)}") from None


class ItemScores(ABC):
    """Per-item quantities from which a task's metrics can be recomputed under any weighting of the items.

    A weighting gives each item a count: 1 for every item on the full set, and how many times the item was drawn for
    a bootstrap resample. Weighted sums turn many resamples into a few matrix products, which is what makes a
    1000-resample bootstrap cheap (ROUGE in particular is scored once per item, never per resample).
    """

    @abstractmethod
    def __len__(self) -> int:
        """The number of items."""

    @abstractmethod
    def aggregate_weighted(self, weights: np.ndarray) -> dict[str, np.ndarray]:
        """Each metric under every row of `weights` (shape (rows, items), item counts), as arrays of shape (rows,)."""

    def aggregate(self, indices: Sequence[int] | np.ndarray | None = None) -> dict[str, float]:
        """The metrics over a multiset of item indices (repeats count repeatedly); all items once when None."""
        n = len(self)
        if indices is None:
            counts = np.ones(n)
        else:
            idx = np.asarray(indices, dtype=np.intp)
            if idx.size == 0:
                raise ValueError("cannot aggregate over an empty set of items")
            if idx.min() < 0 or idx.max() >= n:
                raise IndexError(f"item indices must lie in [0, {n}); got {idx.min()}..{idx.max()}")
            counts = np.bincount(idx, minlength=n).astype(float)
        return {name: float(values[0]) for name, values in self.aggregate_weighted(counts[None, :]).items()}


def _weighted_mean(weights: np.ndarray, values: np.ndarray) -> np.ndarray:
    return weights @ values / weights.sum(axis=1)


def _one_hot(indices: np.ndarray, n_labels: int) -> np.ndarray:
    """Rows of 0/1 indicators; a NO_LABEL row is all zeros, so it is a positive for no label."""
    out = np.zeros((len(indices), n_labels))
    known = indices != NO_LABEL
    out[np.flatnonzero(known), indices[known]] = 1.0
    return out


@dataclass(frozen=True, eq=False)
class LabelScores(ItemScores):
    """Classification items as label indices into the task's label set (`NO_LABEL` for an unmatched prediction)."""

    predicted: np.ndarray
    gold: np.ndarray
    n_labels: int

    def __len__(self) -> int:
        return len(self.gold)

    def aggregate_weighted(self, weights: np.ndarray) -> dict[str, np.ndarray]:
        """Accuracy, and macro-F1 from the resample's own confusion counts (F1 is not a mean of per-item scores).

        Per label, F1 = 2·tp / (2·tp + fp + fn) = 2·tp / (#predicted + #gold), and 0 when the label is neither
        predicted nor gold, which is sklearn's F1 with zero_division=0 averaged over all labels.
        """
        predicted = _one_hot(self.predicted, self.n_labels)
        gold = _one_hot(self.gold, self.n_labels)
        true_positives = weights @ (predicted * gold)
        denominator = weights @ predicted + weights @ gold
        f1 = np.divide(2 * true_positives, denominator, out=np.zeros_like(true_positives), where=denominator > 0)
        correct = (self.predicted == self.gold).astype(float)
        return {"accuracy": _weighted_mean(weights, correct), "f1": f1.mean(axis=1)}


@dataclass(frozen=True, eq=False)
class ErrorScores(ItemScores):
    """Regression items as their absolute and squared errors."""

    abs_error: np.ndarray
    squared_error: np.ndarray

    def __len__(self) -> int:
        return len(self.abs_error)

    def aggregate_weighted(self, weights: np.ndarray) -> dict[str, np.ndarray]:
        return {
            "mae": _weighted_mean(weights, self.abs_error),
            "rmse": np.sqrt(_weighted_mean(weights, self.squared_error)),
        }


@dataclass(frozen=True, eq=False)
class RougeScores(ItemScores):
    """Generation items as their ROUGE-1 and ROUGE-L F-measures."""

    rouge1: np.ndarray
    rougeL: np.ndarray

    def __len__(self) -> int:
        return len(self.rouge1)

    def aggregate_weighted(self, weights: np.ndarray) -> dict[str, np.ndarray]:
        return {"rouge1": _weighted_mean(weights, self.rouge1), "rougeL": _weighted_mean(weights, self.rougeL)}


def _check_lengths(predictions: Sequence[str], golds: Sequence[str]) -> None:
    if len(predictions) != len(golds):
        raise ValueError(f"got {len(predictions)} predictions but {len(golds)} golds")
    if len(predictions) == 0:
        raise ValueError("no predictions to score")


def _label_scores(task: Task, predictions: Sequence[str], golds: Sequence[str]) -> LabelScores:
    index = {label: i for i, label in enumerate(task.labels)}
    unknown = sorted({g.strip() for g in golds} - index.keys())
    if unknown:
        raise ValueError(f"gold labels not in {task.name}'s label set: {unknown}")
    return LabelScores(
        predicted=np.array([index.get(p.strip(), NO_LABEL) for p in predictions], dtype=np.intp),
        gold=np.array([index[g.strip()] for g in golds], dtype=np.intp),
        n_labels=len(task.labels),
    )


def regression_value(prediction: str, gold: float, score_range: tuple[float, float]) -> float:
    """A regression prediction as a number: its float value, or else the end of the task's score range farther from
    the gold (LaMP's rule, for LaMP-3 the farther of 1 and 5).

    The tie at the middle goes to the top, because LaMP picks the bottom only when it is strictly farther.
    """
    value = score_value(prediction)
    if value is not None:
        return value
    low, high = score_range
    return low if abs(low - gold) > abs(high - gold) else high


def _error_scores(task: Task, predictions: Sequence[str], golds: Sequence[str]) -> ErrorScores:
    if task.score_range is None:
        raise ValueError(f"{task.name} is a regression task without a score range")
    gold_values = []
    for gold in golds:
        value = score_value(gold)
        if value is None:
            raise ValueError(f"{task.name} gold {gold!r} is not a number")
        gold_values.append(value)
    predicted = np.array([regression_value(p, g, task.score_range) for p, g in zip(predictions, gold_values)])
    errors = predicted - np.array(gold_values)
    return ErrorScores(abs_error=np.abs(errors), squared_error=errors**2)


def _rouge_scores(predictions: Sequence[str], golds: Sequence[str]) -> RougeScores:
    # Imported here: rouge_score pulls in nltk, over a second of import time that only generation tasks need.
    from rouge_score import rouge_scorer

    scorer = rouge_scorer.RougeScorer(["rouge1", "rougeL"], use_stemmer=False)
    scores = [scorer.score(gold.strip(), prediction.strip()) for prediction, gold in zip(predictions, golds)]
    return RougeScores(
        rouge1=np.array([s["rouge1"].fmeasure for s in scores], dtype=float),
        rougeL=np.array([s["rougeL"].fmeasure for s in scores], dtype=float),
    )


def score_items(task: Task | str, predictions: Sequence[str], golds: Sequence[str]) -> ItemScores:
    """Score every (prediction, gold) pair once, ready to aggregate over the full set or any resample."""
    task = resolve_task(task)
    _check_lengths(predictions, golds)
    if task.family == "classification":
        return _label_scores(task, predictions, golds)
    if task.family == "regression":
        return _error_scores(task, predictions, golds)
    return _rouge_scores(predictions, golds)


def compute_metrics(task: Task | str, predictions: Sequence[str], golds: Sequence[str]) -> dict[str, float]:
    """LaMP's metrics for a task over all items, e.g. {"accuracy": 0.5, "f1": 0.31}."""
    return score_items(task, predictions, golds).aggregate()
