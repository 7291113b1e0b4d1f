"""How long reading LaMP's files takes: the largest training file of each task in the data folder, parsed cold
(the parse cache cleared) and warm, and how many users and history items it holds.

    .venv/bin/python -m benchmarks.data_load --repeats 3

Numbers are medians over repeats; the machine should be otherwise idle. A run over all users reads every file once,
so this bounds what data loading adds to a run.
"""

from __future__ import annotations

import argparse
import statistics
import time

from benchmarks.common import machine
from tailor.data import lamp
from tailor.data.lamp import available_tasks, load_users, resolve_data_dir


def cold_and_warm(task: str, split: str, repeats: int) -> tuple[float, float, int, int]:
    """Median seconds of a cold and of a warm `load_users`, and the users and history items read."""
    cold, warm = [], []
    for _ in range(repeats):
        lamp._parse_file.cache_clear()
        started = time.perf_counter()
        users = load_users(task, split)
        cold.append(time.perf_counter() - started)
        started = time.perf_counter()
        load_users(task, split)
        warm.append(time.perf_counter() - started)
    return statistics.median(cold), statistics.median(warm), len(users), sum(len(u) for u in users)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--split", default="train")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    print(f"machine: {machine()}; data: {resolve_data_dir()}; split: {args.split}; repeats: {args.repeats}\n")
    print("| task | users | history items | cold s | warm s |")
    print("|---|---:|---:|---:|---:|")
    for task in available_tasks():
        cold, warm, users, items = cold_and_warm(task, args.split, args.repeats)
        print(f"| {task} | {users:,} | {items:,} | {cold:.3f} | {warm:.3f} |")


if __name__ == "__main__":
    main()
