"""Tasks: what a user's records look like, how a question is asked, and how an answer is scored.

`get_task("lamp2m")` returns a task's prompts, label set and parser (`tailor.tasks.lamp`); `tailor.tasks.records`
holds the records every layer passes around (`User`, `HistoryItem`, `Query`); `tailor.tasks.metrics` LaMP's official
metrics and `tailor.tasks.stats` the bootstrap over users that puts intervals and paired tests on them.
"""

from tailor.tasks.lamp import MOVIE_TAGS, NEWS_CATEGORIES, TASKS, Task, get_task, score_value
from tailor.tasks.records import HistoryItem, Query, User

__all__ = ["MOVIE_TAGS", "NEWS_CATEGORIES", "TASKS", "HistoryItem", "Query", "Task", "User", "get_task", "score_value"]
