"""`tailor demo`: the main job on the embedded default, a few dev users of LaMP-2N, one table.

Beside the model-free floors and the plain model, RAG and prior fusion (the task-trained multi-task LoRA's label
distribution fused with the user's own; fitted once on the training users and cached), and prior fusion again with
each user answered from another user's history (the swapped control), each user asked LaMP's query and their last four
history items (tailor's protocol: five times the queries of LaMP's), compared against the user prior. The user prior
and the swapped control are the two bars a method has to clear to be personalizing at all."""

from __future__ import annotations

from pathlib import Path

from tailor.backbone.defaults import FAST_MODEL
from tailor.cli._options import (DataDir, Device, Dtype, Model, check_spec, console, load_backbone, progress_bars,
                                 threads)


FUSION_BASE = "max_total=256,epochs=1"
"""The multi-task LoRA under prior fusion: the leaderboard's budget (benchmarks/leaderboard.toml); with the 135M model
the demo's fusion run, fit included, took 128 s on two CPU cores from empty fit and text caches."""
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
    """The main job on the embedded default: priors, non-personalized, RAG, prior fusion and its swapped control on a
    few dev users, one table against the user prior."""
    from tailor.eval.report import compare_runs
    from tailor.eval.runner import run_eval
    from tailor.runs.spec import EvalSpec

    fusion = {"base_options": FUSION_BASE}
    plan = [("user-prior", "user-prior", {}, "own"), ("global-prior", "global-prior", {}, "own"),
            ("none", "none", {}, "own"), ("rag", "rag", {"k": 4}, "own"), ("fusion", "fusion", fusion, "own"),
            ("fusion-swapped", "fusion", fusion, "swapped")]
    specs = {folder: EvalSpec(task=task, method=method, options=options,
                              model=model if method not in ("user-prior", "global-prior") else None, device=device,
                              dtype=dtype, users=users, seed=seed, data_dir=str(data_dir) if data_dir else None,
                              queries_per_user=QUERIES_PER_USER, histories=histories,
                              label=f"{method}, swapped histories" if histories == "swapped" else None)
             for folder, method, options, histories in plan}
    check_spec(specs["user-prior"])
    threads()
    backbone = load_backbone(model, device, dtype)
    folders = []
    with progress_bars() as progress:
        for name, spec in specs.items():
            run_eval(spec, out / name, backbone=backbone, progress=progress)
            folders.append(out / name)
    print(compare_runs(folders, baseline="user-prior", out_dir=out))
    console.print(f"runs and comparison.png in {out}")
