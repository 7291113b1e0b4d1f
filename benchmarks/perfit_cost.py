"""PerFit's cost on one task: trainable parameters, bytes of state and stage-2 seconds per user, inference throughput
with and without the interventions at batch 16. Output: a markdown section for docs/benchmarks/, with its command.

Stage 1 is fitted on the task's training users (or read from tailor's fit cache when an identical stage 1 was fitted
before, e.g. by `tailor eval --method perfit`). Stage 2 is timed per dev user, each user alone, from history to
state (examples, retrieval, the frozen pass and training); for a few users it is timed again with every step run
through the whole network, which is what the frozen pass (`tailor.backbone.partial`) saves. Throughput answers the same requests twice at the same
batch size: once with every user's interventions, once with the same prompts and none (what RAG with PerFit's k
would cost); classification tasks are timed in label scoring, generation tasks in greedy generation.

    .venv/bin/python -m benchmarks.perfit_cost --task lamp2m --users 30 --report runs/perfit/cost-lamp2m.md
"""

from __future__ import annotations

import argparse
import shlex
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from benchmarks.common import add_device_options, machine, publish
from tailor.backbone.device import dtype_name
from tailor.backbone.model import Backbone
from tailor.cli._options import parse_options as parse_set  # `--set KEY=VALUE`, cast exactly as `tailor eval` casts it
from tailor.data.lamp import load_users
from tailor.data.splits import subset
from tailor.methods.perfit import PerFit, describe_counts, parameter_counts
from tailor.methods.prompting import RAG
from tailor.runs.fits import fit_method
from tailor.tasks import get_task


def spread(values: list[float], digits: int = 2) -> str:
    """Mean / median / p95 (nearest rank) / max."""
    p95 = float(np.percentile(values, 95, method="inverted_cdf"))
    return " / ".join(f"{v:,.{digits}f}" for v in (statistics.mean(values), statistics.median(values), p95, max(values)))


