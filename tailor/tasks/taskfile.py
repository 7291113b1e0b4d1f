"""Task files: a task's definition in TOML, read into a `Task` and checked before anything uses it.

The LaMP tasks ship as such files (tailor/tasks/definitions/) and a user's task is one more, so a new task needs no
Python. Everything is checked when the file is read, each problem one line naming the file and the key: a template
using a field the history items do not have is found here, not as a KeyError in the middle of a run.

    name = "tickets"
    description = "Support-ticket priority: ..."
    kind = "classification"            # or regression (with range = [low, high]) or generation
    labels = ["low", "normal", "high", "urgent"]

    [history]
    fields = ["text", "priority"]      # what every history item holds
    input = "text"                     # the field a query's input corresponds to
    output = "priority"                # the user's answer
    item = '"{body}" was {priority}'   # one history item in a prompt; {body}: the long field, cut to fit

    [prompt]
    question = "Ticket: {input}\\nPriority:"
    prefix = "Earlier tickets: "
    joiner = "; "
    suffix = "\\n\\n"

examples/README.md documents every key; tailor/tasks/definitions/*.toml use the LaMP-only ones.
"""

from __future__ import annotations

import tomllib
from dataclasses import dataclass
from pathlib import Path
from string import Formatter
from typing import Any, get_args

from tailor.tasks.task import FAMILY_METRICS, INPUT, MetricFamily, Task, TaskError

KINDS: tuple[MetricFamily, ...] = get_args(MetricFamily)

_KEYS: dict[str, tuple[str, ...]] = {
    "": ("name", "aliases", "description", "kind", "labels", "range", "metrics", "max_new_tokens", "history",
         "prompt", "retrieval"),
    "history": ("fields", "body", "output", "input", "item", "example_prompt"),
    "prompt": ("question", "prefix", "joiner", "suffix", "history_after"),
    "retrieval": ("document", "query_after", "query_end", "query_quotes"),
}
_ABSENT = object()


@dataclass(frozen=True)
class _Table:
    """One table of a task file, with the file and the table's name for the error messages."""

    path: Path
    name: str
    values: dict[str, Any]

    def where(self, key: str) -> str:
        return f"{self.name}.{key}" if self.name else key

    def fail(self, key: str, problem: str) -> TaskError:
        return TaskError(f"{self.path}: {self.where(key)}: {problem}")

    def get(self, key: str, kind: type, default: Any = _ABSENT) -> Any:
        value = self.values.get(key, _ABSENT)
        if value is _ABSENT:
            if default is _ABSENT:
                raise self.fail(key, "is missing")
            return default
        wanted = {str: "a string", int: "an integer", list: "a list"}[kind]
        if not isinstance(value, kind) or isinstance(value, bool):
            raise self.fail(key, f"must be {wanted}, got {type(value).__name__} {value!r}")
        return value

    def strings(self, key: str, default: Any = _ABSENT) -> tuple[str, ...]:
        if key not in self.values and default is not _ABSENT:
            return default
        value = self.get(key, list)
        if not all(isinstance(v, str) and v for v in value):
            raise self.fail(key, f"must be a list of non-empty strings, got {value!r}")
        if len(set(value)) != len(value):
            raise self.fail(key, f"lists a value twice: {value!r}")
        return tuple(value)

    def table(self, key: str) -> "_Table":
        value = self.values.get(key, {})
        if not isinstance(value, dict):
            raise self.fail(key, f"must be a table ([{key}]), got {type(value).__name__}")
        return _Table(self.path, key, value)

    def check_keys(self) -> None:
        known = _KEYS[self.name]
        for key in self.values:
            if key not in known:
                raise self.fail(key, f"is not a key of a task file's {f'[{self.name}]' if self.name else 'top level'}"
                                     f" (known: {', '.join(known)})")


def _placeholders(table: _Table, key: str, template: str, allowed: tuple[str, ...]) -> list[str]:
    """The fields a template uses, each one of `allowed`; a malformed template or an unknown field fails."""
    try:
        used = [field for _, field, _, _ in Formatter().parse(template) if field is not None]
    except ValueError as error:
        raise table.fail(key, f"is not a valid template ({error}); write {{{{ and }}}} for literal braces") from None
    for field in used:
        if field not in allowed:
            raise table.fail(key, f"uses {{{field}}}, which is not one of {', '.join('{' + a + '}' for a in allowed)}")
    return used


def _literal(template: str) -> str:
    """A template's text with its doubled braces read as single ones (a template without placeholders)."""
    return "".join(text for text, _, _, _ in Formatter().parse(template))


