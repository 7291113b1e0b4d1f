"""The `tailor` command line: data, eval, report, demo."""

from __future__ import annotations

import dataclasses
import logging
import os
import sys
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Callable, Iterator, Optional

import click
import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table

from tailor.distributed.cli import RayAddress, WorkerThreads, Workers, ray_argv, register

if TYPE_CHECKING:  # the runner imports torch; `tailor --help` should not
    from tailor.eval.runner import EvalSpec

app = typer.Typer(help="Personalize a language model for each of its users.", no_args_is_help=True,
                  pretty_exceptions_enable=False)  # main() prints user errors in one line; bugs get Python's traceback
data_app = typer.Typer(help="LaMP data: inspect it, download the official files.", no_args_is_help=True)
app.add_typer(data_app, name="data")
register(app)
app.command("serve")(__import__("tailor.serve.cli", fromlist=["serve"]).serve)
console = Console(stderr=True)

DataDir = Annotated[Optional[Path], typer.Option("--data-dir", help="LaMP data folder (default: $TAILOR_DATA, "
                                                 "then ../shared/lamp)")]
Model = Annotated[str, typer.Option(help="packaged model (smollm2-135m, qwen2.5-coder-0.5b) or a local HF folder")]


def _threads() -> None:
    import torch

    torch.set_num_threads(int(os.environ.get("TAILOR_THREADS", os.cpu_count() or 1)))


@contextmanager
def _progress() -> Iterator[Callable[[str, int, int], Callable[[int], None]]]:
    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  TextColumn("eta"), TimeRemainingColumn(), console=console, transient=False) as bar:
        def start(description: str, done: int, total: int) -> Callable[[int], None]:
            task_id = bar.add_task(description, total=total, completed=done)
            return lambda n: bar.advance(task_id, n)
        yield start


def parse_options(pairs: list[str]) -> dict[str, object]:
    """`--set KEY=VALUE` pairs as method options: ints, floats and true/false cast, dashes in keys read as
    underscores. The benchmark scripts parse their `--set` with this too, so a value means the same everywhere."""
    options: dict[str, object] = {}
    for pair in pairs:
        key, sep, raw = pair.partition("=")
        if not sep:
            raise typer.BadParameter(f"--set takes KEY=VALUE, got {pair!r}")
        value: object = raw
        for cast in (int, float):
            try:
                value = cast(raw)
                break
            except ValueError:
                continue
        if raw.lower() in ("true", "false"):
            value = raw.lower() == "true"
        options[key.strip().replace("-", "_")] = value
    return options


DEFAULT_BATCH_SIZE = 8


def merge_flags(options: dict[str, object], flags: dict[str, object | None]) -> dict[str, object]:
    """The method options of `--set` and of the flags (`--k 2`, `--batch-size 4`, ...), with the default batch size.

    The flags are shorthands for `--set` options; a flag left out leaves the `--set` value alone, and one option
    given both ways with different values is refused, not silently resolved.
    """
    merged = {"batch_size": DEFAULT_BATCH_SIZE, **options}
    for name, value in flags.items():
        if value is None:
            continue
        if name in options and options[name] != value:
            flag = "--" + name.replace("_", "-")
            raise typer.BadParameter(f"{flag} {value} and --set {name}={options[name]} disagree; give one")
        merged[name] = value
    return merged


def _check_options(method: str, options: dict[str, object]) -> None:
    cls = _resolve_method(method)
    fields = {f.name for f in dataclasses.fields(cls.config_class)}
    unknown = sorted(set(options) - fields)
    if unknown:
        raise typer.BadParameter(f"{method} has no option {', '.join(unknown)}; it has {', '.join(sorted(fields))}")
    try:
        cls.config_class(**options)  # a config that checks its values says what is wrong before anything loads
    except ValueError as error:
        raise typer.BadParameter(str(error), param_hint="--set") from None


def _resolve_method(method: str) -> type:
    """The method's class: a registered name or module:Class; an unknown one fails in one line at --method."""
    from tailor.methods import method_class

    try:
        return method_class(method)
    except KeyError as error:
        raise typer.BadParameter(error.args[0], param_hint="--method") from None