def throughput(method: RAG, requests: list, repeats: int) -> float:
    """Queries per second over `repeats` passes (the first pass is a warm-up and not counted)."""
    method.predict(requests[:method.config.batch_size])
    started = time.perf_counter()
    for _ in range(repeats):
        method.predict(requests)
    return repeats * len(requests) / (time.perf_counter() - started)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--task", default="lamp2m")
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--users", type=int, default=30, help="dev users personalized and timed")
    parser.add_argument("--queries", type=int, default=64, help="requests in the throughput measurement")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--uncached-users", type=int, default=3,
                        help="users whose stage 2 is also timed without the frozen pass (every step in full)")
    parser.add_argument("--set", dest="set_", action="append", default=[], help="PerFit option KEY=VALUE")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--data-dir", default=None)
    parser.add_argument("--report", type=Path, default=None)
    add_device_options(parser)
    args = parser.parse_args()

    torch.set_num_threads(args.threads)
    task = get_task(args.task)
    backbone = Backbone.load(args.model, device=args.device, dtype=args.dtype)
    options = {**parse_set(args.set_), "batch_size": 16}
    method = PerFit(task, backbone, **options)
    counts = parameter_counts(backbone, method.config)
    print(describe_counts(backbone, method.config), file=sys.stderr, flush=True)

    started = time.perf_counter()
    fit_method(method, load_users(task, "train", args.data_dir))
    fit_s = time.perf_counter() - started

    users = subset(load_users(task, "dev", args.data_dir), args.users, 0)
    seconds, states, sizes, phases = [], [], [], []
    with tempfile.TemporaryDirectory() as tmp:
        for user in users:
            started = time.perf_counter()
            phases.append({})
            state = method.personalize(user, phases=phases[-1])
            seconds.append(time.perf_counter() - started)
            states.append(state)
            sizes.append(state.save(Path(tmp) / f"{len(sizes)}.safetensors").stat().st_size)
            print(f"user {user.id}: {len(user.profile)} items, {seconds[-1]:.2f} s", file=sys.stderr, flush=True)

    uncached = []
    for user, cached_s in zip(users[:args.uncached_users], seconds):
        started = time.perf_counter()
        method.stage2(user, cached=False)
        uncached.append((time.perf_counter() - started, cached_s))

    requests = [(s, q) for s, u in zip(states, users) for q in u.queries]
    requests = (requests * (args.queries // max(len(requests), 1) + 1))[:args.queries]
    plain = RAG(task, backbone, k=method.config.k, history_tokens=method.config.history_tokens, batch_size=16)
    plain_requests = [(plain.personalize(u), q) for u in users for q in u.queries]
    plain_requests = (plain_requests * (args.queries // max(len(plain_requests), 1) + 1))[:args.queries]
    with_edits = throughput(method, requests, args.repeats)
    without = throughput(plain, plain_requests, args.repeats)

    trained = [p for p in phases if p]  # users with no history train nothing
    split = " / ".join(f"{statistics.mean(p[k] for p in trained):.2f}" for k in ("examples", "frozen_pass", "steps")) \
        if trained else "no user trained"
    prompt_tokens = [p["prompt_tokens"] for p in trained] or [0.0]
    tokens = statistics.mean(p["tokens"] for p in trained) if trained else 0.0
    step_line = (f"{statistics.mean(p['optimiser_steps'] for p in trained):.1f} "
                 f"({sum(p['steps'] for p in trained) / sum(p['optimiser_steps'] for p in trained):.3f})"
                 if trained else "no user trained")
    command = "python -m benchmarks.perfit_cost " + shlex.join(sys.argv[1:])
    items = [len(u.profile) for u in users]
    tensor_bytes = statistics.mean(s.nbytes for s in states)
    lora_bytes = counts["oppu_lora_r8_per_user"] * 4
    mode = "label scoring" if method.scoring else "greedy generation"
    comparison = (f"{statistics.mean(u for u, _ in uncached):.2f} (vs {statistics.mean(c for _, c in uncached):.2f})"
                  if uncached else "not measured")
    text = f"""### PerFit cost, {task.name} ({args.model}, {dtype_name(backbone.dtype)}, {len(users)} dev users)

Machine: {machine(args.device, args.dtype)}, torch threads {args.threads}. Options: {method.describe()}.

| quantity | value |
|---|---|
| stage-1 trainable parameters | {counts['stage1']:,} |
| stage-2 trainable parameters per user | {counts['stage2_per_user']:,} |
| OPPU LoRA r=8 (q, v) per user, same backbone | {counts['oppu_lora_r8_per_user']:,} |
| stage 2 vs OPPU | {100 * (1 - counts['stage2_per_user'] / counts['oppu_lora_r8_per_user']):.1f}% fewer |
| backbone parameters | {counts['backbone']:,} |
| state tensors per user (R, W, b, float32) | {tensor_bytes:,.0f} B (OPPU's LoRA in float32: {lora_bytes:,} B) |
| state file per user (with the history the prompt retrieves from) | {statistics.mean(sizes):,.0f} B |
| stage-1 fit (or cache read) | {fit_s:.1f} s |
| stage-2 s per user: mean / median / p95 / max | {spread(seconds)} |
| of which, mean s per user: examples (retrieval, tokens) / frozen pass / optimiser steps | {split} |
| prompt tokens in the frozen pass per user: mean / median / p95 / max (with the answers: mean {tokens:,.0f}) | {spread(prompt_tokens, 0)} |
| frozen-pass speed (prompt tokens per s, all users) | {sum(prompt_tokens) / max(sum(p.get("frozen_pass", 0) for p in phases), 1e-9):,.0f} |
| optimiser steps per user: mean (s per step) | {step_line} |
| history items per user: mean / max | {statistics.mean(items):.1f} / {max(items)} |
| stage 2 without the frozen pass, same {len(uncached)} users: s per user (vs with it) | {comparison} |
| throughput at batch 16, {mode}, with interventions | {with_edits:.2f} queries/s |
| the same prompts without interventions | {without:.2f} queries/s |

Command:

    {command}
"""
    publish(text, args.report)


if __name__ == "__main__":
    main()
