"""Users' own data: a JSONL file, one user per line, read into `User` records for any task.

    {"id": "u1", "history": [{"id": "h1", "text": "...", "priority": "high", "date": "2024-05-01"}, ...],
     "queries": [{"id": "q1", "input": "...", "gold": "urgent"}]}

A history item holds the task's `[history] fields` (every one of them: the templates use them) and may hold a date
and other string fields; a query holds an input, which the task asks as its question (`Task.ask`), and, to be
scored, a gold. `queries` may be left out (a user of a training file may only have a history). Train and dev users
are two files, as LaMP's are.

Nothing is read half way: `check_users_file` finds every problem of a file, each one line that names the file, the
line and the field (`dev.jsonl:7: history[2].priority: 'critical' is not a label of tickets (low, ...)`), for
`tailor data validate`; a run refuses a file with any problem before a model loads (`users_index`). A run streams
its users (`iter_jsonl_users`), holding one line at a time, as it streams LaMP's files.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any, Container, Iterator

from tailor.data.lamp import DataError
from tailor.tasks.records import HistoryItem, Query, User
from tailor.tasks.task import Task, score_value

USER_KEYS = ("id", "history", "queries")
QUERY_KEYS = ("id", "input", "gold")
_JSON_TYPES = {dict: "an object", list: "an array", str: "a string", int: "an integer", float: "a number",
               bool: "a boolean", type(None): "null"}


@dataclass
class FileCheck:
    """What checking a users file found: every problem, one line each in file order, and the good users' ids."""

    path: Path
    problems: list[str] = field(default_factory=list)
    ids: list[str] = field(default_factory=list)
    query_ids: list[tuple[str, ...]] = field(default_factory=list)
    items: int = 0
    without_gold: str | None = None
    """Where the first query without a gold is (file:line: field), None when every query has one."""


@dataclass
class _Line:
    """One line being read: it collects its own problems, each prefixed with the file, the line and the field."""

    path: Path
    number: int
    problems: list[str] = field(default_factory=list)

    def problem(self, where: str, text: str) -> None:
        self.problems.append(f"{self.path}:{self.number}: {where}: {text}" if where else
                             f"{self.path}:{self.number}: {text}")


def _type(value: Any) -> str:
    return _JSON_TYPES.get(type(value), type(value).__name__)


def _id(line: _Line, raw: dict, where: str) -> str | None:
    at = f"{where}.id" if where else "id"
    if "id" not in raw:
        line.problem(at, "is missing")
        return None
    value = raw["id"]
    if isinstance(value, bool) or not isinstance(value, (str, int)):
        line.problem(at, f"must be a string or an integer, got {_type(value)}")
        return None
    if not str(value).strip():
        line.problem(at, "is empty")
        return None
    return str(value)


def _output(line: _Line, task: Task, value: Any, where: str) -> str | None:
    """A user's answer (an item's output field or a query's gold), checked against the task's labels or range."""
    if task.family == "regression" and isinstance(value, (int, float)) and not isinstance(value, bool):
        value = str(int(value)) if float(value).is_integer() else str(value)  # kept as LaMP writes scores: "5"
    if not isinstance(value, str):
        line.problem(where, f"must be a string, got {_type(value)}")
        return None
    if task.family == "classification" and value not in task.labels:
        line.problem(where, f"{value!r} is not a label of {task.name} ({', '.join(task.labels)})")
        return None
    if task.family == "regression":
        low, high = task.score_range or (float("-inf"), float("inf"))
        score = score_value(value)
        if score is None or not low <= score <= high:
            line.problem(where, f"{value!r} is not a score from {low:g} to {high:g}")
            return None
    return value


