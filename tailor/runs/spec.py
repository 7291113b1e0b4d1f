"""What a run evaluates: the spec that fixes its predictions, and the users it answers and fits on.

Users are streamed, not loaded: a run knows its users' ids from one pass over the data file's ids (`RunUsers`), and
the chunks draw the users themselves from a second, streamed pass, so memory holds the chunks being worked on, not
every profile of a run over more users than fit in memory.
"""

from __future__ import annotations

from dataclasses import MISSING, dataclass, field, fields
from functools import lru_cache
from typing import Any, Callable, Iterator, Sequence

from tailor.backbone.device import resolve_device, resolve_dtype
from tailor.data.lamp import SPLITS, VARIANTS, iter_users, load_users, question_ids, resolve_data_dir
from tailor.data.splits import history_queries, ood_split, random_split, subset, subset_positions, swap_histories
from tailor.tasks.lamp import get_task
from tailor.tasks.records import User

USER_SPLITS = ("random", "ood")
"""Profile-to-PEFT's splits of the training file's users (paper section 4.1): fit on one part, answer the other."""


HISTORIES = ("own", "swapped")
"""Whose history a run's users are answered with (EvalSpec.histories)."""


@dataclass
class EvalSpec:
    """Everything that determines a run's predictions. Two runs with equal specs give equal predictions."""

    task: str
    method: str
    options: dict[str, Any] = field(default_factory=dict)
    model: str | None = "smollm2-135m"
    device: str = "auto"
    """Where the backbone runs (auto, cpu, cuda, cuda:N, mps); config.json records the device a run used."""
    dtype: str = "auto"
    """The backbone's precision (auto, float32, bfloat16, float16); config.json records the one it resolved to, so a
    run resumed where `auto` means another precision is refused instead of mixing two."""
    split: str = "dev"
    variant: str = "user"
    users: int | None = None
    seed: int = 0
    label: str | None = None
    data_dir: str | None = None
    histories: str = "own"
    """"own", or "swapped": each user answered with another user's history (a seeded derangement of the run's users;
    `tailor.data.splits.swap_histories`), the control that must not help."""
    queries_per_user: int = 0
    """0: LaMP's protocol, one query per user. M > 0: tailor's own protocol, each user's last M history items asked
    as further queries, the history cut before the first of them (`tailor.data.splits.history_queries`)."""

    def check(self) -> None:
        """Fail on a bad task, split, variant, user count or data folder before a model loads or a folder is made.

        An unknown task raises KeyError and a missing data folder DataError (both name what exists); the rest
        raise ValueError."""
        get_task(self.task)
        if self.split not in SPLITS + USER_SPLITS:
            raise ValueError(f"unknown split {self.split!r}; expected one of {', '.join(SPLITS + USER_SPLITS)}")
        if self.variant not in VARIANTS:
            raise ValueError(f"unknown variant {self.variant!r}; expected one of {', '.join(VARIANTS)}")
        if self.histories not in HISTORIES:
            raise ValueError(f"{self.histories!r} is not one of {', '.join(HISTORIES)}")
        if self.users is not None and self.users < 1:
            raise ValueError(f"users must be at least 1 (or unset for all users), not {self.users}")
        if self.queries_per_user < 0:
            raise ValueError(f"queries_per_user must be 0 (LaMP's one query) or more, not {self.queries_per_user}")
        if self.queries_per_user and get_task(self.task).history_prompt is not None:
            raise ValueError(f"--queries-per-user: {get_task(self.task).name}'s history items hold only the user's "
                             "output, so they cannot be asked as queries")
        resolve_dtype(self.dtype, resolve_device(self.device))  # DeviceError (a ValueError) names what is missing
        resolve_data_dir(self.data_dir)


def spec_defaults(cls: type) -> dict[str, Any]:
    """The default of every field of a dataclass that has one (a run's config.json omits nothing it was made with,
    but fields added later are absent from older runs: absent means default)."""
    return {f.name: f.default for f in fields(cls) if f.default is not MISSING}


@dataclass(frozen=True)
class RunUsers:
    """The users of a run, in run order, without their profiles: the ids are known up front and every iteration
    streams the users again from the data file.

    LaMP gives each user one query with the user's id, so `query_ids` equals `ids` for streamed users. Runs that need
    every profile at once anyway hold a list (`RunUsers.of`): P2P's random and OOD splits cluster all training
    profiles, and swapped histories take each user's history from another user.
    """

    ids: tuple[str, ...]
    query_ids: tuple[str, ...]
    stream: Callable[[], Iterator[User]]

    def __iter__(self) -> Iterator[User]:
        return self.stream()

    def __len__(self) -> int:
        return len(self.ids)

    @classmethod
    def of(cls, users: Sequence[User]) -> "RunUsers":
        held = list(users)
        return cls(tuple(u.id for u in held), tuple(q.id for u in held for q in u.queries), lambda: iter(held))


def run_users(spec: EvalSpec) -> RunUsers:
    """The users a run answers (the same users, in the same order, as `eval_users`), streamed where they can be."""
    _check_histories(spec)
    if spec.split in USER_SPLITS or spec.histories == "swapped" or spec.queries_per_user:
        return RunUsers.of(eval_users(spec))
    index = question_ids(spec.task, spec.split, spec.data_dir, spec.variant)
    positions = subset_positions(len(index.ids), spec.users, spec.seed)
    chosen = frozenset(positions)
    ids = tuple(index.ids[i] for i in positions)
    return RunUsers(ids, ids, lambda: iter_users(index, chosen))


def _check_histories(spec: EvalSpec) -> None:
    if spec.histories not in HISTORIES:
        raise ValueError(f"histories must be one of {', '.join(HISTORIES)}, not {spec.histories!r}")


def eval_users(spec: EvalSpec) -> list[User]:
    """The users a run answers, in file order, all in memory: the seeded subset of the split (with swapped histories
    if asked). Runs use `run_users`, which streams them."""
    _check_histories(spec)
    if spec.split in USER_SPLITS:
        users = subset(_user_split(spec.task, spec.data_dir, spec.variant, spec.split, spec.seed)[1], spec.users,
                       spec.seed)
    else:
        users = subset(load_users(spec.task, spec.split, spec.data_dir, spec.variant), spec.users, spec.seed)
    if spec.queries_per_user:  # before any swap: a user's queries are their own items, the swap moves histories
        task = get_task(spec.task)
        users = [history_queries(user, task, spec.queries_per_user) for user in users]
    return swap_histories(users, spec.seed) if spec.histories == "swapped" else users


def fit_users(spec: EvalSpec) -> list[User]:
    """The users a method is fitted on: the training file, less the held-out users of a random or OOD split."""
    if spec.split in USER_SPLITS:
        return _user_split(spec.task, spec.data_dir, spec.variant, spec.split, spec.seed)[0]
    return load_users(spec.task, "train", spec.data_dir, spec.variant)


@lru_cache(maxsize=8)
def _user_split(task: str, data_dir: str | None, variant: str, split: str,
                seed: int) -> tuple[list[User], list[User]]:
    """(fit users, held-out users), clustered on an embedding of each user's whole history as the paper clusters
    profiles; the packaged sentence encoder keeps the split independent of the backbone under test."""
    from tailor.retrieval.embed import default_embedder

    users = load_users(task, "train", data_dir, variant)
    definition = get_task(task)
    texts = ["\n".join(definition.document(item) for item in user.profile) for user in users]
    splitter = random_split if split == "random" else ood_split
    return splitter(users, default_embedder()(texts), seed=seed)

