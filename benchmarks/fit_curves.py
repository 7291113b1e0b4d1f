"""The learning curves of the fits runs used: for each run folder, every fit folder it recorded (fit_time.json) that
holds a curve.csv (training loss since the previous point and validation loss on held-out training users, by step,
as P2P's fit writes it), printed as one markdown table per fit with the fit's steps, budget and kept step.

    .venv/bin/python -m benchmarks.fit_curves runs/leaderboard/runs/protocol-0/qwen2.5-coder-0.5b/lamp3/P2P
"""

from __future__ import annotations

import argparse
import csv
import json
from pathlib import Path


def curve_section(run: Path) -> str:
    """Markdown: the run's fits that wrote a learning curve, each as a table."""
    if not (run / "fit_time.json").exists():
        return f"{run}: not a run folder that has fitted (no fit_time.json)"
    fits = json.loads((run / "fit_time.json").read_text()).get("fits") or []
    config = json.loads((run / "config.json").read_text())
    parts = []
    for folder in map(Path, fits):
        if not (folder / "curve.csv").exists():
            continue
        log = json.loads((folder / "fit.json").read_text())
        rows = list(csv.DictReader((folder / "curve.csv").open()))
        kept = log.get("kept_step", log["steps"])
        summary = (f"{config['task']} {config['method']} ({run}): {log['users']} training users, {log['examples']} "
                   f"examples, {log['validation_users']} held-out users; {log['steps']} of {log['planned_steps']} "
                   f"planned steps in a {log['budget_s']:.0f} s budget ({log['seconds']:.0f} s of training after "
                   f"{log['prepare_s']:.0f} s of preparation); the fit ends with the weights of step {kept}.")
        lines = [summary, "",
                 "| step | training loss (since the previous point) | validation loss |", "|---|---|---|"]
        lines += [f"| {r['step']}{' (kept)' if int(r['step']) == kept else ''} | "
                  f"{'—' if int(r['step']) == 0 else format(float(r['train_loss']), '.4f')} | "
                  f"{float(r['validation_loss']):.4f} |" for r in rows]
        parts.append("\n".join(lines))
    return "\n\n".join(parts) or f"{run}: no fit with a learning curve"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("runs", nargs="+", type=Path, help="run folders (tailor eval --out)")
    for run in parser.parse_args().runs:
        print(curve_section(run), end="\n\n")


if __name__ == "__main__":
    main()
