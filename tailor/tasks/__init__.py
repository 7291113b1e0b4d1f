"""Tasks: what a user's records look like, how a question is asked, and how an answer is scored.

A task is data: `tailor.tasks.task` holds the `Task` every layer asks for prompts, labels and parsing, and
`tailor.tasks.taskfile` reads one from a TOML file. `get_task("lamp2m")` returns one of LaMP's tasks, shipped as such
files (`tailor.tasks.lamp`), and `get_task("my-task.toml")` a user's own. `tailor.tasks.records` holds the records
every layer passes around (`User`, `HistoryItem`, `Query`); `tailor.tasks.metrics` LaMP's official metrics and
`tailor.tasks.stats` the bootstrap over users that puts intervals and paired tests on them.
"""

from tailor.tasks.lamp import MOVIE_TAGS, NEWS_CATEGORIES, TASKS, Task, TaskError, get_task, score_value
from tailor.tasks.records import HistoryItem, Query, User

__all__ = ["MOVIE_TAGS", "NEWS_CATEGORIES", "TASKS", "HistoryItem", "Query", "Task", "TaskError", "User", "get_task",
           "score_value"]
