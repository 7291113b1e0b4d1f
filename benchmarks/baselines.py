"""Run the foundation's baselines on every dev user of each task and write their tables for BENCHMARKS.md.

Each configuration is one `tailor eval` command, run as written (so the command beside a number is the command that
made it); runs resume, so re-running this script only computes what is missing. Output: one markdown section per
task with `tailor report`'s table (CIs, paired significance against the non-personalized model) and the commands.

    .venv/bin/python benchmarks/baselines.py --tasks lamp2n lamp2m lamp3 lamp4 lamp7 --out runs/bench
"""

from __future__ import annotations

import argparse
import platform
import shlex
import subprocess
import sys
from pathlib import Path

from tailor.eval.report import compare_runs
from tailor.tasks import get_task

CLASSIFICATION_PLAN = [
    ("global prior", "--method global-prior"),
    ("user prior", "--method user-prior"),
    ("non-personalized", "--method none"),
    ("non-personalized, calibrated", "--method none --calibrate"),
    ("RAG k=1", "--method rag --k 1"),
    ("RAG k=1, calibrated", "--method rag --k 1 --calibrate"),
    ("RAG k=4", "--method rag --k 4"),
    ("RAG k=4, calibrated", "--method rag --k 4 --calibrate"),
    ("PAG k=4", "--method pag --k 4"),
    ("PAG k=4, calibrated", "--method pag --k 4 --calibrate"),
    ("full history", "--method full"),
    ("full history, calibrated", "--method full --calibrate"),
]
GENERATION_PLAN = [(label, args) for label, args in CLASSIFICATION_PLAN if "calibrated" not in label]


def slug(label: str) -> str:
    return label.replace(", ", "-").replace(" ", "-").replace("=", "")


def machine() -> str:
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor())
    import os

    return f"{cpu}, {os.cpu_count()} cores, Python {platform.python_version()}"


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--tasks", nargs="+", default=["lamp2n", "lamp2m", "lamp3", "lamp4", "lamp7"])
    parser.add_argument("--out", type=Path, default=Path("runs/bench"))
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--users", type=int, default=None, help="default: every dev user")
    parser.add_argument("--only", nargs="*", default=None, help="labels to run (default: the whole plan)")
    parser.add_argument("--report", type=Path, default=None, help="write the markdown here (default: stdout)")
    args = parser.parse_args()

    sections = [f"Machine: {machine()}. Model: {args.model}, float32. Data: ../shared/lamp dev split, "
                f"{'all' if args.users is None else args.users} users, seed 0.\n"]
    for name in args.tasks:
        task = get_task(name)
        plan = CLASSIFICATION_PLAN if task.family != "generation" else GENERATION_PLAN
        folders, commands = [], []
        for label, method_args in plan:
            if args.only and label not in args.only:
                continue
            folder = args.out / args.model / name / slug(label)
            command = (f"tailor eval --task {name} {method_args} --model {args.model} --seed 0 "
                       + (f"--users {args.users} " if args.users else "") + f"--out {folder} --label '{label}'")
            print(f"$ {command}", file=sys.stderr, flush=True)
            subprocess.run([str(Path(sys.executable).parent / "tailor"), *shlex.split(command)[1:]], check=True)
            folders.append(folder)
            commands.append(command)
        table = compare_runs(folders, baseline="non-personalized", out_dir=args.out / args.model / name)
        table = table.split("\n", 1)[1].lstrip() if table.startswith("# ") else table
        listing = "\n".join(f"    {c}" for c in commands)
        sections.append(f"### {task.name}\n\n{table}\n\nCommands:\n\n{listing}\n")
    text = "\n".join(sections)
    if args.report:
        args.report.parent.mkdir(parents=True, exist_ok=True)
        args.report.write_text(text)
    print(text)


if __name__ == "__main__":
    main()
