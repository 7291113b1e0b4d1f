"""Prior fusion: a task-trained model's answer distribution for the query, combined with the user's own answer
distribution, by weights learned on training users.

The model-free floors are strong because each user is consistent (LaMP-2N: answering a user's most frequent label is
right 74% of the time), and the models are weak at the task; neither sees what the other sees. This method is a
conditional-logit stack (McFadden 1974) over the task's labels y for a query x of user u:

    s(y) = w_m · log p_model(y | x)  +  w_u · log p̃_u(y)  +  w_r · log p̃_u^recent(y)  +  w_g · log p_global(y)
           [ + w_n · log p̃_u(y | x) ]  [ − w_μ · |y − μ̃_u| ]  [ + w_x · log p̃_x(y) ]
    p(y | x, u) = softmax_y s(y)

- p_model(y | x): the base method's label likelihoods (a task-trained LM, by default the multi-task LoRA, whose
  prompt also retrieves from the user's history), normalised over the labels;
- p̃_u(y) = (c_u(y) + α p_global(y)) / (n_u + α): the user's label counts smoothed towards the global distribution
  (α = `strength`), and p̃_u^recent the same with each item weighted by recency (half-life `half_life` items);
- p_global(y): the training users' label distribution;
- p̃_u(y | x), only with `neighbours` k > 0: the labels of the k items of the user's history that BM25 ranks highest
  for the query, smoothed the same way: the one feature that lets the user's own evidence depend on the query;
- μ̃_u, only for a rating with `user_mean`: the user's mean score shrunk towards the training users' mean,
  μ̃_u = (Σ_i y_i + α μ_global) / (n_u + α). The counts treat scores as unordered labels, so a user who gives 4s and
  5s says nothing about 3 through them; a score's distance from the user's mean does (the regression idea: the user's
  own scores shrunk towards the global centre by a learned amount, w_μ, combined with the model's);
- p̃_x(y), only with `items`: the labels the training users gave the query's item x (`tailor.methods.crowd`), smoothed
  the same way: where users share items (LaMP-2M's movies), the crowd's tags for the movie; not a user feature, so
  the user's own evidence has to add to it (the swapped control shows whether it does). While the weights are learned,
  a training user's own answers are taken out of the counts.

The weights are learned by maximum likelihood on training users' own queries (their golds are public), which
the base method never trained on. Likelihood calibrates probabilities, not answers: it keeps the user features' weights
small where a user's few items make the counts overconfident, and then the user's favourite loses to a weak model's
guess more often than it should (LaMP-2M). So the user features' weights are then multiplied by a factor s
(`user_scale`), by default the one of SCALES whose answers score best in 5-fold cross-validation over the training
users (s = 1 is the likelihood's own answer). The fit reports that procedure's own cross-validated score too, the
choice of s redone inside each fold: the number to choose options by without reading a dev user.

A classification answer is the most likely label; a rating (LaMP-3) the median of p(y | x, u), the point that
minimises the expected absolute error LaMP-3 is scored by. Generation tasks have no label set to fuse over and are
refused.

The state is the base method's state and the user's counts (and, with `neighbours`, the history to retrieve from):
nothing is trained per user, so personalizing costs what the base's personalize costs, and an update is a personalize
(`state_is_history` when the base's is).
"""

from __future__ import annotations

import json
import random
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch

from tailor.backbone.model import log_normalise
from tailor.methods.base import LMConfig, LMPersonalizer, Personalizer, Prediction, Progress, Request
from tailor.methods.crowd import ItemLabels
from tailor.methods.options import pairs, typed_options
from tailor.methods.prompting import bm25_of, history_of, profile_header
from tailor.store.state import UserState
from tailor.tasks.records import HistoryItem, Query, User

USER_FEATURES = ("user", "recent", "neighbours", "mean")
FOLDS = 5
SCALES = (1.0, 2.0, 4.0, 8.0, 16.0)


