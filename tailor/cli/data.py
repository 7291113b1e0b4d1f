"""`tailor data`: check a users file against a task, inspect the LaMP data folder, download the official LaMP files.

`validate` reads a users file (JSONL) as `tailor eval --data` would and prints every problem, one line each with the
file, line and field, where a run stops at the first; it writes nothing.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console
from rich.table import Table

from tailor.cli._options import DataDir, TaskName, console

data_app = typer.Typer(help="Users' data: check a users file against a task; LaMP's: inspect it, download it.",
                       no_args_is_help=True)


@data_app.command("validate")
def data_validate(
    task: TaskName,
    data: Annotated[list[Path], typer.Option("--data", help="users file(s) to check (JSONL, one user per line)")],
) -> None:
    """Check users files (JSONL) against a task, listing every problem.

    Each problem is one line, file:line: field: problem; the exit code is 2 when there is any. Writes nothing."""
    from tailor.data.jsonl import check_users_file
    from tailor.data.lamp import DataError
    from tailor.tasks.lamp import get_task

    definition = get_task(task)
    problems = 0
    for path in data:
        check = check_users_file(definition, path)
        for problem in check.problems:
            typer.echo(problem)
        problems += len(check.problems)
        if not check.problems:
            typer.echo(f"{path}: {len(check.ids)} users, {check.items} history items, "
                       f"{sum(map(len, check.query_ids))} queries: no problems", err=True)
    if problems:  # main() prints it in one line and exits with code 2, as for any bad data
        raise DataError(f"{problems} problem{'s' if problems > 1 else ''} in {', '.join(map(str, data))}")


@data_app.command("info")
def data_info(data_dir: DataDir = None, variant: str = "user") -> None:
    """List the LaMP tasks found in the data folder with their user counts."""
    from tailor.data.lamp import available_tasks, load_users, resolve_data_dir

    root = resolve_data_dir(data_dir)
    table = Table(title=f"LaMP data in {root}")
    for column in ("task", "train users", "dev users", "mean profile (dev)"):
        table.add_column(column)
    for name in available_tasks(data_dir, variant):
        counts = []
        for split in ("train", "dev"):
            try:
                counts.append(load_users(name, split, data_dir, variant))
            except Exception as error:  # a missing split is shown, not fatal
                counts.append(error)
        dev = counts[1]
        mean = f"{sum(len(u) for u in dev) / len(dev):.1f}" if isinstance(dev, list) and dev else "-"
        table.add_row(name, *[str(len(c)) if isinstance(c, list) else "missing" for c in counts], mean)
    Console().print(table)


@data_app.command("download")
def data_download(
    task: Annotated[list[str], typer.Option(help="task(s) to fetch, e.g. --task lamp2m --task lamp3")],
    split: Annotated[list[str], typer.Option(help="splits to fetch")] = ["train", "dev"],
    variant: str = "user",
    cache_dir: Annotated[Optional[Path], typer.Option(help="default: $TAILOR_CACHE or ~/.cache/tailor")] = None,
    base_url: Annotated[Optional[str], typer.Option(help="mirror of the official LaMP download folder")] = None,
) -> None:
    """Fetch the official LaMP files into the cache (resumable, checksums recorded)."""
    from tailor.data.download import OFFICIAL_BASE, download_task

    for name in task:
        folder = download_task(name, splits=tuple(split), variant=variant, cache_dir=cache_dir,
                               base_url=base_url or OFFICIAL_BASE)
        console.print(f"{name}: files in {folder} (use --data-dir {folder})")

