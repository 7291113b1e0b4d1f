"""`tailor demo`: the main job on the embedded default, a few dev users of LaMP-2N, one table.

Beside the model-free floors and the plain model, RAG and prior fusion (the task-trained multi-task LoRA's label
distribution fused with the user's own; fitted once on the training users and cached),
each user asked LaMP's query and their last four history items (tailor's protocol: five times the queries of
LaMP's), compared against the user prior: the floor a method has to beat to be personalizing at all."""

from __future__ import annotations

from pathlib import Path

from tailor.backbone.defaults import FAST_MODEL
from tailor.cli._options import (DataDir, Device, Dtype, Model, check_spec, console, load_backbone, progress_bars,
                                 threads)


FUSION_BASE = "max_total=256,epochs=1"
"""The multi-task LoRA under prior fusion: the leaderboard's budget (benchmarks/leaderboard.toml); with the 135M model
the first demo's fusion run, fit included, took 137 s on two CPU cores."""
QUERIES_PER_USER = 4


def demo_command(
    task: str = "lamp2n",
    users: int = 8,
    seed: int = 0,
    out: Path = Path("runs/demo"),
    model: Model = FAST_MODEL,
    device: Device = "auto",
    dtype: Dtype = "auto",
    data_dir: DataDir = None,
) -> None:
    """The main job on the embedded default: priors, non-personalized, RAG and prior fusion on a few dev users, one
    table against the user prior."""
    from tailor.eval.report import compare_runs
    from tailor.eval.runner import run_eval
    from tailor.runs.spec import EvalSpec

    plan = [("user-prior", {}), ("global-prior", {}), ("none", {}), ("rag", {"k": 4}),
            ("fusion", {"base_options": FUSION_BASE})]
    specs = [EvalSpec(task=task, method=method, options=options,
                      model=model if method not in ("user-prior", "global-prior") else None, device=device,
                      dtype=dtype, users=users, seed=seed, data_dir=str(data_dir) if data_dir else None,
                      queries_per_user=QUERIES_PER_USER)
             for method, options in plan]
    check_spec(specs[0])
    threads()
    backbone = load_backbone(model, device, dtype)
    folders = []
    with progress_bars() as progress:
        for spec in specs:
            folder = out / spec.method
            run_eval(spec, folder, backbone=backbone, progress=progress)
            folders.append(folder)
    print(compare_runs(folders, baseline="user-prior", out_dir=out))
    console.print(f"runs and comparison.png in {out}")
