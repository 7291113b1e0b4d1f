"""Which packaged backbone to report results on: quality against cost, per model, on every dev user of LaMP-2N, 2M, 3.

For each model: the non-personalized model (zero-shot), RAG with one retrieved item, and the multi-task LoRA, each one
`tailor eval` command run as written (runs resume, so re-running computes only what is missing), at the model's best
precision on this machine (`--dtype auto`). The MT-LoRA fit gets the same budget on every model (`MTLORA`), stated
in the table; the 1.5B model's fit at tailor's default budget (1,024 examples) would take hours per task on 2 cores.

    .venv/bin/python -m benchmarks.backbones --models smollm2-135m qwen2.5-coder-0.5b qwen2.5-coder-1.5b \
        --tasks lamp2n lamp2m lamp3 --out runs/bench

Printed: one table per task (metric with its 95% CI over users, seconds per query to answer, fit seconds), then per
model the seconds per query over all its runs and its mean rank, the numbers the default backbone is chosen from.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from benchmarks.common import add_device_options, machine, publish, run
from tailor.tasks import get_task
from tailor.tasks.metrics import higher_is_better, metric_names

MTLORA = "--set max_total=256 --set epochs=1 --set targets=q_proj,v_proj"
"""Every model's multi-task LoRA: 256 training examples, one epoch (32 steps of 8), on q and v; one budget for all,
1.5B included, and pinned here so that a later change of MT-LoRA's defaults does not change this comparison."""
PLAN = [
    ("zero-shot", "--method none"),
    ("RAG k=1", "--method rag --k 1"),
    ("MT-LoRA", f"--method mt-lora {MTLORA}"),
]


def row(folder: Path) -> dict:
    metrics = json.loads((folder / "metrics.json").read_text())
    return {**metrics, "folder": folder}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", default=["smollm2-135m", "qwen2.5-coder-0.5b", "qwen2.5-coder-1.5b"])
    parser.add_argument("--tasks", nargs="+", default=["lamp2n", "lamp2m", "lamp3"])
    parser.add_argument("--out", type=Path, default=Path("runs/bench"))
    parser.add_argument("--users", type=int, default=None, help="default: every dev user")
    parser.add_argument("--report", type=Path, default=None, help="also write the markdown here")
    add_device_options(parser)
    args = parser.parse_args()

    results: dict[tuple[str, str, str], dict] = {}
    commands: list[str] = []
    for model in args.models:
        for task in args.tasks:
            for label, method_args in PLAN:
                folder, command = run(label, task, method_args, args.out, model, args.users, device=args.device,
                                      dtype=args.dtype)
                results[(model, task, label)] = row(folder)
                commands.append(command)

    lines = [f"Machine: {machine(args.device, args.dtype)}. Data: ../shared/lamp dev split, "
             f"{'all' if args.users is None else args.users} users, seed 0. MT-LoRA budget: `{MTLORA}` on every "
             "model.\n"]
    ranks: dict[str, list[int]] = {m: [] for m in args.models}
    for task in args.tasks:
        metric = metric_names(task)[0]
        up = higher_is_better(metric)
        lines += [f"### {get_task(task).name} ({metric} {'↑' if up else '↓'})\n",
                  "| model | method | dtype | users | " + metric + " [95% CI] | predict s/query | fit s |",
                  "|---|---|---|---|---|---|---|"]
        for label, _ in PLAN:
            scored = sorted(args.models, key=lambda m: results[(m, task, label)]["metrics"][metric]["value"],
                            reverse=up)
            for position, model in enumerate(scored):
                ranks[model].append(position + 1)
        for model in args.models:
            for label, _ in PLAN:
                r = results[(model, task, label)]
                value, (low, high) = r["metrics"][metric]["value"], r["metrics"][metric]["ci"]
                lines.append(f"| {model} | {label} | {r.get('dtype')} | {r['n_users']} | {value:.3f} "
                             f"[{low:.3f}, {high:.3f}] | {r['predict_s_per_query']:.3f} | {r['fit_s']:.0f} |")
        lines.append("")
    lines += ["### Per model, over every run above\n",
              "| model | mean rank among the models (1 = best) | predict s/query, mean over runs | fit s, total |",
              "|---|---|---|---|"]
    for model in args.models:
        runs = [r for (m, _, _), r in results.items() if m == model]
        mean_rank = sum(ranks[model]) / len(ranks[model])
        per_query = sum(r["predict_s_per_query"] for r in runs) / len(runs)
        lines.append(f"| {model} | {mean_rank:.2f} | {per_query:.3f} | {sum(r['fit_s'] for r in runs):.0f} |")
    lines += ["", "Commands:", "", *[f"    {c}" for c in commands], ""]
    publish("\n".join(lines), args.report)


if __name__ == "__main__":
    main()
