"""The paper's layer-wise analysis (section 4.5, figure 11 left): PerFit intervening at a single layer, early to late,
on LaMP-2M's dev users. Each layer is a full PerFit run (its own stage 1 and stage 2) in its own run folder, written
by the eval runner exactly as `tailor eval --method perfit --set layers=L ...` writes it, so runs resume and the
command beside each number remakes it. Output: a markdown table with 95% CIs, and a PNG of the metrics by layer.

    .venv/bin/python -m benchmarks.perfit_layers --best runs/perfit/search-lamp2m/best.json --out runs/perfit/layers
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
from pathlib import Path

import torch

from benchmarks.common import add_device_options, device_flags, machine
from tailor.backbone.defaults import DEFAULT_MODEL
from tailor.backbone.model import Backbone
from tailor.cli._options import parse_options as parse_set  # `--set KEY=VALUE`, cast exactly as `tailor eval` casts it
from tailor.eval.runner import run_eval
from tailor.methods.perfit import PerFit
from tailor.runs.spec import EvalSpec
from tailor.tasks import get_task
from tailor.tasks.lamp import Task
from tailor.tasks.metrics import higher_is_better, metric_names


def plot(task: Task, layers: list[int], results: list[dict], path: Path) -> None:
    """One line per metric against the intervened layer, with the 95% CI as a band."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    names = metric_names(task)
    figure = Figure(figsize=(4 * len(names), 3.5), layout="constrained")
    FigureCanvasAgg(figure)
    for axes, name in zip(figure.subplots(1, len(names), squeeze=False)[0], names):
        values = [r["metrics"][name]["value"] for r in results]
        axes.plot(layers, values, marker="o")
        axes.fill_between(layers, [r["metrics"][name]["ci"][0] for r in results],
                          [r["metrics"][name]["ci"][1] for r in results], alpha=0.2)
        axes.set_xticks(layers)
        axes.set_xlabel("intervened layer")
        axes.set_title(f"{name} ({'higher' if higher_is_better(name) else 'lower'} is better)")
    figure.suptitle(f"PerFit on {task.name}: one intervened layer, early to late")
    figure.savefig(path, format="png", dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--task", default="lamp2m")
    parser.add_argument("--model", default=DEFAULT_MODEL)
    parser.add_argument("--layers", default=None, help="comma-separated (default: every 3rd layer and the last)")
    parser.add_argument("--best", type=Path, default=None, help="best.json of perfit_search.py: options to keep")
    parser.add_argument("--set", dest="set_", action="append", default=[], help="PerFit option KEY=VALUE")
    parser.add_argument("--users", type=int, default=None, help="default: every dev user")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--data-dir", default=None)
    parser.add_argument("--out", type=Path, default=Path("runs/perfit/layers"))
    add_device_options(parser)
    args = parser.parse_args()

    torch.set_num_threads(args.threads)
    task = get_task(args.task)
    backbone = Backbone.load(args.model, device=args.device, dtype=args.dtype)
    base = json.loads(args.best.read_text()) if args.best else {}
    base = {k: v for k, v in {**base, **parse_set(args.set_)}.items() if k != "layers"}
    layers = [int(x) for x in args.layers.split(",")] if args.layers else \
        sorted({*range(0, backbone.n_layers, 3), backbone.n_layers - 1})
    results, commands = [], []
    for layer in layers:
        pairs = [f"{k}={v}" for k, v in {**base, "layers": layer}.items()]
        options = {**parse_set(pairs), "batch_size": 8}  # what `tailor eval --set ...` passes, cast alike
        folder = args.out / f"layer-{layer:02d}"
        label = f"PerFit layer {layer}"
        spec = EvalSpec(task=args.task, method="perfit", options=options, model=args.model, device=args.device,
                        dtype=args.dtype, users=args.users, label=label, data_dir=args.data_dir)
        sets = " ".join(f"--set {pair}" for pair in pairs)
        command = (f"tailor eval --task {args.task} --method perfit {sets} --model {args.model} "
                   f"{device_flags(args.device, args.dtype)} "
                   + (f"--users {args.users} " if args.users else "") + f"--out {folder} --label {shlex.quote(label)}")
        print(f"$ {command}", file=sys.stderr, flush=True)
        results.append(run_eval(spec, folder, backbone=backbone, method=PerFit(task, backbone, **options)))
        commands.append(command)
    png = args.out / f"perfit-layers-{task.name}.png"
    plot(task, layers, results, png)
    names = metric_names(task)
    rows = ["| layer | " + " | ".join(names) + " | stage 2 s/user |", "|" + "---|" * (len(names) + 2)]
    for layer, r in zip(layers, results):
        cells = [f"{r['metrics'][n]['value']:.3f} [{r['metrics'][n]['ci'][0]:.3f}, {r['metrics'][n]['ci'][1]:.3f}]"
                 for n in names]
        rows.append(f"| {layer} | " + " | ".join(cells) + f" | {r['personalize_s_per_user']:.2f} |")
    listing = "\n".join(f"    {c}" for c in commands)
    text = f"""### PerFit, single intervened layer, {task.name} ({args.model}, {results[0]['n_users']} dev users)

Machine: {machine(args.device, args.dtype)}. Other options: {base or 'the defaults'}. Plot: `{png}`.

{chr(10).join(rows)}

Made by `python -m benchmarks.perfit_layers {shlex.join(sys.argv[1:])}`, which runs:

{listing}
"""
    (args.out / "layers.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
