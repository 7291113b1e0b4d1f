"""PerFit's 20-trial random search (section 4.1) over ranks, layers, positions and learning rates, on training users
only.

The task's training users are split (seeded) into a fit part, on which every trial fits stage 1, and a held-out tuning
part: each tuning user gets a stage 2 from their history and is scored on their own query (training users' golds are
public). Dev users are never read. Trials are appended to trials.jsonl as they finish, so a killed search resumes; a
trial whose stage 1 equals an earlier one's reads it from tailor's fit cache.

Layer sets follow the paper: single layers early to late, and the symmetric sets of its cumulative-intervention
figure (c layers around the middle layer, spaced n_layers / c apart, footnote 4).

    .venv/bin/python -m benchmarks.perfit_search --task lamp2m --out runs/perfit/search-lamp2m
"""

from __future__ import annotations

import argparse
import json
import random
import shlex
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Sequence

import torch

from benchmarks.common import add_device_options, machine
from tailor.backbone.defaults import DEFAULT_MODEL
from tailor.backbone.model import Backbone
from tailor.cli._options import parse_options as parse_set  # `--set KEY=VALUE`, cast exactly as `tailor eval` casts it
from tailor.data.lamp import load_users
from tailor.methods.perfit import PerFit
from tailor.tasks import get_task
from tailor.tasks.lamp import Task
from tailor.tasks.metrics import compute_metrics, higher_is_better, metric_names
from tailor.tasks.records import User


def layer_sets(n_layers: int) -> list[str]:
    """Single layers at 0, 10, 25, 50 and 75% depth, and 2, 4 and 8 layers spread around the middle layer."""
    def nearest(x: float) -> int:  # halves up, so the spread sets are evenly spaced
        return min(n_layers - 1, max(0, int(x + 0.5)))

    singles = sorted({nearest(f * (n_layers - 1)) for f in (0.0, 0.1, 0.25, 0.5, 0.75)})
    spread = []
    for count in (2, 4, 8):
        if count > n_layers:
            continue
        spacing = n_layers / count
        chosen = sorted({nearest(n_layers / 2 + (j - (count - 1) / 2) * spacing) for j in range(count)})
        spread.append(",".join(map(str, chosen)))
    return list(dict.fromkeys([str(layer) for layer in singles] + spread))


SPACE: dict[str, Sequence[Any]] = {
    "k": (0, 1, 2, 4),
    "positions": ("l1", "l3", "l5", "l9", "f3+l3", "f5+l5"),
    "rank1": (1, 2, 4, 8),
    "rank2": (1, 2, 4, 8),
    "lr1": (5e-4, 1e-3, 2e-3, 5e-3),
    "lr2": (5e-4, 1e-3, 2e-3, 5e-3),
    "batch2": (4, 8, 16),
    "stage2_init": ("identity", "loreft"),
}


def sample_trials(n_layers: int, trials: int, seed: int) -> list[dict[str, Any]]:
    rng = random.Random(seed)
    space = {"layers": layer_sets(n_layers), **SPACE}
    return [{name: rng.choice(list(values)) for name, values in space.items()} for _ in range(trials)]


def split_train(users: Sequence[User], tune: int, seed: int) -> tuple[list[User], list[User]]:
    """(fit part, tuning part): tuning users need history (for stage 2) and an answered query (to be scored)."""
    order = list(range(len(users)))
    random.Random(seed).shuffle(order)
    eligible = [i for i in order if users[i].profile and any(q.gold is not None for q in users[i].queries)]
    chosen = set(eligible[:tune])
    return [users[i] for i in range(len(users)) if i not in chosen], [users[i] for i in sorted(chosen)]


def run_trial(task: Task, backbone: Backbone, options: dict[str, Any], fit_users: Sequence[User],
              tune_users: Sequence[User]) -> dict[str, Any]:
    method = PerFit(task, backbone, **options)
    started = time.perf_counter()
    method.fit(fit_users)
    fit_s = time.perf_counter() - started
    started = time.perf_counter()
    states = [method.personalize(u) for u in tune_users]
    stage2_s = (time.perf_counter() - started) / max(len(tune_users), 1)
    requests = [(s, q) for s, u in zip(states, tune_users) for q in u.queries if q.gold is not None]
    predictions = method.predict(requests)
    metrics = compute_metrics(task, [p.text for p in predictions], [q.gold for _, q in requests])  # type: ignore[misc]
    return {"metrics": metrics, "fit_s": round(fit_s, 2), "stage2_s_per_user": round(stage2_s, 3)}


