"""Bring a stale state up to date after history was appended, without starting over where the method allows it.

Which methods can, and why (the store knows how many items the old state was built from, `old_items`):

- none, rag, full, user-prior, global-prior: the state *is* the history (or nothing); the new state is the old one
  with the items appended, which is all `personalize` does. Incremental by construction.
- perfit (stages 1+2 or 2): stage 2 continues training the user's phi_2 from the old state on the new items only
  (each with its retrieved earlier items, as in `personalize`), instead of from the identity on every item. The cost
  scales with the new items; the result is not the one a from-scratch stage 2 gives (older items are not revisited).
  A state made with other layers, positions, rank or stage 1 is rebuilt. Stage 1 only: the state is the history.
- chameleon, pag: cannot. CHAMELEON's history selection is a PCA over every item and its insights, preference pairs
  and CCS probes all depend on the selection; PAG's summary is written over the newest items. They are rebuilt; the
  disk caches of generations and hidden states (`tailor.backbone.cache`) make every unchanged prompt free.
Methods not named here (a method added later) are rebuilt, and say so.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass
from typing import Callable, Literal

import torch

from tailor.data.schema import User
from tailor.methods.base import Personalizer
from tailor.store.state import UserState


@dataclass(frozen=True)
class Update:
    state: UserState
    mode: Literal["incremental", "rebuilt"]
    reason: str


Updater = Callable[[Personalizer, UserState, User, int], UserState | None]


def _history_is_state(method: Personalizer, old: UserState, user: User, old_items: int) -> UserState:
    return method.personalize(user)


def _perfit(method: Personalizer, old: UserState, user: User, old_items: int) -> UserState | None:
    """Continue PerFit's stage 2 from the old phi_2 on the items added since (None: the old state does not fit)."""
    from tailor.backbone.model import Batch
    from tailor.backbone.partial import FrozenBatch
    from tailor.methods.perfit import PerFit, history_examples, length_grouped, stacked

    assert isinstance(method, PerFit) and method.backbone is not None
    if not method.uses_stage2:
        return method.personalize(user)
    try:
        method._check(old)
    except ValueError:
        return None
    cfg = method.config
    examples = history_examples(method.task, method.backbone, user, cfg.k, cfg.history_tokens,
                                range(old_items, len(user.profile)))
    header = {**method._header(user), "stage2_updates": int(old.header.get("stage2_updates", 0)) + 1}
    if not examples:
        return method.new_state(user, header, dict(old.tensors))
    seed = method._user_seed(user) + old_items
    trainer = method._trainer(cfg.rank2, cfg.lr2, math.ceil(len(examples) / cfg.batch2) * cfg.epochs2, seed, True,
                              method._stage1_params())
    with torch.no_grad():
        for i, module in enumerate(trainer.modules):
            module.rotate.weight = old.tensors["R"][i].float()  # through the orthogonal parametrization's inverse
            module.source.weight.copy_(old.tensors["W"][i])
            module.source.bias.copy_(old.tensors["b"][i])
    rng = random.Random(seed)
    plan = length_grouped([len(p) + len(a) for p, a in examples], cfg.batch2, rng)
    prepared: list[FrozenBatch | Batch] = [trainer.freeze(method._batch([examples[i] for i in b])) for b in plan]
    for _ in range(cfg.epochs2):
        for index in rng.sample(range(len(prepared)), len(prepared)):
            trainer.step(prepared[index])
    return method.new_state(user, header, stacked(trainer.modules))


INCREMENTAL: dict[str, tuple[Updater, str]] = {
    **{name: (_history_is_state, "the state is the history: the new items are appended")
       for name in ("none", "rag", "full", "user-prior", "global-prior")},
    "perfit": (_perfit, "stage 2 continued from the old phi_2 on the new items only"),
}
CANNOT: dict[str, str] = {
    "chameleon": "CHAMELEON's history selection (a PCA over all items), insights, pairs and CCS probes depend on the "
                 "whole history; rebuilt, with unchanged generations and hidden states read from the caches",
    "pag": "PAG's profile summary is written over the newest items; rebuilt (the summary cache serves unchanged "
           "histories)",
}


def rebuild_reason(method: Personalizer, old: UserState | None) -> str:
    """Why `update_state` gave None for this method and old state."""
    if old is None:
        return "no earlier state"
    if method.name in INCREMENTAL:
        return "the earlier state was made with other settings; rebuilt from the whole history"
    return CANNOT.get(method.name, f"{method.name} has no incremental update; rebuilt from the whole history")


def update_state(method: Personalizer, old: UserState | None, user: User, old_items: int) -> Update | None:
    """The user's state updated from `old` (built from their first `old_items` items), or None when the method must
    rebuild it with `personalize` (the caller may then batch several users through `personalize_many`)."""
    if old is None or old_items <= 0:
        return None
    entry = INCREMENTAL.get(method.name)
    if entry is None:
        return None
    updater, reason = entry
    state = updater(method, old, user, old_items)
    return Update(state, "incremental", reason) if state is not None else None
