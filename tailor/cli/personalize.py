"""`tailor personalize`: every user of a task and split (or of a users file, `--data`) into OUT/states, in this
process or on Ray.

OUT gets an evaluation's config.json, so `tailor eval` with the same options and --out only predicts.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer


from tailor.backbone.defaults import DEFAULT_MODEL
from tailor.cli._options import (BatchSize, ChunkUsers, DataDir, Device, Dtype, GpusPerWorker, Model, RayAddress,
                                 SetOptions, TaskName, TrainUsersFile, Users, UsersFile, Variant, Workers,
                                 WorkerThreads, build, check_options, checked_spec, console, merge_flags, progress_bars,
                                 ray_errors, ray_options, set_pairs)


def personalize_command(
    task: TaskName,
    method: Annotated[str, typer.Option(help="a registered method (tailor.methods.REGISTRY) or module:Class")],
    out: Annotated[Path, typer.Option(help="folder for config, states/ and personalized.jsonl; rerun resumes")],
    users: Users = None,
    seed: int = 0,
    split: str = "dev",
    variant: Variant = "user",
    batch_size: BatchSize = None,
    set_: SetOptions = [],
    model: Model = DEFAULT_MODEL,
    device: Device = "auto",
    dtype: Dtype = "auto",
    chunk_users: ChunkUsers = 16,
    data: UsersFile = None,
    train_data: TrainUsersFile = None,
    data_dir: DataDir = None,
    ray: RayAddress = None,
    workers: Workers = 2,
    worker_threads: WorkerThreads = 1,
    gpus_per_worker: GpusPerWorker = 0.0,
) -> None:
    """Personalize every user of a task and split into OUT/states, in this process or on Ray."""
    options = merge_flags(check_options(method, set_pairs(set_)), {"batch_size": batch_size})
    spec = checked_spec(method, options, model, data_dir, task=task, data=data, train_data=train_data, device=device,
                        dtype=dtype, split=split, variant=variant, users=users, seed=seed)
    with progress_bars() as progress:
        if ray is not None:
            from tailor.distributed.ray_runner import ray_personalize

            with ray_errors():
                cluster = ray_options(ray, workers, worker_threads, gpus_per_worker)
                summary = ray_personalize(spec, out, cluster, chunk_users, progress)
        else:
            from tailor.runs.chunks import personalize_run

            built = build(method, spec.task, model, device, dtype, spec.options)
            summary = personalize_run(spec, out, built, chunk_users, progress)
    console.print(f"{summary['personalized']} of {summary['users']} users personalized, "
                  f"{summary['state_bytes_per_user']} state bytes and {summary['personalize_s_per_user']} s per "
                  f"user; states in {summary['states']}")
