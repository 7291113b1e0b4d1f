"""A swapped-histories control that borrows its states from the run it controls.

The control answers user A from the history of user B (`tailor.data.splits.swap_histories`). A method that trains
per user would train on B's history a second time to build A's state, although the run with own histories has
already built and saved exactly that state. Borrowing it halves what a control costs for per-user methods, and the
control then reports B's personalize time as measured when the state was built, where personalizing again could read
the generations and hidden states the first run left in the text and hidden-state caches and look cheaper than it is.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

from tailor.data.splits import history_donors
from tailor.runs.spec import EvalSpec, eval_users
from tailor.store.paths import state_path
from tailor.store.state import UserState


def borrow_states(spec: EvalSpec, out: Path) -> int:
    """Save into `out`/states, for each user of the swapped run `spec` without a state there, the state its history's
    owner has in `spec.states_from` (under the borrowing user's id). Users whose owner has no saved state yet are left
    to personalize as usual. Returns how many states were borrowed. `open_run` has checked that the lending run is
    the same run with own histories."""
    assert spec.states_from is not None and spec.histories == "swapped"
    lender = Path(spec.states_from)
    users = eval_users(dataclasses.replace(spec, histories="own", states_from=None))
    lent = 0
    for user, donor in zip(users, history_donors(len(users), spec.seed)):
        target = state_path(out / "states", user.id)
        source = state_path(lender / "states", users[donor].id)
        if target.exists() or not source.exists():
            continue
        target.parent.mkdir(parents=True, exist_ok=True)
        dataclasses.replace(UserState.load(source), user_id=user.id).save(target)
        lent += 1
    return lent

