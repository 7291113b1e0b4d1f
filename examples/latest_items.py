"""A method written outside tailor: the user's newest history items in front of the question (recency, where RAG
uses BM25 relevance). It is the whole of what a new prompting method needs: a config, a state, a prompt.

Every part of tailor takes it by import path, with nothing registered:

    PYTHONPATH=. .venv/bin/tailor eval --task lamp2n --method examples.latest_items:LatestItems --set n=2 \
        --users 8 --out runs/latest-items

`tailor personalize` and `tailor serve` take the same --method; with --ray, every worker must be able to import it.
A method that edits hidden states also overrides `edits(states)`; one that learns across users returns True from
`fits` and implements `fit`, `save_fit` and `load_fit`; one whose state can follow new history without starting over
implements `update` (see tailor/methods/base.py and docs/architecture.md).
"""

from __future__ import annotations

from dataclasses import dataclass

from tailor.methods.base import LMConfig, LMPersonalizer
from tailor.methods.profile import format_history
from tailor.store.state import UserState
from tailor.tasks.records import User


@dataclass
class LatestItemsConfig(LMConfig):
    n: int = 2
    """How many of the user's newest history items go in the prompt (tailor keeps a history oldest first)."""
    history_tokens: int = 512
    """Token budget the items share; a long item is cut to fit."""


class LatestItems(LMPersonalizer[LatestItemsConfig]):
    name = "latest-items"

    def personalize(self, user: User) -> UserState:
        # Formatted once per user and kept in the state's JSON header, not redone for every query.
        newest = list(user.profile[-self.config.n:]) if self.config.n else []
        return self.new_state(user, {"items": format_history(self.task, self.backbone, newest,
                                                             self.config.history_tokens)})

    def prompt(self, state: UserState, query_input: str) -> str:
        return self.task.join_history(state.header["items"], query_input)
