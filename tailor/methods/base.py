"""The one interface every personalization method implements, and the shared path from prompt to answer.

A method's life cycle (DESIGN.md): `fit(train_users)` once on many users, `personalize(user)` into a small saved
`UserState` from that user's history alone, `predict(requests)` for batches of (state, query) pairs that may mix
users. Evaluation, the store, the server and distributed runs are written once against this interface.

Methods that answer through the backbone derive from `LMPersonalizer`: they say how a query becomes a prompt for a
user and, optionally, which per-row edits a batch of users needs; answering (label scoring, contextual calibration or
generation) is written here once.
"""

from __future__ import annotations

import dataclasses
import re
from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, ClassVar, Literal, Mapping, Sequence

import numpy as np
import torch

from tailor.backbone.edits import Edit
from tailor.backbone.layers import Site
from tailor.backbone.model import Backbone
from tailor.data.schema import Query, User
from tailor.store.state import UserState
from tailor.tasks.lamp import Task

Progress = Callable[[int], None] | None
Request = tuple[UserState, Query]


@dataclass(frozen=True)
class Prediction:
    """An answer and how it was produced ("scoring", "scoring-calibrated", "generation" or "prior")."""

    text: str
    mode: str
    scores: tuple[float, ...] | None = None


@dataclass
class MethodConfig:
    """Options shared by every method; each method extends this with its own fields."""

    signed: ClassVar[frozenset[str]] = frozenset({"seed", "scale", "scale_p", "scale_n"})
    """Numeric options that may be negative; every other count, budget, rate and rank must be >= 0."""

    batch_size: int = 8

    def __post_init__(self) -> None:
        """A negative count or a zero batch fails here, before a model loads (`tailor eval` builds the config first).
        Subclasses that check more call this first."""
        for option in dataclasses.fields(self):
            value = getattr(self, option.name)
            if (isinstance(value, (int, float)) and not isinstance(value, bool) and value < 0
                    and option.name not in self.signed):
                raise ValueError(f"{option.name} must be >= 0, not {value}")
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, not {self.batch_size}")


@dataclass
class LMConfig(MethodConfig):
    """How an LM-based method answers. Classification tasks default to label scoring (small models follow output
    instructions poorly); `calibrate` divides label probabilities by those given a content-free input."""

    mode: Literal["scoring", "generation"] = "scoring"
    calibrate: bool = False
    max_new_tokens: int | None = None


class Personalizer(ABC):
    name: ClassVar[str]
    version: ClassVar[int] = 1
    config_class: ClassVar[type[MethodConfig]] = MethodConfig
    needs_backbone: ClassVar[bool] = True
    fits: ClassVar[bool] = False
    """True when `fit` learns weights worth keeping: the runner then caches them with save_fit / load_fit."""

    def __init__(self, task: Task, backbone: Backbone | None = None, config: MethodConfig | None = None,
                 **options: Any):
        if self.needs_backbone and backbone is None:
            raise ValueError(f"method {self.name!r} needs a backbone")
        self.task = task
        self.backbone = backbone
        self.config = config if config is not None else self.config_class(**options)
        if config is not None and options:
            self.config = dataclasses.replace(config, **options)

    @property
    def model_id(self) -> str | None:
        return self.backbone.model_id if self.backbone is not None else None

    def describe(self) -> dict[str, Any]:
        return {"method": self.name, "version": self.version, **dataclasses.asdict(self.config)}

    def fit(self, users: Sequence[User], progress: Progress = None, workdir: Path | None = None) -> None:
        """Learn what is shared across users. Methods with nothing to learn keep this no-op.

        `workdir` is where a long fit may keep checkpoints, so that a killed fit resumes instead of restarting.
        """

    def save_fit(self, folder: Path) -> None:
        """Write what `fit` learned (only called when `fits` is True)."""
        raise NotImplementedError(f"{self.name} declares fits=True but cannot save its fit")

    def load_fit(self, folder: Path) -> None:
        """Read what `save_fit` wrote, instead of fitting again."""
        raise NotImplementedError(f"{self.name} declares fits=True but cannot load its fit")

    @abstractmethod
    def personalize(self, user: User) -> UserState:
        """Build one user's state from that user's history alone."""

    def personalize_many(self, users: Sequence[User], progress: Progress = None) -> list[UserState]:
        """Personalize several users; methods that can batch the work across users override this."""
        states = []
        for user in users:
            states.append(self.personalize(user))
            if progress:
                progress(1)
        return states

    @property
    def personalize_group(self) -> int | None:
        """How many users `personalize_many` works on together. The runner hands it users in groups of this size
        and saves their states after each, so a killed run keeps every user finished before the kill. None: all
        the users at once (methods whose `personalize_many` batches across users)."""
        return 1 if type(self).personalize_many is Personalizer.personalize_many else None

    @abstractmethod
    def predict(self, requests: Sequence[Request], progress: Progress = None) -> list[Prediction]:
        """Answer (state, query) pairs; the pairs may belong to different users."""

    def new_state(self, user: User, header: dict[str, Any] | None = None,
                  tensors: dict[str, torch.Tensor] | None = None) -> UserState:
        return UserState(self.name, self.version, user.id, self.model_id, header or {}, tensors or {})


