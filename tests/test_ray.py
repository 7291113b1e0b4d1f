"""Ray scale-out: the Ray path equals the local path, survives a killed worker, bounds its queue, names failed users.

One local Ray cluster serves the whole module (starting one takes about 10 s here); every test leaves it as found.
"""

from __future__ import annotations

import dataclasses
import json
import os
import signal
from pathlib import Path
from typing import Iterator

import pytest
import ray
import torch
import typer
from typer.testing import CliRunner

from tailor.backbone.model import Backbone
from tailor.cli._options import LOCAL, ray_argv
from tailor.cli.personalize import personalize_command
from tailor.distributed.ray_runner import (FAILURES, PERSONALIZED, RayOptions, UsersFailed, WorkerPool, ray_eval,
                                           run_chunks)
from tailor.eval.runner import run_eval
from tailor.runs.chunks import Chunk
from tailor.runs.folder import read_predictions
from tailor.runs.spec import EvalSpec
from tailor.store.state import UserState
from tailor.tasks.records import Query, User
from tests.conftest import write_lamp_dir

CHUNK_USERS = 3
DEV_USERS = 30


@pytest.fixture(scope="module")
def cluster() -> Iterator[None]:
    # 4 logical CPUs on 2 cores: the module's 2-worker pool and the personalize command's own worker fit at once.
    ray.init(num_cpus=4, include_dashboard=False, object_store_memory=128 << 20, log_to_driver=False)
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def spec(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> EvalSpec:
    data = write_lamp_dir(tmp_path_factory.mktemp("ray-data"), users={"train": 4, "dev": DEV_USERS}, seed=5)
    return EvalSpec(task="lamp7", method="rag", options={"k": 2, "max_new_tokens": 8, "batch_size": 4},
                    model=str(tiny_model_dir), data_dir=str(data))


@pytest.fixture(scope="module")
def pool(cluster: None, spec: EvalSpec) -> Iterator[WorkerPool]:
    with WorkerPool(spec, RayOptions(workers=2)) as workers:
        yield workers


@pytest.fixture(scope="module")
def local_run(spec: EvalSpec, tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The local path, single-threaded like each Ray worker, so both compute with the same kernels."""
    out = tmp_path_factory.mktemp("local")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        run_eval(spec, out, backbone=Backbone.load(str(tiny_model_dir)), chunk_users=CHUNK_USERS)
    finally:
        torch.set_num_threads(threads)
    return out


def predictions_by_query(folder: Path) -> dict[str, str]:
    rows = read_predictions(folder / "predictions.jsonl")
    assert len(rows) == len({r["query_id"] for r in rows}), "duplicate predictions"
    return {r["query_id"]: r["prediction"] for r in rows}


def state_contents(folder: Path) -> dict[str, tuple]:
    """Each saved state without its timing, which differs between any two runs."""
    out = {}
    for path in sorted((folder / "states").glob("*.safetensors")):
        state = UserState.load(path)
        header = {k: v for k, v in state.header.items() if k != "personalize_s"}
        out[path.name] = (json.dumps(header, sort_keys=True), {k: v.tolist() for k, v in state.tensors.items()})
    return out


def test_ray_run_with_two_workers_equals_the_local_run(pool: WorkerPool, spec: EvalSpec, local_run: Path,
                                                      tmp_path: Path) -> None:
    metrics = ray_eval(spec, tmp_path, chunk_users=CHUNK_USERS, pool=pool)
    expected = predictions_by_query(local_run)
    assert len(expected) == DEV_USERS and len(set(expected.values())) > 1
    assert predictions_by_query(tmp_path) == expected
    assert state_contents(tmp_path) == state_contents(local_run) and len(state_contents(tmp_path)) == DEV_USERS
    local_metrics = json.loads((local_run / "metrics.json").read_text())
    assert metrics["metrics"] == local_metrics["metrics"] and metrics["n_queries"] == DEV_USERS
    assert not (tmp_path / FAILURES).exists()
    assert ray_eval(spec, tmp_path, chunk_users=CHUNK_USERS, pool=pool)["metrics"] == metrics["metrics"]


def test_a_worker_killed_mid_run_loses_nothing_and_changes_nothing(pool: WorkerPool, spec: EvalSpec,
                                                                  local_run: Path, tmp_path: Path) -> None:
    before = pool.pids()
    victim = before[1]
    chunks_done: list[int] = []

    def progress(_description: str, _done: int, _total: int):
        def tick(_rows: int) -> None:
            chunks_done.append(1)
            if len(chunks_done) == 1:
                os.kill(victim, signal.SIGKILL)
        return tick

    metrics = ray_eval(spec, tmp_path, chunk_users=CHUNK_USERS, pool=pool, progress=progress)
    after = pool.pids()
    assert after[0] == before[0] and after[1] != victim, "the killed worker should have been restarted"
    assert len(chunks_done) == DEV_USERS // CHUNK_USERS, "every chunk is written once, none lost"
    assert predictions_by_query(tmp_path) == predictions_by_query(local_run)
    assert metrics["n_queries"] == DEV_USERS and not (tmp_path / FAILURES).exists()


def test_a_method_outside_tailor_runs_on_ray_as_it_does_locally(cluster: None, spec: EvalSpec, tiny_model_dir: Path,
                                                                tmp_path: Path) -> None:
    outside = dataclasses.replace(spec, method="examples.latest_items:LatestItems", users=4,
                                  options={"n": 1, "max_new_tokens": 8, "batch_size": 4})
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        run_eval(outside, tmp_path / "local", backbone=Backbone.load(str(tiny_model_dir)), chunk_users=2)
    finally:
        torch.set_num_threads(threads)
    ray_eval(outside, tmp_path / "ray", RayOptions(workers=1), chunk_users=2)
    assert predictions_by_query(tmp_path / "ray") == predictions_by_query(tmp_path / "local")
    assert json.loads((tmp_path / "ray" / "config.json").read_text())["method"] == outside.method


@ray.remote(num_cpus=0)
class FlakyWorker:
    """Answers every user except "bad", for which it raises, as a method would on a user it cannot handle."""

    def evaluate(self, users: tuple[User, ...]) -> list[dict]:
        if any(u.id == "bad" for u in users):
            raise ValueError("cannot personalize user bad")
        return [{"user_id": u.id} for u in users]


def test_dispatch_bounds_queued_chunks_and_reports_failures_per_user(cluster: None, tmp_path: Path) -> None:
    ids = [f"u{i}" for i in range(34)] + ["bad"] + [f"v{i}" for i in range(5)]
    users = [User(uid, "LaMP-7", (), (Query(uid, "q"),)) for uid in ids]
    chunks = [Chunk(i, tuple(users[s:s + 4])) for i, s in enumerate(range(0, len(users), 4))]
    drawn: list[int] = []
    written: list[int] = []
    actors, in_flight = [FlakyWorker.remote(), FlakyWorker.remote()], 2

    def source() -> Iterator[Chunk]:
        for chunk in chunks:
            drawn.append(chunk.index)
            yield chunk

    def tick(_rows: int) -> None:
        written.append(1)
        assert len(drawn) - len(written) <= in_flight * len(actors), "more chunks drawn than the queues hold"

    with pytest.raises(UsersFailed, match=r"1 user\(s\) failed, e.g. bad \(ValueError: cannot personalize user bad\)"):
        run_chunks(actors, tmp_path, tmp_path / "rows.jsonl", source(),
                   lambda actor, chunk: actor.evaluate.remote(chunk.users), tick, in_flight)
    for actor in actors:
        ray.kill(actor)
    failures = [json.loads(line) for line in (tmp_path / FAILURES).read_text().splitlines()]
    assert [(f["user_id"], f["chunk"], f["kind"]) for f in failures] == [("bad", 8, "error")]
    answered = [r["user_id"] for r in read_predictions(tmp_path / "rows.jsonl")]
    assert sorted(answered) == sorted(set(ids) - {"bad"}), "every other user of the failing chunk is answered"
    assert len(written) == len(chunks) - 1 + 3  # the failing chunk ran again as 4 single users, 3 of them answered


def test_ray_argv_gives_a_bare_ray_flag_the_local_value() -> None:
    assert ray_argv(["eval", "--ray", "--out", "x"]) == ["eval", "--ray", LOCAL, "--out", "x"]
    assert ray_argv(["eval", "--out", "x", "--ray"]) == ["eval", "--out", "x", "--ray", LOCAL]
    assert ray_argv(["eval", "--ray", "10.0.0.1:6379"]) == ["eval", "--ray", "10.0.0.1:6379"]
    assert ray_argv(["eval", "--ray=auto"]) == ["eval", "--ray=auto"]


def test_personalize_command_on_ray_writes_the_local_states_and_resumes_locally(
        cluster: None, spec: EvalSpec, local_run: Path, tmp_path: Path) -> None:
    app = typer.Typer()
    app.callback()(lambda: None)  # a group, as in tailor.cli.main, so the command is called by its name
    app.command("personalize")(personalize_command)
    args = ["personalize", "--task", "lamp7", "--method", "rag", "--set", "k=2", "--set", "max_new_tokens=8",
            "--batch-size", "4", "--users", "7", "--model", str(spec.model), "--data-dir", str(spec.data_dir),
            "--out", str(tmp_path), "--chunk-users", "3"]
    result = CliRunner().invoke(app, [*args, "--ray", ray.get_runtime_context().gcs_address, "--workers", "1"])
    assert result.exit_code == 0, result.output
    rows = read_predictions(tmp_path / PERSONALIZED)
    assert len(rows) == 7 and all((tmp_path / "states" / r["state"]).exists() for r in rows)
    states = state_contents(tmp_path)
    assert len(states) == 7 and states.items() <= state_contents(local_run).items()
    lines = (tmp_path / PERSONALIZED).read_text().splitlines(keepends=True)
    (tmp_path / PERSONALIZED).write_text("".join(lines[:5]))  # as if the last chunk had not been recorded
    for row in rows[5:]:
        (tmp_path / "states" / row["state"]).unlink()
    again = CliRunner().invoke(app, args)  # the local path resumes the same folder: same config, same states
    assert again.exit_code == 0, again.output
    assert sorted(r["user_id"] for r in read_predictions(tmp_path / PERSONALIZED)) == sorted(r["user_id"] for r in rows)
    assert state_contents(tmp_path) == states


def test_workers_get_absolute_paths_and_no_lamp_folder_for_users_files(tmp_path: Path,
                                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    """Workers need not share the driver's working directory, and a run on users files needs no LaMP folder."""
    from tailor.distributed.ray_runner import _for_workers

    examples = Path(__file__).resolve().parent.parent / "examples" / "tickets"
    monkeypatch.chdir(examples.parent.parent)
    monkeypatch.setenv("TAILOR_DATA", str(tmp_path / "no-such-folder"))
    spec = EvalSpec(task="examples/tickets/tickets.toml", method="user-prior", model=None,
                    data="examples/tickets/dev.jsonl", train_data="examples/tickets/train.jsonl")
    worker = _for_workers(spec)
    assert (worker.task, worker.data, worker.train_data, worker.data_dir) == (
        str(examples / "tickets.toml"), str(examples / "dev.jsonl"), str(examples / "train.jsonl"), None)
