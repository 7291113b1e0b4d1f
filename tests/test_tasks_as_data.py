"""Tasks as data: LaMP's tasks read from their packaged TOML files behave byte for byte as the hand-written ones did,
a user's task file and JSONL users run through `tailor eval` and `tailor data validate`, and bad files fail in one
line that names the file, the line and the field."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest

from tailor.tasks import HistoryItem, TaskError, get_task
from tailor.tasks.metrics import compute_metrics, metric_names, regression_value

ROOT = Path(__file__).resolve().parent.parent
EXAMPLE = ROOT / "examples" / "tickets"
GOLDEN = Path(__file__).parent / "data" / "lamp_tasks_golden.json"
"""What the hand-written LaMP tasks (tailor/tasks/lamp.py at commit aead42b, before tasks became files) produced on
sample items: real ones from ../shared/lamp cut short, hand-made LaMP-1 and LaMP-5 ones, and edge cases (braces,
quotes, inputs without a marker or a "title")."""


def _items(raw: list[dict]) -> list[HistoryItem]:
    return [HistoryItem(id=i["id"], fields={k: v for k, v in i.items() if k != "id"}) for i in raw]


@pytest.mark.parametrize("name", json.loads(GOLDEN.read_text()))
def test_lamp_task_files_reproduce_the_hand_written_tasks(name: str) -> None:
    expected = json.loads(GOLDEN.read_text())[name]
    task = get_task(name)
    for field, value in expected["fields"].items():
        got = getattr(task, field)
        assert (list(got) if isinstance(got, tuple) else got) == value, field
    items, inputs = _items(expected["items"]), expected["inputs"]
    formatted = [task.format_item(item) for item in items]
    assert [task.document(item) for item in items] == expected["document"]
    assert formatted == expected["format_item"]
    assert [task.format_item(item, body="BODY {x}") for item in items] == expected["format_item_body"]
    assert [task.question(item) for item in items] == expected["question"]
    assert [list(task.example(item)) for item in items] == expected["example"]
    assert [task.item_output(item) for item in items] == expected["item_output"]
    assert [task.retrieval_query(x) for x in inputs] == expected["retrieval_query"]
    assert [task.join_history([], x) for x in inputs] == expected["join_none"]
    assert [task.join_history(formatted[:1], x) for x in inputs] == expected["join_one"]
    assert [task.join_history(formatted, x) for x in inputs] == expected["join_all"]
    assert [task.parse(raw) for raw in expected["raws"]] == expected["parse"]
    assert [task.ask(x) for x in inputs] == inputs  # LaMP's inputs are whole questions
    assert compute_metrics(task, expected["predictions"], expected["golds"]) == expected["metrics"]
    assert metric_names(task) == expected["metric_names"]
    for prediction, gold, value in expected.get("lamp3_value", []):
        assert regression_value(prediction, gold, task.score_range) == value


def test_every_name_and_alias_still_finds_its_task() -> None:
    assert get_task("lamp2n") is get_task("LaMP-2N") is get_task("2N") is get_task("LaMP-2-old")
    assert get_task(" LAMP2 ").name == "LaMP-2M"
    with pytest.raises(KeyError, match="unknown task 'lamp9'.*task file"):
        get_task("lamp9")


# --- task files ----------------------------------------------------------------------------------------------------
def _task_file(tmp_path: Path, edit: tuple[str, str] | None = None, name: str = "t.toml") -> Path:
    text = (EXAMPLE / "tickets.toml").read_text()
    if edit is not None:
        assert edit[0] in text
        text = text.replace(*edit)
    path = tmp_path / name
    path.write_text(text)
    return path


def test_a_task_file_is_a_task_known_by_its_name_afterwards(tmp_path: Path) -> None:
    task = get_task(str(EXAMPLE / "tickets.toml"))
    assert (task.name, task.family, task.labels) == ("tickets", "classification", ("low", "normal", "high", "urgent"))
    assert get_task("tickets") is task  # as P2P finds a user's task by the name the user record carries
    question = task.ask("VPN is down")
    assert question.startswith("Ticket: VPN is down\nWhich priority")
    assert task.retrieval_query(question) == "VPN is down"
    item = HistoryItem("h1", {"text": "Outlook is slow", "priority": "normal"})
    assert task.question(item) == task.ask("Outlook is slow")
    assert task.example(item) == (task.ask("Outlook is slow"), "normal")
    assert task.join_history([task.format_item(item)], question) == \
        f'Tickets this agent triaged before: "Outlook is slow" was normal.\n{question}'
    assert task.parse(' "Urgent"\nbecause') == "urgent" and task.parse("High.") == "high"


@pytest.mark.parametrize(("edit", "message"), [
    (('kind = "classification"', 'kind = "ranking"'), "kind: is 'ranking'; expected one of classification"),
    (("{body}", "{bdy}"), "history.item: uses {bdy}, which is not one of"),
    (("Ticket: {input}", "Ticket: {text}"), "prompt.question: must use {input} exactly once"),
    (('labels = ["low", "normal", "high", "urgent"]', "labels = []"), "labels: is empty"),
    (('metrics = ["accuracy", "f1"]', 'metrics = ["mae"]'), "metrics: a classification task is scored by accuracy"),
    (('output = "priority"', 'output = "prio"'), "history.output: is 'prio', which is not one of the history fields"),
    (('joiner = "; "', 'joinr = "; "'), "prompt.joinr: is not a key of a task file's [prompt]"),
    (('name = "tickets"', 'name = "lamp3"'), "the name 'lamp3' is taken by the built-in task LaMP-3"),
    (('suffix = ".\\n"', 'suffix = ".\\n'), "not valid TOML"),
    (('kind = "classification"', 'kind = "regression"'), "range: is missing"),
])
def test_a_bad_task_file_fails_in_one_line_naming_file_and_key(tmp_path: Path, edit: tuple[str, str],
                                                                message: str) -> None:
    path = _task_file(tmp_path, edit)
    with pytest.raises(TaskError) as error:
        get_task(str(path))
    assert str(error.value).startswith(str(path)) and message in str(error.value) and "\n" not in str(error.value)


def test_a_regression_task_honours_its_own_range(tmp_path: Path) -> None:
    path = tmp_path / "stars.toml"
    path.write_text('name = "stars"\ndescription = "Stars a user gives."\nkind = "regression"\nrange = [0, 10]\n'
                    '[history]\nfields = ["text", "stars"]\ninput = "text"\noutput = "stars"\n'
                    'item = "{body}: {stars}"\n[prompt]\nquestion = "How many stars, 0 to 10? {input}"\n')
    task = get_task(str(path))
    assert task.labels == tuple(str(i) for i in range(11)) and task.score_range == (0.0, 10.0)
    assert regression_value("?", 2.0, task.score_range) == 10.0 and regression_value("?", 8.0, task.score_range) == 0.0
    assert compute_metrics(task, ["?", "?", "7"], ["1", "9", "7"]) == pytest.approx({"mae": 6.0, "rmse": 7.3484692})
    lines = [{"id": "u1", "history": [{"id": "a", "text": "fine", "stars": 11}], "queries": [
        {"id": "q1", "input": "good", "gold": 10}, {"id": "q2", "input": "bad", "gold": "-1"}]}]
    users = tmp_path / "users.jsonl"
    users.write_text("".join(json.dumps(line) + "\n" for line in lines))
    from tailor.data.jsonl import check_users_file

    assert check_users_file(task, users).problems == [
        f"{users}:1: history[0].stars: '11' is not a score from 0 to 10",
        f"{users}:1: queries[1].gold: '-1' is not a score from 0 to 10"]


# --- users files ---------------------------------------------------------------------------------------------------
def test_users_files_read_into_users_asked_through_the_task(tmp_path: Path) -> None:
    from tailor.data.jsonl import load_jsonl_users
    from tailor.data.lamp import DataError
    from tailor.runs.spec import EvalSpec, check_golds, eval_users, fit_users, run_users

    task = get_task(str(EXAMPLE / "tickets.toml"))
    first = json.loads((EXAMPLE / "dev.jsonl").read_text().splitlines()[0])
    user = load_jsonl_users(task, EXAMPLE / "dev.jsonl")[0]
    assert (user.id, user.task, len(user.profile)) == (first["id"], "tickets", len(first["history"]))
    assert user.profile[0].date == first["history"][0]["date"]
    assert user.queries[0].input == task.ask(first["queries"][0]["input"])
    assert user.queries[0].gold == first["queries"][0]["gold"]
    spec = EvalSpec(task=str(EXAMPLE / "tickets.toml"), method="rag", data=str(EXAMPLE / "dev.jsonl"),
                    train_data=str(EXAMPLE / "train.jsonl"), users=5, seed=2)
    spec.check()
    streamed = run_users(spec)
    assert [u.id for u in streamed] == list(streamed.ids) == [u.id for u in eval_users(spec)]
    assert list(streamed.query_ids) == [q.id for u in eval_users(spec) for q in u.queries]
    assert len(streamed) == 5 and len(fit_users(spec)) == 24
    with pytest.raises(ValueError, match="--data .* and --train-data .* go together"):
        replace(spec, train_data=None).check()
    without_gold = tmp_path / "unscored.jsonl"
    without_gold.write_text(json.dumps({**first, "queries": [{"id": "q", "input": "VPN is down"}]}) + "\n")
    check_golds(spec)
    with pytest.raises(DataError, match=f"^{without_gold}:1: queries\\[0\\].gold: is missing; `tailor eval` scores"):
        check_golds(replace(spec, data=str(without_gold)))


def _bad_users(tmp_path: Path) -> Path:
    lines = (EXAMPLE / "dev.jsonl").read_text().splitlines()[:3]
    second, third = json.loads(lines[1]), json.loads(lines[2])
    del second["history"][0]["priority"]
    second["history"][1]["priority"] = "critical"
    second["queries"][0]["gold"] = "asap"
    third["id"] = json.loads(lines[0])["id"]
    path = tmp_path / "bad.jsonl"
    path.write_text("\n".join([lines[0], json.dumps(second), json.dumps(third), '{"id": "x", "history": [']) + "\n")
    return path


# --- the command line, end to end ----------------------------------------------------------------------------------
def _tailor(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "TAILOR_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "tailor.cli", *args], capture_output=True, text=True, env=env,
                          cwd=ROOT)


def test_data_validate_lists_every_problem_by_file_line_and_field(tmp_path: Path) -> None:
    task = str(EXAMPLE / "tickets.toml")
    good = _tailor("data", "validate", "--task", task, "--data", str(EXAMPLE / "train.jsonl"), "--data",
                   str(EXAMPLE / "dev.jsonl"))
    assert good.returncode == 0 and good.stdout == "" and good.stderr.count("no problems") == 2
    bad = _bad_users(tmp_path)
    before = sorted(tmp_path.iterdir())
    result = _tailor("data", "validate", "--task", task, "--data", str(bad))
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stdout.splitlines() == [
        f"{bad}:2: history[0].priority: is missing (every history item of tickets holds text, priority)",
        f"{bad}:2: history[1].priority: 'critical' is not a label of tickets (low, normal, high, urgent)",
        f"{bad}:2: queries[0].gold: 'asap' is not a label of tickets (low, normal, high, urgent)",
        f"{bad}:3: id: user '{json.loads(bad.read_text().splitlines()[0])['id']}' is also on line 1",
        f"{bad}:4: not valid JSON: Expecting value at column 25",
    ]
    assert "5 problems" in result.stderr and sorted(tmp_path.iterdir()) == before  # writes nothing


def test_eval_refuses_a_bad_users_file_in_one_line_before_the_model_loads(tmp_path: Path) -> None:
    result = _tailor("eval", "--task", str(EXAMPLE / "tickets.toml"), "--data", str(_bad_users(tmp_path)),
                     "--train-data", str(EXAMPLE / "train.jsonl"), "--method", "rag", "--model",
                     str(tmp_path / "no-such-model"), "--out", str(tmp_path / "run"))
    assert result.returncode == 2 and "Traceback" not in result.stderr
    lines = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert lines == [f"error: {tmp_path / 'bad.jsonl'}:2: history[0].priority: is missing (every history item of "
                     "tickets holds text, priority) (and 4 more problems: `tailor data validate` lists them all)"]
    assert not (tmp_path / "run").exists()
    for task, message in (("tickets", "unknown task 'tickets'"), ("tickets.jsonl", "a users file goes to --data")):
        result = _tailor("eval", "--task", task, "--method", "rag", "--out", str(tmp_path / "run"))
        assert result.returncode == 2 and message in result.stderr and not (tmp_path / "run").exists()


def test_eval_runs_a_task_file_on_users_files_for_a_prior_rag_and_a_fitted_method(
        tiny_model_dir: Path, tmp_path: Path, private_cache: None) -> None:
    from tailor.store.paths import state_path

    common = ["--task", "examples/tickets/tickets.toml", "--data", "examples/tickets/dev.jsonl", "--train-data",
              "examples/tickets/train.jsonl", "--model", str(tiny_model_dir), "--batch-size", "4"]
    runs = {"global-prior": [], "rag": ["--k", "2"],
            "mt-lora": ["--set", "max_total=16", "--set", "epochs=1", "--set", "r=2", "--set", "max_examples=2"]}
    for method, options in runs.items():
        result = _tailor("eval", *common, "--method", method, *options, "--out", str(tmp_path / method))
        assert result.returncode == 0, result.stderr
        metrics = json.loads((tmp_path / method / "metrics.json").read_text())
        assert (metrics["task"], metrics["n_users"], metrics["n_queries"]) == ("tickets", 12, 18)
        assert set(metrics["metrics"]) == {"accuracy", "f1"}
        config = json.loads((tmp_path / method / "config.json").read_text())
        assert config["task"] == str(EXAMPLE / "tickets.toml") and config["data"] == str(EXAMPLE / "dev.jsonl")
        rows = [json.loads(line) for line in (tmp_path / method / "predictions.jsonl").read_text().splitlines()]
        assert {r["prediction"] for r in rows} <= {"low", "normal", "high", "urgent"}
        for row in rows:  # the saved file's size, header included: RAG's history is all header, no tensors
            assert row["state_bytes"] == state_path(tmp_path / method / "states", row["user_id"]).stat().st_size > 0
    assert (Path(os.environ["TAILOR_CACHE"]) / "fits" / "mt-lora").is_dir()  # fitted on the train users
    report = _tailor("report", *(str(tmp_path / m) for m in runs), "--baseline", "global-prior", "--out",
                     str(tmp_path / "cmp"))
    assert report.returncode == 0, report.stderr
    assert (tmp_path / "cmp" / "comparison.md").read_text().startswith("# tickets: comparison against global-prior")
    edited = _task_file(tmp_path, ("Answer with the priority alone.", "One word."), "tickets.toml")
    rerun = _tailor("eval", *common[2:], "--task", str(edited), "--method", "rag", "--k", "2", "--out",
                    str(tmp_path / "rag"))
    assert rerun.returncode == 2 and "task" in rerun.stderr and "another configuration" in rerun.stderr
