"""The one interface every personalization method implements, and the shared path from prompt to answer.

A method's life cycle (docs/architecture.md): `fit(train_users)` once on many users, `personalize(user)` into a small
saved `UserState` from that user's history alone, `update(old_state, user, new_items)` when history grows, and
`predict(requests)` for batches of (state, query) pairs that may mix users. Evaluation, the store, the server and
distributed runs are written once against this interface; a method owns everything about itself (its config, fit,
checkpoints, update and state format), and nothing below it knows its name.

Methods that answer through the backbone derive from `LMPersonalizer`: they say how a query becomes a prompt for a
user and, optionally, which per-row edits a batch of users needs; answering (label scoring, contextual calibration or
generation) is written here once.

A method's config type is its generic parameter, `class RAG(LMPersonalizer[RAGConfig])`: `config_class` is read from
it, and a base that is also a method in its own right takes a type variable with a default
(`RC = TypeVar("RC", bound=RAGConfig, default=RAGConfig)`), so that subclasses can narrow it again.
"""

from __future__ import annotations

import dataclasses
import re
from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, ClassVar, Generic, Literal, Mapping, Sequence, get_args, get_origin

import numpy as np
import torch
from typing_extensions import TypeVar

from tailor.backbone.edits import Edit
from tailor.backbone.layers import Site
from tailor.backbone.model import Backbone
from tailor.store.state import UserState
from tailor.tasks.lamp import Task
from tailor.tasks.records import HistoryItem, Query, User

Progress = Callable[[int], None] | None
Request = tuple[UserState, Query]
HISTORY_UPDATE = "the state is the history: the new items are appended"
"""The `update_note` of the methods whose state is the history (`state_is_history`)."""


