"""Read LaMP question and output files into `User` records, and refuse anything that is not exactly right.

A dropped profile item or a gold attached to the wrong user does not crash an evaluation: it quietly produces a wrong
number. So the reader validates every question, profile item and gold, and stops at the first problem with one
`DataError` that names the file, the question, the profile item and the field.

Two layouts are read: ours (`<dir>/<TASKDIR>/<split>_questions.json`) and the official server's
(`<dir>/<TASKDIR>/<split>/<split>_questions.json`); the time-based split sits below `<dir>/time/` in both. The
official files call both LaMP-2 tasks `LaMP_2`, so a `LaMP_2` directory is told apart by its profile fields.
This module only reads: it writes nothing anywhere.

`load_users` parses a whole file into a list. `question_ids` and `iter_users` read a questions file as a stream (ijson),
holding one question at a time, so a run over more users than fit in memory never holds every profile: one pass
collects and checks the ids, and each later pass yields the users it is asked for.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any, Container, Iterator

import ijson

from tailor.tasks.lamp import TASKS, Task, get_task
from tailor.tasks.records import HistoryItem, Query, User

SPLITS = ("train", "dev", "test")
VARIANTS = ("user", "time")
DATA_ENV = "TAILOR_DATA"

_JSON_TYPES = {dict: "object", list: "array", str: "string", int: "integer", float: "number", bool: "boolean",
               type(None): "null"}
_ID_EXAMPLES = 5


class DataError(ValueError):
    """Bad input data or a bad data argument. The message says where: file, question, profile item and field."""

    def __init__(self, problem: str, *, file: str | Path | None = None, question: str | None = None,
                 item: str | None = None, field: str | None = None) -> None:
        self.file = None if file is None else str(file)
        self.question = question
        self.item = item
        self.field = field
        ids = [f"question {question}"] if question is not None else []
        ids += [f"profile item {item}"] if item is not None else []
        parts = [self.file] if self.file is not None else []
        parts += [", ".join(ids)] if ids else []
        parts.append(f"field {field!r} {problem}" if field is not None else problem)
        super().__init__(": ".join(parts))


# --- where the data is -----------------------------------------------------------------------------------------------

def _default_data_dirs() -> list[Path]:
    """The shared data folder next to the checkout first, so a worktree elsewhere still finds its own sibling."""
    repo_root = Path(__file__).resolve().parent.parent.parent
    return [repo_root.parent / "shared" / "lamp", Path("/work/shared/lamp")]


def resolve_data_dir(data_dir: str | Path | None = None) -> Path:
    """The LaMP data folder: `data_dir` if given, else $TAILOR_DATA, else the first default folder that exists."""
    if data_dir is not None:
        return _existing_dir(Path(data_dir), "--data-dir")
    from_env = os.environ.get(DATA_ENV, "").strip()
    if from_env:
        return _existing_dir(Path(from_env), f"${DATA_ENV}")
    candidates = _default_data_dirs()
    for candidate in candidates:
        if candidate.is_dir():
            return candidate.resolve()
    looked = ", ".join(str(c) for c in candidates)
    raise DataError(f"no LaMP data folder found: --data-dir was not given, ${DATA_ENV} is not set and none of "
                    f"{looked} exists. Pass --data-dir DIR or set {DATA_ENV}=DIR to a folder holding LaMP_<N> "
                    f"task folders, or fetch the official files with `tailor data download`.")


def _existing_dir(path: Path, source: str) -> Path:
    path = path.expanduser()
    if not path.is_dir():
        raise DataError(f"data folder {path} (from {source}) does not exist or is not a directory")
    return path.resolve()


def _task_dirs(task: Task) -> list[str]:
    """Folders, relative to the variant root, that may hold a task: ours first, then the official server's."""
    own = task.name.replace("-", "_")
    if task.name == "LaMP-2M":
        return [own, "LaMP_2/new", "LaMP_2"]
    if task.name == "LaMP-2N":
        return [own, "LaMP_2"]
    return [own]


def _lamp2_kind(questions: Any) -> str | None:
    """Which LaMP-2 task a questions document holds, read from the fields of its first profile item."""
    for question in questions if isinstance(questions, list) else []:
        profile = question.get("profile") if isinstance(question, dict) else None
        if isinstance(profile, list) and profile and isinstance(profile[0], dict):
            keys = profile[0].keys()
            if "description" in keys and "tag" in keys:
                return "LaMP-2M"
            if "category" in keys:
                return "LaMP-2N"
            return None
    return None