def _labels(top: _Table, family: MetricFamily) -> tuple[tuple[str, ...], tuple[float, float] | None]:
    """The label set and, for a regression task, the score range; each checked against the task's kind."""
    if family == "generation":
        for key in ("labels", "range"):
            if key in top.values:
                raise top.fail(key, "is for classification and regression tasks; a generation task has none")
        return (), None
    if family == "classification":
        if "range" in top.values:
            raise top.fail("range", "is for regression tasks; a classification task has labels")
        labels = top.strings("labels")
        if not labels:
            raise top.fail("labels", "is empty: a classification task needs its labels")
        return labels, None
    bounds = top.get("range", list)
    if len(bounds) != 2 or not all(isinstance(b, (int, float)) and not isinstance(b, bool) for b in bounds) \
            or bounds[0] >= bounds[1]:
        raise top.fail("range", f"must be [lowest, highest] score, two numbers in increasing order, got {bounds!r}")
    low, high = float(bounds[0]), float(bounds[1])
    if "labels" not in top.values:
        if not (low.is_integer() and high.is_integer()):
            raise top.fail("labels", "is missing: a range with fractional ends needs the scores listed as labels")
        return tuple(str(i) for i in range(int(low), int(high) + 1)), (low, high)
    labels = top.strings("labels")
    for label in labels:
        try:
            value = float(label)
        except ValueError:
            raise top.fail("labels", f"{label!r} is not a number: a regression task's labels are scores") from None
        if not low <= value <= high:
            raise top.fail("labels", f"{label!r} is outside the range {bounds[0]} to {bounds[1]}")
    return labels, (low, high)


def _query_cut(retrieval: _Table, question: str, input_field: str | None) -> tuple[str, str, tuple[int, int] | None]:
    """How the retrieval query is cut out of a question: (marker, end, quotes). A task whose queries are asked
    through its question (`input`) cuts, by default, exactly the text around `{input}` away."""
    quotes = retrieval.get("query_quotes", list, None)
    if quotes is not None:
        if len(quotes) != 2 or not all(isinstance(q, int) and not isinstance(q, bool) and q >= 0 for q in quotes) \
                or quotes[0] >= quotes[1]:
            raise retrieval.fail("query_quotes", f"must be [start, stop], two increasing counts, got {quotes!r}")
        quotes = (quotes[0], quotes[1])
    if "query_after" in retrieval.values or input_field is None:
        return retrieval.get("query_after", str, ""), retrieval.get("query_end", str, ""), quotes
    before, _, after = question.partition("{" + INPUT + "}")
    return _literal(before).rstrip(), retrieval.get("query_end", str, _literal(after)), quotes


def read_task_file(path: Path) -> Task:
    """The task a TOML file defines; TaskError, naming the file and key, on anything missing or wrong."""
    try:
        document = tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise TaskError(f"task file {path} does not exist") from None
    except (OSError, UnicodeDecodeError) as error:
        raise TaskError(f"task file {path} cannot be read: {error}") from None
    except tomllib.TOMLDecodeError as error:
        raise TaskError(f"{path}: not valid TOML: {error}") from None
    top = _Table(path, "", document)
    top.check_keys()
    history, prompt, retrieval = top.table("history"), top.table("prompt"), top.table("retrieval")
    for table in (history, prompt, retrieval):
        table.check_keys()

    kind = top.get("kind", str)
    if kind not in KINDS:
        raise top.fail("kind", f"is {kind!r}; expected one of {', '.join(KINDS)}")
    family: MetricFamily = kind  # type: ignore[assignment]
    labels, score_range = _labels(top, family)
    metrics = top.strings("metrics", None)
    if metrics is not None and sorted(metrics) != sorted(FAMILY_METRICS[family]):
        raise top.fail("metrics", f"a {family} task is scored by {', '.join(FAMILY_METRICS[family])}, "
                                  f"not {', '.join(metrics)}")
    max_new_tokens = top.get("max_new_tokens", int, 8)
    if max_new_tokens < 1:
        raise top.fail("max_new_tokens", f"must be at least 1, not {max_new_tokens}")

    fields = history.strings("fields")
    if not fields:
        raise history.fail("fields", "is empty: name the fields every history item holds")
    input_field = history.get("input", str, None)
    for key, value in (("input", input_field), ("body", history.values.get("body")),
                       ("output", history.values.get("output"))):
        if isinstance(value, str) and value not in fields:
            raise history.fail(key, f"is {value!r}, which is not one of the history fields ({', '.join(fields)})")
    body = history.get("body", str, input_field)
    if body is None:
        raise history.fail("body", "is missing: name the long field of an item (the one cut to fit the prompt)")
    output = history.get("output", str)
    named = (*fields, INPUT) if input_field is not None else fields
    item = history.get("item", str)
    _placeholders(history, "item", item, (*named, "body"))

    question = prompt.get("question", str)
    if input_field is not None:
        if _placeholders(prompt, "question", question, named) != [INPUT]:
            raise prompt.fail("question", "must use {input} exactly once: a query's input, or a history item's "
                                          f"{input_field!r}, asked as the task's question")
    else:
        _placeholders(prompt, "question", question, fields)
    document = retrieval.get("document", str, None)
    if document is not None:
        _placeholders(retrieval, "document", document, named)
    marker, end, quotes = _query_cut(retrieval, question, input_field)

    name = top.get("name", str)
    if not name.strip():
        raise top.fail("name", "is empty")
    return Task(
        name=name, aliases=top.strings("aliases", ()), family=family, labels=labels, item_fields=fields,
        body_field=body, output_field=output, query_marker=marker, item_template=item, question_template=question,
        description=top.get("description", str), suffix=prompt.get("suffix", str, ". "),
        max_new_tokens=max_new_tokens, history_prompt=history.get("example_prompt", str, None),
        prefix=prompt.get("prefix", str, ""), joiner=prompt.get("joiner", str, ", and "),
        history_after=prompt.get("history_after", str, None), document_template=document, query_end=end,
        query_quotes=quotes, input_field=input_field, score_range=score_range,
    )
