"""The leaderboard end to end on the tiny model and synthetic LaMP-2N: a three-entry matrix (a floor, a baseline and a
personalized method with its swapped control) under both protocols, run, recorded and reported.

`tailor eval` commands run in this process (the `tailor` app called with the command's arguments) instead of one
subprocess each, which would spend most of the test importing torch eight times."""

from __future__ import annotations

import json
import os
import shlex
import shutil
import time
from pathlib import Path
from types import SimpleNamespace

import pytest

import benchmarks.common
from benchmarks.leaderboard import Delta, Group, main

MATRIX = """
[defaults]
model = "tiny"
device = "cpu"
dtype = "float32"
seed = 0
protocols = [0, 2]
out = "board"

[[entry]]
label = "user prior"
method = "user-prior"
options = {}
role = "floor"
tasks = ["lamp2n"]

[[entry]]
label = "non-personalized"
method = "none"
options = {}
role = "baseline"
tasks = ["lamp2n"]

[[entry]]
label = "MT-LoRA"
method = "mt-lora"
options = { max_total = 8, epochs = 1 }
role = "baseline"
tasks = ["lamp2n"]
protocols = [0]
model = "tiny-copy"

[[entry]]
label = "StyleVector"
method = "stylevector"
options = { layer = 1 }
role = "method"
tasks = ["lamp2n"]
protocols = [0]

[[entry]]
label = "RAG k=1"
method = "rag"
options = { k = 1 }
role = "method"
tasks = ["lamp2n"]
swapped = true
"""
FIELDS = {"task", "label", "method", "role", "options", "protocol", "histories", "backbone", "device", "dtype",
          "hardware", "machine", "other_cores", "contended", "n_users", "n_queries", "metric", "value",
          "ci", "metrics", "fit_s", "personalize_s_p50", "personalize_s_p95", "predict_s_per_query",
          "state_bytes_per_user", "state_params_per_user", "fit_params", "answers", "command", "folder"}


def tailor_in_process(argv: list[str], check: bool, env: dict[str, str] | None = None) -> None:
    """`tailor ...` run here, in the environment the leaderboard gave it, as a subprocess would be."""
    from tailor.cli.main import app

    before = dict(os.environ)
    os.environ.update(env or {})
    try:
        app(args=argv[1:], standalone_mode=False)
    finally:
        os.environ.clear()
        os.environ.update(before)


