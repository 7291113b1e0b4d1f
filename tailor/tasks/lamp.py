"""The tasks tailor knows: LaMP's (Salemi et al. 2023), shipped as task files, and any task file given by path.

LaMP's tasks are data like any other (tailor/tasks/definitions/*.toml, read by `tailor.tasks.taskfile`), so a
user's task runs through the same code with no branch of its own. `get_task` takes a task's name or alias
(`lamp2m`, `LaMP-2M`, `2M`) or the path of a .toml file; a task read from a file is then also known by its name in
this process, so a state or user record naming it (P2P's `user.task`) finds it again.
"""

from __future__ import annotations

from importlib.resources import files
from pathlib import Path

from tailor.tasks.task import MetricFamily, Task, TaskError, score_value
from tailor.tasks.taskfile import read_task_file

__all__ = ["MOVIE_TAGS", "NEWS_CATEGORIES", "TASKS", "MetricFamily", "Task", "TaskError", "get_task", "score_value",
           "task_file"]

_LAMP_FILES = ("lamp1", "lamp2n", "lamp2m", "lamp3", "lamp4", "lamp5", "lamp7")
"""The packaged definitions, in LaMP's order (the order `tailor data info` and error messages list them in)."""

TASKS: dict[str, Task] = {
    task.name: task
    for task in (read_task_file(Path(str(files("tailor.tasks") / "definitions" / f"{stem}.toml")))
                 for stem in _LAMP_FILES)
}

NEWS_CATEGORIES = TASKS["LaMP-2N"].labels
MOVIE_TAGS = TASKS["LaMP-2M"].labels

_ALIASES = {a.lower(): t for t in TASKS.values() for a in (t.name, *t.aliases)}
_FROM_FILES: dict[str, Task] = {}
"""Tasks read from files in this process, by every lowercased name and alias (the file read last wins)."""


def task_file(name: str) -> Path | None:
    """The task file a `--task` value names (it ends in .toml), or None for a task name."""
    return Path(name).expanduser() if name.strip().lower().endswith(".toml") else None


def _read(path: Path) -> Task:
    task = read_task_file(path)
    for alias in (task.name, *task.aliases):
        if alias.lower() in _ALIASES:
            raise TaskError(f"{path}: the name {alias!r} is taken by the built-in task {_ALIASES[alias.lower()].name};"
                            f" give the task another name")
    _FROM_FILES.update({alias.lower(): task for alias in (task.name, *task.aliases)})
    return task


def get_task(name: str) -> Task:
    """A task by any of its names (`lamp2m`, `LaMP-2M`, `LaMP_2M`, `2M`), or the task a .toml file defines."""
    path = task_file(name)
    if path is not None:
        return _read(path)
    task = _ALIASES.get(name.strip().lower()) or _FROM_FILES.get(name.strip().lower())
    if task is None:
        users_file = " (a users file goes to --data)" if name.strip().lower().endswith(".jsonl") else ""
        raise TaskError(f"unknown task {name!r}{users_file}; known tasks: {', '.join(TASKS)}, or the path of a task "
                        f"file (.toml, see examples/README.md)")
    return task
