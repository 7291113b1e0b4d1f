"""docs/scaling.md's cost model, computed from measured inputs: core-hours, workers for a deadline and state
storage for 1 M and 100 M users, per method.

Inputs come from files that benchmarks wrote, never from the command line alone:
- `--ray runs/ray-scaling/ray_scaling.json` (repeatable): per method, the 1-worker run's personalize s/user,
  predict s/query, state file bytes and fit s, the worker start-up, and the scaling efficiency E2 of its 2-worker run;
- `--run LABEL=RUN_DIR`: a `tailor eval` run folder's metrics.json (personalize s/user, predict s/query, fit s as
  that run recorded it: 0 when the fit came from the fit cache) and its state files; E2 is not measured for these,
  and the table says so and takes 1.0;
- `--set LABEL:KEY=VALUE` replaces one input by a figure measured elsewhere (for instance P2P's personalize time
  with a cold summary cache, from benchmarks.p2p); every replaced input is listed under the table.

    .venv/bin/python -m benchmarks.cost_model --ray runs/ray-scaling/ray_scaling.json \
        --run OPPU=runs/bench/smollm2-135m/lamp2n/OPPU --set OPPU:t_fit=2622

The formulas are docs/scaling.md's section 3: c = t_pers + q * t_pred core-seconds per user,
C = U * c / (3600 * E2) core-hours, W = ceil(U * c / (3600 * E2 * (T - (t_fit + t_start) / 3600))) workers to finish
in T hours, S = U * b_state and P = U * q * b_row bytes.
"""

from __future__ import annotations

import argparse
import json
import math
import shlex
import sys
from dataclasses import dataclass, replace
from pathlib import Path

from benchmarks.common import publish


@dataclass(frozen=True)
class Inputs:
    source: str
    t_fit: float
    t_pers: float
    t_pred: float
    b_state: float
    e2: float | None
    t_start: float = 0.0
    b_row: float | None = None
    """Bytes per line of the run's predictions.jsonl (the predictions' storage, P = U * q * b_row)."""


def row_bytes(predictions: Path) -> float | None:
    if not predictions.exists():
        return None
    lines = predictions.read_bytes().count(b"\n")
    return predictions.stat().st_size / lines if lines else None


def from_ray(path: Path) -> dict[str, Inputs]:
    data = json.loads(path.read_text())
    runs = data["results"]
    out = {}
    for one in (r for r in runs if r["workers"] == 1):
        two = next((r for r in runs if r["method"] == one["method"] and r["workers"] == 2), None)
        e2 = two["users_per_s"] / (2 * one["users_per_s"]) if two else None
        m = one["metrics"]
        out[one["method"]] = Inputs(f"{path} ({m['task']}, {one['users']} users)", float(data["fit_s"][one["method"]]),
                                    m["personalize_s_per_user"], m["predict_s_per_query"],
                                    float(one["state_file_bytes"]), e2, one["startup_s"],
                                    row_bytes(Path(one["run_dir"]) / "predictions.jsonl"))
    return out


def from_run(folder: Path) -> Inputs:
    m = json.loads((folder / "metrics.json").read_text())
    states = list((folder / "states").glob("*.safetensors"))
    b_state = sum(f.stat().st_size for f in states) / len(states) if states else float(m["state_bytes_per_user"])
    return Inputs(f"{folder} ({m['task']}, {m['n_users']} users)", float(m["fit_s"]), m["personalize_s_per_user"],
                  m["predict_s_per_query"], b_state, None, b_row=row_bytes(folder / "predictions.jsonl"))


def figures(x: Inputs, users: float, deadline_h: float, queries: float) -> tuple[float, int | None, float]:
    """Core-hours, workers to finish within the deadline (None when the fit alone overruns it), state bytes."""
    c = x.t_pers + queries * x.t_pred
    e2 = x.e2 or 1.0
    core_hours = users * c / (3600 * e2)
    left = deadline_h - (x.t_fit + x.t_start) / 3600
    workers = max(1, math.ceil(core_hours / left)) if left > 0 else None
    return core_hours, workers, users * x.b_state