@dataclass
class FusionConfig(LMConfig):
    base: str = "mt-lora"
    """The registered method whose label likelihoods are fused: one that learned the task (mt-lora, perfit)."""
    base_options: str = ""
    """The base method's options, "KEY=VALUE,KEY=VALUE" (its defaults otherwise)."""
    strength: float = 1.0
    """α: how many pseudo-items of the global distribution smooth a user's counts."""
    half_life: float = 5.0
    """Items after which an item's weight in the recent counts halves (the newest item weighs 1)."""
    l2: float = 1e-3
    """Ridge penalty on the weights (four to six) while they are learned."""
    fit_queries: int = 300
    """Training users' queries the weights are learned from, a sample fixed by `seed` when there are more: a few weights
    need few, and each costs one answer of the base method (LaMP-3's 745 training users would take 15 minutes on two
    CPU cores for no better fit)."""
    seed: int = 0
    neighbours: int = 0
    """k: also fuse the labels of the k history items BM25 ranks highest for the query (0: no such feature)."""
    user_mean: bool = False
    """For a rating: also fuse each score's distance from the user's shrunk mean score (μ̃_u above)."""
    items: bool = False
    """Also fuse the labels the training users gave the query's item (p̃_x above)."""
    user_scale: str = "auto"
    """s, the factor on the learned weights of the user's features: a number, or "auto" for the one of SCALES with the
    best cross-validated score on the training users' queries."""

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.fit_queries < 8:
            raise ValueError(f"fit_queries must be at least 8, not {self.fit_queries}")
        if self.user_scale != "auto":
            try:
                scale = float(self.user_scale)
            except ValueError:
                scale = -1.0
            if not scale > 0:
                raise ValueError(f"user_scale must be 'auto' or a positive number, not {self.user_scale!r}")


