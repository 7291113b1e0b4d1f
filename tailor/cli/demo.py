"""`tailor demo`: the main job on the embedded default, a few dev users of LaMP-2N, one table."""

from __future__ import annotations

from pathlib import Path

from tailor.backbone.defaults import FAST_MODEL
from tailor.cli._options import (DataDir, Device, Dtype, Model, check_spec, console, load_backbone, progress_bars,
                                 threads)


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
    """The main job on the embedded default: priors, non-personalized and RAG on a few dev users, one table."""
    from tailor.eval.report import compare_runs
    from tailor.eval.runner import run_eval
    from tailor.runs.spec import EvalSpec

    plan = [("user-prior", {}), ("global-prior", {}), ("none", {}), ("rag", {"k": 4})]
    specs = [EvalSpec(task=task, method=method, options=options,
                      model=model if method not in ("user-prior", "global-prior") else None, device=device,
                      dtype=dtype, users=users, seed=seed, data_dir=str(data_dir) if data_dir else None)
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
    print(compare_runs(folders, baseline="none", out_dir=out))
    console.print(f"runs and comparison.png in {out}")