def human_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB", "PB"):
        if n < 1000 or unit == "PB":
            return f"{n:.3g} {unit}"
        n /= 1000
    raise AssertionError


def report(inputs: dict[str, Inputs], overrides: list[str], deadline_h: float, queries: float,
           command: str) -> str:
    lines = ["| method | t_fit s | t_start s | t_pers s/user | t_pred s/query | b_state bytes/user | b_row bytes | E2 "
             "| source |", "|---|---|---|---|---|---|---|---|---|"]
    for name, x in inputs.items():
        e2 = f"{x.e2:.2f}" if x.e2 is not None else "not measured (1.0 used)"
        b_row = f"{x.b_row:.0f}" if x.b_row is not None else "-"
        lines.append(f"| {name} | {x.t_fit:.0f} | {x.t_start:.1f} | {x.t_pers:.3f} | {x.t_pred:.3f} | "
                     f"{x.b_state:.0f} | {b_row} | {e2} | {x.source} |")
    lines += ["", f"Deadline T = {deadline_h:g} h, q = {queries:g} queries per user.", "",
              "| method | users | core-hours C | workers for T | state storage S | predictions P |",
              "|---|---|---|---|---|---|"]
    for name, x in inputs.items():
        for users in (1e6, 1e8):
            core_hours, workers, storage = figures(x, users, deadline_h, queries)
            predictions = human_bytes(users * queries * x.b_row) if x.b_row is not None else "-"
            lines.append(f"| {name} | {users:,.0f} | {core_hours:,.0f} | "
                         f"{f'{workers:,}' if workers is not None else 'the fit alone exceeds T'} | "
                         f"{human_bytes(storage)} | {predictions} |")
    if overrides:
        lines += ["", "Inputs replaced by `--set`: " + "; ".join(f"`{o}`" for o in overrides) + "."]
    lines += ["", "Command:", "", f"    {command}", ""]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--ray", type=Path, action="append", default=[],
                        help="ray_scaling.json of benchmarks.ray_scaling (repeatable)")
    parser.add_argument("--run", action="append", default=[], help="LABEL=RUN_DIR of a `tailor eval` run")
    parser.add_argument("--set", dest="set_", action="append", default=[],
                        help="LABEL:KEY=VALUE, KEY one of t_fit, t_start, t_pers, t_pred, b_state, e2")
    parser.add_argument("--deadline-hours", type=float, default=24.0)
    parser.add_argument("--queries", type=float, default=1.0, help="queries per user (LaMP: 1)")
    parser.add_argument("--report", type=Path, default=None)
    args = parser.parse_args()

    inputs: dict[str, Inputs] = {}
    for path in args.ray:
        for label, measured in from_ray(path).items():
            if label in inputs:
                parser.error(f"{label!r} is measured in two --ray files; keep one")
            inputs[label] = measured
    for entry in args.run:
        label, sep, folder = entry.partition("=")
        if not sep:
            parser.error(f"--run takes LABEL=RUN_DIR, got {entry!r}")
        if label in inputs:
            parser.error(f"the label {label!r} is used twice")
        inputs[label] = from_run(Path(folder))
    for entry in args.set_:
        label, _, assignment = entry.partition(":")
        key, sep, value = assignment.partition("=")
        if label not in inputs or not sep or key not in Inputs.__dataclass_fields__ or key == "source":
            parser.error(f"--set takes LABEL:KEY=VALUE for a known label and input, got {entry!r}")
        inputs[label] = replace(inputs[label], **{key: float(value)})
    if not inputs:
        parser.error("give --ray and/or --run")
    command = "python -m benchmarks.cost_model " + shlex.join(sys.argv[1:])
    publish(report(inputs, args.set_, args.deadline_hours, args.queries, command), args.report)


if __name__ == "__main__":
    main()
