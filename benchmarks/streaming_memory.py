"""Peak memory of a run over many users: the streamed run against loading the data file whole.

    .venv/bin/python -m benchmarks.streaming_memory --users 100000 --out runs/streaming-memory

Writes a LaMP-3 data folder whose dev file holds `--users` users (the shared dev users repeated under new ids, so the
texts are real), then measures, each in its own process: (a) `load_users` on that file, what every run did before
runs streamed their users, and (b) a whole `tailor eval --method user-prior` run over all of them. Peak resident
memory comes from the kernel's accounting of each child process (`os.wait4`). The user prior needs no backbone, so
the run's memory is the runner's own: the users it holds, its states and its predictions.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

from benchmarks.common import machine, publish
from tailor.data.lamp import load_users, resolve_data_dir


def write_data(folder: Path, users: int, data_dir: str | None) -> int:
    """A LaMP-3 folder: the shared training files as they are, and a dev file of `users` users written one at a
    time (the generator holds one user, like the reader). Returns the dev file's size in bytes."""
    source = resolve_data_dir(data_dir) / "LaMP_3"
    target = folder / "LaMP_3"
    target.mkdir(parents=True, exist_ok=True)
    for name in ("train_questions.json", "train_outputs.json"):
        shutil.copyfile(source / name, target / name)
    dev = load_users("lamp3", "dev", data_dir)
    golds = []
    with open(target / "dev_questions.json", "w", encoding="utf-8") as handle:
        handle.write("[")
        for i in range(users):
            user = dev[i % len(dev)]
            qid = f"s{i}"
            question = {"id": qid, "input": user.queries[0].input, "profile": [item.to_json() for item in user.profile]}
            handle.write(("," if i else "") + json.dumps(question))
            golds.append({"id": qid, "output": user.queries[0].gold})
        handle.write("]")
    (target / "dev_outputs.json").write_text(json.dumps({"task": "LaMP_3", "golds": golds}))
    return (target / "dev_questions.json").stat().st_size


def measure(command: list[str]) -> tuple[float, float]:
    """(peak resident MiB, wall seconds) of one child process run to its end."""
    started = time.perf_counter()
    child = subprocess.Popen(command)
    _, status, usage = os.wait4(child.pid, 0)
    child.returncode = os.waitstatus_to_exitcode(status)
    if child.returncode:
        raise SystemExit(f"failed ({child.returncode}): {' '.join(command)}")
    return usage.ru_maxrss / 1024, time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--users", type=int, default=100_000)
    parser.add_argument("--data-dir", help="the LaMP folder whose LaMP-3 users are repeated (default: the shared one)")
    parser.add_argument("--out", type=Path, default=Path("runs/streaming-memory"))
    parser.add_argument("--report", type=Path)
    args = parser.parse_args()
    data = args.out / "data"
    size = write_data(data, args.users, args.data_dir)
    python = sys.executable
    load_mib, load_s = measure([python, "-c", "import sys; from tailor.data.lamp import load_users; "
                                "print(len(load_users('lamp3', 'dev', sys.argv[1])), 'users loaded')", str(data)])
    run = args.out / "run"
    shutil.rmtree(run, ignore_errors=True)
    eval_command = [str(Path(python).parent / "tailor"), "eval", "--task", "lamp3", "--method", "user-prior",
                    "--data-dir", str(data), "--out", str(run)]
    run_mib, run_s = measure(eval_command)
    metrics = json.loads((run / "metrics.json").read_text())
    lines = [
        f"LaMP-3 dev file of {args.users:,} users ({size / 2**20:,.0f} MiB of JSON; the "
        f"{len(load_users('lamp3', 'dev', args.data_dir))} shared dev users repeated under new ids). Machine: "
        f"{machine()}.",
        "",
        "| process | peak resident MiB | wall s |",
        "|---|---:|---:|",
        f"| `load_users` of the dev file (the whole file in memory) | {load_mib:,.0f} | {load_s:,.1f} |",
        f"| `tailor eval --method user-prior` over all {metrics['n_users']:,} users (streamed) | {run_mib:,.0f} | "
        f"{run_s:,.1f} |",
        "",
        "Command:",
        "",
        f"    python -m benchmarks.streaming_memory --users {args.users} --out {args.out}",
        "",
        "The run, as started:",
        "",
        "    tailor " + " ".join(eval_command[1:]),
    ]
    publish("\n".join(lines) + "\n", args.report)


if __name__ == "__main__":
    main()