def report(task: Task, records: list[dict[str, Any]], command: str, fit_users: int, tune_users: int,
           fixed: dict[str, Any], where: str) -> tuple[str, dict[str, Any]]:
    """The markdown of the search, ranked by the task's main metric, and the chosen options. `where`: `machine(...)`
    of the search's device and precision."""
    main_metric = metric_names(task)[0]
    sign = 1 if higher_is_better(main_metric) else -1
    ranked = sorted(records, key=lambda r: -sign * r["metrics"][main_metric])
    best = ranked[0]
    names = metric_names(task)
    keys = ["layers", *SPACE]
    header = "| trial | " + " | ".join(keys) + " | " + " | ".join(names) + " | stage 2 s/user |"
    rows = [header, "|" + "---|" * (len(keys) + len(names) + 2)]
    for r in ranked:
        cells = [str(r["options"][k]) for k in keys] + [f"{r['metrics'][n]:.3f}" for n in names]
        rows.append(f"| {r['trial']} | " + " | ".join(cells) + f" | {r['stage2_s_per_user']:.2f} |")
    chosen = {k: best["options"][k] for k in keys}
    text = f"""### PerFit random search, {task.name}

{len(records)} trials on training users only: stage 1 fitted on {fit_users} of them, each trial scored on the queries
of {tune_users} held-out training users (stage 2 from their own history). Fixed options: {fixed}.
Machine: {where}. Chosen by {main_metric}: `{" ".join(f"--set {k}={v}" for k, v in chosen.items())}`.

{chr(10).join(rows)}

Command:

    {command}
"""
    return text, chosen


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--task", default="lamp2m")
    parser.add_argument("--model", default=DEFAULT_MODEL)
    parser.add_argument("--trials", type=int, default=20)
    parser.add_argument("--tune-users", type=int, default=40, help="held-out training users scored per trial")
    parser.add_argument("--stage1-examples", type=int, default=256, help="stage-1 budget per trial")
    parser.add_argument("--set", dest="set_", action="append", default=[], help="fixed PerFit option KEY=VALUE")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--data-dir", default=None)
    parser.add_argument("--out", type=Path, default=Path("runs/perfit/search"))
    add_device_options(parser)
    args = parser.parse_args()

    torch.set_num_threads(args.threads)
    task = get_task(args.task)
    backbone = Backbone.load(args.model, device=args.device, dtype=args.dtype)
    fit_users, tune_users = split_train(load_users(task, "train", args.data_dir), args.tune_users, args.seed)
    fixed = {"stage1_examples": args.stage1_examples, "seed": args.seed, **parse_set(args.set_)}
    args.out.mkdir(parents=True, exist_ok=True)
    log = args.out / "trials.jsonl"
    done = {r["trial"]: r for r in map(json.loads, log.read_text().splitlines())} if log.exists() else {}
    for trial, sampled in enumerate(sample_trials(backbone.n_layers, args.trials, args.seed)):
        options = {**sampled, **fixed}
        if trial in done:
            if done[trial]["options"] != options:
                raise SystemExit(f"{log} holds trial {trial} with other options; use a new --out")
            continue
        print(f"trial {trial}: {sampled}", file=sys.stderr, flush=True)
        record = {"trial": trial, "options": options, **run_trial(task, backbone, options, fit_users, tune_users)}
        print(f"  -> {record['metrics']}, stage 2 {record['stage2_s_per_user']} s/user", file=sys.stderr, flush=True)
        with log.open("a") as handle:
            handle.write(json.dumps(record) + "\n")
        done[trial] = record
    command = "python -m benchmarks.perfit_search " + shlex.join(sys.argv[1:])
    text, chosen = report(task, [done[t] for t in sorted(done)], command, len(fit_users), len(tune_users), fixed,
                          machine(args.device, args.dtype))
    (args.out / "best.json").write_text(json.dumps({**chosen, "stage1_examples": args.stage1_examples}, indent=1))
    (args.out / "search.md").write_text(text)
    print(text)
    print(f"mean stage-2 s/user over trials: {statistics.mean(r['stage2_s_per_user'] for r in done.values()):.2f}",
          file=sys.stderr)


if __name__ == "__main__":
    main()
