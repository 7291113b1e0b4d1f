"""What a task is, as data: prompts, history format, labels or score range, parser and metric family.

A `Task` holds no code of its own task: everything that differs between tasks is a field, read from the task's TOML
file (`tailor.tasks.taskfile`). The LaMP tasks are such files shipped in the package (`tailor.tasks.lamp`), and a
user's own task is one more file, so nothing downstream can tell them apart. What once were `if name == "LaMP-1"`
branches are fields too: what BM25 indexes (`document_template`), how the retrieval query is cut out of a question
(`query_marker`, `query_end`, `query_quotes`) and where the history goes (`prefix`, `joiner`, `suffix`,
`history_after`).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Literal

from tailor.tasks.records import HistoryItem

MetricFamily = Literal["classification", "regression", "generation"]

FAMILY_METRICS: dict[MetricFamily, tuple[str, ...]] = {
    "classification": ("accuracy", "f1"),
    "regression": ("mae", "rmse"),
    "generation": ("rouge1", "rougeL"),
}
"""The metrics each family is scored by, in LaMP's order (computed by `tailor.tasks.metrics`)."""

INPUT = "input"
"""The placeholder of a query's input in the question of a task whose data files hold bare inputs (`input_field`)."""


@dataclass(frozen=True)
class Task:
    """Everything tailor needs to know about one task.

    `item_template` writes one history item into a retrieval-augmented prompt; `{body}` is the item's long field,
    which the prompt builder truncates to the token budget. `prefix`, `joiner` and `suffix` glue the items in front
    of the question (`join_history`). `question_template` asks a history item as the task's question; `example`
    turns it into a training example (an input and the user's real output), which per-user training, the task-level
    fits and StyleVector learn from. Where a history item holds the output alone (`history_prompt`: LaMP-7's items
    are the user's tweets, with no paraphrase to start from), the example is the output after that short prompt, as
    OPPU trains on tweets: asking the item as the task's question would put its own answer in the input, an identity
    map every method learns to copy.
    """

    name: str
    aliases: tuple[str, ...]
    family: MetricFamily
    labels: tuple[str, ...]
    item_fields: tuple[str, ...]
    body_field: str
    output_field: str
    query_marker: str
    """The retrieval query is what follows the first occurrence of this in a question (all of it when absent)."""
    item_template: str
    question_template: str
    description: str
    suffix: str = ". "
    max_new_tokens: int = 8
    history_prompt: str | None = None
    """The prompt of a training example built from a history item that holds only an output (see `example`)."""
    prefix: str = ""
    """Written before the history items."""
    joiner: str = ", and "
    """Written between two history items."""
    history_after: str | None = None
    """The history goes inside the question, right after the first occurrence of this text, joined by `joiner`
    (LaMP-1: after "title"); in front of the question when the question lacks it or when None."""
    document_template: str | None = None
    """What BM25 indexes for an item, over the item's fields (LaMP-4: "{title} {text}"); None: the body field."""
    query_end: str = ""
    """When set, the retrieval query also stops before the last occurrence of this (a question going on after its
    input)."""
    query_quotes: tuple[int, int] | None = None
    """When set, the retrieval query is instead the double-quoted strings [start:stop] of a question, joined by
    spaces, or the whole question when it has fewer than `stop` of them (LaMP-1: its two candidate papers)."""
    input_field: str | None = None
    """The history field a data file's query input corresponds to: a query is asked as `question_template` with
    its input as `{input}`, as a history item is with this field. None: a query's input is the whole question
    already, as in LaMP's files."""
    score_range: tuple[float, float] | None = None
    """A regression task's lowest and highest score (LaMP-3: 1 to 5); an unparseable answer is scored as the end
    farther from the gold."""

    # --- retrieval -------------------------------------------------------------------------------------------
    def document(self, item: HistoryItem) -> str:
        """The text BM25 indexes for an item, as LaMP's query/corpus makers build it."""
        if self.document_template is None:
            return item[self.body_field]
        return self.document_template.format(**self._values(item))

    def retrieval_query(self, query_input: str) -> str:
        """The part of a question used as the retrieval query (the article, review, tweet, ticket, ...)."""
        if self.query_quotes is not None:
            start, stop = self.query_quotes
            quoted = re.findall(r'"([^"]*)"', query_input)
            return " ".join(quoted[start:stop]) if len(quoted) >= stop else query_input
        at = query_input.find(self.query_marker)
        if at < 0:
            return query_input
        rest = query_input[at + len(self.query_marker):]
        end = rest.rfind(self.query_end) if self.query_end else -1
        return (rest[:end] if end >= 0 else rest).strip()

    # --- prompts -----------------------------------------------------------------------------------------------
    def _values(self, item: HistoryItem) -> dict[str, str]:
        values = {k: item.get(k) for k in self.item_fields}
        if self.input_field is not None:
            values[INPUT] = item.get(self.input_field)
        return values

    def format_item(self, item: HistoryItem, body: str | None = None) -> str:
        values = self._values(item)
        values["body"] = item[self.body_field] if body is None else body
        return self.item_template.format(**values)

    def join_history(self, formatted_items: list[str], query_input: str) -> str:
        """Put formatted history in front of (or, with `history_after`, inside) the question."""
        if not formatted_items:
            return query_input
        history = self.joiner.join(formatted_items)
        at = query_input.find(self.history_after) if self.history_after is not None else -1
        if at >= 0:
            end = at + len(self.history_after)  # type: ignore[arg-type]
            return f"{query_input[:end]}{self.joiner}{history}{query_input[end:]}"
        return f"{self.prefix}{history}{self.suffix}{query_input}"

    def ask(self, query_input: str) -> str:
        """A data file's query input as the question the model is asked (unchanged where inputs are questions)."""
        if self.input_field is None:
            return query_input
        return self.question_template.format(**{INPUT: query_input})

    def question(self, item: HistoryItem) -> str:
        """A history item asked as the task's question (LaMP-1: the title of the user's paper from its abstract;
        LaMP-7: the user's own tweet to paraphrase)."""
        return self.question_template.format(**self._values(item))

    def example(self, item: HistoryItem) -> tuple[str, str]:
        """A history item as a training example: (input, the user's output). The input is the item asked as the
        task's question, or, for a task whose items hold only the output (`history_prompt`, LaMP-7), that prompt:
        the example is then the user's own text, language-modelled (OPPU's "tweet: {text}"), not an identity map."""
        if self.history_prompt is not None:
            return self.history_prompt, item[self.output_field]
        return self.question(item), item[self.output_field]

    def item_output(self, item: HistoryItem) -> str:
        return item[self.output_field]

    # --- outputs -----------------------------------------------------------------------------------------------
    def parse(self, raw: str) -> str:
        """Clean a generated answer the way a reader of the output would: first line, no quotes around it.

        The metrics still apply LaMP's strict rules to the cleaned text (an exact label match, a float score).
        """
        text = raw.strip()
        if self.family == "generation":
            return text.split("\n")[0].strip()
        first = text.split("\n")[0].strip().strip('"\'').strip()
        if self.family == "classification":
            lowered = first.lower().rstrip(".")
            for label in self.labels:
                if lowered == label.lower():
                    return label
            return first
        match = re.search(r"[-+]?\d+(?:\.\d+)?", first)
        return match.group(0) if match else first


class TaskError(KeyError):
    """An unknown task name or a bad task file, in one line that says which and why.

    A KeyError, as an unknown task name always was, so every caller that reports an unknown task reports a bad file
    the same way."""

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else ""


def score_value(text: str) -> float | None:
    """A regression answer as LaMP reads it: Python's float() of the stripped text, or None when that fails."""
    try:
        return float(text.strip())
    except ValueError:
        return None
