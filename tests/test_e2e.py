"""End to end on the packaged SmolLM2-135M-Instruct and ../shared/lamp, on three users."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tailor.backbone.model import Backbone
from tailor.eval.report import compare_runs
from tailor.eval.runner import run_eval
from tailor.runs.spec import EvalSpec
from tailor.tasks import get_task

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def smollm() -> Backbone:
    import torch

    torch.set_num_threads(2)
    return Backbone.load("smollm2-135m")


def test_packaged_model_loads_with_its_chat_template(smollm: Backbone) -> None:
    assert smollm.model_id == "SmolLM2-135M-Instruct/30x576"
    assert smollm.render("hi").startswith("<|im_start|>") and smollm.render("hi").endswith("assistant\n")


def test_classification_methods_on_three_users(smollm: Backbone, tmp_path: Path) -> None:
    task = get_task("lamp2n")
    folders = []
    for method, options in (("user-prior", {}), ("none", {}), ("rag", {"k": 2})):
        spec = EvalSpec(task="lamp2n", method=method, options=options, users=3, seed=0,
                        model=None if method == "user-prior" else "smollm2-135m")
        metrics = run_eval(spec, tmp_path / method, backbone=smollm)
        assert metrics["n_users"] == 3
        rows = [json.loads(line) for line in (tmp_path / method / "predictions.jsonl").read_text().splitlines()]
        assert all(r["prediction"] in task.labels for r in rows)
        folders.append(tmp_path / method)
    table = compare_runs(folders, baseline="none", out_dir=tmp_path / "cmp")
    assert "rag" in table and (tmp_path / "cmp" / "comparison.png").stat().st_size > 1000


def test_generation_on_three_users(smollm: Backbone, tmp_path: Path) -> None:
    spec = EvalSpec(task="lamp7", method="rag", options={"k": 2, "max_new_tokens": 24}, users=3, seed=0,
                    model="smollm2-135m")
    metrics = run_eval(spec, tmp_path, backbone=smollm)
    assert metrics["mode"] == "generation" and 0.0 <= metrics["metrics"]["rouge1"]["value"] <= 1.0
    rows = [json.loads(line) for line in (tmp_path / "predictions.jsonl").read_text().splitlines()]
    assert all(r["prediction"].strip() for r in rows)  # the model answered something for every query