class Share:
    """A progress callback for `count` items that moves the caller's bar by `units` in all, rounding down, so that
    one bar can show two phases (P2P's fit: the summaries, then the training steps), or count training steps in
    training users (PerFit's stage 1, MT-LoRA's fit)."""

    def __init__(self, progress: Progress, units: int, count: int) -> None:
        self.progress, self.units, self.count = progress, units, max(count, 1)
        self.done = self.reported = 0

    def __call__(self, n: int) -> None:
        self.done += n
        now = min(self.units, self.units * self.done // self.count)
        if now > self.reported:
            if self.progress:
                self.progress(now - self.reported)
            self.reported = now


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


C = TypeVar("C", bound=MethodConfig, default=MethodConfig)
LC = TypeVar("LC", bound=LMConfig, default=LMConfig)


def _config_type(cls: type) -> type[MethodConfig] | None:
    """The config type a class names as its generic parameter (or its type variable's default), if it names one."""
    for base in cls.__dict__.get("__orig_bases__", ()):
        origin = get_origin(base)
        if not (isinstance(origin, type) and issubclass(origin, Personalizer)):
            continue
        arg = get_args(base)[0]
        arg = getattr(arg, "__default__", arg) if isinstance(arg, TypeVar) else arg
        if isinstance(arg, type) and issubclass(arg, MethodConfig):
            return arg
    return None


class Personalizer(ABC, Generic[C]):
    name: ClassVar[str]
    """The method's registry key (`tailor.methods.REGISTRY`) and the name its states are saved under."""
    version: ClassVar[int] = 1
    config_class: ClassVar[type[MethodConfig]] = MethodConfig
    """Set from the class's generic parameter."""
    needs_backbone: ClassVar[bool] = False
    state_is_history: ClassVar[bool] = False
    """True when a state holds the user's history and what follows from it alone (or nothing), so that `update` is
    `personalize` on the grown history: the contract test checks the two are equal."""
    update_note: ClassVar[str] = "no incremental update; rebuilt from the whole history"
    """What `update` does, or why the method cannot update, said to whoever asked (the server's job record)."""

    config: C
    backbone: Backbone | None

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        cls.config_class = _config_type(cls) or cls.config_class

    def __init__(self, task: Task, backbone: Backbone | None = None, config: C | None = None, **options: Any):
        if self.needs_backbone and backbone is None:
            raise ValueError(f"method {self.name!r} needs a backbone")
        self.task = task
        self.backbone = backbone
        built = config if config is not None else self.config_class(**options)
        if config is not None and options:
            built = dataclasses.replace(config, **options)
        self.config = built  # type: ignore[assignment]

    @property
    def model_id(self) -> str | None:
        return self.backbone.model_id if self.backbone is not None else None

    @property
    def fits(self) -> bool:
        """True when `fit` learns weights worth keeping: the runner then caches them with save_fit / load_fit."""
        return False

    def describe(self) -> dict[str, Any]:
        return {"method": self.name, "version": self.version, **dataclasses.asdict(self.config)}

    # --- fit ----------------------------------------------------------------------------------------------------
    def prerequisites(self) -> Sequence[Personalizer]:
        """Fitted methods this one builds on (OPPU: its multi-task LoRA). The runner fits, or loads, each from its own
        place in the fit cache before calling `fit`, so runs of those methods share the fit."""
        return ()

    def fit_settings(self) -> dict[str, Any]:
        """What `fit` depends on: the fit cache keys a fit by this (and the backbone, dtype, task and training users).
        A method whose fit ignores some options narrows it, so runs differing only there share one fit."""
        return self.describe()

    def fit(self, users: Sequence[User], progress: Progress = None, workdir: Path | None = None) -> None:
        """Learn what is shared across users. Methods with nothing to learn keep this no-op.

        `workdir` is where a long fit keeps its checkpoint (`tailor.methods.checkpoint`), so that a killed fit
        resumes instead of restarting.
        """

    def save_fit(self, folder: Path) -> None:
        """Write what `fit` learned (only called when `fits` is True)."""
        raise NotImplementedError(f"{self.name} fits but cannot save its fit")

    def load_fit(self, folder: Path) -> None:
        """Read what `save_fit` wrote, instead of fitting again."""
        raise NotImplementedError(f"{self.name} fits but cannot load its fit")

    def fitted_numbers(self) -> int | None:
        """How many numbers `fit` learned, for a method whose fit is not kept as tensors (a logistic model's weights, a
        table of rates): the fit cache records it beside the fit. None: count the elements of the safetensors files
        `save_fit` wrote, which is what a fit of neural weights learned."""
        return None

    # --- personalize ----------------------------------------------------------------------------------------------
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

    def update(self, old: UserState, user: User, new_items: Sequence[HistoryItem]) -> UserState | None:
        """`old` brought up to date after `new_items` were appended to the user's history (`user` holds all of it,
        the new items last), without starting over; None when the method cannot, and the caller personalizes the
        user from scratch (batching several users through `personalize_many`)."""
        return self.personalize(user) if self.state_is_history else None

    # --- predict --------------------------------------------------------------------------------------------------
    @abstractmethod
    def predict(self, requests: Sequence[Request], progress: Progress = None) -> list[Prediction]:
        """Answer (state, query) pairs; the pairs may belong to different users."""

    def new_state(self, user: User, header: dict[str, Any] | None = None,
                  tensors: dict[str, torch.Tensor] | None = None) -> UserState:
        dtype = str(self.backbone.dtype).removeprefix("torch.") if self.backbone is not None else None
        return UserState(self.name, self.version, user.id, self.model_id, header or {}, tensors or {}, dtype)

    @property
    def device(self) -> torch.device:
        """Where the method's tensors live: the backbone's device (the CPU for methods without one)."""
        return self.backbone.device if self.backbone is not None else torch.device("cpu")


def content_free(task: Task, query_input: str) -> str:
    """The question with its content replaced by "N/A" (contextual calibration, Zhao et al. 2021)."""
    if task.name == "LaMP-1":
        return re.sub(r'"[^"]*"', '"N/A"', query_input)
    at = query_input.find(task.query_marker)
    return query_input if at < 0 else query_input[:at + len(task.query_marker)] + " N/A"


class LMPersonalizer(Personalizer[LC]):
    """A method that answers by prompting the backbone, possibly with per-user edits of its hidden states."""

    needs_backbone = True
    backbone: Backbone

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
