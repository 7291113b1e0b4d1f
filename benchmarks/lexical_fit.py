"""Choose lexical fusion's options on training users only: fit it once per configuration and report, for each
length factor, its ROUGE-1 cross-validated over folds of training users (their own queries, answered from their whole
history, as a dev user's is), beside copying the input (the floor) and the oracle that keeps exactly the input's words
found in the gold (the most that deleting words can give). No backbone is loaded; dev users are not read.

    .venv/bin/python -m benchmarks.lexical_fit --task lamp4 --configs "add=false,history_examples=0" \
        "add=true,history_examples=0" "add=true,history_examples=4"
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Sequence
from pathlib import Path

from benchmarks.common import machine, publish
from tailor.data.lamp import load_users
from tailor.methods.lexical import LexicalFusion, words_of
from tailor.methods.options import pairs, typed_options
from tailor.tasks import get_task
from tailor.tasks.metrics import compute_metrics


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--task", default="lamp4")
    parser.add_argument("--data", default="../shared/lamp")
    parser.add_argument("--configs", nargs="+", default=["add=true,history_examples=4"],
                        help="lexical fusion's options to compare, KEY=VALUE,...")
    parser.add_argument("--report", type=Path, help="also write the table to this markdown file")
    args = parser.parse_args(argv)
    task = get_task(args.task)
    train = load_users(task, "train", args.data)
    asked = [(u, q) for u in train for q in u.queries if q.gold]
    golds = [q.gold for _, q in asked]
    copies = [task.retrieval_query(q.input) for _, q in asked]
    oracle = [" ".join(w for w in c.split() if set(words_of(w)) & set(words_of(g))) for c, g in zip(copies, golds)]
    lines = [f"Lexical fusion on {task.name}'s {len(train)} training users ({args.data}), seed 0; no backbone "
             f"({machine()}). Copying the input: ROUGE-1 {compute_metrics(task, copies, golds)['rouge1']:.4f}; the "
             f"oracle deletion: {compute_metrics(task, oracle, golds)['rouge1']:.4f}.", "",
             "| options | examples | cross-validated ROUGE-1 by length factor t | chosen t | training ROUGE-1 | fit s |",
             "|---|---|---|---|---|---|"]
    for config in args.configs:
        options = typed_options(LexicalFusion, pairs([p for p in config.split(",") if p], "--configs"))
        method = LexicalFusion(task, **options)
        start = time.perf_counter()
        method.fit(train)
        log = method.fit_log
        cells = ", ".join(f"{f:g}: {s:.4f}" for f, s in log["by_factor"].items())
        lines.append(f"| {config} | {log['examples']} | {cells} | {log['length_factor']:g} | "
                     f"{log['training_rouge1']:.4f} | {time.perf_counter() - start:.1f} |")
    publish("\n".join(lines), args.report)


if __name__ == "__main__":
    main()