def _history_item(line: _Line, task: Task, raw: Any, where: str) -> HistoryItem | None:
    if not isinstance(raw, dict):
        line.problem(where, f"must be an object, got {_type(raw)}")
        return None
    item_id = _id(line, raw, where)
    fields: dict[str, str] = {}
    for name in task.item_fields:
        value = raw.get(name)
        if name not in raw:
            line.problem(f"{where}.{name}", f"is missing (every history item of {task.name} holds "
                                            f"{', '.join(task.item_fields)})")
        elif name == task.output_field:
            value = _output(line, task, value, f"{where}.{name}")
        elif not isinstance(value, str):
            line.problem(f"{where}.{name}", f"must be a string, got {_type(value)}")
            value = None
        if value is not None:
            fields[name] = value
    date = raw.get("date")
    if date is not None and (isinstance(date, bool) or not isinstance(date, (str, int))):
        line.problem(f"{where}.date", f"must be a string or an integer, got {_type(date)}")
        return None
    if item_id is None or len(fields) < len(task.item_fields):
        return None
    fields.update({k: v for k, v in raw.items() if k not in fields and k not in ("id", "date") and isinstance(v, str)})
    return HistoryItem(id=item_id, fields=fields, date=None if date is None else str(date))


def _query(line: _Line, task: Task, raw: Any, where: str) -> Query | None:
    if not isinstance(raw, dict):
        line.problem(where, f"must be an object, got {_type(raw)}")
        return None
    query_id = _id(line, raw, where)
    for key in raw:
        if key not in QUERY_KEYS:
            line.problem(f"{where}.{key}", f"is not a key of a query ({', '.join(QUERY_KEYS)})")
    text = raw.get("input")
    if text is None:
        line.problem(f"{where}.input", "is missing")
    elif not isinstance(text, str):
        line.problem(f"{where}.input", f"must be a string, got {_type(text)}")
    elif not text.strip():
        line.problem(f"{where}.input", "is empty")
    gold = raw.get("gold")
    if gold is not None:
        gold = _output(line, task, gold, f"{where}.gold")
        if gold is None:
            return None
    if query_id is None or not isinstance(text, str) or not text.strip():
        return None
    return Query(id=query_id, input=task.ask(text), gold=gold)


def _same_ids(line: _Line, ids: list[str | None], where: str) -> None:
    """A problem for every id that an earlier entry of the same list already has."""
    first: dict[str, int] = {}
    for position, value in enumerate(ids):
        if value is not None and value in first:
            line.problem(f"{where}[{position}].id", f"{value!r} is also the id of {where}[{first[value]}]")
        elif value is not None:
            first[value] = position


def _user(line: _Line, task: Task, text: str) -> User | None:
    """One line as a user, or None with its problems added to `line`."""
    try:
        raw = json.loads(text.rstrip("\r\n"))
    except json.JSONDecodeError as error:
        line.problem("", f"not valid JSON: {error.msg} at column {error.colno}")
        return None
    if not isinstance(raw, dict):
        line.problem("", f"must be a JSON object (a user), got {_type(raw)}")
        return None
    for key in raw:
        if key not in USER_KEYS:
            line.problem(key, f"is not a key of a user ({', '.join(USER_KEYS)})")
    user_id = _id(line, raw, "")
    history, queries = raw.get("history"), raw.get("queries", [])
    if history is None:
        line.problem("history", "is missing")
    elif not isinstance(history, list):
        line.problem("history", f"must be an array, got {_type(history)}")
    elif not history:
        line.problem("history", "is empty: every user needs at least one history item")
    if not isinstance(queries, list):
        line.problem("queries", f"must be an array, got {_type(queries)}")
    items = [_history_item(line, task, item, f"history[{i}]") for i, item in enumerate(history)] \
        if isinstance(history, list) else []
    _same_ids(line, [i.id if i else None for i in items], "history")
    asked = [_query(line, task, query, f"queries[{j}]") for j, query in enumerate(queries)] \
        if isinstance(queries, list) else []
    _same_ids(line, [q.id if q else None for q in asked], "queries")
    if line.problems or user_id is None:
        return None
    return User(id=user_id, task=task.name, profile=tuple(items), queries=tuple(asked))  # type: ignore[arg-type]