def _find_questions(base: Path, task: Task, split: str) -> tuple[Path | None, list[Path]]:
    """The task's questions file for a split, and every path looked at (for the error message)."""
    tried: list[Path] = []
    for task_dir in _task_dirs(task):
        for path in (base / task_dir / f"{split}_questions.json", base / task_dir / split / f"{split}_questions.json"):
            tried.append(path)
            if not path.is_file():
                continue
            shared_name = task_dir.startswith("LaMP_2") and task_dir != task.name.replace("-", "_")
            if shared_name and _lamp2_kind(_read_json(path)) not in (None, task.name):
                continue
            return path, tried
    return None, tried


# --- reading -----------------------------------------------------------------------------------------------------

@lru_cache(maxsize=16)
def _parse_file(path: str, mtime_ns: int, size: int) -> Any:
    """Parse one JSON file; cached per (path, mtime, size) so repeated loads and layout sniffing parse it once.

    Callers must not mutate the returned document: it is shared between calls.
    """
    try:
        with open(path, "rb") as handle:
            return json.load(handle)
    except json.JSONDecodeError as err:
        raise DataError(f"invalid JSON at line {err.lineno} column {err.colno} (char {err.pos}): {err.msg}; the "
                        f"file may be truncated or not a LaMP file", file=path) from None
    except UnicodeDecodeError as err:
        raise DataError(f"is not UTF-8 text (byte {err.start})", file=path) from None


def _read_json(path: Path) -> Any:
    stat = path.stat()
    return _parse_file(str(path.resolve()), stat.st_mtime_ns, stat.st_size)


def _json_type(value: Any) -> str:
    return _JSON_TYPES.get(type(value), type(value).__name__)


def _id(value: Any, *, file: Path, question: str | None = None, item: str | None = None) -> str:
    """An id as a string: official files use integers in places and digit strings elsewhere."""
    if isinstance(value, bool) or not isinstance(value, (int, str)):
        raise DataError(f"must be a string or an integer, got {_json_type(value)}", file=file, question=question,
                        item=item, field="id")
    text = str(value)
    if not text.strip():
        raise DataError("is empty", file=file, question=question, item=item, field="id")
    return text


def _text(value: Any, name: str, *, numeric: bool, file: Path, question: str | None,
          item: str | None = None) -> str:
    """A text value; a score may also be a JSON number, kept as LaMP writes labels ("5", not "5.0")."""
    if isinstance(value, str):
        return value
    if numeric and isinstance(value, (int, float)) and not isinstance(value, bool):
        return str(int(value)) if float(value).is_integer() else str(value)
    expected = "a string or a number" if numeric else "a string"
    raise DataError(f"must be {expected}, got {_json_type(value)}", file=file, question=question, item=item,
                    field=name)


def _require(record: dict, name: str, *, file: Path, question: str | None, item: str | None = None) -> Any:
    if name not in record:
        raise DataError("is missing", file=file, question=question, item=item, field=name)
    return record[name]


def _history_item(raw: Any, position: int, task: Task, *, file: Path, question: str) -> HistoryItem:
    """One profile item: the task's fields (required) plus any other string fields, and the date if there is one."""
    if not isinstance(raw, dict):
        raise DataError(f"must be an object, got {_json_type(raw)}", file=file, question=question, item=f"#{position}")
    item_id = _id(_require(raw, "id", file=file, question=question, item=f"#{position}"), file=file,
                  question=question, item=f"#{position}")
    where = {"file": file, "question": question, "item": item_id}
    fields = {name: _text(_require(raw, name, **where), name, numeric=name == "score", **where)
              for name in task.item_fields}
    fields.update({name: value for name, value in raw.items()
                   if name not in fields and name not in ("id", "date") and isinstance(value, str)})
    date = raw.get("date")
    if date is not None and (isinstance(date, bool) or not isinstance(date, (str, int))):
        raise DataError(f"must be a string or an integer, got {_json_type(date)}", field="date", **where)
    return HistoryItem(id=item_id, fields=fields, date=None if date is None else str(date))


def _question(raw: Any, position: int, task: Task, file: Path) -> tuple[str, str, tuple[HistoryItem, ...]]:
    if not isinstance(raw, dict):
        raise DataError(f"must be an object, got {_json_type(raw)}", file=file, question=f"#{position}")
    qid = _id(_require(raw, "id", file=file, question=f"#{position}"), file=file, question=f"#{position}")
    text = _text(_require(raw, "input", file=file, question=qid), "input", numeric=False, file=file, question=qid)
    profile = _require(raw, "profile", file=file, question=qid)
    if not isinstance(profile, list):
        raise DataError(f"must be an array, got {_json_type(profile)}", file=file, question=qid, field="profile")
    if not profile:
        raise DataError("is empty: every LaMP user needs a history", file=file, question=qid, field="profile")
    items = tuple(_history_item(item, i, task, file=file, question=qid) for i, item in enumerate(profile))
    return qid, text, items


