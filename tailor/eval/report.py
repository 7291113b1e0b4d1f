"""Markdown reports comparing run dirs against a baseline (`tailor report`), with a chart and a cost table.

Each run's own numbers come from its metrics.json, as the runner measured them. Deltas against the baseline are
recomputed from the predictions with a paired bootstrap over users, on the queries both runs answered only: runs may
cover different users, and a difference between unpaired sets would mix the methods with the sample.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np

from tailor.runs.record import Run, cell, load_run, metric_header, table, value_with_ci, wall_time
from tailor.tasks.lamp import Task
from tailor.tasks.metrics import higher_is_better, metric_names
from tailor.tasks.stats import PairedResult, paired_bootstrap


class CompareError(ValueError):
    """The runs given cannot be compared as asked (different tasks, no shared queries, no such baseline)."""


# --- several runs -----------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Pairing:
    """A run against the baseline on the queries both answered."""

    n_queries: int
    results: dict[str, PairedResult]


def _common_task(runs: Sequence[Run]) -> Task:
    tasks = {run.task.name for run in runs}
    if len(tasks) > 1:
        listing = ", ".join(f"{run.path} ({run.task.name})" for run in runs)
        raise CompareError(f"cannot compare runs of different tasks: {listing}")
    return runs[0].task


def _pick_baseline(runs: Sequence[Run], baseline: str | None) -> Run:
    """The run named by `baseline`: by display label first, then method, then run dir name; the first run if None."""
    if baseline is None:
        return runs[0]
    for key in (lambda r: r.label, lambda r: r.config["method"], lambda r: r.path.name):
        matches = [run for run in runs if key(run) == baseline]
        if len(matches) == 1:
            return matches[0]
        if matches:
            dirs = ", ".join(str(run.path) for run in matches)
            raise CompareError(f"baseline {baseline!r} is ambiguous: it names {dirs}; pass a label or run dir name")
    known = ", ".join(sorted({run.label for run in runs}))
    raise CompareError(f"no run matches baseline {baseline!r}; runs are: {known}")


def _pair(task: Task, run: Run, base: Run, n_resamples: int, seed: int) -> Pairing:
    """Paired bootstrap of run against base over their shared query_ids (in the baseline's order)."""
    theirs = {str(r["query_id"]): r for r in run.predictions}
    shared = [(b, theirs[str(b["query_id"])]) for b in base.predictions if str(b["query_id"]) in theirs]
    if not shared:
        raise CompareError(f"runs {run.path} and {base.path} share no query_id, so they cannot be paired")
    for b, r in shared:
        if (str(b["user_id"]), b["gold"]) != (str(r["user_id"]), r["gold"]):
            raise CompareError(f"query {b['query_id']!r} has a different user or gold in {run.path} than in {base.path}")
    results = paired_bootstrap(
        task,
        preds_a=[r["prediction"] for _, r in shared],
        preds_b=[b["prediction"] for b, _ in shared],
        golds=[b["gold"] for b, _ in shared],
        user_ids=[str(b["user_id"]) for b, _ in shared],
        n_resamples=n_resamples,
        seed=seed,
    )
    return Pairing(n_queries=len(shared), results=results)


def _display_labels(runs: Sequence[Run]) -> list[str]:
    """Run labels, with the run dir name added where two runs would otherwise show the same label."""
    labels = [run.label for run in runs]
    return [f"{label} ({run.path.name})" if labels.count(label) > 1 else label for label, run in zip(labels, runs)]


def _delta_cell(result: PairedResult) -> str:
    return f"{result.delta:+.4f} (p={result.p_value:.3f})"


def _top_answer(answers: Sequence[str]) -> str:
    """The most frequent answer and how often it is given: a run that answers one label for everyone shows it."""
    if not answers:
        return "—"
    answer, count = Counter(answers).most_common(1)[0]
    return f"{cell(answer)} ({count}/{len(answers)})"


def _comparison_table(runs: Sequence[Run], metrics: Sequence[str], pairings: Sequence[Pairing | None],
                      answers: bool) -> str:
    """One row per run; `pairings` holds each run's comparison with the baseline, None for the baseline itself.
    With `answers` (labels and scores, not generated text), a column shows each run's most frequent answer."""
    header = ["run", "mode", "queries", *(["most frequent answer"] if answers else []),
              *(metric_header(m) for m in metrics), *(f"Δ {m} vs baseline (p)" for m in metrics), "paired queries",
              "run s"]
    rows = []
    for run, label, pairing in zip(runs, _display_labels(runs), pairings):
        values = [value_with_ci(run, m) for m in metrics]
        if pairing is None:
            name, deltas, paired = f"{label} (baseline)", ["—"] * len(metrics), "—"
        else:
            name, paired = label, pairing.n_queries
            deltas = [_delta_cell(pairing.results[m]) for m in metrics]
        top = [_top_answer([str(r["prediction"]) for r in run.predictions])] if answers else []
        rows.append([name, run.mode, len(run.predictions), *top, *values, *deltas, paired, wall_time(run)])
    return table(header, rows)


def _write_chart(runs: Sequence[Run], base: Run, metrics: Sequence[str], path: Path) -> None:
    """One bar subplot per metric, CI error bars, the baseline in its own colour.

    matplotlib is imported here, and drawn through the Agg canvas directly, so importing tailor.eval stays light and
    never changes the process's global matplotlib backend.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    labels = _display_labels(runs)
    figure = Figure(figsize=(1.5 + 0.9 * len(runs) * len(metrics), 4.5), layout="constrained")
    FigureCanvasAgg(figure)
    for axes, metric in zip(figure.subplots(1, len(metrics), squeeze=False)[0], metrics):
        heights, below, above = [], [], []
        for run in runs:
            value, ci = run.metric(metric)
            heights.append(float("nan") if value is None else value)
            below.append(max(0.0, value - ci[0]) if value is not None and ci else 0.0)
            above.append(max(0.0, ci[1] - value) if value is not None and ci else 0.0)
        colours = ["tab:orange" if run is base else "tab:blue" for run in runs]
        axes.bar(range(len(runs)), heights, yerr=[below, above], color=colours, capsize=4)
        axes.set_xticks(range(len(runs)), labels, rotation=30, ha="right")
        axes.set_title(f"{metric} ({'higher' if higher_is_better(metric) else 'lower'} is better)")
    figure.suptitle(f"{runs[0].task.name}: baseline {base.label} in orange")
    figure.savefig(path, format="png", dpi=120)


def cost_table(runs: Sequence[Run]) -> str:
    """Each run's one-time fit and per-user cost, from its own files: the fit's seconds (metrics.json's `fit_s`), and
    per user the personalize seconds (mean, p95, max), the saved state's bytes and the prediction seconds per query.

    Per-user figures are sums over a user's prediction rows (the runner spreads a user's personalize time over their
    queries), so they are what personalizing that user cost, wherever the run was resumed. A method that personalizes
    users together (`personalize_many`: P2P's batched pass, PAG's batched summaries) records each group's mean, so
    its p95 and max are over groups, not users.
    """
    rows = []
    for run in runs:
        personalize: dict[str, float] = {}
        state_bytes: dict[str, float] = {}
        predict = []
        for record in run.predictions:
            user = str(record["user_id"])
            if "personalize_s" in record:
                personalize[user] = personalize.get(user, 0.0) + float(record["personalize_s"])
            if "state_bytes" in record:
                state_bytes[user] = float(record["state_bytes"])
            if "predict_s" in record:
                predict.append(float(record["predict_s"]))
        fit = run.metrics.get("fit_s")
        seconds = np.array(list(personalize.values()))
        rows.append([
            run.label, len({str(r["user_id"]) for r in run.predictions}),
            "n/a" if fit is None else f"{float(fit):.1f}",
            *(("n/a",) * 3 if not len(seconds) else
              (f"{seconds.mean():.3f}", f"{np.percentile(seconds, 95):.3f}", f"{seconds.max():.3f}")),
            f"{np.mean(list(state_bytes.values())):,.0f}" if state_bytes else "n/a",
            f"{np.mean(predict):.3f}" if predict else "n/a",
        ])
    header = ["run", "users", "fit s (once)", "personalize s/user mean", "p95", "max", "state bytes/user",
              "predict s/query"]
    return ("Cost per run (from each run's predictions.jsonl and metrics.json; wall seconds as measured, on whatever "
            "else the machine was doing):\n\n" + table(header, rows))


def compare_runs(
    run_dirs: Sequence[str | Path],
    baseline: str | None = None,
    out_dir: str | Path | None = None,
    *,
    n_resamples: int = 1000,
    seed: int = 0,
    costs: bool = False,
) -> str:
    """A markdown comparison of runs of one task against a baseline run (by label, method or dir name; default first).

    Each run shows its recorded metrics with CIs, mode and run seconds (fit + personalize + predict); each other run
    also shows the paired-bootstrap delta (run − baseline) and p-value on the queries it shares with the baseline, and
    how many those are. With `costs`, a second table gives each run's one-time fit and its per-user cost (see
    `cost_table`). With `out_dir`, also writes comparison.md and a bar chart, comparison.png, there.
    """
    if not run_dirs:
        raise CompareError("no run dirs to compare")
    runs = [load_run(d) for d in run_dirs]
    task = _common_task(runs)
    base = _pick_baseline(runs, baseline)
    metrics = metric_names(task)
    pairings = [None if run is base else _pair(task, run, base, n_resamples, seed) for run in runs]
    answers = task.family != "generation"
    golds = [str(r["gold"]) for r in base.predictions if r.get("gold") is not None]
    text = (
        f"# {task.name}: comparison against {base.label}\n\n"
        + _comparison_table(runs, metrics, pairings, answers)
        + f"\n\nMetric values are each run's own, with its recorded CI. Δ is run − baseline on the queries both "
        f"runs answered (\"paired queries\"), with a two-sided paired bootstrap p-value over users ({n_resamples} "
        f"resamples, seed {seed}). Run s: its fit, personalize and predict seconds (a swapped control that borrowed "
        f"its states counts what they cost their lender).\n"
        + (f"The most frequent gold answer of the baseline's queries: {_top_answer(golds)}.\n"
           if answers and golds else "")
        + (f"\n{cost_table(runs)}\n" if costs else "")
    )
    if out_dir is not None:
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        (out / "comparison.md").write_text(text, encoding="utf-8")
        _write_chart(runs, base, metrics, out / "comparison.png")
    return text
