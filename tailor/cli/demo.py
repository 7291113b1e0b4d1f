"""`tailor demo`: the main job on the embedded default, two tables.

1. A few dev users of LaMP-2N: beside the model-free floors and the plain model, RAG and prior fusion (the
   task-trained multi-task LoRA's label distribution fused with the user's own; fitted once on the training users and
   cached), and prior fusion again with each user answered from another user's history (the swapped control), each
   user asked LaMP's query and their last four history items (tailor's protocol: five times the queries of LaMP's),
   compared against the user prior.
2. Every dev user of LaMP-4 (headlines), LaMP's one query each: copying the article (the task's floor, ahead of the
   plain model's headlines there), the user's closest past headline, and lexical fusion (a word model that needs no
   backbone: the article's and the user's own past words chosen for the expected ROUGE-1; a word list, not a written
   headline) with its swapped control, compared against copying and then against that control. On this task
   tailor's best clears both bars.

The floor and the swapped control are the two bars a method has to clear to be personalizing at all."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from tailor.backbone.defaults import FAST_MODEL
from tailor.cli._options import (DataDir, Device, Dtype, Model, check_spec, console, load_backbone, progress_bars,
                                 threads)


FUSION_BASE = "max_total=256,epochs=1"
"""The multi-task LoRA under prior fusion: the leaderboard's budget (benchmarks/leaderboard.toml); with the 135M model
the demo's fusion run, fit included, took 157 s on two CPU cores from empty fit and text caches (README.md)."""
QUERIES_PER_USER = 4
Plan = list[tuple[str, str, dict, str]]
"""(run folder, method, options, histories) of one table."""


def demo_command(
    task: Annotated[str, typer.Option(help="the label or rating task of the first table")] = "lamp2n",
    users: Annotated[int, typer.Option(help="its seeded dev users, each asked 5 queries")] = 8,
    words_task: Annotated[str, typer.Option(help="the generation task of the second table")] = "lamp4",
    words_users: Annotated[int, typer.Option(help="its seeded dev users, one query each (0: all)")] = 0,
    seed: int = 0,
    out: Annotated[Path, typer.Option(help="run folders: OUT/labels/*, OUT/words/*; a rerun resumes")] = Path(
        "runs/demo"),
    model: Model = FAST_MODEL,
    device: Device = "auto",
    dtype: Dtype = "auto",
    data_dir: DataDir = None,
) -> None:
    """The main job on the embedded default: priors, non-personalized, RAG, prior fusion and its swapped control on a
    few dev users against the user prior; then lexical fusion and its swapped control on every dev user of a
    generation task (`--words-users 0`: all of them) against copying the input."""
    from tailor.eval.report import compare_runs
    from tailor.eval.runner import run_eval
    from tailor.methods import method_class
    from tailor.runs.spec import EvalSpec
    from tailor.tasks import get_task

    fusion = {"base_options": FUSION_BASE}
    labels: Plan = [("user-prior", "user-prior", {}, "own"), ("global-prior", "global-prior", {}, "own"),
                    ("none", "none", {}, "own"), ("rag", "rag", {"k": 4}, "own"), ("fusion", "fusion", fusion, "own"),
                    ("fusion-swapped", "fusion", fusion, "swapped")]
    words: Plan = [("global-prior", "global-prior", {}, "own"), ("user-prior", "user-prior", {}, "own"),
                   ("lexical", "lexical", {}, "own"), ("lexical-swapped", "lexical", {}, "swapped")]

    def specs(task_name: str, n_users: int | None, queries: int, plan: Plan) -> dict[str, EvalSpec]:
        return {folder: EvalSpec(task=task_name, method=method, options=options,
                                 model=model if method_class(method).needs_backbone else None,
                                 device=device, dtype=dtype, users=n_users, seed=seed,
                                 data_dir=str(data_dir) if data_dir else None, queries_per_user=queries,
                                 histories=histories,
                                 label=f"{method}, swapped histories" if histories == "swapped" else None)
                for folder, method, options, histories in plan}

    if words_users < 0:
        raise typer.BadParameter(f"--words-users must be 0 (all users) or more, not {words_users}")
    for name, option, generation in ((task, "--task", False), (words_task, "--words-task", True)):
        if (get_task(name).family == "generation") != generation:
            kind = "generation" if generation else "label or rating"
            raise typer.BadParameter(f"{option} {name}: the demo needs a {kind} task there")
    tables = [(out / "labels", specs(task, users, QUERIES_PER_USER, labels), "user-prior"),
              (out / "words", specs(words_task, words_users or None, 0, words), "global-prior")]
    for _, table, _ in tables:
        check_spec(next(iter(table.values())))
    threads()
    backbone = load_backbone(model, device, dtype)
    with progress_bars() as progress:
        for folder, table, _ in tables:
            for name, spec in table.items():
                run_eval(spec, folder / name, backbone=backbone, progress=progress)
    for folder, table, baseline in tables:
        print(compare_runs([folder / name for name in table], baseline=baseline, out_dir=folder))
    print(compare_runs([out / "words" / "lexical-swapped", out / "words" / "lexical"], baseline="lexical-swapped"))
    console.print(f"runs, comparison.md and comparison.png in {out / 'labels'} and {out / 'words'}")
