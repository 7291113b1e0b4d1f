"""LaMP task definitions: `get_task("lamp2m")` returns the prompt, label set, parser and metric family."""

from tailor.tasks.lamp import MOVIE_TAGS, NEWS_CATEGORIES, TASKS, Task, get_task, score_value

__all__ = ["MOVIE_TAGS", "NEWS_CATEGORIES", "TASKS", "Task", "get_task", "score_value"]