class Fusion(LMPersonalizer[FusionConfig]):
    name = "fusion"
    update_note = "the user's counts follow the history; the base method's state is rebuilt or updated as it does"

    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        if self.task.family == "generation":
            raise ValueError(f"fusion combines label distributions; {self.task.name} has no label set")
        if self.config.user_mean and self.task.family != "regression":
            raise ValueError(f"fusion's user_mean needs scores to average; {self.task.name}'s labels are not scores")
        from tailor.methods import build_method, method_class

        options = pairs([p for p in self.config.base_options.split(",") if p.strip()], "base_options")
        typed = typed_options(method_class(self.config.base), {"batch_size": self.config.batch_size, **options})
        self.base = build_method(self.config.base, self.task, self.backbone, **typed)
        if not isinstance(self.base, LMPersonalizer):
            raise ValueError(f"fusion's base must answer through the backbone; {self.config.base!r} does not")
        self.labels = list(self.task.labels)
        self.weights: np.ndarray | None = None
        self.global_share: np.ndarray | None = None
        self.crowd: ItemLabels | None = None
        self.fit_log: dict[str, Any] = {}

    @property
    def fits(self) -> bool:
        return True

    def prerequisites(self) -> Sequence[Personalizer]:
        return (self.base,)

    # --- features ------------------------------------------------------------------------------------------------
    def _counts(self, history: Sequence[HistoryItem]) -> tuple[list[float], list[float]]:
        """The user's label counts, plain and recency-weighted (newest item 1, halving every `half_life` items)."""
        plain = [0.0] * len(self.labels)
        recent = [0.0] * len(self.labels)
        position = {label: i for i, label in enumerate(self.labels)}
        for age, item in enumerate(reversed(history)):
            label = self.task.item_output(item)
            if label in position:
                plain[position[label]] += 1.0
                recent[position[label]] += 0.5 ** (age / self.config.half_life)
        return plain, recent

    @property
    def features(self) -> tuple[str, ...]:
        return ("model", "user", "recent", "global") + ("neighbours",) * bool(self.config.neighbours) \
            + ("mean",) * self.config.user_mean + ("items",) * self.config.items

    def _smoothed(self, counts: Sequence[float]) -> np.ndarray:
        assert self.global_share is not None
        alpha = self.config.strength
        return np.log((np.asarray(counts) + alpha * self.global_share) / (sum(counts) + alpha))

    def _neighbour_counts(self, state: UserState, query_input: str) -> list[float]:
        """Label counts of the `neighbours` history items BM25 ranks highest for the query."""
        history = history_of(state)
        top = bm25_of(self.task, state).top_k(self.task.retrieval_query(query_input), self.config.neighbours)
        return self._counts([history[i] for i in top])[0]

    def _features(self, model_scores: np.ndarray, state: UserState, query_input: str,
                  without: User | None = None) -> np.ndarray:
        """(labels, features) for one query: each feature a log-probability over the labels (the item's counts
        without `without`'s own answers: a training user's, while the weights are learned)."""
        assert self.global_share is not None
        model = log_normalise(np.asarray(model_scores, dtype=np.float64)[None])[0]
        columns = [model, self._smoothed(state.header["counts"]), self._smoothed(state.header["recent"]),
                   np.log(self.global_share)]
        if self.config.neighbours:
            columns.append(self._smoothed(self._neighbour_counts(state, query_input)))
        if self.config.user_mean:
            columns.append(-np.abs(self._label_values - self._shrunk_mean(state.header["counts"])))
        if self.config.items:
            assert self.crowd is not None
            columns.append(self._smoothed(self.crowd.for_query(query_input, self.labels, without)))
        return np.stack(columns, axis=1)

    @property
    def _label_values(self) -> np.ndarray:
        """A rating task's labels as numbers."""
        return np.array([float(label) for label in self.labels])

    def _shrunk_mean(self, counts: Sequence[float]) -> float:
        """μ̃_u: the user's mean score with `strength` pseudo-items at the training users' mean."""
        assert self.global_share is not None
        alpha = self.config.strength
        centre = float(self.global_share @ self._label_values)
        return (float(np.asarray(counts) @ self._label_values) + alpha * centre) / (sum(counts) + alpha)

    # --- fit -----------------------------------------------------------------------------------------------------
    def fit(self, users: Sequence[User], progress: Progress = None, workdir: Path | None = None) -> None:
        """The global distribution, then the weights: by maximum likelihood on the training users' queries, those
        of the user's features then scaled by `user_scale`."""
        if self.base.fits and not self._base_fitted():
            self.base.fit(users, progress, workdir)
        golds = Counter(self.task.item_output(item) for user in users for item in user.profile)
        golds.update(q.gold for user in users for q in user.queries if q.gold is not None)
        total = sum(golds[label] for label in self.labels)
        self.global_share = np.array([(golds[label] + 1.0) / (total + len(self.labels)) for label in self.labels])
        if self.config.items:
            self.crowd = ItemLabels.of(self.task, users)
        asked = [(user, query) for user in users for query in user.queries if query.gold in self.labels]
        if not asked:
            raise ValueError(f"fusion: no training user of {self.task.name} has a query with a gold label")
        if len(asked) > self.config.fit_queries:
            keep = sorted(random.Random(self.config.seed).sample(range(len(asked)), self.config.fit_queries))
            asked = [asked[i] for i in keep]
        askers = list({user.id: user for user, _ in asked}.values())
        states = dict(zip((u.id for u in askers), self.personalize_many(askers)))
        requests = [(states[user.id], query) for user, query in asked]
        scores = self._model_scores([(self._base_state(state), query) for state, query in requests])
        features = np.stack([self._features(s, state, query.input, user)
                             for s, (state, query), (user, _) in zip(scores, requests, asked)])
        targets = np.array([self.labels.index(query.gold) for _, query in asked])
        owners = [user.id for user, _ in asked]
        self.weights, scale, by_scale = self._fitted(features, targets, owners)
        self.fit_log = {"queries": len(asked), "weights": dict(zip(self.features, self.weights.round(4).tolist())),
                        "user_scale": scale, "by_scale": by_scale,
                        "training": self._scored(self._answers(features, self.weights), targets),
                        "cross_validated": self._cross_validated(features, targets, owners)}
        if progress:
            progress(len(users))

    def _base_fitted(self) -> bool:
        probe = getattr(self.base, "stack", None)
        return probe is not None or getattr(self.base, "stage1", None) is not None

    def _answers(self, features: np.ndarray, weights: np.ndarray) -> list[str]:
        logits = np.einsum("nlf,f->nl", features, weights)
        probs = np.exp(logits - logits.max(axis=1, keepdims=True))
        return [self._answer(row / row.sum()) for row in probs]

    def _scored(self, answers: Sequence[str], targets: np.ndarray) -> dict[str, float]:
        """Accuracy, and for a rating the mean absolute error (LaMP-3's metric) too."""
        golds = [self.labels[t] for t in targets]
        scored = {"accuracy": float(np.mean([a == g for a, g in zip(answers, golds)]))}
        if self.task.family == "regression":
            scored["mae"] = float(np.mean([abs(float(a) - float(g)) for a, g in zip(answers, golds)]))
        return {k: round(v, 4) for k, v in scored.items()}

    def _merit(self, scored: dict[str, float]) -> float:
        """Higher is better: accuracy, or minus the mean absolute error for a rating."""
        return -scored["mae"] if self.task.family == "regression" else scored["accuracy"]

    def _scaled(self, weights: np.ndarray, scale: float) -> np.ndarray:
        factors = [scale if name in USER_FEATURES else 1.0 for name in self.features]
        return weights * np.array(factors)

    def _fitted(self, features: np.ndarray, targets: np.ndarray,
                owners: Sequence[str]) -> tuple[np.ndarray, float, dict[str, dict[str, float]]]:
        """The weights for these queries: the likelihood's, times the user scale (when "auto", the one with the best
        cross-validated score over these queries' users, the smaller on a tie); the scale, and each scale's score."""
        weights = self._learn(features, targets)
        if self.config.user_scale != "auto":
            scale = float(self.config.user_scale)
            return self._scaled(weights, scale), scale, {}
        by_scale = {str(s): self._cross_validated(features, targets, owners, lambda f, t, o, s=s: self._scaled(
            self._learn(f, t), s)) for s in SCALES}
        scale = max(SCALES, key=lambda s: (self._merit(by_scale[str(s)]), -s))
        return self._scaled(weights, scale), scale, by_scale

    def _cross_validated(self, features: np.ndarray, targets: np.ndarray, owners: Sequence[str],
                         rule: Callable[[np.ndarray, np.ndarray, list[str]], np.ndarray] | None = None,
                         ) -> dict[str, float]:
        """Scores on each of FOLDS folds of users (seeded) with the weights `rule` (by default the whole fit) makes
        from the other folds: an estimate of how it does on users it has not seen, unlike the training scores."""
        rule = rule or (lambda f, t, o: self._fitted(f, t, o)[0])
        users = sorted(set(owners))
        random.Random(self.config.seed).shuffle(users)
        fold = {user: i % FOLDS for i, user in enumerate(users)}
        assigned = np.array([fold[owner] for owner in owners])
        answers = [""] * len(targets)
        for k in range(min(FOLDS, len(users))):
            held = np.flatnonzero(assigned == k)
            kept = np.flatnonzero(assigned != k)
            weights = rule(features[kept], targets[kept], [owners[i] for i in kept])
            for i, answer in zip(held, self._answers(features[held], weights)):
                answers[i] = answer
        return self._scored(answers, targets)

    def _learn(self, features: np.ndarray, targets: np.ndarray) -> np.ndarray:
        """The conditional logit's weights: minimise the mean negative log-likelihood plus `l2` times |w|^2."""
        x = torch.as_tensor(features, dtype=torch.float64)
        y = torch.as_tensor(targets)
        start = [1.0, 1.0] + [0.0] * (features.shape[2] - 2)
        w = torch.tensor(start, dtype=torch.float64, requires_grad=True)
        optimizer = torch.optim.LBFGS([w], lr=0.5, max_iter=200, line_search_fn="strong_wolfe")

        def objective() -> torch.Tensor:
            optimizer.zero_grad()
            logits = torch.einsum("nlf,f->nl", x, w)
            loss = torch.nn.functional.cross_entropy(logits, y) + self.config.l2 * w.pow(2).sum()
            loss.backward()
            return loss

        optimizer.step(objective)
        return w.detach().numpy()

    def save_fit(self, folder: Path) -> None:
        assert self.weights is not None and self.global_share is not None
        (folder / "fusion.json").write_text(json.dumps(
            {"labels": self.labels, "weights": self.weights.tolist(), "global_share": self.global_share.tolist(),
             "log": self.fit_log}, indent=1))
        if self.crowd is not None:
            self.crowd.save(folder / "items.json")

    def fitted_numbers(self) -> int:
        """Its own: the feature weights, the global label shares and the items' label counts (its base's fit is counted
        in the base's folder)."""
        assert self.weights is not None and self.global_share is not None
        counts = sum(len(found) for found in self.crowd.counts.values()) if self.crowd is not None else 0
        return len(self.weights) + len(self.global_share) + counts

    def load_fit(self, folder: Path) -> None:
        saved = json.loads((folder / "fusion.json").read_text())
        if saved["labels"] != self.labels:
            raise ValueError(f"{folder}: a fusion fit for labels {saved['labels']}, not {self.labels}")
        self.weights = np.array(saved["weights"])
        if len(self.weights) != len(self.features):
            raise ValueError(f"{folder}: a fusion fit of {len(self.weights)} weights, not {len(self.features)}")
        self.global_share = np.array(saved["global_share"])
        self.fit_log = saved["log"]
        if self.config.items:
            self.crowd = ItemLabels.load(self.task, folder / "items.json")

    # --- personalize and predict ---------------------------------------------------------------------------------
    def personalize(self, user: User) -> UserState:
        return self.personalize_many([user])[0]

    def personalize_many(self, users: Sequence[User], progress: Progress = None) -> list[UserState]:
        states = []
        for user, base in zip(users, self.base.personalize_many(users)):
            plain, recent = self._counts(user.profile)
            header = {"base": {"method": base.method, "version": base.version, "header": base.header},
                      "counts": plain, "recent": recent}
            if self.config.neighbours:
                header["profile"] = profile_header(user)["profile"]
            states.append(self.new_state(user, header, {f"base/{k}": v for k, v in base.tensors.items()}))
        if progress:
            progress(len(users))
        return states

    def _base_state(self, state: UserState) -> UserState:
        base = state.runtime.get("base")
        if base is None:
            info = state.header["base"]
            tensors = {k[len("base/"):]: v for k, v in state.tensors.items() if k.startswith("base/")}
            base = state.runtime["base"] = UserState(info["method"], info["version"], state.user_id, state.model_id,
                                                     info["header"], tensors, state.dtype)
        return base

    def _model_scores(self, requests: Sequence[tuple[UserState, Query]]) -> list[np.ndarray]:
        predictions = self.base.predict(list(requests))
        missing = [p for p in predictions if p.scores is None]
        if missing:
            raise ValueError(f"fusion's base {self.base.name!r} answered without label scores (mode "
                             f"{missing[0].mode!r}); it must score labels")
        return [np.asarray(p.scores) for p in predictions]

    def prompt(self, state: UserState, query_input: str) -> str:
        return self.base.prompt(self._base_state(state), query_input)

    def predict(self, requests: Sequence[Request], progress: Progress = None) -> list[Prediction]:
        if self.weights is None:
            raise RuntimeError("fusion needs fit(train_users) first")
        scores = self._model_scores([(self._base_state(state), query) for state, query in requests])
        out = []
        for (state, query), model in zip(requests, scores):
            logits = self._features(model, state, query.input) @ self.weights
            probs = np.exp(logits - logits.max())
            probs /= probs.sum()
            out.append(Prediction(self._answer(probs), "fusion", tuple(float(x) for x in np.log(probs))))
        if progress:
            progress(len(requests))
        return out

    def _answer(self, probs: np.ndarray) -> str:
        """The most likely label; for a rating, the median of the distribution over the ordered scores."""
        if self.task.family != "regression":
            return self.labels[int(probs.argmax())]
        order = sorted(range(len(self.labels)), key=lambda i: float(self.labels[i]))
        cumulative = np.cumsum(probs[order])
        return self.labels[order[int(np.searchsorted(cumulative, 0.5))]]

    def edits(self, states: Sequence[UserState]):  # noqa: ANN201 - the base's edits, if any
        return self.base.edits([self._base_state(s) for s in states])