@pytest.fixture()
def board(tmp_path: Path, tiny_model_dir: Path, lamp_dir: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A working folder holding the matrix, with the tiny model under a relative name (run folders are named after
    the model) and the synthetic data and a private cache in the environment."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("TAILOR_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("TAILOR_DATA", str(lamp_dir))
    monkeypatch.setenv("TAILOR_THREADS", "1")
    monkeypatch.setattr(benchmarks.common, "subprocess", SimpleNamespace(run=tailor_in_process))
    (tmp_path / "tiny").symlink_to(tiny_model_dir, target_is_directory=True)
    (tmp_path / "tiny-copy").symlink_to(tiny_model_dir, target_is_directory=True)  # an entry's own backbone
    (tmp_path / "matrix.toml").write_text(MATRIX)
    return tmp_path


def test_run_then_report(board: Path, capsys: pytest.CaptureFixture[str]) -> None:
    main(["run", "--matrix", "matrix.toml"])
    records = {(r["label"], r["protocol"], r["histories"]): r
               for r in map(json.loads, map(Path.read_text, (board / "board" / "records").rglob("*.json")))}
    assert set(records) == {(label, protocol, histories) for protocol in (0, 2)
                            for label, histories in (("user prior", "own"), ("non-personalized", "own"),
                                                     ("RAG k=1", "own"), ("RAG k=1", "swapped"))} | \
        {("MT-LoRA", 0, "own"), ("StyleVector", 0, "own")}
    for record in records.values():
        assert FIELDS <= set(record) and record["fit_contended"] in (True, False)
        fitted = record["label"] == "MT-LoRA"
        assert record["metric"] == "accuracy" and (record["fit_params"] > 0 if fitted else record["fit_params"] == 0)
        assert ("--queries-per-user 2" in record["command"]) == (record["protocol"] == 2)
        assert ("--histories swapped" in record["command"]) == (record["histories"] == "swapped")
        own = records.get((record["label"], record["protocol"], "own"), {}).get("folder")
        assert (f"--states-from {own}" in record["command"]) == (record["histories"] == "swapped")
        counts = f"{record['label']}, protocol {record['protocol']}: {record['n_queries']} queries, " \
                 f"{record['n_users']} users"
        assert (record["n_queries"] > record["n_users"]) == (record["protocol"] == 2), counts
    assert records[("RAG k=1", 0, "own")]["backbone"] == "tiny/2x32"
    assert "--model tiny-copy" in records[("MT-LoRA", 0, "own")]["command"]  # the entry's backbone, not the matrix's
    assert records[("user prior", 0, "own")]["backbone"] is None
    # Each run measured its seconds with its own, empty text and hidden-state caches, sharing only the converted
    # models and the fits: StyleVector's activations never reached the shared cache, MT-LoRA's fit did.
    shared = board / "cache"
    assert not (shared / "hidden-cache.sqlite").exists() and any((shared / "fits" / "mt-lora").iterdir())
    assert all(record["caches"] == "cold" for record in records.values())
    assert not any(path.is_file() for path in (board / "board" / "caches").rglob("*"))  # removed once finished

    main(["run", "--matrix", "matrix.toml"])  # every record exists: nothing is run again
    assert "recorded: lamp2n / protocol 2 / RAG k=1 (swapped histories)" in capsys.readouterr().err

    # A record's folder is as the run named it (relative to where it ran): a swapped control resumed elsewhere
    # borrows the states from the folder this matrix puts the own run in, not from the record's path.
    own_path = board / "board" / "records" / "lamp2n" / "0" / "RAG-k1.json"
    own = json.loads(own_path.read_text())
    own_path.write_text(json.dumps({**own, "folder": "elsewhere/RAG-k1"}))
    (board / "board" / "records" / "lamp2n" / "0" / "RAG-k1-swapped.json").unlink()
    shutil.rmtree(Path(records[("RAG k=1", 0, "swapped")]["folder"]))
    main(["run", "--matrix", "matrix.toml", "--only", "RAG k=1", "--protocols", "0"])
    again = json.loads((board / "board" / "records" / "lamp2n" / "0" / "RAG-k1-swapped.json").read_text())
    assert f"--states-from {own['folder']}" in again["command"] and again["answers"] == \
        records[("RAG k=1", 0, "swapped")]["answers"]
    own_path.write_text(json.dumps(own))

    shutil.rmtree(board / "board" / "runs")  # the report reads the records alone
    main(["report", "--matrix", "matrix.toml", "--out-md", "board.md"])
    text = capsys.readouterr().out
    assert (board / "board.md").read_text().strip() == text.strip()
    decision = text.split("## Which method", 1)[1].split("\n## ", 1)[0]
    rows = [line for line in decision.splitlines() if line.startswith("| LaMP-2N")]
    assert len(rows) == 2 and all("RAG k=1" in row and "p=" in row for row in rows)
    assert "python -m benchmarks.leaderboard report --matrix matrix.toml --out-md board.md" in decision
    assert "tiny/2x32 on cpu in float32" in decision
    assert "tiny-copy/2x32 on cpu in float32" in decision  # MT-LoRA's own backbone is named beside the matrix's
    assert text.count("tiny-copy/2x32") == 1  # the setup is said once; a table below repeats only one that differs
    assert text.count("### LaMP-2N") == 2 and "RAG k=1, swapped histories" not in text
    control = records[("RAG k=1", 0, "swapped")]
    row = next(line for line in text.split("### LaMP-2N, LaMP's", 1)[1].splitlines() if line.startswith("| RAG"))
    assert f" | {control['value']:.4f}, " in row  # the control stands in its run's row, with the paired Δ
    assert (board / "board" / "plots" / "lamp2n.png").stat().st_size > 0
    assert "Made by `python -m benchmarks.leaderboard run --tasks lamp2n --protocols 2`" in text
    for record in records.values():
        assert shlex.split(record["command"])[0] == "tailor"
    assert "Every run of the matrix has its record." in text and "‡" not in text
    assert "timed themselves with" not in text  # every run had cold caches: nothing to say

    # A run made on another machine: its seconds are marked, not silently compared with the others'.
    moved = json.loads(own_path.read_text())
    own_path.write_text(json.dumps({**moved, "machine": "Other CPU, 2 cores, Python 3.11.7; backbone on cpu"}))
    main(["report", "--matrix", "matrix.toml"])
    text = capsys.readouterr().out
    lamp = text.split("### LaMP-2N, LaMP's protocol", 1)[1].split("\n### ", 1)[0]
    names = {line.split(" | ")[0].removeprefix("| ").replace(" †", "") for line in lamp.splitlines()
             if line.startswith("| RAG")}  # † where the machine was busy while the test ran
    assert names == {"RAG k=1 ‡"}
    assert "Runs marked ‡ were made on Other CPU, 2 cores, Python 3.11.7, not on " in lamp
    own_path.write_text(json.dumps({key: value for key, value in moved.items() if key != "caches"}))  # an old record
    main(["report", "--matrix", "matrix.toml"])
    decision = capsys.readouterr().out.split("## Which method", 1)[1].split("\n## ", 1)[0]
    assert f"{len(records) - 1} of {len(records)} runs timed themselves with text and hidden-state caches" in decision
    own_path.write_text(json.dumps(moved))

    tailors = board / "board" / "records" / "lamp2n" / "2"
    own_record = (tailors / "RAG-k1.json").read_text()
    (tailors / "RAG-k1.json").unlink()
    main(["report", "--matrix", "matrix.toml"])
    text = capsys.readouterr().out
    assert "| RAG k=1, swapped histories" in text.split("### LaMP-2N, tailor's", 1)[1]  # a control without its run
    assert "| LaMP-2N | tailor, +2/user | 1 | RAG k=1 |" in text.split("## Not measured yet", 1)[1]
    (tailors / "RAG-k1.json").write_text(own_record)
    (tailors / "RAG-k1-swapped.json").unlink()
    main(["report", "--matrix", "matrix.toml"])
    text = capsys.readouterr().out
    row = next(line for line in text.split("### LaMP-2N, tailor's", 1)[1].splitlines() if line.startswith("| RAG"))
    assert row.split(" | ")[7] == "—"  # no control recorded: nothing in its column
    missing = text.split("## Not measured yet", 1)[1]
    assert "| LaMP-2N | tailor, +2/user | 1 | RAG k=1, swapped histories |" in missing
    (tailors / "RAG-k1.json").unlink()
    main(["report", "--matrix", "matrix.toml"])
    missing = capsys.readouterr().out.split("## Not measured yet", 1)[1]
    assert "| LaMP-2N | tailor, +2/user | 2 | RAG k=1 (+ swapped) |" in missing  # a run and its control: one name

    main(["report", "--matrix", "matrix.toml", "--benchmarks", "BENCH.md", "--plot", "pictures"])
    bench = (board / "BENCH.md").read_text()
    assert bench.startswith("# tailor benchmarks") and "{leaderboard}" not in bench and "# Leaderboard" not in bench
    assert "## Which method, for which task, at what cost" in bench and "## Serving" in bench
    assert "![LaMP-2N](pictures/lamp2n.png)" in bench and (board / "pictures" / "lamp2n.png").exists()


def test_fit_seconds_made_while_others_used_the_cpu_are_flagged(tmp_path: Path) -> None:
    """A run may load a fit another process made while the machine was busy: its fit seconds say so, not the run's."""
    from benchmarks.leaderboard import fit_contended

    def run_loading(*fits: dict) -> Path:
        folder = tmp_path / f"run{len(list(tmp_path.iterdir()))}"
        folder.mkdir()
        paths = []
        for i, done in enumerate(fits):
            (folder / f"fit{i}").mkdir()
            (folder / f"fit{i}" / "DONE").write_text(json.dumps(done))
            paths.append(str(folder / f"fit{i}"))
        (folder / "fit_time.json").write_text(json.dumps({"seconds": 1.0, "fits": paths}))
        return folder

    assert fit_contended(run_loading()) is False  # nothing fitted
    assert fit_contended(run_loading({"seconds": 9, "other_cores": 0.05})) is False
    assert fit_contended(run_loading({"seconds": 9, "other_cores": 0.05}, {"seconds": 9, "other_cores": 1.1})) is True
    assert fit_contended(run_loading({"seconds": 9, "other_cores": None})) is True  # unmeasurable
    assert fit_contended(run_loading({"seconds": 9})) is None  # made before the fit cache recorded it


def test_a_run_is_contended_by_what_others_use_not_by_its_own_threads() -> None:
    from tailor.runs.contention import BUSY_OTHERS, busy_cpu_s, others_cores

    before = busy_cpu_s()
    end = time.process_time() + 0.3
    while time.process_time() < end:  # this process burns CPU: the machine's busy time must count it
        pass
    after = busy_cpu_s()
    assert before is not None and after is not None and after - before >= 0.25
    # 10 s of wall: the run's own process tree used 19 core-seconds of the machine's 20 (2 threads), others 1
    quiet, shared = others_cores((100.0, 120.0), (5.0, 24.0), 10.0), others_cores((100.0, 120.0), (5.0, 10.0), 10.0)
    assert quiet == pytest.approx(0.1) and quiet < BUSY_OTHERS
    assert shared == pytest.approx(1.5) and shared > BUSY_OTHERS
    assert others_cores((None, None), (0.0, 1.0), 10.0) is None


def test_the_recommended_method_is_one_that_clears_both_bars_before_a_larger_lead_that_does_not() -> None:
    def run(label: str) -> dict:
        return {"label": label, "histories": "own", "role": "method", "metric": "accuracy", "value": 0.5}

    floor = {**run("user prior"), "role": "floor"}
    big, solid = run("big but unsure"), run("smaller and sure")
    deltas = {("big but unsure|own", "floor"): Delta(0.10, 0.20),
              ("big but unsure|own", "control"): Delta(0.3, 0.002),
              ("smaller and sure|own", "floor"): Delta(0.05, 0.01),
              ("smaller and sure|own", "control"): Delta(0.2, 0.002)}
    group = Group("lamp2n", 0, [floor, big, solid], floor, None, deltas)
    assert group.clears(solid) and not group.clears(big)
    assert group.best_method() is solid
    unsure = {**deltas, ("smaller and sure|own", "floor"): Delta(0.05, 0.20)}
    assert Group("lamp2n", 0, [floor, big, solid], floor, None, unsure).best_method() is big  # none clears: the lead
