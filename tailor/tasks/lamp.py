"""The LaMP tasks (Salemi et al. 2023): prompts, history formats, labels, parsers and metric families.

Each task is data, not a class hierarchy: a `Task` names the profile fields an item must have, how a history item is
written into a retrieval-augmented prompt (the per-item templates of LaMP's `prompts.py`), how an item becomes an
(input, output) training example in the same wording as the task's questions, and how a raw model output is parsed.
The metric family says which of LaMP's official metrics apply (see `tailor.tasks.metrics`).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Literal

from tailor.tasks.records import HistoryItem

MetricFamily = Literal["classification", "regression", "generation"]

NEWS_CATEGORIES = (
    "women", "religion", "politics", "style & beauty", "entertainment", "culture & arts", "sports",
    "science & technology", "travel", "business", "crime", "education", "healthy living", "parents", "food & drink",
)
MOVIE_TAGS = (
    "sci-fi", "based on a book", "comedy", "action", "twist ending", "dystopia", "dark comedy", "classic",
    "psychology", "fantasy", "romance", "thought-provoking", "social commentary", "violence", "true story",
)


@dataclass(frozen=True)
class Task:
    """Everything tailor needs to know about one LaMP task.

    `item_template` writes one history item into LaMP's RAG prompt; `{body}` is the item's long field, which the
    prompt builder truncates to the token budget. `joiner`, `prefix` and `suffix` reproduce how LaMP glues the
    items in front of the question. `question` asks a history item as the task's question; `example` turns it into
    a training example (an input and the user's real output), which per-user training, the task-level fits and
    StyleVector learn from. Where a history item holds the output alone (`history_prompt`: LaMP-7's items are the
    user's tweets, with no paraphrase to start from), the example is the output after that short prompt, as OPPU
    trains on tweets: asking the item as the task's question would put its own answer in the input, an identity map
    every method learns to copy.
    """

    name: str
    aliases: tuple[str, ...]
    family: MetricFamily
    labels: tuple[str, ...]
    item_fields: tuple[str, ...]
    body_field: str
    output_field: str
    query_marker: str
    item_template: str
    question_template: str
    description: str
    suffix: str = ". "
    max_new_tokens: int = 8
    history_prompt: str | None = None
    """The prompt of a training example built from a history item that holds only an output (see `example`)."""

    # --- retrieval -------------------------------------------------------------------------------------------
    def document(self, item: HistoryItem) -> str:
        """The text BM25 indexes for an item, as LaMP's query/corpus makers build it."""
        if self.name in ("LaMP-2N", "LaMP-4"):
            return f"{item['title']} {item['text']}"
        if self.name in ("LaMP-1", "LaMP-5"):
            return f"{item['title']} {item['abstract']}"
        return item[self.body_field]

    def retrieval_query(self, query_input: str) -> str:
        """The part of a question that LaMP uses as the retrieval query (the article, review, tweet, ...)."""
        if self.name == "LaMP-1":
            quoted = re.findall(r'"([^"]*)"', query_input)
            return " ".join(quoted[1:3]) if len(quoted) >= 3 else query_input
        at = query_input.find(self.query_marker)
        return query_input[at + len(self.query_marker):].strip() if at >= 0 else query_input

    # --- prompts -----------------------------------------------------------------------------------------------
    def format_item(self, item: HistoryItem, body: str | None = None) -> str:
        values = {k: item.get(k) for k in self.item_fields}
        values["body"] = item[self.body_field] if body is None else body
        return self.item_template.format(**values)

    def join_history(self, formatted_items: list[str], query_input: str) -> str:
        """Put formatted history in front of (or, for LaMP-1, inside) the question, as LaMP does."""
        if not formatted_items:
            return query_input
        history = ", and ".join(formatted_items)
        if self.name == "LaMP-1":
            at = query_input.find("title")
            if at < 0:
                return f"{history}. {query_input}"
            return f"{query_input[:at + 5]}, and {history}{query_input[at + 5:]}"
        return f"{history}{self.suffix}{query_input}"

    def question(self, item: HistoryItem) -> str:
        """A history item asked as the task's question (LaMP-1: the title of the user's paper from its abstract;
        LaMP-7: the user's own tweet to paraphrase)."""
        values = {k: item.get(k) for k in self.item_fields}
        return self.question_template.format(**values)

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


_REVIEW_Q = ("What is the score of the following review on a scale of 1 to 5? just answer with 1, 2, 3, 4, or 5 "
             "without further explanation. review: {text}")

TASKS: dict[str, Task] = {
    t.name: t
    for t in (
        Task(
            name="LaMP-1", aliases=("lamp1", "LaMP_1", "1"), family="classification", labels=("[1]", "[2]"),
            item_fields=("title", "abstract"), body_field="title", output_field="title", query_marker='"',
            item_template='"{body}"',
            question_template="Generate a title for the following abstract of a paper: {abstract}",
            description="Academic citation recommendation: Identify relevant reference papers for researchers based "
                        "on their publication titles and research focus areas.",
        ),
        Task(
            name="LaMP-2N", aliases=("lamp2n", "LaMP_2N", "2N", "LaMP-2-old"), family="classification",
            labels=NEWS_CATEGORIES, item_fields=("text", "title", "category"), body_field="text",
            output_field="category", query_marker="article:",
            item_template='the category for the article: "{body}" is "{category}" ',
            question_template="Which category does this article relate to among the following categories? Just "
                              "answer with the category name without further explanation. categories: ["
                              + ", ".join(NEWS_CATEGORIES) + "] article: {text}",
            description="News article categorization: Classify news articles into topical categories based on "
                        "content, subject matter, and thematic focus.",
        ),
        Task(
            name="LaMP-2M", aliases=("lamp2m", "LaMP_2M", "2M", "lamp2", "LaMP-2"), family="classification",
            labels=MOVIE_TAGS, item_fields=("description", "tag"), body_field="description", output_field="tag",
            query_marker="description:", item_template='the tag for the movie: "{body}" is "{tag}" ',
            question_template="Which tag does this movie relate to among the following tags? Just answer with the "
                              "tag name without further explanation. tags: [" + ", ".join(MOVIE_TAGS)
                              + "] description: {description}",
            description="Movie genre tagging: Analyze movie descriptions and assign appropriate genre tags based on "
                        "content themes, narrative elements, and stylistic features.",
        ),
        Task(
            name="LaMP-3", aliases=("lamp3", "LaMP_3", "3"), family="regression", labels=("1", "2", "3", "4", "5"),
            item_fields=("text", "score"), body_field="text", output_field="score", query_marker="review:",
            item_template='{score} is the score for "{body}" ', question_template=_REVIEW_Q,
            description="Product review rating prediction: Analyze product reviews and predict the rating score "
                        "based on sentiment, content quality, and expressed satisfaction levels.",
            max_new_tokens=4,
        ),
        Task(
            name="LaMP-4", aliases=("lamp4", "LaMP_4", "4"), family="generation", labels=(),
            item_fields=("text", "title"), body_field="text", output_field="title", query_marker="article:",
            item_template='"{title}" is the title for "{body}" ',
            question_template="Generate a headline for the following article: {text}",
            description="News article headline generation: Create a concise and engaging headline for news articles "
                        "based on their content and key themes.",
            max_new_tokens=32,
        ),
        Task(
            name="LaMP-5", aliases=("lamp5", "LaMP_5", "5"), family="generation", labels=(),
            item_fields=("title", "abstract"), body_field="abstract", output_field="title", query_marker="paper:",
            item_template='"{title}" is a title for "{body}" ', suffix=". Following the given patterns ",
            question_template="Generate a title for the following abstract of a paper: {abstract}",
            description="Academic title generation: Generate concise and descriptive titles for research papers based "
                        "on abstracts, capturing the main research contribution and scope.",
            max_new_tokens=32,
        ),
        Task(
            name="LaMP-7", aliases=("lamp7", "LaMP_7", "7"), family="generation", labels=(), item_fields=("text",),
            body_field="text", output_field="text", query_marker=":", item_template='"{body}" ',
            suffix=" are written by a person. Following the given patterns ",
            question_template="Paraphrase the following tweet without any explanation before or after it: {text}",
            history_prompt="tweet:",
            description="Tweet paraphrasing: Rewrite tweets in a personal style while maintaining the original "
                        "meaning and adapting the tone and language to individual communication patterns.",
            max_new_tokens=48,
        ),
    )
}

_ALIASES = {a.lower(): t for t in TASKS.values() for a in (t.name, *t.aliases)}


def get_task(name: str) -> Task:
    """Look a task up by any of its names (`lamp2m`, `LaMP-2M`, `LaMP_2M`, `2M`)."""
    task = _ALIASES.get(name.strip().lower())
    if task is None:
        known = ", ".join(TASKS)
        raise KeyError(f"unknown task {name!r}; known tasks: {known}")
    return task


def score_value(text: str) -> float | None:
    """A LaMP-3 answer as LaMP reads it: Python's float() of the stripped text, or None when that fails."""
    try:
        return float(text.strip())
    except ValueError:
        return None

