"""Profile-to-PEFT's deployment cost on one task: seconds per user for each part (summary, embedding, hypernetwork
pass, save), against OPPU's per-user training on the same users in the same run, plus the one-time fit and the
break-even number of users (the paper's section 6, "Deployment Efficiency"). `--quality` also runs P2P beside the
baselines on the dev users, each as its `tailor eval` command. Output: a markdown section for docs/benchmarks/.

The hypernetwork is fitted on the task's training users (or read from tailor's fit cache, e.g. after
`tailor eval --method p2p`); its fit time is the time recorded when it was fitted. Each dev user is then
personalized alone, or `--batch` users at a time as a deployment that personalizes arriving users together would, with
summaries generated cold (a fresh, private text cache), so the summary time is what a new user costs; "save" is the
user's state file, which tailor's store and server read. Exporting one adapter in PEFT's format, needed only to
serve it from another multi-LoRA server, is timed on its own row. OPPU (its multi-task LoRA fitted or read from the
cache the same way) personalizes the same users.

    .venv/bin/python -m benchmarks.p2p --task lamp2n --users 20 --report runs/bench/p2p-cost-lamp2n.md
    .venv/bin/python -m benchmarks.p2p --task lamp2n --users 2 --train-users 4 --set steps=2 \
        --oppu-set steps=2 --oppu-set base_max_total=8   # a smoke run
"""

from __future__ import annotations

import argparse
import json
import shlex
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from benchmarks.common import add_device_options, machine, publish, run, section
from tailor.backbone.defaults import DEFAULT_MODEL
from tailor.backbone.model import Backbone
from tailor.backbone.textcache import TextCache
from tailor.cli._options import parse_options as parse_set  # `--set KEY=VALUE`, cast exactly as `tailor eval` casts it
from tailor.data.lamp import load_users
from tailor.data.splits import subset
from tailor.methods.lora import OPPU
from tailor.methods.p2p import P2P
from tailor.retrieval.embed import default_embedder
from tailor.runs.fits import fit_folder, fit_method
from tailor.tasks import get_task

QUALITY_PLAN = [
    ("user prior", "--method user-prior"),
    ("non-personalized", "--method none"),
    ("RAG k=2", "--method rag --k 2"),
    ("PAG k=2", "--method pag --k 2"),
    ("MT-LoRA", "--method mt-lora"),
    ("OPPU", "--method oppu"),
    ("P2P", "--method p2p"),
]
SPLIT_PLAN = ("user prior", "non-personalized", "RAG k=2", "P2P")


def ms(values: list[float]) -> str:
    return f"{1000 * statistics.mean(values):.1f} | {1000 * float(np.percentile(values, 95)):.1f}"


