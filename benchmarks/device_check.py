"""Every method on one device, end to end: a short evaluation of each and the mixed-user check on the real model, as
one markdown table. scripts/gpu-check.sh runs it on a machine with CUDA; on a CPU it checks the same code paths.

    .venv/bin/python -m benchmarks.device_check --device cuda --users 3
    .venv/bin/python -m benchmarks.device_check --device cpu --methods rag,lora-p --model PATH --data-dir PATH

For each method of `tailor.methods.REGISTRY` (or `--methods`), `tailor.eval.runner.run_eval` evaluates `--users` dev
users of `--task` into a fresh run folder OUT/METHOD (removed first, so its seconds are this run's; fits still come
from tailor's fit cache when an identical fit was made before), with small fixed options (`options`) so that each
method finishes in well under a few minutes on a GPU: the numbers say that a method runs on the device and answers
sensibly, not how good it is. The metric, device, precision and hardware are those metrics.json records.

Then, for every method that answers through the backbone, the check of tests/test_contract.py
(`test_a_mixed_batch_equals_each_user_alone`) on the packaged model instead of the tiny random one: every user is asked
every user's question, the rows interleaved in one batch, and each user's rows are asked again alone. "mixed==alone"
says whether every answer is the same; max |Δscore| is the largest difference of a label's log-likelihood between the
two (padding and batch shape change the kernels, so on a GPU and in bfloat16 it is small but not always 0).

A method that fails is reported in the table and its error below it; the exit status is then 1.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import time
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from benchmarks.common import add_device_options, machine, slug
from tailor.backbone.device import DeviceError, resolve_device, resolve_dtype
from tailor.backbone.model import Backbone
from tailor.eval.runner import run_eval
from tailor.methods import REGISTRY, build_method, method_class
from tailor.methods.base import Personalizer, Prediction
from tailor.runs.chunks import personalize_with_states
from tailor.runs.spec import EvalSpec, run_users
from tailor.tasks import get_task
from tailor.tasks.metrics import metric_names
from tailor.tasks.records import Query


def options(name: str, n_layers: int) -> dict[str, Any]:
    """Small fixed options per method (modest sizes of tests/test_contract.py's CASES for the real model); layers are
    chosen within the backbone's depth, so a small local model runs the same check."""
    middle = n_layers // 2
    insights = {"history": 4, "insight_tokens": 16, "ccs_restarts": 1, "ccs_steps": 50}
    return {
        "rag": {"k": 2},
        "pag": {"k": 2, "summary_items": 8, "summary_tokens": 32},
        "full": {"history_tokens": 512},
        "chameleon": insights,
        "dpo": {**insights, "budget_s": 5.0, "r": 8, "alpha": 16, "max_length": 512},
        "perfit": {"layers": str(middle), "stage1_examples": 64, "epochs1": 1, "epochs2": 1},
        "mt-lora": {"max_total": 64},
        "lora-p": {"steps": 4},
        "oppu": {"steps": 4, "base_max_total": 64},
        "stylevector": {"layer": min(3, n_layers - 1), "max_items": 8},
        "p2p": {"steps": 20, "train_users": 8, "summary_items": 8, "summary_tokens": 32},
    }.get(name, {})


@dataclass
class Row:
    method: str
    task: str
    metric: str
    value: float | None = None
    seconds: float | None = None
    device: str | None = None
    dtype: str | None = None
    same: bool | None = None
    """Mixed batch and each user alone gave the same answers (None: not checked, the method has no backbone)."""
    delta: float | None = None
    error: str | None = None


def mixed_equals_alone(method: Personalizer, spec: EvalSpec, folder: Path) -> tuple[bool, float | None]:
    """Every user asked every user's question in one interleaved batch, against each user's rows alone: whether the
    answers are the same, and the largest label-score difference (None where no answer has scores)."""
    users = list(run_users(spec))
    states = personalize_with_states(method, users, folder / "states")  # the states the run saved
    questions = [u.queries[0] for u in users if u.queries]
    rows = [(state, Query(f"{state.user_id}/{q.id}", q.input)) for q in questions for state in states]
    mixed = method.predict(rows)
    same, delta = True, None
    for state in states:
        own = [i for i, (s, _) in enumerate(rows) if s is state]
        alone = method.predict([rows[i] for i in own])
        for i, answer in zip(own, alone):
            equal, gap = compare(mixed[i], answer)
            same = same and equal
            if gap is not None:
                delta = gap if delta is None else max(delta, gap)
    return same, delta


def compare(a: Prediction, b: Prediction) -> tuple[bool, float | None]:
    """(same answer, largest score difference) of two predictions of one row."""
    equal = a.text == b.text and a.mode == b.mode and (a.scores is None) == (b.scores is None)
    if a.scores is None or b.scores is None or len(a.scores) != len(b.scores):
        return equal, None
    return equal, max((abs(x - y) for x, y in zip(a.scores, b.scores)), default=0.0)


def check(name: str, args: argparse.Namespace, backbone: Backbone | None) -> Row:
    """One method: its evaluation, then (with a backbone) the mixed-user check."""
    task = get_task(args.task)
    main_metric = metric_names(task)[0]
    row = Row(name, task.name, main_metric)
    needs = method_class(name).needs_backbone
    chosen = options(name, backbone.n_layers) if backbone is not None else {}
    spec = EvalSpec(task=args.task, method=name, options=chosen, model=args.model if needs else None,
                    device=args.device, dtype=args.dtype, users=args.users, seed=0, label=name,
                    data_dir=args.data_dir)
    folder = args.out / slug(name)
    shutil.rmtree(folder, ignore_errors=True)
    print(f"device_check: {name} {chosen or ''}", file=sys.stderr, flush=True)
    try:
        method = build_method(name, task, backbone if needs else None, **chosen)
        started = time.perf_counter()
        metrics = run_eval(spec, folder, backbone=backbone if needs else None, method=method)
        row.seconds = time.perf_counter() - started
        row.value = metrics["metrics"][main_metric]["value"]
        row.device, row.dtype = metrics.get("device"), metrics.get("dtype")
        if needs:
            row.same, row.delta = mixed_equals_alone(method, spec, folder)
    except Exception as error:  # a check reports every method; one failure does not hide the others
        traceback.print_exc()
        row.error = f"{type(error).__name__}: {error}".splitlines()[0]
    return row


def table(rows: list[Row]) -> str:
    def cell(value: Any, fmt: str = "") -> str:
        return "-" if value is None else format(value, fmt)

    lines = ["| method | task | metric | value | seconds | device | dtype | mixed==alone | max \\|Δscore\\| |",
             "|---|---|---|---:|---:|---|---|---|---:|"]
    for r in rows:
        value = "error" if r.error else cell(r.value, ".3f")
        same = "-" if r.same is None else "yes" if r.same else "**no**"
        lines.append(f"| {r.method} | {r.task} | {r.metric} | {value} | {cell(r.seconds, '.1f')} | {cell(r.device)} | "
                     f"{cell(r.dtype)} | {same} | {cell(r.delta, '.2e')} |")
    errors = [f"- {r.method}: {r.error}" for r in rows if r.error]
    return "\n".join(lines + ([""] + errors if errors else []))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="smollm2-135m", help="a packaged model or a local Hugging Face folder")
    parser.add_argument("--task", default="lamp2n")
    parser.add_argument("--users", type=int, default=3, help="dev users per method (a seeded sample)")
    parser.add_argument("--methods", nargs="+", default=None, metavar="NAME",
                        help="methods to check, comma- or space-separated (default: every registered method)")
    parser.add_argument("--data-dir", default=None, help="the LaMP folder (default: $TAILOR_DATA or ../shared/lamp)")
    parser.add_argument("--out", type=Path, default=Path("runs/device-check"))
    add_device_options(parser)
    args = parser.parse_args()
    names = [n for entry in args.methods or [] for n in entry.split(",") if n] or list(REGISTRY)
    try:
        resolve_dtype(args.dtype, resolve_device(args.device))
        for name in names:
            method_class(name)
    except (DeviceError, KeyError) as error:
        parser.error(str(error).strip("'\""))
    needs = any(method_class(name).needs_backbone for name in names)
    backbone = Backbone.load(args.model, device=args.device, dtype=args.dtype) if needs else None
    rows = [check(name, args, backbone) for name in names]
    print(f"Machine: {machine(args.device, args.dtype)}. Model: {args.model}, {args.users} dev users, seed 0.\n")
    print(table(rows))
    sys.exit(1 if any(r.error for r in rows) else 0)


if __name__ == "__main__":
    main()
