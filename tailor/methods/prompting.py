"""Prompting baselines: non-personalized, RAG, PAG and full history.

They personalize by what they put in the prompt, so a user's state is their history (and, for PAG, the summary the
backbone wrote of it). The BM25 index is rebuilt from the state the first time it is used and kept with it.

- non-personalized: the LaMP question alone.
- RAG (Salemi et al. 2024): the k history items BM25 ranks highest for the question, in LaMP's item templates,
  in front of the question.
- PAG (Richardson et al. 2023, as P2P's appendix C runs it): the backbone's profile summary, then the RAG block.
- full history: as many whole items as fit the context budget, newest first.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

from typing_extensions import TypeVar

from tailor.methods.base import HISTORY_UPDATE, LMConfig, LMPersonalizer, Progress
from tailor.methods.profile import ProfileSummarizer, format_history, newest_that_fit
from tailor.retrieval.bm25 import BM25Index
from tailor.store.state import UserState
from tailor.tasks.lamp import Task
from tailor.tasks.records import HistoryItem, User


def history_of(state: UserState) -> tuple[HistoryItem, ...]:
    cached = state.runtime.get("history")
    if cached is None:
        cached = tuple(HistoryItem(str(d["id"]), {k: v for k, v in d.items() if k not in ("id", "date")}, d.get("date"))
                       for d in state.header.get("profile", []))
        state.runtime["history"] = cached
    return cached


def bm25_of(task: Task, state: UserState) -> BM25Index:
    """The BM25 index over the history a state holds, built on first use and kept with the state."""
    index = state.runtime.get("bm25")
    if index is None:
        index = state.runtime["bm25"] = BM25Index([task.document(item) for item in history_of(state)])
    return index


def retrieve_earlier(task: Task, items: Sequence[HistoryItem], index: int, k: int) -> list[HistoryItem]:
    """The k items BM25 ranks highest for item `index`'s question among the items before it (a profile is oldest
    first): a training example built from a history item sees only what came before it, as the query it trains for
    sees only the profile, which is older than the query. Retrieving from later items would show the model a
    future it never has at inference."""
    earlier = items[:index]
    question, _ = task.example(items[index])
    query = task.retrieval_query(question)
    if k <= 0 or not earlier or not query.strip():  # a bare language-modelling prompt asks nothing to retrieve for
        return []
    ranked = BM25Index([task.document(item) for item in earlier]).top_k(query, k)
    return [earlier[i] for i in ranked]


def profile_header(user: User) -> dict:
    return {"task": user.task, "profile": [item.to_json() for item in user.profile]}


class NonPersonalized(LMPersonalizer[LMConfig]):
    name = "none"
    state_is_history = True
    update_note = "the state holds nothing of the user: nothing to update"

    def personalize(self, user: User) -> UserState:
        return self.new_state(user)

    def prompt(self, state: UserState, query_input: str) -> str:
        return query_input


@dataclass
class RAGConfig(LMConfig):
    k: int = 4
    history_tokens: int = 512


RC = TypeVar("RC", bound=RAGConfig, default=RAGConfig)


class RAG(LMPersonalizer[RC]):
    name = "rag"
    state_is_history = True
    update_note = HISTORY_UPDATE

    def personalize(self, user: User) -> UserState:
        return self.new_state(user, profile_header(user))

    def retrieve(self, state: UserState, query_input: str) -> list[HistoryItem]:
        top = bm25_of(self.task, state).top_k(self.task.retrieval_query(query_input), self.config.k)
        return [history_of(state)[i] for i in top]

    def history_block(self, state: UserState, query_input: str) -> str:
        items = self.retrieve(state, query_input)
        formatted = format_history(self.task, self.backbone, items, self.config.history_tokens)
        return self.task.join_history(formatted, query_input)

    def prompt(self, state: UserState, query_input: str) -> str:
        return self.history_block(state, query_input)


@dataclass
class PAGConfig(RAGConfig):
    summary_items: int = 16
    summary_history_tokens: int = 768
    summary_tokens: int = 128


class PAG(RAG[PAGConfig]):
    name = "pag"
    state_is_history = False
    update_note = "PAG's profile summary is written over the newest items; rebuilt (the summary cache serves " \
                  "unchanged histories)"

    @property
    def summarizer(self) -> ProfileSummarizer:
        return ProfileSummarizer(self.task, self.backbone, self.config.summary_items,
                                 self.config.summary_history_tokens, self.config.summary_tokens,
                                 self.config.batch_size)

    def personalize(self, user: User) -> UserState:
        return self.personalize_many([user])[0]

    def personalize_many(self, users: Sequence[User], progress: Progress = None) -> list[UserState]:
        summaries = self.summarizer.summaries(users)
        states = [self.new_state(u, {**profile_header(u), "summary": s}) for u, s in zip(users, summaries)]
        if progress:
            progress(len(users))
        return states

    def prompt(self, state: UserState, query_input: str) -> str:
        return f"User profile: {state.header['summary']}\n\n{self.history_block(state, query_input)}"


@dataclass
class FullHistoryConfig(LMConfig):
    history_tokens: int = 1536


class FullHistory(LMPersonalizer[FullHistoryConfig]):
    name = "full"
    state_is_history = True
    update_note = HISTORY_UPDATE

    def personalize(self, user: User) -> UserState:
        return self.new_state(user, profile_header(user))

    def prompt(self, state: UserState, query_input: str) -> str:
        formatted = state.runtime.get("full")
        if formatted is None:
            formatted = newest_that_fit(self.task, self.backbone, history_of(state), self.config.history_tokens)
            state.runtime["full"] = formatted
        return self.task.join_history(formatted, query_input)
