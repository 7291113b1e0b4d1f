"""Which method, for which task, at what cost: every registered method in one fixed configuration on every LaMP task,
measured against the strongest model-free floor and non-personalized baseline, and against its own swapped-history
control.

The matrix is checked in (benchmarks/leaderboard.toml), so a number means the same configuration wherever it was
measured. Every configuration runs under LaMP's protocol (one query per user) and tailor's (each user's last M history
items also asked as queries, which narrows the intervals over users); each personalized method also runs with each
user answered from another user's history, the control that a method which really personalizes must beat.

    .venv/bin/python -m benchmarks.leaderboard run                        # run or resume the whole matrix
    .venv/bin/python -m benchmarks.leaderboard run --tasks lamp2n --only 'user prior' 'RAG k=4'
    .venv/bin/python -m benchmarks.leaderboard report --out-md runs/leaderboard/leaderboard.md
    .venv/bin/python -m benchmarks.leaderboard report --benchmarks BENCHMARKS.md --plot docs/benchmarks/leaderboard

`run` runs or resumes one `tailor eval` per (task, entry, protocol, histories) in OUT/runs and writes one JSON record
per run to RECORDS/<task>/<protocol>/<slug>.json (the matrix's `records`, checked in): what ran where (backbone,
device, precision, hardware, the machine, the CPU the rest of the machine used while it ran: a run that shared the
machine is flagged contended, its seconds are not a speed measurement; each run has text and hidden-state caches of
its own, empty at its start, so its seconds are a new user's), its quality (every metric with its CI over
users), its cost (fit seconds and parameters, personalize seconds per user p50 and p95, predict seconds per query,
state bytes and parameters per user) and every query's answer and gold, so the report reads records alone. A record
that exists is kept, so re-running measures only what is missing; a run that fails is reported and the others go on.

`report` compares each record, by paired bootstrap over users on the queries both runs answered, with the best floor
and the best baseline of its task and protocol, and with its swapped control; it prints a decision table (the best
personalized method per task and protocol, its margins and its cost per user), one table per task and protocol, how
much tailor's protocol narrows the intervals, and a quality-against-cost plot per task.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shlex
import shutil
import subprocess
import sys
import tomllib
from collections import Counter
from dataclasses import dataclass
from functools import cached_property, lru_cache
from pathlib import Path
from typing import Any, Iterable, Iterator, Sequence

import numpy as np
import typer
from safetensors import safe_open

from benchmarks.common import add_device_options, fresh_cache, machine, publish, run, run_folder, slug
from tailor.atomic import write_json, write_text
from tailor.backbone.defaults import DEFAULT_MODEL
from tailor.backbone.device import DeviceError
from tailor.backbone.loading import cache_root
from tailor.cli._options import check_options
from tailor.methods import REGISTRY
from tailor.runs.contention import Watch, contended
from tailor.runs.fits import made_seconds
from tailor.tasks import get_task
from tailor.tasks.metrics import higher_is_better, metric_names
from tailor.tasks.stats import paired_bootstrap

MATRIX = Path(__file__).with_name("leaderboard.toml")
TEMPLATE = Path(__file__).with_name("BENCHMARKS.template.md")
"""BENCHMARKS.md around the leaderboard: what the file is for, then `{leaderboard}`, then serving, scale-out and the
studies in docs/benchmarks/."""
TASKS = ("lamp2n", "lamp2m", "lamp3", "lamp4", "lamp7")
ROLES = ("floor", "baseline", "method")
ENTRY_KEYS = {"label", "method", "options", "role", "tasks", "users", "why", "swapped", "protocols", "model"}
RUN_REFERENCE = "run:"
"""An option value "run:LABEL" is the run folder of entry LABEL for the same task, protocol and histories."""
RESAMPLES = 1000
SIGNIFICANT = 0.05
COST_FLOOR_S = 1e-4
"""The plot's log axis starts here: a prior's cost per user rounds to 0 seconds."""


class MatrixError(ValueError):
    """The matrix file cannot be run as written (an unknown method, role, task or option, a duplicate label)."""


# --- the matrix ------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Entry:
    label: str
    method: str
    role: str
    options: dict[str, Any]
    tasks: tuple[str, ...]
    protocols: tuple[int, ...]
    users: int | None
    why: str | None
    swapped: bool
    model: str | None = None
    """The entry's own backbone, part of its configuration (None: the matrix's, or `run --model`)."""

    def histories(self) -> tuple[str, ...]:
        return ("own", "swapped") if self.swapped else ("own",)


@dataclass(frozen=True)
class Matrix:
    model: str
    device: str
    dtype: str
    out: Path
    records: Path
    """Where the records are kept: checked in (benchmarks/records), unlike the run folders under `out`."""
    entries: tuple[Entry, ...]


def load_matrix(path: Path) -> Matrix:
    data = tomllib.loads(path.read_text())
    defaults = data.get("defaults", {})
    if defaults.get("seed", 0) != 0:
        raise MatrixError(f"{path}: seed must be 0, the seed every benchmark run uses (benchmarks.common.run)")
    protocols = tuple(defaults.get("protocols", (0,)))
    entries = tuple(_entry(raw, protocols) for raw in data.get("entry", []))
    labels = [e.label for e in entries]
    duplicates = sorted({label for label in labels if labels.count(label) > 1})
    if duplicates:
        raise MatrixError(f"{path}: labels name one entry each; repeated: {', '.join(duplicates)}")
    out = Path(defaults.get("out", "runs/leaderboard"))
    return Matrix(defaults.get("model", DEFAULT_MODEL), defaults.get("device", "auto"), defaults.get("dtype", "auto"),
                  out, Path(defaults.get("records", out / "records")), entries)


def _entry(raw: dict[str, Any], protocols: tuple[int, ...]) -> Entry:
    label = raw.get("label", "?")
    problems = [f"unknown key {key!r}" for key in sorted(set(raw) - ENTRY_KEYS)]
    if raw.get("method") not in REGISTRY:
        problems.append(f"method {raw.get('method')!r} is not one of {', '.join(REGISTRY)}")
    if raw.get("role") not in ROLES:
        problems.append(f"role {raw.get('role')!r} is not one of {', '.join(ROLES)}")
    tasks = tuple(raw.get("tasks", TASKS))
    problems += [f"unknown task {task!r}" for task in tasks if task not in TASKS]
    if raw.get("users") is not None and not raw.get("why"):
        problems.append("a user subset needs a `why`")
    if not problems:
        try:
            check_options(raw["method"], raw.get("options", {}))
        except typer.BadParameter as error:
            problems.append(error.format_message())
    if problems:
        raise MatrixError(f"entry {label!r}: " + "; ".join(problems))
    return Entry(label, raw["method"], raw["role"], dict(raw.get("options", {})), tasks,
                 tuple(raw.get("protocols", protocols)), raw.get("users"), raw.get("why"), bool(raw.get("swapped")),
                 raw.get("model"))


# --- running ---------------------------------------------------------------------------------------------------------
def record_path(records: Path, task: str, protocol: int, label: str, histories: str) -> Path:
    return records / task / str(protocol) / f"{slug(label)}{'-swapped' if histories == 'swapped' else ''}.json"


def planned(matrix: Matrix, tasks: Sequence[str] | None, only: Sequence[str] | None,
            protocols: Sequence[int] | None) -> Iterator[tuple[str, Entry, int, str]]:
    """(task, entry, protocol, histories) in matrix order; tailor's protocol is skipped where a task's history
    items hold only outputs (LaMP-7)."""
    for task in tasks or TASKS:
        for entry in matrix.entries:
            if task not in entry.tasks or (only and entry.label not in only):
                continue
            for protocol in entry.protocols:
                if (protocols and protocol not in protocols) or (protocol and get_task(task).history_prompt):
                    continue
                for histories in entry.histories():
                    yield task, entry, protocol, histories


def option_value(value: Any) -> str:
    return str(value).lower() if isinstance(value, bool) else str(value)


def resolved_options(entry: Entry, task: str, protocol: int, records: Path) -> dict[str, Any]:
    """The entry's options with each "run:LABEL" replaced by the run folder of entry LABEL with own histories, read
    from its record. A swapped control resolves to the same folder: it is the same configuration (time-constrained
    DPO keeps CHAMELEON's own time per user) and borrows the own run's states."""
    options = {}
    for key, value in entry.options.items():
        if isinstance(value, str) and value.startswith(RUN_REFERENCE):
            needed = record_path(records, task, protocol, value[len(RUN_REFERENCE):], "own")
            if not needed.exists():
                raise MatrixError(f"{entry.label} needs the run of {value[len(RUN_REFERENCE):]!r} first "
                                  f"({needed} is missing)")
            value = json.loads(needed.read_text())["folder"]
        options[key] = value
    return options


def method_args(entry: Entry, options: dict[str, Any], protocol: int, histories: str,
                states_from: str | None = None) -> str:
    sets = " ".join(f"--set {shlex.quote(f'{key}={option_value(value)}')}" for key, value in options.items())
    return " ".join(part for part in (f"--method {entry.method}", sets,
                                      f"--queries-per-user {protocol}" if protocol else "",
                                      "--histories swapped" if histories == "swapped" else "",
                                      f"--states-from {shlex.quote(states_from)}" if states_from else "") if part)


def protocol_out(matrix: Matrix, protocol: int) -> Path:
    """The folder that holds one protocol's run folders."""
    return matrix.out / "runs" / f"protocol-{protocol}"


def lender(matrix: Matrix, task: str, entry: Entry, protocol: int, histories: str) -> str | None:
    """The run folder a swapped control borrows its states from: the entry's own-histories run, once recorded (a
    per-user method then trains each history once, and the control's personalize times are the cold ones). It is
    the folder this matrix's `out` puts that run in, not the one its record names, which may be relative to another
    working directory."""
    own = record_path(matrix.records, task, protocol, entry.label, "own")
    if histories != "swapped" or not own.exists():
        return None
    return str(run_folder(protocol_out(matrix, protocol), entry.model or matrix.model, task, entry.label))


def run_cache(matrix: Matrix, task: str, label: str, protocol: int, model: str) -> Path:
    """The run's own TAILOR_CACHE: converted models and fits are links to the shared cache, but text and hidden-state
    caches start empty, so a run's personalize seconds are what a new user costs, not what an earlier run on this
    machine left cached (CHAMELEON's generated answers, PAG's and P2P's summaries, StyleVector's activations), and
    time-constrained DPO's budget, CHAMELEON's seconds per user, is its cold cost too. A killed run keeps its cache for
    the resume (a fit's summaries are not written twice); a finished run's is removed."""
    folder = run_folder(matrix.out / "caches" / f"protocol-{protocol}", model, task, label)
    return folder if folder.exists() else fresh_cache(folder, cache_root())


def run_entry(task: str, entry: Entry, protocol: int, histories: str, matrix: Matrix, where: str) -> Path:
    """One `tailor eval` (resumed if its folder exists) and its record; returns the record's path."""
    options = resolved_options(entry, task, protocol, matrix.records)
    label = entry.label if histories == "own" else f"{entry.label}, swapped histories"
    watch = Watch()
    states_from = lender(matrix, task, entry, protocol, histories)
    model = entry.model or matrix.model
    cache = run_cache(matrix, task, label, protocol, model)
    folder, command = run(label, task, method_args(entry, options, protocol, histories, states_from),
                          protocol_out(matrix, protocol), model, entry.users, device=matrix.device,
                          dtype=matrix.dtype, env={**os.environ, "TAILOR_CACHE": str(cache)})
    shutil.rmtree(cache)
    others = watch.others()
    record = {"task": task, "label": entry.label, "method": entry.method, "role": entry.role, "options": options,
              "protocol": protocol, "histories": histories, "users_asked": entry.users, "why": entry.why,
              "machine": where, "other_cores": None if others is None else round(others, 3),
              "contended": contended(others), "caches": "cold",
              "command": command, "folder": str(folder), **measured(folder, task)}
    path = record_path(matrix.records, task, protocol, entry.label, histories)
    write_json(path, record)
    return path


# --- what a run folder says ------------------------------------------------------------------------------------------
def measured(folder: Path, task: str) -> dict[str, Any]:
    """Quality and cost of a finished run, from its metrics.json, predictions.jsonl, states/ and the fit cache."""
    metrics = json.loads((folder / "metrics.json").read_text())
    primary = metric_names(task)[0]
    personalize, state_bytes = per_user(folder)
    return {
        "backbone": metrics.get("model"), "device": metrics.get("device"), "dtype": metrics.get("dtype"),
        "hardware": metrics.get("hardware"), "mode": metrics.get("mode"),
        "n_users": metrics["n_users"], "n_queries": metrics["n_queries"],
        "metric": primary, "value": metrics["metrics"][primary]["value"], "ci": metrics["metrics"][primary]["ci"],
        "metrics": metrics["metrics"], "fit_s": fit_seconds(folder, metrics["fit_s"]),
        "personalize_s_p50": float(np.percentile(personalize, 50)),
        "personalize_s_p95": float(np.percentile(personalize, 95)),
        "predict_s_per_query": metrics["predict_s_per_query"],
        "state_bytes_per_user": float(np.mean(state_bytes)),
        "state_params_per_user": float(np.mean([numel(p) for p in (folder / "states").rglob("*.safetensors")] or [0])),
        "fit_params": fit_parameters(folder),
        "fit_contended": fit_contended(folder),
        "answers": answers(folder),
    }


def answers(folder: Path) -> list[list[str]]:
    """[query id, user id, answer, gold] per query: what a paired comparison with another record needs, so that the
    report reads records alone and a checked-in record stays comparable after its run folder is gone."""
    return [[qid, str(row["user_id"]), str(row["prediction"]), str(row["gold"])]
            for qid, row in predictions(folder).items()]


def per_user(folder: Path) -> tuple[list[float], list[float]]:
    """Each user's personalize seconds (the runner spreads them over the user's queries) and state bytes."""
    seconds: dict[str, float] = {}
    state_bytes: dict[str, float] = {}
    for row in predictions(folder).values():
        user = str(row["user_id"])
        seconds[user] = seconds.get(user, 0.0) + float(row["personalize_s"])
        state_bytes[user] = float(row["state_bytes"])
    return list(seconds.values()), list(state_bytes.values())


def numel(path: Path) -> int:
    """Elements of every tensor in a safetensors file, read from its header without loading the tensors."""
    with safe_open(str(path), "pt") as handle:
        return sum(math.prod(handle.get_slice(name).get_shape()) for name in handle.keys())


def fit_seconds(folder: Path, measured_s: float) -> float:
    """The run's fit seconds, or, where it loaded fits another process made (a benchmark that chose the options, an
    earlier run), the seconds those fits took when they were made: what fitting the method once costs."""
    recorded = fit_folders(folder)
    made = made_seconds(recorded) if recorded else None
    return max(measured_s, made) if made is not None else measured_s


def fit_folders(folder: Path) -> list[str] | None:
    """The fit cache folders the run recorded in fit_time.json; None for a method that fits nothing."""
    path = folder / "fit_time.json"
    return json.loads(path.read_text()).get("fits") if path.exists() else None


def fit_contended(folder: Path) -> bool | None:
    """Whether a fit the run's fit seconds count was made while other processes used the CPU (an earlier run's, or a
    benchmark's that chose the options, may have been though this run was not); None where a fit predates that record
    or is no longer in the cache. False for a method that fits nothing."""
    recorded = fit_folders(folder)
    if recorded is None:
        return False
    fits = cached_fits(recorded)
    if fits is None:
        return None
    dones = [done for _, done in fits]
    if any("other_cores" not in done for done in dones):
        return None
    return any(contended(done["other_cores"]) for done in dones)


def recorded_fits(folder: Path) -> list[tuple[Path, dict]] | None:
    """Each fit cache folder the run recorded (fit_time.json) with its DONE; None for a run that recorded no
    folders, or whose fits are no longer all in the cache."""
    recorded = fit_folders(folder)
    return None if recorded is None else cached_fits(recorded)


def cached_fits(recorded: list[str]) -> list[tuple[Path, dict]] | None:
    """Each fit cache folder with its DONE; None where one is no longer in the cache."""
    if not all((Path(f) / "DONE").exists() for f in recorded):
        return None
    return [(Path(f), json.loads((Path(f) / "DONE").read_text())) for f in recorded]


def fit_parameters(folder: Path) -> int | None:
    """Numbers learned by every fit the run's method used, its own and those it builds on (OPPU's and fusion's
    MT-LoRA), from the fit cache folders the run recorded (fit_time.json): the count a fit recorded in its DONE (a
    method whose fit is not tensors), else the elements of its safetensors files. 0 for a method that fits nothing;
    None for a run that recorded no folders, or whose fit is no longer in the cache."""
    fits = recorded_fits(folder)
    return None if fits is None else sum(learned_numbers(fit, done) for fit, done in fits)


def learned_numbers(fit: Path, done: dict | None = None) -> int:
    """What one fit learned: the count its DONE records, else the elements of its safetensors files."""
    counted = (done if done is not None else json.loads((fit / "DONE").read_text())).get("parameters")
    return counted if counted is not None else sum(numel(p) for p in fit.rglob("*.safetensors"))


@lru_cache(maxsize=64)
def predictions(folder: Path) -> dict[str, dict]:
    """A finished run's rows by query id."""
    lines = (folder / "predictions.jsonl").read_text(encoding="utf-8").splitlines()
    return {str(row["query_id"]): row for row in map(json.loads, filter(str.strip, lines))}


# --- the report ------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Delta:
    """a − b on the primary metric over the queries both runs answered, with its paired bootstrap p-value."""

    value: float
    p: float

    def cell(self) -> str:
        return f"{self.value:+.4f} (p={self.p:.3f})"

    def better(self, metric: str) -> bool:
        """Significantly better, in the metric's own direction."""
        return self.p < SIGNIFICANT and (self.value > 0) == higher_is_better(metric) and self.value != 0


def paired(a: dict, b: dict) -> Delta:
    theirs = {qid: (user, answer, gold) for qid, user, answer, gold in b["answers"]}
    shared = [(answer, theirs[qid]) for qid, _, answer, _ in a["answers"] if qid in theirs]
    if not shared:
        raise ValueError(f"{a['label']} and {b['label']} share no query")
    result = paired_bootstrap(a["task"], [x for x, _ in shared], [y[1] for _, y in shared],
                              [y[2] for _, y in shared], [y[0] for _, y in shared],
                              n_resamples=RESAMPLES, seed=0)[a["metric"]]
    return Delta(result.delta, result.p_value)


def load_records(folder: Path) -> list[dict]:
    """Every record, floors first, then baselines, then methods, each control after its own run."""
    records = [json.loads(p.read_text()) for p in folder.glob("*/*/*.json")]
    return sorted(records, key=lambda r: (ROLES.index(r["role"]), r["label"], r["histories"] == "swapped"))


def best(records: Iterable[dict], role: str) -> dict | None:
    """The record of this role with the best primary metric (own histories only: a control is never a reference)."""
    candidates = [r for r in records if r["role"] == role and r["histories"] == "own"]
    if not candidates:
        return None
    sign = 1 if higher_is_better(candidates[0]["metric"]) else -1
    return max(candidates, key=lambda r: sign * r["value"])


@dataclass(frozen=True)
class Group:
    """The records of one task under one protocol, the references they are compared with, and the comparisons."""

    task: str
    protocol: int
    records: list[dict]
    floor: dict | None
    baseline: dict | None
    deltas: dict[tuple[str, str], Delta]

    @cached_property
    def controls(self) -> dict[str, dict]:
        """Each swapped control by its run's label."""
        return swapped_controls(self.records)

    def delta(self, record: dict, reference: str) -> Delta | None:
        return self.deltas.get((key(record), reference))

    def clears(self, record: dict) -> bool | None:
        """Whether the record is significantly ahead of both the best floor and its own swapped control (None where
        either was not run)."""
        floor, control = self.delta(record, "floor"), self.delta(record, "control")
        if floor is None or control is None:
            return None
        return floor.better(record["metric"]) and control.better(record["metric"])

    def best_method(self) -> dict | None:
        """The personalized record (own histories) to recommend: among those that clear both bars, else among all,
        the one with the best paired margin over the best floor, or the best metric where no floor was run (margins
        over one reference stay comparable where runs cover different users). A method whose lead is significant
        comes before one whose larger lead is not: a reader is told to use what was shown to work."""
        methods = [r for r in self.records if r["role"] == "method" and r["histories"] == "own"]
        if not methods:
            return None
        sign = 1 if higher_is_better(methods[0]["metric"]) else -1
        if self.floor is None:
            return max(methods, key=lambda r: sign * r["value"])
        return max(methods, key=lambda r: (bool(self.clears(r)), sign * self.deltas[(key(r), "floor")].value))


def compare(task: str, protocol: int, records: list[dict]) -> Group:
    """Each record against the best floor, the best baseline and (own histories) its swapped control."""
    floor, baseline = best(records, "floor"), best(records, "baseline")
    controls = swapped_controls(records)
    deltas = {}
    for record in records:
        control = controls.get(record["label"]) if record["histories"] == "own" else None
        for name, reference in (("floor", floor), ("baseline", baseline), ("control", control)):
            if reference is not None and reference is not record:
                deltas[(key(record), name)] = paired(record, reference)
    return Group(task, protocol, records, floor, baseline, deltas)


def swapped_controls(records: Iterable[dict]) -> dict[str, dict]:
    return {r["label"]: r for r in records if r["histories"] == "swapped"}


def key(record: dict) -> str:
    return f"{record['label']}|{record['histories']}"


def protocol_name(protocol: int) -> str:
    return "LaMP's protocol (one query per user)" if protocol == 0 else \
        f"tailor's protocol (LaMP's query and the last {protocol} history items per user)"


def protocol_short(protocol: int) -> str:
    return "LaMP" if protocol == 0 else f"tailor, +{protocol}/user"


def cost_per_user(record: dict) -> float:
    """Personalizing a user (p50) and answering their queries in this run."""
    return record["personalize_s_p50"] + record["n_queries"] / record["n_users"] * record["predict_s_per_query"]


def setup(records: Sequence[dict]) -> str:
    """Backbones, devices, precisions and machines of the records, each distinct combination once."""
    backbones = sorted({f"{r['backbone']} on {r['device']} in {r['dtype']} ({r['hardware']})"
                        for r in records if r["backbone"]})
    machines = sorted({machine_of(r) for r in records})
    return f"Backbone: {'; '.join(backbones) or 'none (model-free runs only)'}. Machine: {'; '.join(machines)}."


def machine_of(record: dict) -> str:
    return record["machine"].split("; backbone ")[0]  # its device is named just before


def main_machine(records: Sequence[dict]) -> str:
    """The machine most runs were made on: the one whose seconds the tables compare; others' rows are marked ‡."""
    return Counter(map(machine_of, records)).most_common(1)[0][0]


def marks(record: dict, usual: str) -> str:
    return (" †" if record["contended"] else "") + (" ‡" if machine_of(record) != usual else "")


def elsewhere(records: Sequence[dict], usual: str) -> str:
    """What ‡ means, where a record of these was made on another machine than `usual`."""
    others = sorted({machine_of(r) for r in records} - {usual})
    return (f"Runs marked ‡ were made on {'; '.join(others)}, not on {usual}: compare their seconds only with each "
            "other's." if others else "")


def contention(records: Sequence[dict], explained: bool) -> str:
    """How many runs (and fits they loaded) were contended; what that means is said once, where `explained` is False."""
    runs = sum(r["contended"] for r in records)
    fits = sum(bool(r.get("fit_contended")) for r in records)
    said = []
    if runs:
        said.append(f"{runs} of {len(records)} runs were contended (†)." if explained else
                    f"{runs} of {len(records)} runs were contended (marked †: other processes used the CPU while "
                    "they ran, so their seconds are not speed measurements).")
    if fits:
        said.append(f"{fits} runs' fit seconds come from a fit made while other processes used the CPU "
                    "(fit s marked †).")
    return " ".join(said)


def warmth(records: Sequence[dict]) -> str:
    """How many runs timed themselves with caches of their own (`run_cache`); said once, above the decision table."""
    cold = sum(r.get("caches") == "cold" for r in records)
    return (f"{cold} of {len(records)} runs timed themselves with text and hidden-state caches of their own, empty at "
            "the start; the others shared the machine's, so where an earlier run had generated the same texts "
            "(CHAMELEON's answers, PAG's and P2P's summaries) or activations (StyleVector), their personalize seconds "
            "are below a new user's." if cold < len(records) else "")


def provenance(records: Sequence[dict], usual: str | None, shared: str = "") -> str:
    """The records' setup, contention and, for a table of seconds (`usual`: the machine they compare), the runs made
    on another machine; below the decision table (`shared`: its setup) only what differs, above it how many runs
    timed themselves with cold caches."""
    own = setup(records)
    return " ".join(part for part in (own if own != shared else "", contention(records, bool(shared)),
                                      elsewhere(records, usual) if usual else "",
                                      "" if shared else warmth(records)) if part)


def cell(delta: Delta | None) -> str:
    return delta.cell() if delta else "—"


def seconds(value: float) -> str:
    return f"{value:.3g}"


def table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return "\n".join(lines + ["| " + " | ".join(str(c) for c in row) + " |" for row in rows])


def decision_table(groups: Sequence[Group], made_by: str, usual: str) -> str:
    records = [r for g in groups for r in g.records]
    rows = []
    for group in groups:
        top = group.best_method()
        if top is None:
            continue
        floor, control = group.delta(top, "floor"), group.delta(top, "control")
        arrow = "↑" if higher_is_better(top["metric"]) else "↓"
        clears = {None: "—", True: "yes", False: "no"}[group.clears(top)]
        rows.append([get_task(group.task).name, protocol_short(group.protocol), top["label"] + marks(top, usual),
                     f"{top['metric']} {arrow} {top['value']:.4f}",
                     f"{cell(floor)} vs {group.floor['label']}" if floor else "—", cell(control), clears,
                     seconds(cost_per_user(top))])
    header = ["task", "protocol", "best personalized method", "metric", "Δ vs best floor (p)",
              "Δ vs own swapped control (p)", f"clears both (p < {SIGNIFICANT})", "cost s/user"]
    return (f"## Which method, for which task, at what cost\n\nMade by `{made_by}`. {provenance(records, usual)}\n\n"
            + table(header, rows)
            + "\n\nThe best personalized method is the one with the largest paired margin over the task's best floor "
              "(the model-free run with the best metric) among those that clear both bars, or among all where none "
              "does. Δ is method − reference on the queries both runs answered, "
              f"with a two-sided paired bootstrap p-value over users ({RESAMPLES} resamples, seed 0); for MAE and RMSE "
              "a negative Δ is better. The swapped control answers each user from another user's history: a method "
              "that personalizes must beat it. Cost per user: personalize seconds (p50) plus the user's queries "
              "times the seconds per query.\n")


def group_table(group: Group, shared: str, usual: str) -> str:
    metric = group.records[0]["metric"]
    arrow = "↑" if higher_is_better(metric) else "↓"
    header = ["run", "role", "users", "queries", f"{metric} {arrow} [95% CI]", "Δ vs best floor (p)",
              "Δ vs best baseline (p)", "own swapped control: metric, Δ (p)", "fit s", "fit params",
              "personalize s/user p50", "p95", "predict s/query", "state bytes/user", "state params/user"]
    rows = []
    for r in folded(group.records):
        name = r["label"] + (", swapped histories" if r["histories"] == "swapped" else "") + marks(r, usual)
        control = group.controls.get(r["label"]) if r["histories"] == "own" else None
        rows.append([name, r["role"], r["n_users"], r["n_queries"],
                     f"{r['value']:.4f} [{r['ci'][0]:.4f}, {r['ci'][1]:.4f}]",
                     cell(group.delta(r, "floor")), cell(group.delta(r, "baseline")),
                     f"{control['value']:.4f}, {cell(group.delta(r, 'control'))}" if control else "—",
                     f"{r['fit_s']:.1f}" + (" †" if r.get("fit_contended") else ""),
                     "n/a" if r["fit_params"] is None else f"{r['fit_params']:,}",
                     seconds(r["personalize_s_p50"]), seconds(r["personalize_s_p95"]),
                     seconds(r["predict_s_per_query"]), f"{r['state_bytes_per_user']:,.0f}",
                     f"{r['state_params_per_user']:,.0f}"])
    references = ", ".join(f"best {role}: {ref['label']}" for role, ref in
                           (("floor", group.floor), ("baseline", group.baseline)) if ref)
    said = " ".join(part for part in (provenance(group.records, usual, shared), references.capitalize() + ".") if part)
    # One command per table, not one per row: the rows' own `tailor eval` commands, each in its record, would take
    # a quarter of the page and grow with every run.
    made = (f"Made by `python -m benchmarks.leaderboard run --tasks {group.task} --protocols {group.protocol}`; each "
            "row's own `tailor eval` command is in its record.")
    return (f"### {get_task(group.task).name}, {protocol_name(group.protocol)}\n\n{said}\n\n"
            f"{table(header, rows)}\n\n{made}\n")


def folded(records: Sequence[dict]) -> list[dict]:
    """The rows of a task's table: a swapped control is shown in its own-histories run's row (its metric and the
    paired Δ), so it gets a row of its own only where that run has no record."""
    own = {r["label"] for r in records if r["histories"] == "own"}
    return [r for r in records if r["histories"] == "own" or r["label"] not in own]


def interval_table(groups: Sequence[Group], shared: str) -> str:
    """CI half-widths of each entry under LaMP's protocol and under tailor's, on the same users."""
    lamp = {(g.task, key(r)): r for g in groups if g.protocol == 0 for r in g.records}
    rows = []
    for group in groups:
        for r in group.records:
            base = lamp.get((group.task, key(r)))
            if group.protocol == 0 or r["histories"] != "own" or base is None:
                continue
            half, base_half = (r["ci"][1] - r["ci"][0]) / 2, (base["ci"][1] - base["ci"][0]) / 2
            rows.append([get_task(group.task).name, r["label"], r["metric"], r["n_users"], base["n_queries"],
                         f"{base_half:.4f}", group.protocol, r["n_queries"], f"{half:.4f}",
                         f"{half / base_half:.2f}" if base_half else "—"])
    header = ["task", "run", "metric", "users", "queries (LaMP)", "CI half-width (LaMP)", "extra queries/user",
              "queries (tailor)", "CI half-width (tailor)", "ratio"]
    records = [r for g in groups for r in g.records]
    said = provenance(records, None, shared)  # no seconds in this table
    intro = f"{said}\n\n" if said else ""
    return (f"## How much narrower the intervals get with more queries per user\n\n{intro}"
            f"{table(header, rows)}\n\nHalf-width of the 95% bootstrap interval over users of each run's primary "
            "metric, under LaMP's protocol and under tailor's, for the same entry on the same users; a ratio under 1 "
            "is a narrower interval. The two protocols ask different queries, so their metric values differ too.\n")


def plot(groups: Sequence[Group], folder: Path) -> list[Path]:
    """Quality against cost per user, one PNG per task with a panel per protocol (own histories only).

    matplotlib is drawn through the Agg canvas directly, so the process's global backend is never changed."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    colours = {"floor": "tab:grey", "baseline": "tab:orange", "method": "tab:blue"}
    paths = []
    folder.mkdir(parents=True, exist_ok=True)
    for task in dict.fromkeys(g.task for g in groups):
        panels = [g for g in groups if g.task == task]
        figure = Figure(figsize=(6.5 * len(panels), 5), layout="constrained")
        FigureCanvasAgg(figure)
        for axes, group in zip(figure.subplots(1, len(panels), squeeze=False)[0], panels):
            for r in (r for r in group.records if r["histories"] == "own"):
                x = max(r["personalize_s_p50"] + r["predict_s_per_query"], COST_FLOOR_S)
                axes.scatter([x], [r["value"]], color=colours[r["role"]], label=r["role"])
                axes.annotate(r["label"], (x, r["value"]), fontsize=7, xytext=(3, 3), textcoords="offset points")
            axes.set_xscale("log")
            axes.margins(x=0.2)
            axes.set_xlabel(f"personalize s/user (p50) + predict s/query (at least {COST_FLOOR_S:g})")
            metric = group.records[0]["metric"]
            axes.set_ylabel(f"{metric} ({'higher' if higher_is_better(metric) else 'lower'} is better)")
            axes.set_title(protocol_name(group.protocol), fontsize=9)
            handles, labels = axes.get_legend_handles_labels()
            unique = dict(zip(labels, handles))
            axes.legend(unique.values(), unique.keys(), fontsize=8)
        figure.suptitle(f"{get_task(task).name}: quality against cost per user")
        path = folder / f"{task}.png"
        figure.savefig(path, format="png", dpi=120)
        paths.append(path)
    return paths


def report(folder: Path, plots: Path, made_by: str, matrix: Matrix | None = None) -> str:
    """The leaderboard's markdown from the records in `folder` alone (their answers carry the paired comparisons)."""
    records = load_records(folder)
    if not records:
        raise MatrixError(f"no records under {folder}; run `python -m benchmarks.leaderboard run` first")
    order = {task: i for i, task in enumerate(TASKS)}
    keys = sorted({(r["task"], r["protocol"]) for r in records}, key=lambda k: (order.get(k[0], len(order)), k[1]))
    groups = [compare(task, protocol, [r for r in records if (r["task"], r["protocol"]) == (task, protocol)])
              for task, protocol in keys]
    pictures = plot(groups, plots)
    shared, usual = setup(records), main_machine(records)
    with_methods = {g.task for g in groups if any(r["role"] == "method" for r in g.records)}
    unmeasured = [get_task(task).name for task in TASKS if task not in with_methods]
    gaps = (f"No personalized method has a record yet on {', '.join(unmeasured)}; the last section lists every run "
            "still missing.\n" if unmeasured else "")
    return "\n".join([
        "# Leaderboard\n", decision_table(groups, made_by, usual) + gaps,
        "## Every run, per task and protocol\n\nEvery table below was made by the same command, on the setup the "
        "decision table names unless it says otherwise. A run's swapped control stands in the run's row (its metric, "
        "and the run's paired Δ against it): it answers from the run's own saved states, so its costs are the "
        "run's.\n", *(group_table(g, shared, usual) for g in groups),
        interval_table(groups, shared),
        "## Quality against cost per user\n\n" + "\n".join(f"![{get_task(p.stem).name}]({p})" for p in pictures)
        + "\n",
        *([missing_table(matrix, folder)] if matrix is not None else []),
    ])


def missing_table(matrix: Matrix, records: Path) -> str:
    """The matrix's runs that have no record yet, per task and protocol: what the tables above do not answer."""
    missing: dict[tuple[str, int], dict[str, list[str]]] = {}
    for task, entry, protocol, histories in planned(matrix, None, None, None):
        if not record_path(records, task, protocol, entry.label, histories).exists():
            missing.setdefault((task, protocol), {}).setdefault(entry.label, []).append(histories)
    if not missing:
        return "## Not measured yet\n\nEvery run of the matrix has its record.\n"

    def named(label: str, histories: list[str]) -> str:
        if len(histories) == 2:
            return f"{label} (+ swapped)"
        return label + (", swapped histories" if histories == ["swapped"] else "")

    rows = [(get_task(task).name, protocol_short(protocol), sum(map(len, labels.values())),
             "; ".join(named(label, h) for label, h in labels.items())) for (task, protocol), labels in missing.items()]
    return ("## Not measured yet\n\nRuns of the matrix (benchmarks/leaderboard.toml) without a record (\"+ swapped\": "
            "and its swapped control): `python -m benchmarks.leaderboard run` runs exactly these.\n\n"
            + table(("task", "protocol", "runs", "entries"), rows) + "\n")


# --- the command -----------------------------------------------------------------------------------------------------
def run_matrix(args: argparse.Namespace, matrix: Matrix) -> int:
    """Run every planned configuration whose record is missing; returns how many failed."""
    unknown = sorted(set(args.only or ()) - {e.label for e in matrix.entries})
    if unknown:
        raise MatrixError(f"--only: no entry is labelled {', '.join(map(repr, unknown))}")
    where = machine(matrix.device, matrix.dtype)
    failed = []
    for task, entry, protocol, histories in planned(matrix, args.tasks, args.only, args.protocols):
        name = f"{task} / protocol {protocol} / {entry.label}{' (swapped histories)' if histories == 'swapped' else ''}"
        path = record_path(matrix.records, task, protocol, entry.label, histories)
        if path.exists():
            print(f"recorded: {name} ({path})", file=sys.stderr)
            continue
        try:
            print(f"recorded: {name} ({run_entry(task, entry, protocol, histories, matrix, where)})", file=sys.stderr)
        except subprocess.CalledProcessError as error:
            failed.append(name)
            print(f"failed: {name}: tailor eval exited with status {error.returncode} (its error is above)",
                  file=sys.stderr)
        except MatrixError as error:
            failed.append(name)
            print(f"failed: {name}: {error}", file=sys.stderr)
    if failed:
        print(f"{len(failed)} runs failed: " + "; ".join(failed), file=sys.stderr)
    return len(failed)


def main(argv: Sequence[str] | None = None) -> None:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--matrix", type=Path, default=MATRIX, help="the matrix file (default: %(default)s)")
    common.add_argument("--out", type=Path, default=None, help="run folders and plots (default: the matrix's out)")
    common.add_argument("--records", type=Path, default=None,
                        help="the records' folder (default: the matrix's records; OUT/records with --out)")
    parser = argparse.ArgumentParser(prog="python -m benchmarks.leaderboard", description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    running = commands.add_parser("run", parents=[common], help="run or resume the matrix, one record per run",
                                  description="Run or resume the matrix; options left out take the matrix's values.")
    running.add_argument("--tasks", nargs="+", choices=TASKS, default=None)
    running.add_argument("--only", nargs="+", default=None, metavar="LABEL", help="entries to run, by label")
    running.add_argument("--protocols", nargs="+", type=int, default=None,
                         help="0 (LaMP's one query per user) and/or M (tailor's M more per user)")
    running.add_argument("--model", default=None, help="the backbone (default: the matrix's)")
    add_device_options(running)
    running.set_defaults(device=None, dtype=None)
    reporting = commands.add_parser("report", parents=[common], help="compare the records and plot them")
    reporting.add_argument("--out-md", type=Path, default=None, help="also write the markdown here")
    reporting.add_argument("--plot", type=Path, default=None, help="folder of the per-task PNGs (default OUT/plots)")
    reporting.add_argument("--benchmarks", type=Path, default=None, metavar="PATH",
                           help="also write BENCHMARKS.md here: benchmarks/BENCHMARKS.template.md around the report")
    args = parser.parse_args(argv)
    try:
        matrix = load_matrix(args.matrix)
    except (MatrixError, tomllib.TOMLDecodeError, OSError) as error:
        parser.error(str(error))
    out = args.out or matrix.out
    records = args.records or (args.out / "records" if args.out else matrix.records)
    if args.command == "run":
        matrix = Matrix(args.model or matrix.model, args.device or matrix.device, args.dtype or matrix.dtype, out,
                        records, matrix.entries)
        try:
            failed = run_matrix(args, matrix)
        except (MatrixError, DeviceError) as error:
            parser.error(str(error))
        if failed:
            raise SystemExit(1)
        return
    made_by = f"{parser.prog} " + " ".join(map(shlex.quote, sys.argv[1:] if argv is None else argv))
    try:
        text = report(records, args.plot or out / "plots", made_by, matrix)
        publish(text, args.out_md)
        if args.benchmarks is not None:
            template = TEMPLATE.read_text()
            body = text.split("\n", 1)[1]  # its sections under the template's title
            write_text(args.benchmarks, template.replace("{leaderboard}", body.strip() + "\n"))
    except MatrixError as error:
        parser.error(str(error))


if __name__ == "__main__":
    main()
