"""Run reports and comparisons, on fake run dirs written the way the eval runner writes them."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from tailor.eval.report import CompareError, compare_runs
from tailor.runs.record import RunDirError, load_run, write_run_report
from tailor.tasks.lamp import NEWS_CATEGORIES
from tailor.tasks.metrics import compute_metrics
from tailor.tasks.stats import bootstrap_ci

N_QUERIES = 120
_RNG = np.random.default_rng(0)
GOLDS = [NEWS_CATEGORIES[i] for i in _RNG.integers(0, 6, N_QUERIES)]
USERS = [f"u{i // 2}" for i in range(N_QUERIES)]  # 60 users with 2 queries each


def _predictions(accuracy: float, seed: int) -> list[str]:
    rng = np.random.default_rng(seed)
    return [g if rng.random() < accuracy else "politics" if g != "politics" else "sports" for g in GOLDS]


def make_run(
    root: Path,
    name: str,
    predictions: list[str],
    *,
    task: str = "LaMP-2N",
    method: str | None = None,
    label: str | None = None,
    mode: str = "scoring",
    queries: range = range(N_QUERIES),
    golds: list[str] = GOLDS,
) -> Path:
    """A run dir with config.json, predictions.jsonl and metrics.json consistent with the predictions."""
    run = root / name
    run.mkdir()
    config = {"task": task, "method": method or name, "method_config": {"k": 4}, "model": "SmolLM2-135M-Instruct",
              "split": "dev", "users": len({USERS[q] for q in queries}), "seed": 0, "mode": mode}
    if label:
        config["label"] = label
    (run / "config.json").write_text(json.dumps(config))
    records = [{"user_id": USERS[q], "query_id": f"q{q}", "prediction": predictions[q], "gold": golds[q],
                "mode": mode, "extra": "ignored"} for q in queries]
    (run / "predictions.jsonl").write_text("\n".join(json.dumps(r) for r in records) + "\n")
    preds, gold, users = [predictions[q] for q in queries], [golds[q] for q in queries], [USERS[q] for q in queries]
    values = compute_metrics(task, preds, gold)
    cis = bootstrap_ci(task, preds, gold, users, n_resamples=200)
    metrics = {"task": task, "method": config["method"], "mode": mode, "n_users": config["users"],
               "n_queries": len(records), "wall_time_s": 12.345,
               "metrics": {m: {"value": values[m], "ci": list(cis[m])} for m in values}}
    (run / "metrics.json").write_text(json.dumps(metrics))
    return run


def parse_table(text: str) -> list[dict[str, str]]:
    """The rows of the first markdown table in `text`, keyed by header."""
    lines = [line for line in text.splitlines() if line.startswith("|")]
    split = [[cell.strip() for cell in line.strip("|").split(" | ")] for line in lines]
    return [dict(zip(split[0], row)) for row in split[2:]]


def _p(cell: str) -> float:
    return float(re.search(r"p=([0-9.]+)", cell).group(1))


@pytest.fixture
def three_runs(tmp_path: Path) -> list[Path]:
    base = _predictions(0.4, seed=1)
    return [
        make_run(tmp_path, "base", base, method="zero_shot"),
        make_run(tmp_path, "good", _predictions(0.95, seed=2), method="rag", label="RAG k=4", mode="generation"),
        make_run(tmp_path, "same", base, method="copy", queries=range(0, N_QUERIES, 2)),
    ]


def test_compare_runs_table(three_runs: list[Path]) -> None:
    text = compare_runs(three_runs, n_resamples=1000)
    rows = {row["run"]: row for row in parse_table(text)}
    assert set(rows) == {"zero_shot (baseline)", "RAG k=4", "copy"}
    base, good, same = rows["zero_shot (baseline)"], rows["RAG k=4"], rows["copy"]

    assert base["mode"] == "scoring" and good["mode"] == "generation"
    assert base["run s"] == "12.3 s"
    assert base["Δ accuracy vs baseline (p)"] == "—" and base["paired queries"] == "—"
    assert good["paired queries"] == str(N_QUERIES)
    assert same["paired queries"] == str(N_QUERIES // 2) and same["queries"] == str(N_QUERIES // 2)

    accuracy = json.loads((three_runs[1] / "metrics.json").read_text())["metrics"]["accuracy"]
    assert good["accuracy ↑"] == f"{accuracy['value']:.4f} [{accuracy['ci'][0]:.4f}, {accuracy['ci'][1]:.4f}]"

    # RAG is far better than the baseline; the copy has the baseline's own predictions on the shared queries.
    assert good["Δ accuracy vs baseline (p)"].startswith("+")
    assert _p(good["Δ accuracy vs baseline (p)"]) < 0.01
    assert _p(good["Δ f1 vs baseline (p)"]) < 0.01
    assert same["Δ accuracy vs baseline (p)"] == "+0.0000 (p=1.000)"
    assert "1000 resamples" in text
    for row, path in zip((base, good, same), three_runs):  # a run answering one label for everyone shows it
        answers = [json.loads(line)["prediction"] for line in (path / "predictions.jsonl").read_text().splitlines()]
        answer, count = re.fullmatch(r"(.*) \((\d+)/\d+\)", row["most frequent answer"]).groups()
        assert answers.count(answer) == int(count) == max(answers.count(a) for a in answers)
    golds = [json.loads(line)["gold"] for line in (three_runs[0] / "predictions.jsonl").read_text().splitlines()]
    answer, count, total = re.search(r"most frequent gold answer of the baseline's queries: (.*) \((\d+)/(\d+)\)",
                                     text).groups()
    assert golds.count(answer) == int(count) == max(golds.count(g) for g in golds) and int(total) == len(golds)


def test_delta_is_measured_on_shared_queries_only(tmp_path: Path) -> None:
    base = _predictions(0.4, seed=1)
    better_on_odd = [GOLDS[q] if q % 2 else base[q] for q in range(N_QUERIES)]
    runs = [make_run(tmp_path, "base", base), make_run(tmp_path, "even", better_on_odd, queries=range(0, N_QUERIES, 2))]
    # On the even queries the second run equals the baseline, whatever it does on the odd ones.
    row = parse_table(compare_runs(runs, n_resamples=100))[1]
    assert row["Δ accuracy vs baseline (p)"] == "+0.0000 (p=1.000)"


def test_baseline_choice(three_runs: list[Path]) -> None:
    by_label = parse_table(compare_runs(three_runs, baseline="RAG k=4", n_resamples=50))
    assert [row["run"] for row in by_label] == ["zero_shot", "RAG k=4 (baseline)", "copy"]
    assert by_label[0]["Δ accuracy vs baseline (p)"].startswith("-")
    by_method = parse_table(compare_runs(three_runs, baseline="rag", n_resamples=50))
    assert by_method[1]["run"] == "RAG k=4 (baseline)"
    with pytest.raises(CompareError, match="no run matches baseline 'bm25'"):
        compare_runs(three_runs, baseline="bm25")


def test_ambiguous_baseline_and_duplicate_labels(tmp_path: Path) -> None:
    runs = [make_run(tmp_path, name, _predictions(0.5, seed=i), method="rag") for i, name in enumerate(["r1", "r2"])]
    with pytest.raises(CompareError, match="ambiguous"):
        compare_runs(runs, baseline="rag")
    rows = parse_table(compare_runs(runs, baseline="r2", n_resamples=50))
    assert [row["run"] for row in rows] == ["rag (r1)", "rag (r2) (baseline)"]


def test_out_dir_gets_markdown_and_png(three_runs: list[Path], tmp_path: Path) -> None:
    out = tmp_path / "comparison"
    text = compare_runs(three_runs, out_dir=out, n_resamples=50)
    assert (out / "comparison.md").read_text() == text
    png = (out / "comparison.png").read_bytes()
    assert png.startswith(b"\x89PNG\r\n\x1a\n")
    from matplotlib.image import imread

    image = imread(out / "comparison.png")
    assert image.ndim == 3 and image.shape[0] > 100 and image.shape[1] > 100


def test_generation_runs_compare(tmp_path: Path) -> None:
    golds = [f"headline number {i} about topic {i % 7}" for i in range(N_QUERIES)]
    runs = [
        make_run(tmp_path, "echo", golds, task="LaMP-4", golds=golds),
        make_run(tmp_path, "noise", ["completely unrelated words"] * N_QUERIES, task="LaMP-4", golds=golds),
    ]
    rows = parse_table(compare_runs(runs, n_resamples=200))
    assert "most frequent answer" not in rows[0]  # generated text: no label to count
    assert rows[0]["rouge1 ↑"].startswith("1.0000")
    assert rows[1]["Δ rougeL vs baseline (p)"].startswith("-1.0000")


def test_runs_of_different_tasks_are_refused(tmp_path: Path) -> None:
    scores = [str(1 + i % 5) for i in range(N_QUERIES)]
    runs = [make_run(tmp_path, "news", _predictions(0.5, seed=1)),
            make_run(tmp_path, "reviews", scores, task="LaMP-3", golds=scores)]
    with pytest.raises(CompareError, match="different tasks"):
        compare_runs(runs)


def test_runs_without_shared_queries_are_refused(tmp_path: Path) -> None:
    predictions = _predictions(0.5, seed=1)
    runs = [make_run(tmp_path, "even", predictions, queries=range(0, N_QUERIES, 2)),
            make_run(tmp_path, "odd", predictions, queries=range(1, N_QUERIES, 2))]
    with pytest.raises(CompareError, match="share no query_id"):
        compare_runs(runs)


def test_disagreeing_golds_are_refused(tmp_path: Path) -> None:
    predictions = _predictions(0.5, seed=1)
    other_golds = ["crime"] + GOLDS[1:]
    runs = [make_run(tmp_path, "a", predictions), make_run(tmp_path, "b", predictions, golds=other_golds)]
    with pytest.raises(CompareError, match="different user or gold"):
        compare_runs(runs)


@pytest.mark.parametrize("missing", ["config.json", "predictions.jsonl"])
def test_missing_file_is_named(tmp_path: Path, missing: str) -> None:
    run = make_run(tmp_path, "run", _predictions(0.5, seed=1))
    (run / missing).unlink()
    with pytest.raises(RunDirError, match=re.escape(f"{missing}: file is missing")):
        load_run(run)


def test_an_unfinished_run_is_called_unfinished(tmp_path: Path) -> None:
    run = make_run(tmp_path, "run", _predictions(0.5, seed=1))
    (run / "metrics.json").unlink()  # what a run still being written, or killed, looks like
    with pytest.raises(RunDirError, match=re.escape("the run is not finished (no metrics.json yet)")):
        load_run(run)


def test_the_cli_reports_runs_it_cannot_compare_in_one_line(tmp_path: Path) -> None:
    scores = [str(1 + i % 5) for i in range(N_QUERIES)]
    runs = [make_run(tmp_path, "news", _predictions(0.5, seed=1)),
            make_run(tmp_path, "reviews", scores, task="LaMP-3", golds=scores)]
    result = subprocess.run([sys.executable, "-m", "tailor.cli", "report", *map(str, runs)], capture_output=True,
                            text=True)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "error: cannot compare runs of different tasks" in result.stderr


def test_corrupt_files_are_named(tmp_path: Path) -> None:
    run = make_run(tmp_path, "run", _predictions(0.5, seed=1))
    (run / "metrics.json").write_text("{not json")
    with pytest.raises(RunDirError, match="metrics.json: not valid JSON"):
        load_run(run)

    run = make_run(tmp_path, "run2", _predictions(0.5, seed=1))
    lines = (run / "predictions.jsonl").read_text().splitlines()
    lines[2] = '{"user_id": "u1", "prediction": "x", "gold": "politics"}'
    (run / "predictions.jsonl").write_text("\n".join(lines))
    with pytest.raises(RunDirError, match="predictions.jsonl, line 3: missing query_id"):
        load_run(run)

    run = make_run(tmp_path, "run3", _predictions(0.5, seed=1))
    (run / "config.json").write_text(json.dumps({"task": "LaMP-9", "method": "rag"}))
    with pytest.raises(RunDirError, match="config.json: unknown task"):
        load_run(run)

    with pytest.raises(RunDirError, match="run dir does not exist"):
        compare_runs([tmp_path / "nowhere"])


def test_write_run_report(tmp_path: Path) -> None:
    run = make_run(tmp_path, "rag", _predictions(0.7, seed=3), label="RAG k=4")
    path = write_run_report(run)
    assert path == run / "report.md"
    text = path.read_text()
    assert text.startswith("# LaMP-2N: RAG k=4")
    metrics = json.loads((run / "metrics.json").read_text())["metrics"]
    f1 = metrics["f1"]
    assert f"| f1 ↑ | {f1['value']:.4f} [{f1['ci'][0]:.4f}, {f1['ci'][1]:.4f}] |" in text
    assert '| method_config | {"k": 4} |' in text
    assert "| run s (fit + personalize + predict) | 12.3 s |" in text
    assert f"| queries | {N_QUERIES} |" in text


def test_cost_table_sums_each_users_rows(tmp_path: Path) -> None:
    costly = make_run(tmp_path, "oppu", _predictions(0.7, seed=4))
    rows = [json.loads(line) for line in (costly / "predictions.jsonl").read_text().splitlines()]
    for number, row in enumerate(rows):  # user u<i> took i seconds, spread over their 2 queries as the runner does
        row.update(personalize_s=int(row["user_id"][1:]) / 2, state_bytes=1000, predict_s=0.25 + number % 2 / 2)
    (costly / "predictions.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    metrics = json.loads((costly / "metrics.json").read_text())
    (costly / "metrics.json").write_text(json.dumps({**metrics, "fit_s": 61.27}))  # as the runner's finalize does
    cheap = make_run(tmp_path, "none", _predictions(0.2, seed=5))
    text = compare_runs([cheap, costly], costs=True)
    seconds = np.arange(60)
    assert (f"| oppu | 60 | 61.3 | {seconds.mean():.3f} | {np.percentile(seconds, 95):.3f} | 59.000 | 1,000 | "
            "0.500 |") in text
    assert "| none | 60 | n/a | n/a | n/a | n/a | n/a | n/a |" in text
    assert "Cost per run" not in compare_runs([cheap, costly])
