"""Lexical fusion: a personal word model for generation tasks, decoded for the expected ROUGE-1 F1.

On LaMP's generation tasks the best floor copies the query's input (LaMP-4 article, LaMP-7 paraphrase), and the
small backbones write worse than that copy. Each user reuses words, though: their past headlines share a
vocabulary, a vocabulary that the article often lacks. This method fuses the two sources of words, the input and the
user's past outputs, by a word-level stack learned on training users, and answers with the set of words whose expected
ROUGE-1 F1 against the user's unseen text is highest.

For a query x of user u, the candidates are every word w of x and every word of u's past outputs that x lacks:

    p(w ∈ y | x, u) = σ(β · f(w, x, u))
    f(w, x, u) = [1[w ∈ x],  logit r(w),  pos_x(w),  |w| / 10,  1[w ∈ x] · h_u(w),  1[w ∉ x] · h_u(w)]

- r(w): the training users' rate at which w, when in the input, is in the gold output (or, when it is only in the
  user's history, is added to it), smoothed towards 0.5 (input words) or 0.02 (added words); while β is learned,
  a user's rows see rates without any of that user's examples, as a new user's would;
- pos_x(w): w's relative position in the input (0 first, 1 last), 0 for added words;
- h_u(w): the share of u's history items whose output contains w: the one personal feature, kept apart for input
  and added words.

β is learned by logistic regression on the training users' queries and, with `history_examples`, their last history
items asked as queries (one row per candidate; the label: the word is in the gold output). The answer is the set S of the top-k candidates by p, with k maximising the expected F1
against the unseen output y,

    E[F1(S, y)] ≈ 2 · Σ_{w ∈ S} p(w) / (|S| + t · L_u)

where L_u is the user's mean output length in words and t the length factor chosen by 5-fold cross-validation over
the training users (the fit log has each factor's score). Kept input words come in the input's order, added words
after them, most likely first.

What it is not: the answer is a word selection, not a written text: ROUGE-1 does not read word order, ROUGE-L and a
reader do (the leaderboard reports both). Letting the backbone write a headline from the selection kept a fifth of
the gain on LaMP-4 (docs/benchmarks/lexical-fusion.md). Nothing here reads the backbone; the state is the user's word shares and
mean output length (`state_is_history`: an update is a personalize on the grown history). Classification and
regression tasks have their label sets, which `fusion` fuses; this method refuses them.
"""

from __future__ import annotations

import json
import math
import random
import re
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from sklearn.linear_model import LogisticRegression

from tailor.data.splits import history_queries
from tailor.methods.base import (
    HISTORY_UPDATE,
    MethodConfig,
    Personalizer,
    Prediction,
    Progress,
    Request,
)
from tailor.store.state import UserState
from tailor.tasks.metrics import compute_metrics
from tailor.tasks.records import Query, User
from tailor.tasks.task import Task

FACTORS = (0.5, 0.75, 1.0, 1.5, 2.0, 3.0, 4.0)
FOLDS = 5
PRIORS = {"input": 0.5, "added": 0.02}
"""The rate each kind of candidate word is smoothed towards when the training users seldom saw it."""


def words_of(text: str) -> list[str]:
    """ROUGE's tokens: lower-cased alphanumeric runs (rouge-score's tokenizer, no stemmer)."""
    return re.findall(r"[a-z0-9]+", text.lower())


def output_words(task: Task, user: User) -> list[list[str]]:
    """The words of each of the user's past outputs."""
    return [words_of(task.item_output(item)) for item in user.profile]


def items_using(outputs: Sequence[list[str]]) -> Counter:
    """How many of the outputs (`output_words`) use each word: an output counts a word once."""
    return Counter(word for words in outputs for word in set(words))


