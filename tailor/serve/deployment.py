"""One deployment at run time: a task and method on a backbone, its non-personalized counterpart, the states its users
answer from, and how a request's row becomes an answer.

A row is answered on the micro-batcher's model thread, with the rows of every request that share its `Work`: the
method's own answer (a label and its scores for a classification or rating task, the method's text otherwise), or
text generated through the backbone with each row's sampling options, for generation tasks of methods that answer
through `LMPersonalizer`'s prompt path (every built-in one but p2p, whose adapter depends on the query: it answers
with its own greedy `predict`).

A user's state is looked up at each request, so an answer comes from the latest state the personalize worker saved;
while a newer history awaits personalization the previous state answers, and the answer says it is stale.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Sequence

from tailor.backbone.model import GREEDY, Sampling
from tailor.methods import build_method
from tailor.methods.base import LMPersonalizer, Personalizer, Prediction
from tailor.serve.batcher import MicroBatcher
from tailor.serve.config import Limits
from tailor.serve.errors import ApiError
from tailor.serve.states import StateCache
from tailor.store.state import StateError, UserState
from tailor.store.store import Store, UserRecord
from tailor.tasks.lamp import Task
from tailor.tasks.records import Query, User


def base_method(method: Personalizer) -> Personalizer | None:
    """The non-personalized prompt on the same backbone, answering as `method` answers (mode, calibration, batch);
    None for methods that do not answer through a backbone."""
    if not isinstance(method, LMPersonalizer):
        return None
    if method.name == "none":
        return method
    config = method.config
    return build_method("none", method.task, method.backbone, mode=config.mode, calibrate=config.calibrate,
                        batch_size=config.batch_size, max_new_tokens=config.max_new_tokens)


def as_question(task: Task, text: str) -> str:
    """The task's question for a text: a text that asks it already (it starts as the task's questions start, LaMP's
    inputs do) is kept, any other is the question's content (the article, review, tweet) and is put into the task's
    question template. LaMP-1's questions (two candidate papers) have no template: its texts are kept."""
    lead = task.question_template.split("{", 1)[0].strip()
    if task.name == "LaMP-1" or text.lstrip().startswith(lead[:40]):
        return text
    return re.sub(r"\{\w+\}", lambda _: text, task.question_template, count=1)


@dataclass(frozen=True)
class Work:
    """What answers a batch of rows: the key the micro-batcher groups rows by."""

    deployment: str
    personalized: bool
    generate: int = 0
    """0: the method's own answer; n > 0: text of at most n new tokens, sampled as each row asks."""


@dataclass(frozen=True)
class Row:
    state: UserState
    query: Query
    sampling: Sampling = GREEDY


@dataclass(frozen=True)
class Answer:
    text: str
    mode: str
    scores: dict[str, float] | None = None
    """Each label's score (log-probability) where the answer is a label."""
    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    """Token counts, where the text was generated here: the prompt's, and the returned text's re-tokenized (at most
    the budget; a text cut at a stop string counts what is left)."""


class Deployment:
    """A deployment's method and base, its store slot (its name) and state cache, and the batcher it answers on."""

    def __init__(self, name: str, method: Personalizer, store: Store, limits: Limits, batcher: MicroBatcher,
                 prefix: str):
        self.name, self.method, self.store, self.limits, self.batcher = name, method, store, limits, batcher
        self.prefix = prefix
        """Where its native routes are (/v1 for the default deployment)."""
        self.task = method.task
        self.base = base_method(method)
        self.base_state: UserState | None = self.base.personalize(User("-", self.task.name, ())) if self.base else None
        self.cache = StateCache(store, method)

    def generates(self, personalized: bool) -> bool:
        """Whether completions are generated here with sampling options (else the method's own `predict` answers)."""
        method = self.method if personalized else self.base
        return (self.task.family == "generation" and isinstance(method, LMPersonalizer)
                and type(method).predict is LMPersonalizer.predict)

    def default_tokens(self, personalized: bool) -> int:
        method = self.method if personalized else self.base
        return method.max_new_tokens if isinstance(method, LMPersonalizer) else self.task.max_new_tokens

    def records(self, tenant: str, user_ids: Sequence[str]) -> dict[str, UserRecord]:
        return self.store.records(tenant, user_ids, self.name)

    def state_of(self, tenant: str, user_id: str, record: UserRecord | None, param: str | None = None) -> UserState:
        """The state a personalized answer comes from (the latest saved, stale or not); ApiError when there is none
        to use."""
        if record is None:
            raise ApiError(404, "unknown_user", f"unknown user {user_id!r}", param=param)
        personalize = f"POST {self.prefix}/users/{user_id}/personalize"
        if not record.has_state:
            raise ApiError(409, "not_personalized", f"user {user_id!r} has no personalized state for {self.name}; "
                           f"{personalize} first", param=param)
        try:
            return self.cache.get(tenant, record)
        except StateError as error:
            raise ApiError(409, "state_unusable", f"{error}; {personalize} to rebuild it", param=param) from None

    def check_query(self, text: str, param: str) -> str:
        if len(text) > self.limits.max_query_chars:
            raise ApiError(413, "too_long", f"{param} has {len(text)} characters; at most "
                           f"{self.limits.max_query_chars}", param=param)
        return as_question(self.task, text)

    def run(self, work: Work, rows: list[Row]) -> list[Answer]:
        """Answers for rows of one `Work`, in one call (run on the batcher's model thread)."""
        method = self.method if work.personalized else self.base
        assert method is not None
        requests = [(row.state, row.query) for row in rows]
        if not work.generate:
            return [self._answer(p) for p in method.predict(requests)]
        assert isinstance(method, LMPersonalizer)
        backbone = method.backbone
        prompts, edits, row_ids = method.forward_inputs(requests)
        texts = backbone.generate(prompts, work.generate, method.config.batch_size, edits, row_ids,
                                  sampling=[row.sampling for row in rows])
        used = [len(ids) for ids in backbone.prompt_ids(prompts, room=work.generate)]
        return [Answer(text, "generation", None, n, min(backbone.count_tokens(text), work.generate))
                for text, n in zip(texts, used)]

    def _answer(self, prediction: Prediction) -> Answer:
        scores = None
        labels = self.task.labels
        if prediction.scores is not None and len(prediction.scores) == len(labels):
            scores = {label: round(score, 4) for label, score in zip(labels, prediction.scores)}
        return Answer(prediction.text, prediction.mode, scores)
