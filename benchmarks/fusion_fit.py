"""Choose prior fusion's options on training users only: fit fusion once per base configuration, neighbour count and
set of its own options
(into the fit cache, where the leaderboard's runs find it) and report the fused model's scores on the training users'
own LaMP queries, which the base never trained on (its examples are history items): in-sample, and cross-validated
over folds of users (the number to choose by), beside the learned weights, the scale chosen for the user's features
with each scale's cross-validated score (scale 1 is the likelihood's own answer), and the fit's seconds.

    .venv/bin/python -m benchmarks.fusion_fit --task lamp2n --bases "max_total=256,epochs=1" "max_total=1024,epochs=1"
    .venv/bin/python -m benchmarks.fusion_fit --task lamp2n --bases "max_total=256,epochs=1" --neighbours 0 4
    .venv/bin/python -m benchmarks.fusion_fit --task lamp3 --bases "max_total=256,epochs=1" --options "" user_mean=true

Dev users are never read: the choice this prints is the one a held-out check can trust.
"""

from __future__ import annotations

import argparse
import itertools
import time
from pathlib import Path

from benchmarks.common import add_device_options, machine, publish
from tailor.backbone.defaults import DEFAULT_MODEL
from tailor.backbone.model import Backbone
from tailor.methods import build_method, method_class
from tailor.methods.options import pairs, typed_options
from tailor.runs.fits import fit_folder, fit_method
from tailor.runs.spec import EvalSpec, fit_users
from tailor.tasks import get_task


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--task", default="lamp2n")
    parser.add_argument("--base", default="mt-lora", help="fusion's base method")
    parser.add_argument("--bases", nargs="+", required=True, help="the base's options to compare, KEY=VALUE,...")
    parser.add_argument("--neighbours", nargs="+", type=int, default=[0],
                        help="fusion's neighbours options to compare (0: no query-retrieved label feature)")
    parser.add_argument("--options", nargs="+", default=[""],
                        help="fusion's own further options to compare, KEY=VALUE,... (\"\": its defaults)")
    parser.add_argument("--model", default=DEFAULT_MODEL)
    parser.add_argument("--report", type=Path, default=None, help="also write the table to this markdown file")
    add_device_options(parser)
    args = parser.parse_args(argv)
    backbone = Backbone.load(args.model, device=args.device, dtype=args.dtype)
    users = fit_users(EvalSpec(task=args.task, method="fusion", model=args.model))
    regression = get_task(args.task).family == "regression"
    scores = ["accuracy", "mae"] if regression else ["accuracy"]
    lines = [f"Prior fusion on {get_task(args.task).name}'s {len(users)} training users, base {args.base}, "
             f"{backbone.model_id} ({machine(args.device, args.dtype)}):", "",
             "| base options | neighbours | options | fit s | fit queries | "
             + " | ".join(f"training {s} | cross-validated {s}" for s in scores)
             + f" | user scale | cross-validated {scores[-1]} by user scale | weights |",
             "|---|---|---|---|---|" + "---|---|" * len(scores) + "---|---|---|"]
    for base_options, neighbours, own in itertools.product(args.bases, args.neighbours, args.options):
        chosen = pairs([p for p in own.split(",") if p.strip()], "--options")
        options = typed_options(method_class("fusion"), {**chosen, "base": args.base, "base_options": base_options,
                                                         "neighbours": str(neighbours)})
        method = build_method("fusion", get_task(args.task), backbone, **options)
        cached = (fit_folder(method, users) / "DONE").exists()
        started = time.perf_counter()
        fit_method(method, users)
        seconds = "cached" if cached else f"{time.perf_counter() - started:.0f}"
        log = method.fit_log
        weights = ", ".join(f"{name} {w:+.3f}" for name, w in log["weights"].items())
        measured = " | ".join(f"{log['training'][s]:.4f} | {log['cross_validated'][s]:.4f}" for s in scores)
        by_scale = ", ".join(f"{float(k):g}: {v[scores[-1]]:.4f}" for k, v in log["by_scale"].items())
        lines.append(f"| {base_options} | {neighbours} | {own or 'defaults'} | {seconds} | {log['queries']} | "
                     f"{measured} | {log['user_scale']:g} | {by_scale} | {weights} |")
    publish("\n".join(lines), args.report)


if __name__ == "__main__":
    main()