@dataclass
class LexicalConfig(MethodConfig):
    length_factor: float = 0.0
    """t in the expected F1's denominator; 0 chooses it from FACTORS by cross-validation on training users."""
    add: bool = True
    """Also offer the words of the user's past outputs that the input lacks; False only deletes input words."""
    history_examples: int = 4
    """Each training user's last N history items also asked as queries, answered from the items before them
    (`tailor.data.splits.history_queries`), beside the user's own query: more examples to learn from. Tasks whose
    items hold only an output (LaMP-7's tweets) have no question to ask of them, and learn from the queries alone."""
    seed: int = 0
    """Which training users fall in which cross-validation fold."""


@dataclass(frozen=True)
class _Profile:
    """What the method reads of a user: the share of history items using each word, and the mean output length."""

    shares: dict[str, float]
    length: float

    @classmethod
    def of(cls, task: Task, user: User) -> _Profile:
        outputs = output_words(task, user)
        n = max(len(outputs), 1)
        return cls({word: c / n for word, c in items_using(outputs).items()}, sum(map(len, outputs)) / n)

    @classmethod
    def of_state(cls, state: UserState) -> _Profile:
        return cls(state.header["shares"], state.header["length"])


class _Rates:
    """r(w) of the docstring: per kind, how often a candidate word was in the training users' golds."""

    def __init__(self) -> None:
        self.hits: Counter = Counter()
        self.seen: Counter = Counter()

    def count(self, kind: str, word: str, hit: bool, sign: int = 1) -> None:
        self.hits[kind, word] += sign * hit
        self.seen[kind, word] += sign

    def logit(self, kind: str, word: str) -> float:
        rate = (self.hits[kind, word] + 2 * PRIORS[kind]) / (self.seen[kind, word] + 2)
        return math.log(rate / (1 - rate))

    def to_json(self) -> dict:
        return {kind: {w: [self.hits[kind, w], self.seen[kind, w]] for (k, w) in self.seen if k == kind}
                for kind in PRIORS}

    @classmethod
    def from_json(cls, saved: dict) -> _Rates:
        rates = cls()
        for kind, table in saved.items():
            for word, (hits, seen) in table.items():
                rates.hits[kind, word], rates.seen[kind, word] = hits, seen
        return rates


@dataclass(frozen=True)
class _Candidate:
    word: str
    position: int
    """Index of the input's whitespace word it came from, or -1 for a word added from the history."""
    text: str


def _candidates(task: Task, query_input: str, profile: _Profile, add: bool) -> list[_Candidate]:
    pieces = task.retrieval_query(query_input).split()
    found = [_Candidate((words_of(p) or [""])[0], i, p) for i, p in enumerate(pieces)]
    if add:
        present = {w for p in pieces for w in words_of(p)}
        found += [_Candidate(w, -1, w) for w in sorted(profile.shares) if w not in present]
    return found


def _features(cands: Sequence[_Candidate], profile: _Profile, rates: _Rates) -> np.ndarray:
    n_input = sum(c.position >= 0 for c in cands)
    rows = []
    for c in cands:
        share = profile.shares.get(c.word, 0.0)
        if c.position >= 0:
            rows.append([1.0, rates.logit("input", c.word), c.position / max(n_input - 1, 1), len(c.word) / 10,
                         share, 0.0])
        else:
            rows.append([0.0, rates.logit("added", c.word), 0.0, len(c.word) / 10, 0.0, share])
    return np.array(rows, dtype=float).reshape(len(rows), 6)


def _decode(cands: Sequence[_Candidate], p: np.ndarray, length: float) -> str:
    """The top-k candidates by p with the k of the highest expected F1 (the docstring's E[F1])."""
    order = np.argsort(-p, kind="stable")
    expected = 2 * np.cumsum(p[order]) / (np.arange(1, len(order) + 1) + length)
    chosen = order[: int(np.argmax(expected)) + 1]
    kept = sorted((cands[j] for j in chosen if cands[j].position >= 0), key=lambda c: c.position)
    added = [cands[j] for j in chosen if cands[j].position < 0]
    return " ".join(c.text for c in [*kept, *added])


