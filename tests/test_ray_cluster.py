"""`tailor eval --ray ADDRESS` joins a cluster someone else started, and its workers spread over that cluster's nodes.

The cluster has two Ray nodes (two raylets, the multi-node set-up Ray's own tests use on one machine) of one CPU
each; a worker takes one CPU, so a run with two workers can only finish with one worker on each node. tests/test_ray.py
covers the rest of the Ray path with a cluster the test process starts itself.
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterator

import pytest
import ray
import torch
from ray.cluster_utils import Cluster
from typer.testing import CliRunner

from tailor.backbone.model import Backbone
from tailor.cli.main import app
from tailor.eval.runner import run_eval
from tailor.runs.folder import read_predictions
from tailor.runs.spec import EvalSpec
from tests.conftest import write_lamp_dir

NODE = {"num_cpus": 1, "object_store_memory": 128 << 20}


@pytest.fixture
def two_nodes() -> Iterator[Cluster]:
    assert not ray.is_initialized(), "this test needs a process that is not connected to Ray"
    cluster = Cluster(initialize_head=True, head_node_args={**NODE, "include_dashboard": False})
    cluster.add_node(**NODE)
    cluster.wait_for_nodes()
    yield cluster
    cluster.shutdown()


def predictions(folder: Path) -> dict[str, str]:
    return {r["query_id"]: r["prediction"] for r in read_predictions(folder / "predictions.jsonl")}


def test_eval_joins_an_existing_two_node_cluster_and_matches_the_local_run(
        two_nodes: Cluster, tiny_model_dir: Path, tmp_path: Path) -> None:
    data = write_lamp_dir(tmp_path / "data", users={"train": 4, "dev": 8}, seed=7)
    args = ["eval", "--task", "lamp7", "--method", "rag", "--k", "2", "--set", "max_new_tokens=8", "--batch-size", "4",
            "--model", str(tiny_model_dir), "--data-dir", str(data), "--chunk-users", "3"]
    result = CliRunner().invoke(app, [*args, "--out", str(tmp_path / "ray"), "--ray", two_nodes.address,
                                      "--workers", "2"])
    assert result.exit_code == 0, result.output
    assert not ray.is_initialized(), "the command disconnects from the cluster it joined"
    ray.init(address=two_nodes.address, log_to_driver=False)
    try:
        assert sum(node["Alive"] for node in ray.nodes()) == 2, "and leaves both nodes running"
    finally:
        ray.shutdown()

    spec = EvalSpec(task="lamp7", method="rag", options={"k": 2, "max_new_tokens": 8, "batch_size": 4},
                    model=str(tiny_model_dir), data_dir=str(data))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # each Ray worker computes on one thread
    try:
        run_eval(spec, tmp_path / "local", backbone=Backbone.load(str(tiny_model_dir)), chunk_users=3)
    finally:
        torch.set_num_threads(threads)
    local = predictions(tmp_path / "local")
    assert len(local) == 8 and predictions(tmp_path / "ray") == local
