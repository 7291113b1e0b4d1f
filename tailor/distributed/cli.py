"""Command-line pieces for Ray runs: the `--ray [ADDRESS]` option of `tailor eval` and `tailor personalize`.

`tailor.cli` owns the app; it adds the `personalize` command with `register(app)`, gives its `eval` command the
`RayAddress` and `Workers` options and hands a run with `--ray` to `eval_on_ray`. Ray is imported only when a
command runs.
"""

from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Callable, Iterator, Optional, Sequence

import typer

if TYPE_CHECKING:
    from tailor.distributed.ray_runner import RayOptions
    from tailor.eval.runner import EvalSpec

LOCAL = "local"
"""The value of a bare `--ray`: start a local cluster (with an address, the run joins that cluster)."""

RayAddress = Annotated[Optional[str], typer.Option(
    "--ray", metavar="[ADDRESS]",
    help="run on Ray: alone, start a local cluster; with an address (auto, host:6379, ray://host:10001), join it")]
Workers = Annotated[int, typer.Option(help="Ray workers (actors), each with its own backbone")]
WorkerThreads = Annotated[int, typer.Option(help="torch threads (and Ray CPUs) per Ray worker")]
Progress = Callable[[str, int, int], Callable[[int], None]]


def ray_argv(argv: Sequence[str]) -> list[str]:
    """The arguments with a bare `--ray` given its LOCAL value.

    Typer has no options with an optional value, so `tailor.cli.main` passes its arguments through this: a `--ray`
    at the end or followed by another option becomes `--ray local`; `--ray ADDRESS` and `--ray=ADDRESS` are kept.
    """
    out = []
    for i, arg in enumerate(argv):
        out.append(arg)
        if arg == "--ray" and (i + 1 == len(argv) or argv[i + 1].startswith("-")):
            out.append(LOCAL)
    return out


def _options(address: str, workers: int, threads: int) -> "RayOptions":
    from tailor.distributed.ray_runner import RayOptions

    if workers < 1 or threads < 1:
        raise typer.BadParameter("--workers and --worker-threads must be at least 1")
    return RayOptions(address=None if address == LOCAL else address, workers=workers, threads=threads)


@contextmanager
def _one_line_errors() -> Iterator[None]:
    """Failed users end the command with exit code 1 (every other user is saved); a worker that cannot start (bad
    method options, a fit that raises) with exit code 2, like tailor's other user errors. One line each."""
    from tailor.distributed.ray_runner import UsersFailed, WorkerStartError

    try:
        yield
    except UsersFailed as error:
        typer.echo(f"error: {error}", err=True)
        raise typer.Exit(1) from None
    except WorkerStartError as error:
        typer.echo(f"error: {error}", err=True)
        raise typer.Exit(2) from None


def eval_on_ray(spec: "EvalSpec", out: Path, address: str, workers: int, chunk_users: int, progress: Progress,
                threads: int = 1) -> dict:
    """`tailor eval --ray`: the run on Ray workers; this process loads no backbone."""
    from tailor.distributed.ray_runner import ray_eval

    with _one_line_errors():
        return ray_eval(spec, out, _options(address, workers, threads), chunk_users, progress)


def personalize_command(
    task: Annotated[str, typer.Option(help="lamp1, lamp2n, lamp2m, lamp3, lamp4, lamp5, lamp7")],
    method: Annotated[str, typer.Option(help="a registered method (tailor.methods.REGISTRY) or module:Class")],
    out: Annotated[Path, typer.Option(help="folder for config, states/ and personalized.jsonl; rerun resumes")],
    users: Annotated[Optional[int], typer.Option(help="a seeded sample of this many users (default: all)")] = None,
    seed: int = 0,
    split: str = "dev",
    variant: Annotated[str, typer.Option(help="user (LaMP's user-based split) or time")] = "user",
    batch_size: Annotated[Optional[int], typer.Option(help="rows per forward pass (default 8)")] = None,
    set_: Annotated[list[str], typer.Option("--set", help="method option KEY=VALUE (repeatable)")] = [],
    model: Annotated[str, typer.Option(help="packaged model or a local HF folder")] = "smollm2-135m",
    dtype: Annotated[str, typer.Option(help="float32 or bfloat16")] = "float32",
    chunk_users: Annotated[int, typer.Option(help="users per checkpointed chunk")] = 16,
    data_dir: Annotated[Optional[Path], typer.Option("--data-dir", help="LaMP data folder")] = None,
    ray: RayAddress = None,
    workers: Workers = 2,
    worker_threads: WorkerThreads = 1,
) -> None:
    """Personalize every user of a task and split into OUT/states, in this process or on Ray.

    OUT has an evaluation's config.json, so `tailor eval` with the same options and --out only predicts.
    """
    from tailor.cli import (_check_options, _check_spec, _load_backbone, _progress, _resolve_method, _threads, console,
                            merge_flags, parse_options)
    from tailor.distributed.ray_runner import personalize_run, ray_personalize
    from tailor.eval.runner import EvalSpec
    from tailor.methods import build_method
    from tailor.tasks.lamp import get_task

    needs_model = _resolve_method(method).needs_backbone
    options = merge_flags(parse_options(set_), {"batch_size": batch_size})
    _check_options(method, options)
    spec = EvalSpec(task=task, method=method, options=options, model=model if needs_model else None, dtype=dtype,
                    split=split, variant=variant, users=users, seed=seed,
                    data_dir=str(data_dir) if data_dir else None)
    _check_spec(spec)
    with _progress() as progress:
        if ray is not None:
            with _one_line_errors():
                summary = ray_personalize(spec, out, _options(ray, workers, worker_threads), chunk_users, progress)
        else:
            _threads()
            backbone = _load_backbone(model, dtype) if needs_model else None
            built = build_method(method, get_task(task), backbone, **options)
            summary = personalize_run(spec, out, built, chunk_users, progress)
    console.print(f"{summary['personalized']} of {summary['users']} users personalized, "
                  f"{summary['state_bytes_per_user']} state bytes and {summary['personalize_s_per_user']} s per "
                  f"user; states in {summary['states']}")


def register(app: typer.Typer) -> None:
    """Add `personalize` to the tailor app."""
    app.command("personalize")(personalize_command)