def _check_spec(spec: EvalSpec) -> None:
    """A bad task, split, user count or data folder fails in one line before the model loads."""
    from tailor.data.lamp import DataError

    try:
        spec.check()
    except DataError:
        raise  # main() prints it in one line, as for bad data found later
    except ValueError as error:
        raise typer.BadParameter(str(error)) from None


def _load_backbone(model: str, dtype: str):
    from tailor.backbone.model import Backbone

    with console.status(f"loading {model} ({dtype})"):
        return Backbone.load(model, dtype=dtype)  # type: ignore[arg-type]


@app.command("eval")
def eval_command(
    task: Annotated[str, typer.Option(help="lamp1, lamp2n, lamp2m, lamp3, lamp4, lamp5, lamp7")],
    method: Annotated[str, typer.Option(help="global-prior, user-prior, none, rag, pag, full, chameleon, perfit, "
                                             "p2p, mt-lora, lora-p, oppu, stylevector, dpo, or module:Class of "
                                             "your own Personalizer")],
    out: Annotated[Path, typer.Option(help="run folder; rerunning the same command there resumes")],
    users: Annotated[Optional[int], typer.Option(help="a seeded sample of this many users (default: all)")] = None,
    seed: int = 0,
    split: Annotated[str, typer.Option(help="dev, train, or Profile-to-PEFT's random / ood split of the training "
                                             "users (fit on the rest)")] = "dev",
    variant: Annotated[str, typer.Option(help="user (LaMP's user-based split) or time")] = "user",
    histories: Annotated[str, typer.Option(help="own, or swapped: each user answered with another user's history "
                                                "(a control that must not help)")] = "own",
    k: Annotated[Optional[int], typer.Option(help="retrieved history items (rag, pag)")] = None,
    mode: Annotated[Optional[str], typer.Option(help="scoring or generation (classification tasks)")] = None,
    calibrate: Annotated[bool, typer.Option(help="contextual calibration of label scores")] = False,
    batch_size: Annotated[Optional[int], typer.Option(help="rows per forward pass (default 8)")] = None,
    set_: Annotated[list[str], typer.Option("--set", help="method option KEY=VALUE (repeatable)")] = [],
    model: Model = "smollm2-135m",
    dtype: Annotated[str, typer.Option(help="float32 or bfloat16")] = "float32",
    label: Annotated[Optional[str], typer.Option(help="name shown in reports")] = None,
    chunk_users: Annotated[int, typer.Option(help="users per checkpointed chunk")] = 16,
    data_dir: DataDir = None,
    ray: RayAddress = None,
    workers: Workers = 2,
    worker_threads: WorkerThreads = 1,
) -> None:
    """Evaluate one method on one task and write config, predictions, metrics and a report to OUT."""
    from tailor.eval.runner import EvalSpec, run_eval

    needs_model = _resolve_method(method).needs_backbone
    explicit = parse_options(set_)
    options = merge_flags(explicit, {"k": k, "mode": mode, "calibrate": calibrate or None, "batch_size": batch_size})
    if not needs_model:  # --k, --mode, --calibrate are for LM methods; a prior takes only its own --set options
        options = {key: v for key, v in options.items() if key in explicit or key == "batch_size"}
    _check_options(method, options)
    spec = EvalSpec(task=task, method=method, options=options, model=model if needs_model else None, dtype=dtype,
                    split=split, variant=variant, users=users, seed=seed, label=label,
                    data_dir=str(data_dir) if data_dir else None, histories=histories)
    _check_spec(spec)
    if ray is not None:
        from tailor.distributed.cli import eval_on_ray

        with _progress() as progress:
            metrics = eval_on_ray(spec, out, ray, workers, chunk_users, progress, worker_threads)
    else:
        _threads()
        backbone = _load_backbone(model, dtype) if needs_model else None
        with _progress() as progress:
            metrics = run_eval(spec, out, backbone=backbone, chunk_users=chunk_users, progress=progress)
    console.print(_metrics_table([metrics]))
    console.print(f"run folder: {out}")