def _lines(path: Path) -> Iterator[tuple[int, str]]:
    """(line number, text) of every non-blank line; DataError when the file cannot be read."""
    try:
        with path.open(encoding="utf-8") as handle:
            for number, text in enumerate(handle, start=1):
                if text.strip():
                    yield number, text
    except FileNotFoundError:
        raise DataError("does not exist", file=path) from None
    except IsADirectoryError:
        raise DataError("is a folder, not a users file (JSONL, one user per line)", file=path) from None
    except UnicodeDecodeError as error:
        raise DataError(f"is not UTF-8 text (byte {error.start})", file=path) from None


def check_users_file(task: Task, path: str | Path) -> FileCheck:
    """Every problem of a users file for `task`, one line each (file:line: field: problem), and its users' ids."""
    check = FileCheck(Path(path))
    user_lines: dict[str, int] = {}
    query_lines: dict[str, int] = {}
    try:
        for number, text in _lines(check.path):
            line = _Line(check.path, number)
            user = _user(line, task, text)
            if user is not None and user.id in user_lines:
                line.problem("id", f"user {user.id!r} is also on line {user_lines[user.id]}")
            for j, query in enumerate(user.queries if user is not None else ()):
                if query.id in query_lines:
                    line.problem(f"queries[{j}].id", f"{query.id!r} is also the id of a query on line "
                                                     f"{query_lines[query.id]}")
                query_lines.setdefault(query.id, number)
                if query.gold is None and check.without_gold is None:
                    check.without_gold = f"{check.path}:{number}: queries[{j}].gold"
            if user is not None and not line.problems:
                user_lines[user.id] = number
                check.ids.append(user.id)
                check.query_ids.append(tuple(q.id for q in user.queries))
                check.items += len(user.profile)
            check.problems += line.problems
    except DataError as error:
        check.problems.append(str(error))
    if not check.problems and not check.ids:
        check.problems.append(f"{check.path}: holds no users (a users file has one JSON object per line)")
    return check


@dataclass(frozen=True)
class UsersIndex:
    """A checked users file without its profiles: the user ids in file order and each user's query ids. Every
    later pass streams the users from the file again."""

    task: Task
    path: Path
    ids: tuple[str, ...]
    query_ids: tuple[tuple[str, ...], ...]
    without_gold: str | None


@lru_cache(maxsize=8)
def _index(task: Task, path: Path, mtime_ns: int, size: int) -> UsersIndex:
    check = check_users_file(task, path)
    if check.problems:
        more = len(check.problems) - 1
        also = f" (and {more} more problem{'s' if more > 1 else ''}: `tailor data validate` lists them all)" \
            if more else ""
        raise DataError(check.problems[0] + also)
    return UsersIndex(task, path, tuple(check.ids), tuple(check.query_ids), check.without_gold)


def users_index(task: Task, path: str | Path) -> UsersIndex:
    """Check a users file whole and index it (cached while the file is unchanged); DataError with the first
    problem, in one line, when it has any."""
    path = Path(path)
    try:
        stat = path.stat()
    except OSError:
        raise DataError("does not exist", file=path) from None
    return _index(task, path, stat.st_mtime_ns, stat.st_size)


def iter_jsonl_users(index: UsersIndex, positions: Container[int] | None = None) -> Iterator[User]:
    """The users of an indexed file, streamed in file order: every one, or those at `positions` (0-based file
    positions). None is kept after it is yielded."""
    for position, (number, text) in enumerate(_lines(index.path)):
        if positions is not None and position not in positions:
            continue
        line = _Line(index.path, number)
        user = _user(line, index.task, text)
        if user is None or position >= len(index.ids) or user.id != index.ids[position]:
            raise DataError(f"has changed since it was checked (line {number})", file=index.path)
        yield user


def load_jsonl_users(task: Task, path: str | Path) -> list[User]:
    """Every user of a users file, in file order; DataError as `users_index` raises it."""
    return list(iter_jsonl_users(users_index(task, path)))