def fit_seconds(method: P2P | OPPU, users: list) -> float:
    """Seconds the (possibly cached) fit took when it was made, as its fit.json recorded them (for OPPU, that of
    the multi-task LoRA it trains on); this process's time when there is no record."""
    started = time.perf_counter()
    fit_method(method, users)
    took = time.perf_counter() - started
    log = fit_folder(method.base_method() if isinstance(method, OPPU) else method, users) / "fit.json"
    return float(json.loads(log.read_text()).get("seconds", took)) if log.exists() else took


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--task", default="lamp2n")
    parser.add_argument("--model", default=DEFAULT_MODEL)
    parser.add_argument("--users", type=int, default=20, help="dev users personalized, timed and (--quality) evaluated")
    parser.add_argument("--train-users", type=int, default=None, help="training users of the fits (default: all)")
    parser.add_argument("--set", dest="set_", action="append", default=[], help="P2P option KEY=VALUE")
    parser.add_argument("--oppu-set", dest="oppu_set", action="append", default=[], help="OPPU option KEY=VALUE")
    parser.add_argument("--no-oppu", action="store_true", help="skip OPPU (no cost ratio)")
    parser.add_argument("--quality", action="store_true", help="also run P2P and the baselines on the dev users")
    parser.add_argument("--splits", nargs="*", default=[], choices=["random", "ood"],
                        help="also run P2P beside the cheap baselines on these held-out-user splits")
    parser.add_argument("--out", type=Path, default=Path("runs/bench"))
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--batch", type=int, default=1,
                        help="users personalized together (one summary batch, one encoder call, one hypernetwork "
                             "pass); each user's summary, embedding and hypernetwork time is its share of the batch's")
    parser.add_argument("--data-dir", default=None)
    parser.add_argument("--report", type=Path, default=None)
    add_device_options(parser)
    args = parser.parse_args()
    if args.batch < 1:
        parser.error("--batch must be at least 1")

    torch.set_num_threads(args.threads)
    task = get_task(args.task)
    backbone = Backbone.load(args.model, device=args.device, dtype=args.dtype)
    train = subset(load_users(task, "train", args.data_dir), args.train_users, 0)
    users = subset(load_users(task, "dev", args.data_dir), args.users, 0)

    p2p = P2P(task, backbone, **parse_set(args.set_))
    p2p_fit_s = fit_seconds(p2p, train)
    default_embedder()(["warm-up"])  # load the encoder before timing, as a server would
    parts: dict[str, list[float]] = {"summary": [], "embed": [], "hypernet": [], "save": []}
    peft_export: list[float] = []
    with tempfile.TemporaryDirectory() as tmp:
        p2p.text_cache = TextCache(Path(tmp) / "cold-summaries.sqlite")
        for start in range(0, len(users), args.batch):
            chunk = users[start:start + args.batch]
            for i, (user, state) in enumerate(zip(chunk, p2p.personalize_many(chunk)), start):
                started = time.perf_counter()
                state.save(Path(tmp) / f"{i}.safetensors")
                parts["save"].append(time.perf_counter() - started)
                started = time.perf_counter()
                p2p.export_peft(state, Path(tmp) / f"peft-{i}", user.queries[0] if user.queries else None)
                peft_export.append(time.perf_counter() - started)
                for part in ("summary", "embed", "hypernet"):
                    parts[part].append(float(state.header[f"{part}_s"]))
                print(f"user {user.id}: " + ", ".join(f"{k} {v[-1]:.3f} s" for k, v in parts.items())
                      + f", peft export {peft_export[-1]:.3f} s", file=sys.stderr, flush=True)
    total = [sum(p[i] for p in parts.values()) for i in range(len(users))]
    without_summary = [t - s for t, s in zip(total, parts["summary"])]

    rows = [f"| {part} | {ms(values)} |" for part, values in parts.items()]
    rows += [f"| **total** | {ms(total)} |", f"| total without the summary | {ms(without_summary)} |",
             f"| PEFT export of one adapter (only to serve it elsewhere; not in the total) | {ms(peft_export)} |"]
    lines = ["| P2P part | ms/user mean | ms/user p95 |", "|---|---|---|", *rows, ""]
    lines += ["| quantity | value |", "|---|---|",
              f"| P2P one-time fit ({min(len(train), p2p.config.train_users or len(train))} of {len(train)} "
              f"training users) | {p2p_fit_s:.0f} s |"]
    if not args.no_oppu:
        oppu = OPPU(task, backbone, **parse_set(args.oppu_set))
        oppu_fit_s = fit_seconds(oppu, train)
        oppu_s = []
        for user in users:
            started = time.perf_counter()
            oppu.personalize(user)
            oppu_s.append(time.perf_counter() - started)
        per_user = statistics.mean(oppu_s)
        saving = per_user - statistics.mean(total)
        lines += [f"| OPPU per-user training, mean | {per_user:.2f} s |",
                  f"| OPPU one-time fit (its MT-LoRA base) | {oppu_fit_s:.0f} s |",
                  f"| OPPU / P2P per-user cost | {per_user / statistics.mean(total):.1f}x |",
                  f"| OPPU / P2P per-user cost without the summary | "
                  f"{per_user / statistics.mean(without_summary):.0f}x |",
                  f"| break-even users (P2P fit / per-user saving) | "
                  f"{p2p_fit_s / saving:.0f} |" if saving > 0 else "| break-even users | never (P2P costs more) |"]
    command = "python -m benchmarks.p2p " + shlex.join(sys.argv[1:])
    text = (f"### Profile-to-PEFT deployment cost, {task.name} ({args.model}, {len(users)} dev users)\n\n"
            f"Machine: {machine(args.device, args.dtype)}, torch threads {args.threads}, users personalized "
            f"{args.batch} at a time. Options: {p2p.describe()}.\n\n"
            + "\n".join(lines) + f"\n\nCommand:\n\n    {command}\n")
    if args.quality:
        runs = [run(label, args.task, method_args, args.out, args.model, args.users, device=args.device,
                    dtype=args.dtype) for label, method_args in QUALITY_PLAN]
        text += "\n" + section(args.task, runs, "non-personalized", args.out / args.model / args.task,
                               f"{task.name}, P2P and baselines")
    for split in args.splits:
        # held-out training users: every fitted method is refitted on the rest, so the split plan leaves out the
        # LoRA baselines whose fits this CPU cannot afford twice more
        runs = [run(label, args.task, method_args, args.out, args.model, split=split, device=args.device,
                    dtype=args.dtype) for label, method_args in QUALITY_PLAN if label in SPLIT_PLAN]
        text += "\n" + section(args.task, runs, "non-personalized", args.out / args.model / args.task,
                               f"{task.name}, P2P on the {split} split (held-out training users)")
    publish(text, args.report)


if __name__ == "__main__":
    main()