def _metrics_table(runs: list[dict]) -> Table:
    table = Table(title=f"{runs[0]['task']} ({runs[0]['n_users']} users)")
    table.add_column("method")
    table.add_column("mode")
    names = list(runs[0]["metrics"])
    for name in names:
        table.add_column(name)
    table.add_column("wall s", justify="right")
    for run in runs:
        cells = [f"{run['metrics'][n]['value']:.3f} [{run['metrics'][n]['ci'][0]:.3f}, {run['metrics'][n]['ci'][1]:.3f}]"
                 for n in names]
        table.add_row(run["label"], run["mode"] or "", *cells, f"{run['wall_time_s']:.1f}")
    return table


@app.command()
def report(
    runs: Annotated[list[Path], typer.Argument(help="run folders to compare")],
    baseline: Annotated[Optional[str], typer.Option(help="label or method of the baseline (default: first)")] = None,
    out: Annotated[Optional[Path], typer.Option(help="write comparison.md and comparison.png here")] = None,
    costs: Annotated[bool, typer.Option(help="add a table of each run's fit seconds and per-user cost "
                                             "(personalize mean/p95/max, state bytes, predict seconds)")] = False,
) -> None:
    """Compare runs in one table with paired-bootstrap significance against a baseline."""
    from tailor.eval.report import compare_runs

    print(compare_runs(runs, baseline=baseline, out_dir=out, costs=costs))


@app.command()
def demo(
    task: str = "lamp2n",
    users: int = 8,
    seed: int = 0,
    out: Path = Path("runs/demo"),
    model: Model = "smollm2-135m",
    data_dir: DataDir = None,
) -> None:
    """The main job on the embedded default: priors, non-personalized and RAG on a few dev users, one table."""
    from tailor.eval.report import compare_runs
    from tailor.eval.runner import EvalSpec, run_eval

    plan = [("user-prior", {}), ("global-prior", {}), ("none", {}), ("rag", {"k": 4})]
    specs = [EvalSpec(task=task, method=method, options=options,
                      model=model if method not in ("user-prior", "global-prior") else None,
                      users=users, seed=seed, data_dir=str(data_dir) if data_dir else None)
             for method, options in plan]
    _check_spec(specs[0])
    _threads()
    backbone = _load_backbone(model, "float32")
    folders = []
    with _progress() as progress:
        for spec in specs:
            folder = out / spec.method
            run_eval(spec, folder, backbone=backbone, progress=progress)
            folders.append(folder)
    print(compare_runs(folders, baseline="none", out_dir=out))
    console.print(f"runs and comparison.png in {out}")


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


# Recent typer ships its own copy of click, whose errors are not click's classes: catch both kinds.
CLICK_ERRORS = tuple({click.ClickException,
                      *(c for c in typer.BadParameter.__mro__ if c.__name__ == "ClickException")})
ABORTS = tuple({click.exceptions.Abort, typer.Abort})


def main() -> None:
    """Entry point: user errors (bad data, a conflicting run folder, an unknown model) print one line, exit 2."""
    from tailor.backbone.loading import ModelNotFound
    from tailor.data.download import DownloadError
    from tailor.data.lamp import DataError
    from tailor.eval.report import CompareError, RunDirError
    from tailor.eval.runner import RunConflict
    from tailor.store.state import StateError
    from tailor.store.store import StoreError

    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    try:
        app(args=ray_argv(sys.argv[1:]), standalone_mode=False)
    except (DataError, DownloadError, RunConflict, RunDirError, CompareError, StateError, StoreError, ModelNotFound,
            KeyError) as error:
        message = error.args[0] if isinstance(error, KeyError) and error.args else error
        print(f"error: {message}", file=sys.stderr)
        raise SystemExit(2) from None
    except ABORTS:
        raise SystemExit(130) from None
    except CLICK_ERRORS as error:
        error.show()  # type: ignore[attr-defined]
        raise SystemExit(error.exit_code) from None


if __name__ == "__main__":
    main()