def _questions(doc: Any, task: Task, file: Path) -> list[tuple[str, str, tuple[HistoryItem, ...]]]:
    """Every question of a questions document as (id, input, profile), in file order, ids unique."""
    if not isinstance(doc, list):
        raise DataError(f"top level must be an array of questions, got {_json_type(doc)}", file=file)
    questions = [_question(raw, i, task, file) for i, raw in enumerate(doc)]
    seen: set[str] = set()
    for qid, _, _ in questions:
        _add_unique(qid, seen, file)
    return questions


def _add_unique(qid: str, seen: set[str], file: Path) -> None:
    if qid in seen:
        raise DataError("is duplicated: each question (user) must appear once", file=file, question=qid, field="id")
    seen.add(qid)


def _task_field_matches(value: str, task: Task) -> bool:
    """The outputs file's `task` field names this task; `LaMP_2` (the official name) counts for both LaMP-2 tasks."""
    def canonical(name: str) -> str:
        return "".join(ch for ch in name.lower() if ch.isalnum())

    found, wanted = canonical(value), canonical(task.name)
    return found == wanted or (found == "lamp2" and wanted.startswith("lamp2"))


def _golds(doc: Any, task: Task, file: Path) -> dict[str, str]:
    """The gold output per question id from an outputs document `{"task": ..., "golds": [{"id", "output"}]}`."""
    if not isinstance(doc, dict):
        raise DataError(f"top level must be an object with 'task' and 'golds', got {_json_type(doc)}", file=file)
    named = doc.get("task")
    if named is not None and (not isinstance(named, str) or not _task_field_matches(named, task)):
        raise DataError(f"is {named!r}, but this file was read as {task.name}", file=file, field="task")
    entries = _require(doc, "golds", file=file, question=None)
    if not isinstance(entries, list):
        raise DataError(f"must be an array, got {_json_type(entries)}", file=file, field="golds")
    golds: dict[str, str] = {}
    numeric = task.family == "regression"
    for position, entry in enumerate(entries):
        if not isinstance(entry, dict):
            raise DataError(f"must be an object, got {_json_type(entry)}", file=file, question=f"#{position}")
        qid = _id(_require(entry, "id", file=file, question=f"#{position}"), file=file, question=f"#{position}")
        output = _require(entry, "output", file=file, question=qid)
        if qid in golds:
            raise DataError("is duplicated among the golds", file=file, question=qid, field="id")
        golds[qid] = _text(output, "output", numeric=numeric, file=file, question=qid)
    return golds


def _check_same_ids(question_ids: list[str], golds: dict[str, str], questions_file: Path, outputs_file: Path) -> None:
    """Questions and golds must pair up one to one; name a few ids on each side when they do not."""
    known = set(question_ids)
    missing = [qid for qid in question_ids if qid not in golds]
    extra = [qid for qid in golds if qid not in known]
    if not missing and not extra:
        return
    problems = []
    if missing:
        problems.append(f"{len(missing)} question(s) of {questions_file.name} have no gold, e.g. "
                        f"{', '.join(missing[:_ID_EXAMPLES])}")
    if extra:
        problems.append(f"{len(extra)} gold(s) match no question of {questions_file.name}, e.g. "
                        f"{', '.join(extra[:_ID_EXAMPLES])}")
    raise DataError("does not match between the questions and outputs files: " + "; ".join(problems),
                    file=outputs_file, field="id")


def resolve_task(task: str | Task) -> Task:
    """A Task from any of its names (or the Task itself); an unknown name is a DataError like any bad input."""
    if isinstance(task, Task):
        return task
    try:
        return get_task(task)
    except KeyError as err:
        raise DataError(str(err.args[0])) from None


def _check_choice(value: str, allowed: tuple[str, ...], what: str) -> None:
    if value not in allowed:
        raise DataError(f"unknown {what} {value!r}; expected one of {', '.join(allowed)}")


def _variant_root(data_dir: str | Path | None, variant: str) -> Path:
    root = resolve_data_dir(data_dir)
    return root / "time" if variant == "time" else root


def _locate(task: Task, split: str, data_dir: str | Path | None, variant: str) -> tuple[Path, Path | None]:
    """The questions file of a task's split and its outputs file (None for a test split without one)."""
    _check_choice(split, SPLITS, "split")
    _check_choice(variant, VARIANTS, "variant")
    questions_file, tried = _find_questions(_variant_root(data_dir, variant), task, split)
    if questions_file is None:
        looked = ", ".join(str(p) for p in tried)
        raise DataError(f"no {split} questions for {task.name} ({variant}-based split); looked for {looked}. Point "
                        f"--data-dir or ${DATA_ENV} at a folder that has them, or run `tailor data download`.")
    outputs_file = questions_file.with_name(f"{split}_outputs.json")
    if outputs_file.is_file():
        return questions_file, outputs_file
    if split != "test":
        raise DataError(f"is missing: {split} questions need their outputs file ({questions_file.name} is there)",
                        file=outputs_file)
    return questions_file, None