def content_free(task: Task, query_input: str) -> str:
    """The question with its content replaced by "N/A" (contextual calibration, Zhao et al. 2021)."""
    if task.name == "LaMP-1":
        return re.sub(r'"[^"]*"', '"N/A"', query_input)
    at = query_input.find(task.query_marker)
    return query_input if at < 0 else query_input[:at + len(task.query_marker)] + " N/A"


class LMPersonalizer(Personalizer):
    """A method that answers by prompting the backbone, possibly with per-user edits of its hidden states."""

    config_class = LMConfig
    config: LMConfig

    @abstractmethod
    def prompt(self, state: UserState, query_input: str) -> str:
        """The prompt for this user and this question."""

    def edits(self, states: Sequence[UserState]) -> Mapping[Site, Edit] | None:
        """Edits for a batch whose row r uses the parameters of states[r]; None when the method edits nothing."""
        return None

    @property
    def scoring(self) -> bool:
        return self.task.family != "generation" and self.config.mode == "scoring"

    @property
    def mode(self) -> str:
        if not self.scoring:
            return "generation"
        return "scoring-calibrated" if self.config.calibrate else "scoring"

    @property
    def max_new_tokens(self) -> int:
        return self.config.max_new_tokens or self.task.max_new_tokens

    def forward_inputs(self, requests: Sequence[Request]
                       ) -> tuple[list[str], Mapping[Site, Edit] | None, list[int] | None]:
        """Each request's prompt, the batch's edits, and each row's index into them (None when nothing edits)."""
        states, rows = _unique_states([s for s, _ in requests])
        edits = self.edits(states)
        return [self.prompt(s, q.input) for s, q in requests], edits, rows if edits else None

    def predict(self, requests: Sequence[Request], progress: Progress = None) -> list[Prediction]:
        assert self.backbone is not None
        if not requests:
            return []
        prompts, edits, row_ids = self.forward_inputs(requests)
        if not self.scoring:
            texts = self.backbone.generate(prompts, self.max_new_tokens, self.config.batch_size, edits, row_ids,
                                           progress)
            return [Prediction(self.task.parse(t), self.mode) for t in texts]
        labels = self.task.labels
        scores = self.backbone.score_labels(prompts, labels, self.config.batch_size, edits, row_ids, progress)
        if self.config.calibrate:
            scores = self._calibrate(scores, requests, edits, row_ids)
        best = scores.argmax(axis=1)
        return [Prediction(labels[b], self.mode, tuple(float(x) for x in row)) for b, row in zip(best, scores)]

    def _calibrate(self, scores: np.ndarray, requests: Sequence[Request], edits: Mapping[Site, Edit] | None,
                   rows: list[int] | None) -> np.ndarray:
        """Each row against the same user's prompt with the question's content replaced by "N/A"."""
        assert self.backbone is not None
        cf_prompts = [self.prompt(s, content_free(self.task, q.input)) for s, q in requests]
        return self.backbone.calibrate(scores, cf_prompts, self.task.labels, self.config.batch_size, edits, rows)


def _unique_states(states: Sequence[UserState]) -> tuple[list[UserState], list[int]]:
    """Distinct states in first-seen order and, per request, the index of its state among them."""
    index: dict[int, int] = {}
    unique: list[UserState] = []
    rows = []
    for state in states:
        key = id(state)
        if key not in index:
            index[key] = len(unique)
            unique.append(state)
        rows.append(index[key])
    return unique, rows
