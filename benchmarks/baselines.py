"""The foundation's baselines on every dev user of each task, as markdown for BENCHMARKS.md.

Each configuration is one `tailor eval` command, run as written (so the command beside a number is the command that
made it); runs resume, so re-running this script only computes what is missing.

    .venv/bin/python -m benchmarks.baselines --tasks lamp2n lamp2m lamp3 lamp4 lamp7 --out runs/bench
"""

from __future__ import annotations

import argparse
from pathlib import Path

from benchmarks.common import BASELINE, add_device_options, chosen, machine, publish, run, section
from tailor.backbone.defaults import DEFAULT_MODEL
from tailor.tasks import get_task

CLASSIFICATION_PLAN = [
    ("global prior", "--method global-prior"),
    ("user prior", "--method user-prior"),
    ("non-personalized", "--method none"),
    ("non-personalized, calibrated", "--method none --calibrate"),
    ("RAG k=1", "--method rag --k 1"),
    ("RAG k=4", "--method rag --k 4"),
    ("RAG k=4, calibrated", "--method rag --k 4 --calibrate"),
    ("PAG k=4", "--method pag --k 4"),
    ("full history", "--method full"),
]
GENERATION_PLAN = [(label, args) for label, args in CLASSIFICATION_PLAN if "calibrated" not in label]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--tasks", nargs="+", default=["lamp2n", "lamp2m", "lamp3", "lamp4", "lamp7"])
    parser.add_argument("--out", type=Path, default=Path("runs/bench"))
    parser.add_argument("--model", default=DEFAULT_MODEL)
    parser.add_argument("--users", type=int, default=None, help="default: every dev user")
    parser.add_argument("--only", nargs="*", default=None,
                        help="labels to run (default: the whole plan); the baseline row is always included")
    parser.add_argument("--report", type=Path, default=None, help="also write the markdown here")
    add_device_options(parser)
    args = parser.parse_args()

    sections = [f"Machine: {machine(args.device, args.dtype)}. Model: {args.model}. Data: ../shared/lamp dev split, "
                f"{'all' if args.users is None else args.users} users, seed 0.\n"]
    for name in args.tasks:
        plan = CLASSIFICATION_PLAN if get_task(name).family != "generation" else GENERATION_PLAN
        runs = [run(label, name, method_args, args.out, args.model, args.users, device=args.device,
                    dtype=args.dtype) for label, method_args in plan if chosen(label, args.only)]
        sections.append(section(name, runs, BASELINE, args.out / args.model / name))
    text = "\n".join(sections)
    publish(text, args.report)


if __name__ == "__main__":
    main()