def _user(qid: str, text: str, profile: tuple[HistoryItem, ...], golds: dict[str, str], task: Task) -> User:
    return User(id=qid, task=task.name, profile=profile, queries=(Query(id=qid, input=text, gold=golds.get(qid)),))


def load_users(task: str | Task, split: str, data_dir: str | Path | None = None, variant: str = "user") -> list[User]:
    """All users of one task and split, one per LaMP question, in file order.

    `split` is train, dev or test; the test split has no outputs file, so its queries carry gold=None (an outputs
    file next to test questions is read if present). `variant` is LaMP's user-based ("user") or time-based ("time")
    split. Raises DataError on anything missing, malformed or inconsistent.
    """
    task = resolve_task(task)
    questions_file, outputs_file = _locate(task, split, data_dir, variant)
    questions = _questions(_read_json(questions_file), task, questions_file)
    golds = {} if outputs_file is None else _golds(_read_json(outputs_file), task, outputs_file)
    if outputs_file is not None:
        _check_same_ids([qid for qid, _, _ in questions], golds, questions_file, outputs_file)
    return [_user(qid, text, profile, golds, task) for qid, text, profile in questions]


# --- streaming ---------------------------------------------------------------------------------------------------

def _stream_array(path: Path) -> Iterator[Any]:
    """The elements of the JSON array in `path`, parsed one at a time (memory holds one element, not the file)."""
    try:
        with open(path, "rb") as handle:
            first = handle.read(1)
            while first in (b" ", b"\t", b"\n", b"\r"):
                first = handle.read(1)
            if first != b"[":
                found = "nothing" if not first else f"{first.decode('utf-8', 'replace')!r}"
                raise DataError(f"top level must be an array of questions, but the file starts with {found}",
                                file=path)
            handle.seek(0)
            yield from ijson.items(handle, "item", use_float=True)
    except ijson.JSONError as err:
        detail = " ".join(str(err).split())
        raise DataError(f"invalid JSON ({detail}); the file may be truncated or not a LaMP file", file=path) from None


@dataclass(frozen=True)
class QuestionIndex:
    """What one streamed pass over a split learns without keeping any profile: the question ids in file order (each
    LaMP question is one user, and its query has the same id), checked unique and matched one to one with the
    golds, which are small and kept by id."""

    task: Task
    questions_file: Path
    ids: tuple[str, ...]
    golds: dict[str, str]


def question_ids(task: str | Task, split: str, data_dir: str | Path | None = None,
                 variant: str = "user") -> QuestionIndex:
    """Stream a split once and return its question ids and golds; raises DataError as `load_users` does for a
    malformed id, a duplicate, a gold without a question or a question without a gold."""
    task = resolve_task(task)
    questions_file, outputs_file = _locate(task, split, data_dir, variant)
    ids: list[str] = []
    seen: set[str] = set()
    for position, raw in enumerate(_stream_array(questions_file)):
        if not isinstance(raw, dict):
            raise DataError(f"must be an object, got {_json_type(raw)}", file=questions_file,
                            question=f"#{position}")
        qid = _id(_require(raw, "id", file=questions_file, question=f"#{position}"), file=questions_file,
                  question=f"#{position}")
        _add_unique(qid, seen, questions_file)
        ids.append(qid)
    golds = {} if outputs_file is None else _golds(_read_json(outputs_file), task, outputs_file)
    if outputs_file is not None:
        _check_same_ids(ids, golds, questions_file, outputs_file)
    return QuestionIndex(task, questions_file, tuple(ids), golds)


def iter_users(index: QuestionIndex, positions: Container[int] | None = None) -> Iterator[User]:
    """The users of an indexed split, streamed in file order: every one, or those at `positions` (0-based file
    positions). Each yielded user is validated as `load_users` validates it; none is kept after it is yielded."""
    task, path = index.task, index.questions_file
    for position, raw in enumerate(_stream_array(path)):
        if position >= len(index.ids):
            raise DataError(f"has changed since it was indexed (more than {len(index.ids)} questions)", file=path)
        if positions is not None and position not in positions:
            continue
        qid, text, profile = _question(raw, position, task, path)
        if qid != index.ids[position]:
            raise DataError(f"has changed since it was indexed (question #{position} was {index.ids[position]})",
                            file=path, question=qid)
        yield _user(qid, text, profile, index.golds, task)


def available_tasks(data_dir: str | Path | None = None, variant: str = "user") -> list[str]:
    """Names of the tasks with at least one split present in the data folder, in registry order."""
    _check_choice(variant, VARIANTS, "variant")
    base = _variant_root(data_dir, variant)
    return [task.name for task in TASKS.values()
            if any(_find_questions(base, task, split)[0] is not None for split in SPLITS)]
