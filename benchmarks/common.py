"""Shared by the benchmark scripts: run `tailor eval` commands exactly as printed, and turn run folders into the
markdown sections of the studies in docs/benchmarks/. Every script that runs the backbone takes `--device` and `--dtype`
(`add_device_options`), passes them on to what it loads or runs, and prints what they resolved to in its header
(`machine`), so each number says where and in what precision it was measured."""

from __future__ import annotations

import argparse
import os
import platform
import shlex
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Mapping, Sequence

from tailor.backbone.device import DTYPES, describe_device, dtype_name, resolve_device, resolve_dtype
from tailor.eval.report import compare_runs
from tailor.tasks import get_task


def add_device_options(parser: argparse.ArgumentParser, dtype: bool = True) -> None:
    """`--device` and (unless the script chooses precisions itself) `--dtype`, with `tailor eval`'s values and
    defaults."""
    parser.add_argument("--device", default="auto",
                        help="auto (the first CUDA device when present, else the CPU), cpu, cuda, cuda:N or mps")
    if dtype:
        parser.add_argument("--dtype", default="auto", choices=["auto", *DTYPES],
                            help="the backbone's precision; auto: bfloat16 where the device computes it in hardware, "
                                 "else float32")


def machine(device: str | None = None, dtype: str | None = None) -> str:
    """The CPU, cores and Python; with `device` (and `dtype`), also what they resolve to here and the hardware behind
    the device. A device or precision this machine lacks raises DeviceError (one line)."""
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor())
    text = f"{cpu}, {os.cpu_count()} cores, Python {platform.python_version()}"
    if device is None:
        return text
    where = resolve_device(device)
    precision = f" in {dtype_name(resolve_dtype(dtype, where))}" if dtype is not None else ""
    return f"{text}; backbone on {where} ({describe_device(where)}){precision}"


def device_flags(device: str, dtype: str) -> str:
    """The `--device X --dtype Y` of a `tailor eval` or `tailor serve` command line."""
    return f"--device {device} --dtype {dtype}"


def slug(label: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "-" for c in label.replace(", ", "-").replace("=", ""))


def run_folder(out: Path, model: str, task: str, label: str, split: str = "dev") -> Path:
    """Where `run` keeps the run of `label`: a later run (a swapped control borrowing its states) finds it here."""
    return out / model / task / (slug(label) if split == "dev" else f"{split}-{slug(label)}")


def run(label: str, task: str, method_args: str, out: Path, model: str, users: int | None = None,
        split: str = "dev", device: str = "auto", dtype: str = "auto",
        env: Mapping[str, str] | None = None) -> tuple[Path, str]:
    """Run one `tailor eval` (resuming if its folder exists; in `env`, else this process's environment) and return
    (folder, the command as run)."""
    folder = run_folder(out, model, task, label, split)
    command = (f"tailor eval --task {task} {method_args} --model {model} {device_flags(device, dtype)} --seed 0 "
               + (f"--split {split} " if split != "dev" else "")
               + (f"--users {users} " if users else "") + f"--out {folder} --label '{label}'")
    print(f"$ {command}", file=sys.stderr, flush=True)
    subprocess.run([str(Path(sys.executable).parent / "tailor"), *shlex.split(command)[1:]], check=True, env=env)
    return folder, command


def section(task: str, runs: Sequence[tuple[Path, str]], baseline: str, out: Path, title: str | None = None) -> str:
    """A markdown section: the comparison table (CIs, paired significance against `baseline`) and the commands."""
    folders = [folder for folder, _ in runs]
    chart = out / slug(title or task)
    table = compare_runs(folders, baseline=baseline, out_dir=chart)
    table = table.split("\n", 1)[1].lstrip() if table.startswith("# ") else table
    listing = "\n".join(f"    {command}" for _, command in runs)
    return f"### {title or get_task(task).name}\n\n{table.strip()}\n\nCommands:\n\n{listing}\n"


def publish(text: str, report: Path | None) -> None:
    """Print a benchmark's markdown, and also write it to `report` when one is given."""
    if report:
        report.parent.mkdir(parents=True, exist_ok=True)
        report.write_text(text)
    print(text)


SHARED = ("models", "fits")
"""Cache folders that cold measurements still share: what is converted or fitted once. Text and hidden-state
caches are not."""


def fresh_cache(folder: Path, shared_root: Path) -> Path:
    """An empty cache folder whose models/ and fits/ are links into the shared cache."""
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    for name in SHARED:
        (shared_root / name).mkdir(parents=True, exist_ok=True)
        (folder / name).symlink_to(shared_root / name, target_is_directory=True)
    return folder


BASELINE = "non-personalized"
"""The row every benchmark section compares against (its Δ and p-values)."""


def chosen(label: str, only: Sequence[str] | None) -> bool:
    """Whether `--only` selects a plan row. The baseline row is always kept: the section is measured against it."""
    return not only or label in only or label == BASELINE
