"""CHAMELEON on the dev users of each task, its ablations, and its per-user cost, as markdown for BENCHMARKS.md.

Defaults (layers, scales) are chosen on TRAINING users (`--tune`), never on the dev users reported.

    .venv/bin/python -m benchmarks.chameleon --tune --tasks lamp2m      # choose layers and scale on 40 train users
    .venv/bin/python -m benchmarks.chameleon --tasks lamp2n lamp2m lamp3 lamp4 lamp7
    .venv/bin/python -m benchmarks.chameleon --ablations --tasks lamp2m
    .venv/bin/python -m benchmarks.chameleon --cost --tasks lamp2m
    .venv/bin/python -m benchmarks.chameleon --cost --calibrate --tasks lamp3   # LaMP-3 keeps pairs only calibrated
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path

import torch

from benchmarks.common import BASELINE, add_device_options, chosen, fresh_cache, machine, publish, run, section, slug
from tailor.backbone.defaults import DEFAULT_MODEL
from tailor.backbone.device import dtype_name
from tailor.backbone.loading import cache_root
from tailor.backbone.model import Backbone
from tailor.data.lamp import load_users
from tailor.data.splits import subset
from tailor.methods.chameleon import Chameleon
from tailor.store.state import UserState
from tailor.store.store import Store
from tailor.tasks import get_task

MAIN_PLAN = [
    ("user prior", "--method user-prior"),
    ("non-personalized", "--method none"),
    ("RAG k=4", "--method rag --k 4"),
    ("CHAMELEON history prompt, no edit", "--method chameleon --set scale_p=0 --set scale_n=0"),
    ("CHAMELEON per user", "--method chameleon"),
    ("CHAMELEON group", "--method chameleon --set scope=group"),
    ("CHAMELEON unseen users", "--method chameleon --set scope=unseen --set history_in_prompt=false"),
]
ABLATIONS = [
    ("non-personalized", "--method none"),
    ("CHAMELEON history prompt, no edit", "--method chameleon --set scale_p=0 --set scale_n=0"),
    ("CHAMELEON both directions", "--method chameleon"),
    ("CHAMELEON theta_P only", "--method chameleon --set direction=personal"),
    ("CHAMELEON theta_N only", "--method chameleon --set direction=neutral"),
    ("CHAMELEON random directions", "--method chameleon --set direction=random"),
    *[(f"CHAMELEON {n} edited layers", f"--method chameleon --set layers={n}") for n in (1, 5, 10)],
    *[(f"CHAMELEON {n} history items", f"--method chameleon --set history={n}") for n in (1, 5, 15, 20)],
    *[(f"CHAMELEON group of {n} users", f"--method chameleon --set scope=group --set groups=1 --set group_users={n}")
      for n in (20, 50, 100)],
]
TUNING = [("tune no edit", "--method chameleon --set scale_p=0 --set scale_n=0"),
          *[(f"tune layers={layers} scale={scale}",
             f"--method chameleon --set layers={layers} --set scale_p={scale} --set scale_n={scale}")
            for layers in (1, 3, 5) for scale in (0.5, 1.0, 2.0, 4.0, 8.0)]]


def cost(task_name: str, model: str, users: int, out: Path, calibrate: bool = False, device: str = "auto",
         dtype: str = "auto") -> str:
    """Per-user seconds by stage, state bytes, and predict throughput at batch 16 with the edit on and off.

    Generations and hidden states go to a fresh cache (OUT/chameleon-cost-cache), so the stage times are a first
    run's even after other benchmarks cached these users. `calibrate` scores labels against content-free prompts,
    in the pairs and at predict time alike (on LaMP-3 uncalibrated pairs collapse, so there is nothing to edit)."""
    torch.set_num_threads(2)
    os.environ["TAILOR_CACHE"] = str(fresh_cache(out / "chameleon-cost-cache", cache_root()))
    backbone = Backbone.load(model, device=device, dtype=dtype)
    task = get_task(task_name)
    chosen = subset(load_users(task, "dev"), users, seed=1)
    method = Chameleon(task, backbone, calibrate=calibrate)
    states = method.personalize_many(chosen)
    stages: dict[str, list[float]] = {}
    for state in states:
        for stage, seconds in state.header["seconds"].items():
            stages.setdefault(stage, []).append(seconds)
    # The edit's cost is measured on rows that carry one: the users whose pairs gave directions, cycled to a
    # batch of 16, against the same rows with both scales at 0 (the same prompt, no edit).
    edited = [(state, user) for state, user in zip(states, chosen) if state.tensors["layers"].numel()]
    scoring = ", calibrated label scoring" if calibrate else ""
    lines = [f"Per-user cost on {len(chosen)} dev users of {task.name} (first run, empty caches), {model}, "
             f"{backbone.device}, {dtype_name(backbone.dtype)}, 2 threads{scoring}. Every stage but the directions "
             "runs batched over all the users, and each user records the batch's time divided by the users, so those "
             "stages' max equals their mean:\n",
             "| stage | mean s/user | max s/user |", "|---|---|---|"]
    for stage, values in stages.items():
        lines.append(f"| {stage} | {statistics.mean(values):.3f} | {max(values):.3f} |")
    lines.append(f"\nState bytes per user (tensors): mean {statistics.mean(s.nbytes for s in states):.0f}, "
                 f"max {max(s.nbytes for s in states)}; pairs kept / dropped: "
                 f"{sum(s.header['pairs_kept'] for s in states)} / {sum(s.header['pairs_dropped'] for s in states)}; "
                 f"users whose state edits any layer: {len(edited)} of {len(states)}.")
    if not edited:
        lines.append("\nNo user kept a pair, so no row carries an edit: the edit's throughput is not measured.")
        return "\n".join(lines) + "\n"
    plain = Chameleon(task, backbone, scale_p=0.0, scale_n=0.0, calibrate=calibrate)
    queries = [user.queries[0] for _, user in edited]
    off = plain.personalize_many([user for _, user in edited])  # generations and hidden states from the cache
    timings = {}
    for name, m, user_states in (("edit off", plain, off), ("edit on", method, [state for state, _ in edited])):
        m.config.batch_size = 16
        reqs = [(user_states[i % len(edited)], queries[i % len(edited)]) for i in range(16)]
        timings[name] = _throughput(m, reqs)
    unit = "queries/s" if method.scoring else "generated tokens/s"
    how = "" if method.scoring else (f", every row decoding {method.max_new_tokens} tokens whatever it says, so "
                                     "that a different answer length does not count as the edit's cost")
    lines.append(f"\nPredict throughput at batch 16 ({method.mode}{how}), every row edited ({len(edited)} "
                 f"distinct users cycled): edit on {timings['edit on']:.2f} {unit}, "
                 f"edit off {timings['edit off']:.2f} {unit}, ratio {timings['edit on'] / timings['edit off']:.2f}.")
    return "\n".join(lines) + "\n\n" + json.dumps({"stages": {k: statistics.mean(v) for k, v in stages.items()}})


def _throughput(method: Chameleon, requests: list, repeats: int = 3) -> float:
    """Queries per second of label scoring, or generated tokens per second of decoding with EOS ignored; one
    untimed warm-up call first."""
    if method.scoring:
        method.predict(requests)
        started = time.perf_counter()
        for _ in range(repeats):
            method.predict(requests)
        return repeats * len(requests) / (time.perf_counter() - started)
    tokens = method.max_new_tokens

    def decode() -> None:  # as LMPersonalizer.predict does, but past EOS
        prompts, edits, rows = method.forward_inputs(requests)
        method.backbone.generate(prompts, tokens, len(prompts), edits, rows, stop_at_eos=False)

    decode()
    started = time.perf_counter()
    for _ in range(repeats):
        decode()
    return repeats * len(requests) * tokens / (time.perf_counter() - started)


def pair_stats(folder: Path) -> str:
    """How much preference data CHAMELEON's users kept (section 3.1 drops pairs whose two answers agree), and how
    many states edit anything, read from the saved states of a run (RUN/states) or of a `tailor serve` store. A user
    with no kept pair gets no direction and so no edit; a group or unseen user inherits its group's directions."""
    if (folder / "index.sqlite").exists():  # a store: its index says which file is each user's current state
        store = Store(folder)
        states = [store.load_state(t["id"], r.user_id, "chameleon", record=r) for t in store.tenants()
                  for r in store.users(t["id"]) if r.has_state]
    else:
        states = [UserState.load(f, method="chameleon") for f in sorted((folder / "states").glob("*.safetensors"))]
    if not states:
        raise SystemExit(f"no CHAMELEON states in {folder / 'states'} or in a store at {folder}")
    edited = sum(1 for s in states if s.tensors["layers"].numel())
    text = f"{folder}: {len(states)} users; "
    if "pairs_kept" in states[0].header:  # per-user scope: the user's own pairs
        kept = [s.header["pairs_kept"] for s in states]
        text += (f"synthetic pairs kept {sum(kept)}, dropped {sum(s.header['pairs_dropped'] for s in states)} "
                 f"(answers identical); users with at least one kept pair {sum(k > 0 for k in kept)}; ")
    text += f"users whose state edits any layer {edited}"
    if "group" in states[0].header:  # group and unseen scopes: the group's pooled pairs
        groups: dict[int, list[int]] = {}
        for s in states:
            groups.setdefault(s.header["group"], []).append(s.tensors["layers"].numel())
        text += "; users per group (edited layers): " + ", ".join(
            f"group {g}: {len(v)} ({v[0]})" for g, v in sorted(groups.items()))
    if "insight_p" in states[0].header:
        text += (f". First user's insights: personalized {states[0].header['insight_p']!r}, "
                 f"neutral {states[0].header['insight_n']!r}")
    return text + "."


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--tasks", nargs="+", default=["lamp2n", "lamp2m", "lamp3", "lamp4", "lamp7"])
    parser.add_argument("--out", type=Path, default=Path("runs/bench"))
    parser.add_argument("--model", default=DEFAULT_MODEL)
    parser.add_argument("--users", type=int, default=None)
    parser.add_argument("--tune", action="store_true", help="grid on 40 training users (never dev users)")
    parser.add_argument("--ablations", action="store_true")
    parser.add_argument("--cost", action="store_true")
    parser.add_argument("--calibrate", action="store_true", help="with --cost: calibrated label scoring")
    parser.add_argument("--only", nargs="*", default=None,
                        help="labels to run (default: the whole plan); the baseline row is always included")
    parser.add_argument("--report", type=Path, default=None)
    parser.add_argument("--pair-stats", type=Path, nargs="+", default=None, metavar="FOLDER",
                        help="instead of running anything: kept pairs and edited users of finished runs' states "
                             "(RUN_DIR) or of a serve store (STORE_DIR)")
    add_device_options(parser)
    args = parser.parse_args()
    if args.pair_stats:
        print("\n".join(pair_stats(folder) for folder in args.pair_stats))
        return
    sections = [f"Machine: {machine(args.device, args.dtype)}. Model: {args.model}, seed 0.\n"]
    for name in args.tasks:
        if args.cost:
            measured = cost(name, args.model, args.users or 16, args.out, args.calibrate, args.device, args.dtype)
            sections.append(f"### CHAMELEON cost, {get_task(name).name}\n\n{measured}")
            continue
        if args.tune:
            plan, split, users, title = TUNING + [("non-personalized", "--method none")], "train", 40, "tuning"
        elif args.ablations:
            plan, split, users, title = ABLATIONS, "dev", args.users, "ablations"
        else:
            # The first CHAMELEON run of the plan generates every user's insights and pairs from scratch; later runs
            # reuse them from the cache, so it is the first run's personalize time that is DPO's fair budget.
            per_user = args.out / args.model / name / slug("CHAMELEON history prompt, no edit")
            plan = MAIN_PLAN + [("time-constrained DPO", f"--method dpo --set budget_run={per_user}")]
            split, users, title = "dev", args.users, "main"
        runs = [run(label, name, method_args, args.out, args.model, users, split, args.device, args.dtype)
                for label, method_args in plan if chosen(label, args.only)]
        sections.append(section(name, runs, BASELINE, args.out / args.model / name,
                                title=f"{get_task(name).name}, CHAMELEON {title}"))
    text = "\n".join(sections)
    publish(text, args.report)


if __name__ == "__main__":
    main()
