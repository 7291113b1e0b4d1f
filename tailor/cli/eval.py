"""`tailor eval`: one method on one task, in this process or on Ray, into a resumable run folder.

The task is LaMP's or a task file's (`--task my-task.toml`), and the users LaMP's (`--split`) or a users file's
(`--data dev.jsonl --train-data train.jsonl`); everything is checked, one line per problem, before a model loads.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from rich.table import Table

from tailor.backbone.defaults import DEFAULT_MODEL
from tailor.cli._options import (BatchSize, ChunkUsers, DataDir, Device, Dtype, GpusPerWorker, Model, RayAddress,
                                 SetOptions, TaskName, TrainUsersFile, Users, UsersFile, Variant, Workers,
                                 WorkerThreads, build, check_options, checked_spec, console, merge_flags, progress_bars,
                                 ray_errors, ray_options, resolve_method, set_pairs)


def eval_command(
    task: TaskName,
    method: Annotated[str, typer.Option(help="global-prior, user-prior, none, rag, pag, full, chameleon, perfit, "
                                             "p2p, mt-lora, lora-p, oppu, stylevector, dpo, or module:Class of "
                                             "your own Personalizer")],
    out: Annotated[Path, typer.Option(help="run folder; rerunning the same command there resumes")],
    users: Users = None,
    seed: int = 0,
    split: Annotated[str, typer.Option(help="dev, train, or Profile-to-PEFT's random / ood split of the training "
                                             "users (fit on the rest)")] = "dev",
    variant: Variant = "user",
    histories: Annotated[str, typer.Option(help="own, or swapped: each user answered with another user's history "
                                                "(a control that must not help)")] = "own",
    states_from: Annotated[Optional[Path], typer.Option(help="with --histories swapped: the run folder of the same "
                                                             "run with own histories, whose states the swapped "
                                                             "users borrow instead of personalizing again")] = None,
    queries_per_user: Annotated[int, typer.Option(help="tailor's own protocol: each user's last M history items "
                                                       "also asked as queries, the history cut before them (0: LaMP's "
                                                       "one query per user)")] = 0,
    k: Annotated[Optional[int], typer.Option(help="retrieved history items (rag, pag)")] = None,
    mode: Annotated[Optional[str], typer.Option(help="scoring or generation (classification tasks)")] = None,
    calibrate: Annotated[bool, typer.Option(help="contextual calibration of label scores")] = False,
    batch_size: BatchSize = None,
    set_: SetOptions = [],
    model: Model = DEFAULT_MODEL,
    device: Device = "auto",
    dtype: Dtype = "auto",
    label: Annotated[Optional[str], typer.Option(help="name shown in reports")] = None,
    chunk_users: ChunkUsers = 16,
    data: UsersFile = None,
    train_data: TrainUsersFile = None,
    data_dir: DataDir = None,
    ray: RayAddress = None,
    workers: Workers = 2,
    worker_threads: WorkerThreads = 1,
    gpus_per_worker: GpusPerWorker = 0.0,
) -> None:
    """Evaluate one method on one task and write config, predictions, metrics and a report to OUT."""
    from tailor.runs.spec import check_golds

    explicit = check_options(method, set_pairs(set_))
    options = merge_flags(explicit, {"k": k, "mode": mode, "calibrate": calibrate or None, "batch_size": batch_size})
    if not resolve_method(method).needs_backbone:  # --k, --mode, --calibrate are for LM methods; a prior takes
        options = {key: v for key, v in options.items() if key in explicit or key == "batch_size"}  # only --set
    spec = checked_spec(method, options, model, data_dir, task=task, data=data, train_data=train_data,
                        device=device, dtype=dtype, split=split, variant=variant, users=users, seed=seed, label=label,
                        histories=histories, queries_per_user=queries_per_user,
                        states_from=str(states_from) if states_from else None)
    check_golds(spec)
    with progress_bars() as progress:
        if ray is not None:
            from tailor.distributed.ray_runner import ray_eval

            with ray_errors():
                cluster = ray_options(ray, workers, worker_threads, gpus_per_worker)
                metrics = ray_eval(spec, out, cluster, chunk_users, progress)
        else:
            from tailor.eval.runner import run_eval

            built = build(method, spec.task, model, device, dtype, spec.options)
            metrics = run_eval(spec, out, method=built, chunk_users=chunk_users, progress=progress)
    console.print(metrics_table([metrics]))
    console.print(f"run folder: {out}")


def metrics_table(runs: list[dict]) -> Table:
    table = Table(title=f"{runs[0]['task']} ({runs[0]['n_users']} users)")
    table.add_column("method")
    table.add_column("mode")
    names = list(runs[0]["metrics"])
    for name in names:
        table.add_column(name)
    table.add_column("run s", justify="right")
    for run in runs:
        cells = [f"{m['value']:.3f} [{m['ci'][0]:.3f}, {m['ci'][1]:.3f}]" for m in (run["metrics"][n] for n in names)]
        table.add_row(run["label"], run["mode"] or "", *cells, f"{run['wall_time_s']:.1f}")
    return table
