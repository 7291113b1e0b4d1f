"""What a run evaluates: the spec that fixes its predictions, and the users it answers and fits on.

Users are streamed, not loaded: a run knows its users' ids from one pass over the data file's ids (`RunUsers`), and
the chunks draw the users themselves from a second, streamed pass, so memory holds the chunks being worked on, not
every profile of a run over more users than fit in memory.

The users come from LaMP's files (`split` of the folder `data_dir`) or from users files of one's own (`data`, answered,
and `train_data`, fitted on; JSONL, `tailor.data.jsonl`), for any task, LaMP's or a task file's.
"""

from __future__ import annotations

from dataclasses import MISSING, dataclass, field, fields, replace
from functools import lru_cache
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

from tailor.backbone.device import resolve_device, resolve_dtype
from tailor.data.jsonl import iter_jsonl_users, load_jsonl_users, users_index
from tailor.backbone.defaults import DEFAULT_MODEL
from tailor.data.lamp import SPLITS, VARIANTS, DataError, iter_users, load_users, question_ids, resolve_data_dir
from tailor.data.splits import history_queries, ood_split, random_split, subset, subset_positions, swap_histories
from tailor.tasks.lamp import get_task, task_file
from tailor.tasks.records import User

USER_SPLITS = ("random", "ood")
"""Profile-to-PEFT's splits of the training file's users (paper section 4.1): fit on one part, answer the other."""


HISTORIES = ("own", "swapped")
"""Whose history a run's users are answered with (EvalSpec.histories)."""


@dataclass
class EvalSpec:
    """Everything that determines a run's predictions. Two runs with equal specs give equal predictions."""

    task: str
    """A task's name or the path of its task file (.toml)."""
    method: str
    options: dict[str, Any] = field(default_factory=dict)
    model: str | None = DEFAULT_MODEL
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
    data: str | None = None
    """A users file (JSONL) whose users the run answers, instead of LaMP's `split`."""
    train_data: str | None = None
    """The users file (JSONL) methods fit on, with `data`: the global prior's answer, the task-level fits."""
    states_from: str | None = None
    """With swapped histories: the folder of the same run with own histories, whose saved states are the swapped
    users' states (each user gets the state of the user whose history they are given, and its personalize time), so
    a method that trains per user does not train every history twice (`tailor.runs.borrow`)."""

    def check(self) -> None:
        """Fail on a bad task, split, variant, user count or data before a model loads or a folder is made.

        An unknown task or a bad task file raises KeyError, and missing or bad data DataError (both name what is
        wrong, a users file's first problem by file, line and field); the rest raise ValueError."""
        task = get_task(self.task)
        if self.data is not None or self.train_data is not None:
            self._check_users_files()
        if self.split not in SPLITS + USER_SPLITS:
            raise ValueError(f"unknown split {self.split!r}; expected one of {', '.join(SPLITS + USER_SPLITS)}")
        if self.variant not in VARIANTS:
            raise ValueError(f"unknown variant {self.variant!r}; expected one of {', '.join(VARIANTS)}")
        if self.histories not in HISTORIES:
            raise ValueError(f"{self.histories!r} is not one of {', '.join(HISTORIES)}")
        if self.states_from is not None:
            if self.histories != "swapped":
                raise ValueError("--states-from lends a run's states to its swapped-histories control; add "
                                 "--histories swapped")
            if not (Path(self.states_from) / "config.json").exists():
                raise ValueError(f"--states-from {self.states_from}: no run there (it has no config.json)")
        if self.users is not None and self.users < 1:
            raise ValueError(f"users must be at least 1 (or unset for all users), not {self.users}")
        if self.queries_per_user < 0:
            raise ValueError(f"queries_per_user must be 0 (LaMP's one query) or more, not {self.queries_per_user}")
        if self.queries_per_user and task.history_prompt is not None:
            raise ValueError(f"--queries-per-user: {task.name}'s history items hold only the user's output, so they "
                             "cannot be asked as queries")
        resolve_dtype(self.dtype, resolve_device(self.device))  # DeviceError (a ValueError) names what is missing
        if self.data is None:
            resolve_data_dir(self.data_dir)
        else:
            for path in (self.data, self.train_data):
                users_index(task, path)  # type: ignore[arg-type]

    def portable(self) -> EvalSpec:
        """The spec with its task file and users files by absolute path, as config.json records them: a resumed run,
        a Ray worker or a report then finds them from any working directory."""
        path = task_file(self.task)
        return replace(self, task=str(path.expanduser().resolve()) if path is not None else self.task,
                       data=_absolute(self.data), train_data=_absolute(self.train_data),
                       states_from=_absolute(self.states_from))

    def _check_users_files(self) -> None:
        if self.data is None or self.train_data is None:
            raise ValueError("--data (the users a run answers) and --train-data (the users methods fit on) go "
                             "together; give both, two users files (JSONL)")
        if self.split != "dev" or self.variant != "user":
            raise ValueError(f"--split {self.split} --variant {self.variant}: these pick among LaMP's files; with "
                             "--data the run answers that file's users")