class LexicalFusion(Personalizer[LexicalConfig]):
    name = "lexical"
    mode = "words"
    """How it answers, as a run's config records it (methods without a backbone are recorded as priors otherwise)."""
    state_is_history = True
    update_note = HISTORY_UPDATE

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        if self.task.family != "generation":
            raise ValueError(f"lexical fusion selects words for generation tasks; {self.task.name} is a "
                             f"{self.task.family} task (fusion fuses its labels)")
        self.rates: _Rates | None = None
        self.model: LogisticRegression | None = None
        self.factor: float | None = None
        self.fit_log: dict = {}

    @property
    def fits(self) -> bool:
        return True

    # --- fit -----------------------------------------------------------------------------------------------------
    def fit(self, users: Sequence[User], progress: Progress = None, workdir: Path | None = None) -> None:
        """β and r(w) from the training users' queries (and, with `history_examples`, their last history items);
        the length factor t by cross-validation, scored on the users' own queries answered from their whole
        history, as a dev user's query is."""
        asked = self._examples(users)
        if not asked:
            raise ValueError(f"lexical: no training user of {self.task.name} has a query with a gold output")
        learn = asked
        if self.config.history_examples and self.task.history_prompt is None:
            learn = self._examples([history_queries(u, self.task, self.config.history_examples) for u in users])
        by_factor = self._cross_validated(learn, asked)
        self.factor = self.config.length_factor or max(by_factor, key=by_factor.get)
        self.rates, self.model = self._learned(learn)
        answers = [self._answer(q.input, profile, self.rates, self.model, self.factor) for _, q, profile in asked]
        self.fit_log = {"examples": len(learn), "queries": len(asked), "length_factor": self.factor,
                        "by_factor": by_factor,
                        "weights": dict(zip(("input", "rate", "position", "length", "user input", "user added"),
                                            np.round(self.model.coef_[0], 4).tolist())),
                        "training_rouge1": round(compute_metrics(self.task, answers,
                                                                 [q.gold for _, q, _ in asked])["rouge1"], 4)}
        if progress:
            progress(len(users))

    def _examples(self, users: Sequence[User]) -> list[tuple[str, Query, _Profile]]:
        """(owner, query, the owner's profile) for every query with a gold output."""
        out = []
        for user in users:
            profile = _Profile.of(self.task, user)
            out += [(user.id, q, profile) for q in user.queries if q.gold]
        return out

    def _learned(self, examples: Sequence[tuple[str, Query, _Profile]]) -> tuple[_Rates, LogisticRegression]:
        by_owner: dict[str, list[tuple[Query, _Profile]]] = {}
        for owner, q, profile in examples:
            by_owner.setdefault(owner, []).append((q, profile))
        tallies = {owner: [t for q, profile in asked for t in self._tally(q, profile)]
                   for owner, asked in by_owner.items()}
        rates = _Rates()
        for tally in tallies.values():
            for kind, word, hit in tally:
                rates.count(kind, word, hit)
        rows, labels = [], []
        for owner, tally in tallies.items():
            for kind, word, hit in tally:  # leave the user's own examples out of the rates their rows see
                rates.count(kind, word, hit, -1)
            for q, profile in by_owner[owner]:
                cands = _candidates(self.task, q.input, profile, self.config.add)
                rows.append(_features(cands, profile, rates))
                gold = set(words_of(q.gold or ""))
                labels += [float(c.word in gold) for c in cands]
            for kind, word, hit in tally:
                rates.count(kind, word, hit)
        model = LogisticRegression(max_iter=2000).fit(np.vstack(rows), labels)
        return rates, model

    def _tally(self, query: Query, profile: _Profile) -> list[tuple[str, str, bool]]:
        gold = set(words_of(query.gold or ""))
        present = set(words_of(self.task.retrieval_query(query.input)))
        return ([("input", w, w in gold) for w in present]
                + [("added", w, w in gold) for w in profile.shares if self.config.add and w not in present])

    def _cross_validated(self, learn: Sequence[tuple[str, Query, _Profile]],
                         asked: Sequence[tuple[str, Query, _Profile]]) -> dict[float, float]:
        """Each length factor's ROUGE-1 on `asked` of held-out folds of training users, learned on `learn` of the
        other folds."""
        owners = sorted({owner for owner, _, _ in asked})
        random.Random(self.config.seed).shuffle(owners)
        fold_of = {owner: i % FOLDS for i, owner in enumerate(owners)}
        answers: dict[float, list[str]] = {f: [] for f in FACTORS}
        golds = []
        for fold in range(min(FOLDS, len(owners))):
            rest = [e for e in learn if fold_of.get(e[0]) != fold]
            held = [e for e in asked if fold_of[e[0]] == fold]
            if not rest:
                continue
            rates, model = self._learned(rest)
            golds += [q.gold for _, q, _ in held]
            for factor in FACTORS:
                answers[factor] += [self._answer(q.input, profile, rates, model, factor) for _, q, profile in held]
        return {f: round(compute_metrics(self.task, a, golds)["rouge1"], 4) for f, a in answers.items()}

    def _scored(self, query_input: str, profile: _Profile, rates: _Rates, model: LogisticRegression
                ) -> tuple[list[_Candidate], np.ndarray]:
        cands = _candidates(self.task, query_input, profile, self.config.add)
        if not cands:
            return cands, np.zeros(0)
        return cands, model.predict_proba(_features(cands, profile, rates))[:, 1]

    def _answer(self, query_input: str, profile: _Profile, rates: _Rates, model: LogisticRegression,
                factor: float) -> str:
        cands, p = self._scored(query_input, profile, rates, model)
        if not cands:
            return ""
        length = profile.length or sum(c.position >= 0 for c in cands)
        return _decode(cands, p, factor * length)

    def save_fit(self, folder: Path) -> None:
        assert self.rates is not None and self.model is not None
        (folder / "lexical.json").write_text(json.dumps(
            {"coef": self.model.coef_[0].tolist(), "intercept": float(self.model.intercept_[0]),
             "length_factor": self.factor, "rates": self.rates.to_json(), "log": self.fit_log}))

    def fitted_numbers(self) -> int:
        """The word model's coefficients and intercept, the length factor, and one rate per (kind, word) counted."""
        assert self.rates is not None and self.model is not None
        return self.model.coef_.size + 1 + 1 + len(self.rates.seen)

    def load_fit(self, folder: Path) -> None:
        saved = json.loads((folder / "lexical.json").read_text())
        model = LogisticRegression()
        model.classes_ = np.array([0.0, 1.0])
        model.coef_ = np.array([saved["coef"]])
        model.intercept_ = np.array([saved["intercept"]])
        self.model, self.factor = model, saved["length_factor"]
        self.rates = _Rates.from_json(saved["rates"])
        self.fit_log = saved["log"]

    # --- personalize and predict ---------------------------------------------------------------------------------
    def personalize(self, user: User) -> UserState:
        profile = _Profile.of(self.task, user)
        return self.new_state(user, {"shares": profile.shares, "length": profile.length})

    def _fitted(self) -> tuple[_Rates, LogisticRegression, float]:
        if self.model is None or self.rates is None or self.factor is None:
            raise RuntimeError("lexical: call fit(train_users) before predict")
        return self.rates, self.model, self.factor

    def word_probabilities(self, state: UserState, query: Query) -> list[tuple[str, float]]:
        """p(w ∈ y | x, u) of each candidate word (the input's, then the user's): what the answer is chosen from,
        for a caller that scores other answers with it."""
        rates, model, _ = self._fitted()
        cands, p = self._scored(query.input, _Profile.of_state(state), rates, model)
        return [(c.word, float(pi)) for c, pi in zip(cands, p)]

    def predict(self, requests: Sequence[Request], progress: Progress = None) -> list[Prediction]:
        rates, model, factor = self._fitted()
        out = []
        for state, query in requests:
            out.append(Prediction(self._answer(query.input, _Profile.of_state(state), rates, model, factor), self.mode))
        if progress:
            progress(len(requests))
        return out
