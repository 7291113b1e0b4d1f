"""Model-free floors that every method is reported against.

On small backbones the user prior beats zero-shot prompting by far (on ../shared/lamp LaMP-2N: 0.74 accuracy against
0.38 for the global prior), so a method is only interesting if it beats these.

- global prior: the most common gold label (classification) or the mean gold score (LaMP-3) over the training
  users; for generation, the input text copied (the question's content after its marker).
- user prior: the user's most frequent label or mean score in their own history (ties go to the most recent label);
  for generation, the output of the history item BM25 finds most similar to the question.
- item prior: what the training users answered for the query's item (its most frequent label or their mean score,
  `tailor.methods.crowd`), the global prior's answer where none of them met the item: the floor of a task whose users
  share items (LaMP-2M's movies), where the crowd knows an item better than a small model does. Classification and
  regression only: a generation task's items are never repeated.

For ratings, `center="median"` answers with the median instead of the mean: the mean is the constant that minimises
RMSE, the median the one that minimises MAE, LaMP-3's first metric. On ../shared/lamp most LaMP-3 scores are 5, so
the two differ by a lot.
"""

from __future__ import annotations

import statistics
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Sequence

from tailor.methods.base import HISTORY_UPDATE, MethodConfig, Personalizer, Prediction, Progress, Request
from tailor.methods.crowd import ItemLabels
from tailor.methods.prompting import bm25_of, history_of, profile_header
from tailor.store.state import UserState
from tailor.tasks.records import User


def _format_score(value: float) -> str:
    return f"{value:.4f}".rstrip("0").rstrip(".")


@dataclass
class PriorConfig(MethodConfig):
    center: Literal["mean", "median"] = "mean"
    """How a rating prior summarises scores (classification and generation ignore it)."""

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.center not in ("mean", "median"):
            raise ValueError(f"center must be mean or median, not {self.center!r}")


def _center(scores: Sequence[float], center: str) -> str:
    return _format_score(statistics.median(scores) if center == "median" else sum(scores) / len(scores))


class GlobalPrior(Personalizer[PriorConfig]):
    name = "global-prior"
    state_is_history = True
    update_note = "the state holds nothing of the user: nothing to update"

    answer: str | None = None

    def fit(self, users: Sequence[User], progress: Progress = None, workdir: Path | None = None) -> None:
        golds = [q.gold for u in users for q in u.queries if q.gold is not None]
        if self.task.family == "generation":
            return
        if not golds:
            raise ValueError(f"global prior for {self.task.name}: the training users have no gold outputs")
        if self.task.family == "regression":
            self.answer = _center([float(g) for g in golds], self.config.center)
        else:
            self.answer = Counter(golds).most_common(1)[0][0]

    def personalize(self, user: User) -> UserState:
        return self.new_state(user)

    def predict(self, requests: Sequence[Request], progress: Progress = None) -> list[Prediction]:
        if self.task.family != "generation" and self.answer is None:
            raise RuntimeError("global prior: call fit(train_users) before predict")
        out = []
        for _, query in requests:
            text = self.task.retrieval_query(query.input) if self.task.family == "generation" else self.answer
            out.append(Prediction(str(text), "prior"))
        if progress:
            progress(len(requests))
        return out


class ItemPrior(GlobalPrior):
    name = "item-prior"

    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        if self.task.family == "generation":
            raise ValueError(f"item prior answers with labels other users gave an item; {self.task.name} has none")
        self.items: ItemLabels | None = None
        self.order: list[str] = []

    def fit(self, users: Sequence[User], progress: Progress = None, workdir: Path | None = None) -> None:
        super().fit(users, progress, workdir)
        self.items = ItemLabels.of(self.task, users)
        given = sum(self.items.counts.values(), Counter())
        self.order = [label for label, _ in given.most_common()]  # a tie goes to the label the crowd gives most

    def predict(self, requests: Sequence[Request], progress: Progress = None) -> list[Prediction]:
        if self.items is None:
            raise RuntimeError("item prior: call fit(train_users) before predict")
        out = []
        for _, query in requests:
            counts = dict(zip(self.order, self.items.for_query(query.input, self.order)))
            if not any(counts.values()):
                out.append(Prediction(str(self.answer), "prior"))
            elif self.task.family == "regression":
                scores = [float(label) for label, n in counts.items() for _ in range(int(n))]
                out.append(Prediction(_center(scores, self.config.center), "prior"))
            else:
                out.append(Prediction(max(self.order, key=counts.__getitem__), "prior"))
        if progress:
            progress(len(requests))
        return out


class UserPrior(Personalizer[PriorConfig]):
    name = "user-prior"
    state_is_history = True
    update_note = HISTORY_UPDATE

    def personalize(self, user: User) -> UserState:
        header = profile_header(user)
        if self.task.family != "generation":
            outputs = [self.task.item_output(item) for item in user.profile]
            if self.task.family == "regression":
                header["answer"] = _center([float(o) for o in outputs], self.config.center)
            else:
                counts = Counter(outputs)
                top = max(counts.values())
                header["answer"] = next(o for o in reversed(outputs) if counts[o] == top)
            del header["profile"]
        return self.new_state(user, header)

    def predict(self, requests: Sequence[Request], progress: Progress = None) -> list[Prediction]:
        out = []
        for state, query in requests:
            if self.task.family != "generation":
                out.append(Prediction(state.header["answer"], "prior"))
                continue
            best = bm25_of(self.task, state).top_k(self.task.retrieval_query(query.input), 1)
            out.append(Prediction(self.task.item_output(history_of(state)[best[0]]) if best else "", "prior"))
        if progress:
            progress(len(requests))
        return out