def _absolute(path: str | None) -> str | None:
    return None if path is None else str(Path(path).expanduser().resolve())


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
    if spec.data is not None:
        users = users_index(get_task(spec.task), spec.data)
        positions = subset_positions(len(users.ids), spec.users, spec.seed)
        chosen = frozenset(positions)
        return RunUsers(tuple(users.ids[i] for i in positions), tuple(q for i in positions for q in users.query_ids[i]),
                        lambda: iter_jsonl_users(users, chosen))
    index = question_ids(spec.task, spec.split, spec.data_dir, spec.variant)
    positions = subset_positions(len(index.ids), spec.users, spec.seed)
    chosen = frozenset(positions)
    ids = tuple(index.ids[i] for i in positions)
    return RunUsers(ids, ids, lambda: iter_users(index, chosen))


def _check_histories(spec: EvalSpec) -> None:
    if spec.histories not in HISTORIES:
        raise ValueError(f"histories must be one of {', '.join(HISTORIES)}, not {spec.histories!r}")


def check_golds(spec: EvalSpec) -> None:
    """Every query of a users file has a gold to score the answer against (an evaluation needs one; personalizing
    does not); DataError naming the first one without."""
    if spec.data is not None:
        missing = users_index(get_task(spec.task), spec.data).without_gold
        if missing is not None:
            raise DataError(f"{missing}: is missing; `tailor eval` scores every answer against its gold")


def eval_users(spec: EvalSpec) -> list[User]:
    """The users a run answers, in file order, all in memory: the seeded subset of the split (with swapped histories
    if asked). Runs use `run_users`, which streams them."""
    _check_histories(spec)
    if spec.split in USER_SPLITS:
        users = subset(_user_split(spec.task, spec.data_dir, spec.variant, spec.split, spec.seed)[1], spec.users,
                       spec.seed)
    elif spec.data is not None:
        users = subset(load_jsonl_users(get_task(spec.task), spec.data), spec.users, spec.seed)
    else:
        users = subset(load_users(spec.task, spec.split, spec.data_dir, spec.variant), spec.users, spec.seed)
    if spec.queries_per_user:  # before any swap: a user's queries are their own items, the swap moves histories
        task = get_task(spec.task)
        users = [history_queries(user, task, spec.queries_per_user) for user in users]
    return swap_histories(users, spec.seed) if spec.histories == "swapped" else users


def fit_users(spec: EvalSpec) -> list[User]:
    """The users a method is fitted on: the training file (`train_data`, or LaMP's), less the held-out users of a
    random or OOD split."""
    if spec.split in USER_SPLITS:
        return _user_split(spec.task, spec.data_dir, spec.variant, spec.split, spec.seed)[0]
    if spec.train_data is not None:
        return load_jsonl_users(get_task(spec.task), spec.train_data)
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

