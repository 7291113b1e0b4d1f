"""The evaluation runner: run folders, resume after a torn write or a SIGKILL, conflicts, CLI errors."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import weakref
from pathlib import Path

import pytest
import typer

from tailor.backbone.model import Backbone
from tailor.data.lamp import load_users
from tailor.data.splits import swap_histories
from tailor.eval.runner import run_eval
from tailor.runs.fits import Fitted
from tailor.runs.folder import RunConflict, read_predictions
from tailor.runs.spec import EvalSpec, eval_users
from tailor.store.paths import state_path
from tailor.store.state import UserState
from tailor.tasks import get_task
from tests.conftest import write_lamp_dir


def predictions_by_query(folder: Path) -> dict[str, str]:
    rows = read_predictions(folder / "predictions.jsonl")
    assert len(rows) == len({r["query_id"] for r in rows}), "duplicate predictions"
    return {r["query_id"]: r["prediction"] for r in rows}


def test_run_folder_holds_config_predictions_metrics_report(backbone: Backbone, lamp_dir: Path,
                                                             tmp_path: Path) -> None:
    spec = EvalSpec(task="lamp2n", method="rag", options={"k": 2}, data_dir=str(lamp_dir), users=5, seed=1)
    metrics = run_eval(spec, tmp_path / "run", backbone=backbone, chunk_users=2)
    assert {p.name for p in (tmp_path / "run").iterdir()} >= {"config.json", "predictions.jsonl", "metrics.json",
                                                              "report.md"}
    assert metrics["n_users"] == 5 and set(metrics["metrics"]) == {"accuracy", "f1"}
    lo, hi = metrics["metrics"]["accuracy"]["ci"]
    assert lo <= metrics["metrics"]["accuracy"]["value"] <= hi
    config = json.loads((tmp_path / "run" / "config.json").read_text())
    assert config["method_config"]["k"] == 2 and config["mode"] == "scoring" and config["model"] == backbone.model_id
    for row in read_predictions(tmp_path / "run" / "predictions.jsonl"):  # RAG's state is all header, no tensors
        assert row["state_bytes"] == state_path(tmp_path / "run" / "states", row["user_id"]).stat().st_size > 0


def test_resume_after_a_torn_line_equals_an_uninterrupted_run(backbone: Backbone, lamp_dir: Path,
                                                                tmp_path: Path) -> None:
    spec = EvalSpec(task="lamp3", method="none", data_dir=str(lamp_dir), seed=0)
    run_eval(spec, tmp_path / "full", backbone=backbone, chunk_users=2)
    expected = predictions_by_query(tmp_path / "full")
    partial = tmp_path / "partial"
    partial.mkdir()
    lines = (tmp_path / "full" / "predictions.jsonl").read_text().splitlines(keepends=True)
    (partial / "config.json").write_text((tmp_path / "full" / "config.json").read_text())
    (partial / "predictions.jsonl").write_text("".join(lines[:2]) + lines[2][:15])  # killed mid-write
    run_eval(spec, partial, backbone=backbone, chunk_users=2)
    assert predictions_by_query(partial) == expected


def test_a_different_config_in_the_same_folder_is_refused(backbone: Backbone, lamp_dir: Path,
                                                          tmp_path: Path) -> None:
    run_eval(EvalSpec(task="lamp3", method="none", data_dir=str(lamp_dir), users=2), tmp_path, backbone=backbone)
    with pytest.raises(RunConflict, match="users: 2 -> 3"):
        run_eval(EvalSpec(task="lamp3", method="none", data_dir=str(lamp_dir), users=3), tmp_path,
                 backbone=backbone)


def test_a_folder_another_process_is_writing_is_refused(backbone: Backbone, lamp_dir: Path, tmp_path: Path) -> None:
    spec = EvalSpec(task="lamp3", method="none", data_dir=str(lamp_dir), users=2)
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time; from pathlib import Path; "
                               "from tailor.runs.folder import run_lock\n"
                               "with run_lock(Path(sys.argv[1])):\n print('held', flush=True); time.sleep(60)",
                               str(tmp_path)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(RunConflict, match="another running evaluation"):
            run_eval(spec, tmp_path, backbone=backbone)
        assert not (tmp_path / "predictions.jsonl").exists()
    finally:
        holder.kill()
        holder.wait()
    run_eval(spec, tmp_path, backbone=backbone)  # the lock dies with its holder, even after kill -9
    assert len(read_predictions(tmp_path / "predictions.jsonl")) == 2


def test_p2p_splits_answer_held_out_training_users_and_fit_on_the_rest(backbone: Backbone, lamp_dir: Path,
                                                                        tmp_path: Path,
                                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    import numpy as np

    from tailor.retrieval import embed
    from tailor.runs import spec as runner

    def letters(texts: list[str]) -> np.ndarray:  # a deterministic stand-in for the sentence encoder
        return np.array([[t.count(c) + 1.0 for c in "aeiourst"] for t in texts])

    monkeypatch.setattr(embed, "default_embedder", lambda: letters)
    runner._user_split.cache_clear()
    train_ids = {u.id for u in load_users("lamp3", "train", str(lamp_dir))}
    for split in ("random", "ood"):
        spec = EvalSpec(task="lamp3", method="none", data_dir=str(lamp_dir), split=split)
        held, fit = {u.id for u in runner.eval_users(spec)}, {u.id for u in runner.fit_users(spec)}
        assert held and fit and not held & fit and held | fit == train_ids
        runner._user_split.cache_clear()
        assert {u.id for u in runner.eval_users(spec)} == held  # the same seed gives the same split
        metrics = run_eval(spec, tmp_path / split, backbone=backbone)
        assert metrics["n_users"] == len(held)


def _eval_command(model: Path, data: Path, out: Path) -> list[str]:
    return [sys.executable, "-m", "tailor.cli", "eval", "--task", "lamp7", "--method", "rag", "--k", "2",
            "--model", str(model), "--data-dir", str(data), "--out", str(out), "--chunk-users", "3",
            "--set", "max_new_tokens=24", "--batch-size", "3"]


def test_sigkill_during_eval_then_resume_gives_the_uninterrupted_result(tiny_model_dir: Path,
                                                                         tmp_path: Path) -> None:
    data = write_lamp_dir(tmp_path / "data", users={"train": 3, "dev": 45}, seed=3)
    env = {**os.environ, "TAILOR_THREADS": "1"}
    subprocess.run(_eval_command(tiny_model_dir, data, tmp_path / "full"), check=True, env=env,
                   capture_output=True)
    expected = predictions_by_query(tmp_path / "full")
    assert len(expected) == 45

    killed = tmp_path / "killed"
    process = subprocess.Popen(_eval_command(tiny_model_dir, data, killed), env=env,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    predictions = killed / "predictions.jsonl"
    deadline = time.time() + 120
    while time.time() < deadline and not (predictions.exists() and predictions.read_bytes().count(b"\n") >= 3):
        time.sleep(0.02)
    process.send_signal(signal.SIGKILL)
    process.wait()
    answered = predictions.read_bytes().count(b"\n")
    assert 3 <= answered < 45, f"the kill should land mid-run, {answered} of 45 were answered"
    assert not (killed / "metrics.json").exists()

    subprocess.run(_eval_command(tiny_model_dir, data, killed), check=True, env=env, capture_output=True)
    assert predictions_by_query(killed) == expected
    assert json.loads((killed / "metrics.json").read_text())["n_queries"] == 45


def test_cli_reports_bad_data_in_one_line(tmp_path: Path) -> None:
    folder = tmp_path / "LaMP_3"
    folder.mkdir()
    (folder / "dev_questions.json").write_text('[{"id": "31", "input": "x", "profile": [')
    (folder / "dev_outputs.json").write_text('{"task": "LaMP_3", "golds": []}')
    result = subprocess.run([sys.executable, "-m", "tailor.cli", "eval", "--task", "lamp3", "--method",
                             "user-prior", "--data-dir", str(tmp_path), "--out", str(tmp_path / "run")],
                            capture_output=True, text=True)
    assert result.returncode == 2
    assert "dev_questions.json" in result.stderr and "Traceback" not in result.stderr


@pytest.mark.parametrize(("method", "option", "message"), [
    ("global-prior", "center=middle", "--set center=middle: center must be one of mean, median"),
    ("perfit", "stages=3", "--set stages=3: stages must be one of 1+2, 1, 2"),
    ("perfit", "stage2_examples=-1", "stage2_examples must be >= 0, not -1"),
    ("rag", "k=-1", "k must be >= 0, not -1"),
    ("rag", "k=abc", "--set k=abc: k must be an integer"),
    ("rag", "k=1.5", "--set k=1.5: k must be an integer"),
    ("rag", "mode=foo", "--set mode=foo: mode must be one of scoring, generation"),
    ("rag", "calibrate=maybe", "--set calibrate=maybe: calibrate must be true or false"),
    ("mt-lora", "lr=fast", "--set lr=fast: lr must be a number"),
    ("chameleon", "history=-3", "history must be >= 0, not -3"),
])
def test_cli_reports_a_bad_method_option_in_one_line(tmp_path: Path, method: str, option: str, message: str) -> None:
    result = subprocess.run([sys.executable, "-m", "tailor.cli", "eval", "--task", "lamp3", "--method", method,
                             "--set", option, "--out", str(tmp_path / "run")], capture_output=True, text=True)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert message in result.stderr and not (tmp_path / "run").exists()


@pytest.mark.parametrize(("args", "message"), [
    (["--task", "lamp9"], "unknown task 'lamp9'"),
    (["--task", "lamp3", "--split", "weird"], "unknown split 'weird'; expected one of train, dev, test, random, ood"),
    (["--task", "lamp3", "--variant", "month"], "unknown variant 'month'"),
    (["--task", "lamp3", "--users", "0"], "users must be at least 1"),
    (["--task", "lamp3", "--histories", "borrowed"], "'borrowed' is not one of own, swapped"),
])
def test_cli_reports_a_bad_run_in_one_line_before_loading_anything(tmp_path: Path, args: list[str],
                                                                   message: str) -> None:
    result = subprocess.run([sys.executable, "-m", "tailor.cli", "eval", *args, "--method", "none",
                             "--out", str(tmp_path / "run")], capture_output=True, text=True)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert message in result.stderr and "Loading weights" not in result.stderr
    assert not (tmp_path / "run").exists()


def test_set_values_are_read_as_their_options_types() -> None:
    from tailor.cli._options import check_options, set_pairs

    typed = check_options("perfit", set_pairs(["stages=1", "lr1=1", "k=3", "calibrate=TRUE", "max-new-tokens=4"]))
    assert typed == {"stages": "1", "lr1": 1.0, "k": 3, "calibrate": True, "max_new_tokens": 4}
    assert [type(v) for v in typed.values()] == [str, float, int, bool, int]
    assert check_options("rag", {"k": 2, "mode": "generation", "max_new_tokens": None}) == \
        {"k": 2, "mode": "generation", "max_new_tokens": None}
    with pytest.raises(typer.BadParameter, match="--set k=true: k must be an integer"):
        check_options("rag", {"k": True})


def test_a_run_that_fails_before_it_starts_leaves_no_folder(lamp_dir: Path, tmp_path: Path,
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    import tailor.eval.runner as runner

    def failing_fit(*args: object, **kwargs: object) -> Fitted:
        raise ValueError("the fit cannot start")

    spec = EvalSpec(task="lamp3", method="user-prior", model=None, data_dir=str(lamp_dir), users=2)
    monkeypatch.setattr(runner, "fit_for_spec", failing_fit)
    with pytest.raises(ValueError, match="cannot start"):
        run_eval(spec, tmp_path / "new" / "run")
    assert not (tmp_path / "new" / "run").exists()
    monkeypatch.undo()
    run_eval(spec, tmp_path / "run")
    (tmp_path / "run" / "predictions.jsonl").write_text("")  # as if killed after personalizing
    monkeypatch.setattr(runner, "fit_for_spec", failing_fit)
    with pytest.raises(ValueError, match="cannot start"):
        run_eval(spec, tmp_path / "run")
    assert (tmp_path / "run" / "config.json").exists()  # a folder that was there is left alone


def test_a_flag_and_its_set_option_agree_or_fail(lamp_dir: Path, tmp_path: Path) -> None:
    from tailor.cli._options import merge_flags

    assert merge_flags({"batch_size": 2}, {"batch_size": None, "k": 1}) == {"batch_size": 2, "k": 1}
    assert merge_flags({}, {"batch_size": None}) == {"batch_size": 8}
    with pytest.raises(typer.BadParameter, match="--batch-size 4 and --set batch_size=2 disagree"):
        merge_flags({"batch_size": 2}, {"batch_size": 4})
    base = [sys.executable, "-m", "tailor.cli", "eval", "--task", "lamp3", "--method", "user-prior", "--users", "2",
            "--data-dir", str(lamp_dir), "--set", "batch_size=2"]
    subprocess.run([*base, "--out", str(tmp_path / "run")], check=True, capture_output=True)
    assert json.loads((tmp_path / "run" / "config.json").read_text())["options"]["batch_size"] == 2
    refused = subprocess.run([*base, "--batch-size", "4", "--out", str(tmp_path / "both")], capture_output=True,
                             text=True)
    assert refused.returncode == 2 and "disagree" in refused.stderr and not (tmp_path / "both").exists()


@pytest.mark.parametrize("command", ["personalize", "demo"])
def test_personalize_and_demo_check_the_run_before_loading_anything(tmp_path: Path, command: str) -> None:
    method = ["--method", "none"] if command == "personalize" else []
    result = subprocess.run([sys.executable, "-m", "tailor.cli", command, "--task", "lamp3", *method, "--users", "0",
                             "--out", str(tmp_path / "run")], capture_output=True, text=True)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "users must be at least 1" in result.stderr and "Loading weights" not in result.stderr


@pytest.mark.parametrize(("args", "says"), [
    (["--words-task", "lamp2n"], "--words-task lamp2n: the demo needs a generation task"),
    (["--task", "lamp7"], "--task lamp7: the demo needs a label or rating task"),
    (["--words-users", "-2"], "--words-users must be 0"),
])
def test_the_demo_refuses_a_task_its_table_cannot_run_before_loading_anything(tmp_path: Path, args: list[str],
                                                                              says: str) -> None:
    result = subprocess.run([sys.executable, "-m", "tailor.cli", "demo", *args, "--out", str(tmp_path / "run")],
                            capture_output=True, text=True)
    assert result.returncode == 2 and says in result.stderr and "Loading weights" not in result.stderr


def test_a_method_config_rejects_negative_counts_but_not_signed_scales() -> None:
    from tailor.methods import method_class

    config_class = method_class("chameleon").config_class
    assert config_class(scale_p=-1.0, scale_n=-0.5).scale_p == -1.0
    with pytest.raises(ValueError, match="layers must be >= 0"):
        config_class(layers=-1)
    with pytest.raises(ValueError, match="batch_size must be at least 1"):
        config_class(batch_size=0)


def test_a_method_outside_tailor_runs_by_import_path(backbone: Backbone, lamp_dir: Path, tmp_path: Path) -> None:
    from tailor.methods import build_method

    name = "examples.latest_items:LatestItems"
    spec = EvalSpec(task="lamp2n", method=name, options={"n": 1}, data_dir=str(lamp_dir), users=3)
    metrics = run_eval(spec, tmp_path, backbone=backbone)
    assert metrics["n_users"] == 3 and json.loads((tmp_path / "config.json").read_text())["method"] == name
    method = build_method(name, get_task("lamp2n"), backbone, n=1)
    user = next(u for u in load_users(get_task("lamp2n"), "dev", lamp_dir) if len(u.profile) >= 2)
    prompt = method.prompt(method.personalize(user), user.queries[0].input)
    newest, older = (method.task.format_item(item) for item in (user.profile[-1], user.profile[-2]))
    assert prompt.endswith(user.queries[0].input) and newest in prompt and older not in prompt
    assert run_eval(spec, tmp_path, backbone=backbone)["metrics"] == metrics["metrics"]  # resumes as built-ins do


def test_an_import_path_that_is_not_a_method_fails_in_one_line(tmp_path: Path) -> None:
    for method, message in (("examples.nowhere:Method", "cannot import Method from examples.nowhere"),
                            ("tailor.tasks.records:User", "is not a tailor.methods.Personalizer subclass")):
        result = subprocess.run([sys.executable, "-m", "tailor.cli", "eval", "--task", "lamp3", "--method", method,
                                 "--out", str(tmp_path / "run")], capture_output=True, text=True)
        assert result.returncode == 2 and "Traceback" not in result.stderr and message in result.stderr


def test_saved_states_are_reused_on_resume(backbone: Backbone, lamp_dir: Path, tmp_path: Path,
                                           monkeypatch: pytest.MonkeyPatch) -> None:
    from tailor.methods import build_method

    spec = EvalSpec(task="lamp3", method="rag", options={"k": 1}, data_dir=str(lamp_dir), users=4)
    method = build_method("rag", get_task("lamp3"), backbone, k=1)
    run_eval(spec, tmp_path, method=method, chunk_users=2)
    assert len(list((tmp_path / "states").glob("*.safetensors"))) == 4
    (tmp_path / "predictions.jsonl").write_text("")  # as if killed after personalizing, before predicting
    personalized: list[str] = []
    original = method.personalize_many
    monkeypatch.setattr(method, "personalize_many", lambda users, progress=None: personalized.extend(
        u.id for u in users) or original(users))
    metrics = run_eval(spec, tmp_path, method=method, chunk_users=2)
    assert personalized == [] and metrics["n_queries"] == 4


def test_state_file_names_cannot_escape_the_folder(tmp_path: Path) -> None:
    from tailor.store.paths import state_path

    for user_id in ("../../etc/passwd", ".hidden", "a/b", "x" * 500, "ok_user-1.2"):
        path = state_path(tmp_path, user_id)
        assert path.parent == tmp_path and not path.name.startswith(".")
    assert state_path(tmp_path, "ok_user-1.2").name == "ok_user-1.2.safetensors"


def test_fit_time_survives_a_resume_and_a_rerun(backbone: Backbone, lamp_dir: Path, tmp_path: Path,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    import tailor.eval.runner as runner

    spec = EvalSpec(task="lamp3", method="rag", options={"k": 1}, data_dir=str(lamp_dir), users=4)
    fits = iter([Fitted(100.0, []), Fitted(5.0, [])])
    monkeypatch.setattr(runner, "fit_for_spec", lambda *args, **kwargs: next(fits))
    assert run_eval(spec, tmp_path, backbone)["fit_s"] == 100.0
    assert run_eval(spec, tmp_path, backbone)["fit_s"] == 100.0  # finished: nothing fitted, the record is kept
    rows = (tmp_path / "predictions.jsonl").read_text().splitlines(keepends=True)
    (tmp_path / "predictions.jsonl").write_text("".join(rows[:2]))  # as if killed halfway
    metrics = run_eval(spec, tmp_path, backbone)
    assert metrics["fit_s"] == 105.0 and metrics["wall_time_s"] >= 105.0


def test_swapped_histories_answer_each_user_from_another_users_history(lamp_dir: Path, tmp_path: Path) -> None:
    own = EvalSpec(task="lamp2n", method="user-prior", model=None, data_dir=str(lamp_dir), seed=3)
    swapped = EvalSpec(task="lamp2n", method="user-prior", model=None, data_dir=str(lamp_dir), seed=3,
                       histories="swapped")
    run_eval(own, tmp_path / "own")
    run_eval(swapped, tmp_path / "swapped")
    users = load_users("lamp2n", "dev", str(lamp_dir))
    donors = {u.id: next(d for d in users if d.profile == s.profile)
              for u, s in zip(users, swap_histories(users, seed=3))}
    own_answers, swapped_answers = predictions_by_query(tmp_path / "own"), predictions_by_query(tmp_path / "swapped")
    for user in users:  # the user prior answers with the history's most frequent label: now the donor's
        assert donors[user.id].id != user.id
        assert {swapped_answers[q.id] for q in user.queries} == {own_answers[q.id] for q in donors[user.id].queries}
    assert swapped_answers != own_answers, "the data gives users different priors, so the swap shows"
    assert json.loads((tmp_path / "swapped" / "config.json").read_text())["histories"] == "swapped"


def test_a_swapped_control_borrows_the_own_runs_states_instead_of_personalizing_again(
        lamp_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Each swapped user gets the state its history's owner has in the own run (under its own id, with the owner's
    personalize time) and answers as a swapped run that personalized afresh; nothing is personalized twice."""
    from tailor.methods.priors import UserPrior

    def spec(**fields: object) -> EvalSpec:
        return EvalSpec(task="lamp2n", method="user-prior", model=None, data_dir=str(lamp_dir), seed=3,
                        queries_per_user=1, **fields)  # type: ignore[arg-type]

    run_eval(spec(), tmp_path / "own")
    run_eval(spec(histories="swapped"), tmp_path / "fresh")
    built = []
    original = UserPrior.personalize
    monkeypatch.setattr(UserPrior, "personalize", lambda self, user: built.append(user.id) or original(self, user))
    run_eval(spec(histories="swapped", states_from=str(tmp_path / "own")), tmp_path / "borrowed")
    assert built == []
    assert predictions_by_query(tmp_path / "borrowed") == predictions_by_query(tmp_path / "fresh")
    own, swapped = eval_users(spec()), eval_users(spec(histories="swapped"))
    for user in swapped:
        donor = next(d for d in own if d.profile == user.profile)
        state = UserState.load(state_path(tmp_path / "borrowed" / "states", user.id))
        lent = UserState.load(state_path(tmp_path / "own" / "states", donor.id))
        assert donor.id != user.id and state.user_id == user.id and state.header == lent.header
    with pytest.raises(ValueError, match="add --histories swapped"):
        spec(states_from=str(tmp_path / "own")).check()
    with pytest.raises(RunConflict, match="queries_per_user: 1 there, 0 here"):
        run_eval(EvalSpec(task="lamp2n", method="user-prior", model=None, data_dir=str(lamp_dir), seed=3,
                          histories="swapped", states_from=str(tmp_path / "own")), tmp_path / "other")
    with pytest.raises(ValueError, match="no run there"):
        run_eval(spec(histories="swapped", states_from=str(tmp_path / "nothing")), tmp_path / "other")
    assert not (tmp_path / "other").exists()  # refused before the folder was made: the same --out works once fixed


def test_a_run_made_before_a_spec_field_existed_resumes(lamp_dir: Path, tmp_path: Path) -> None:
    spec = EvalSpec(task="lamp3", method="global-prior", model=None, data_dir=str(lamp_dir), users=2)
    run_eval(spec, tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    del config["histories"]  # as written before the field was added
    (tmp_path / "config.json").write_text(json.dumps(config))
    run_eval(spec, tmp_path)
    with pytest.raises(RunConflict, match="histories: 'own' -> 'swapped'"):
        run_eval(EvalSpec(task="lamp3", method="global-prior", model=None, data_dir=str(lamp_dir), users=2,
                          histories="swapped"), tmp_path)


def test_a_run_streams_its_users_instead_of_loading_them(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A run over many users never holds all of them: the dev file is never loaded whole, and at most two chunks of
    users (the one being answered and the one being read) are alive at any moment."""
    from tailor.data import lamp as lamp_module
    from tailor.runs import spec as runner

    data_dir = write_lamp_dir(tmp_path / "lamp", {"train": 6, "dev": 40})
    whole_file = runner.load_users

    def train_only(task: str, split: str, *args: object) -> list:
        assert split == "train", "the run loaded its whole dev file"
        return whole_file(task, split, *args)

    train_ids = {u.id for u in whole_file("lamp3", "train", str(data_dir))}
    alive, peak, made = set(), [0], [0]

    class Counted(lamp_module.User):
        def __init__(self, *args: object, **kwargs: object) -> None:
            super().__init__(*args, **kwargs)
            if self.id in train_ids:  # the fit's users: loaded whole, as a fit needs them
                return
            alive.add(id(self))
            made[0] += 1
            peak[0] = max(peak[0], len(alive))
            weakref.finalize(self, alive.discard, id(self))

    monkeypatch.setattr(runner, "load_users", train_only)
    monkeypatch.setattr(lamp_module, "User", Counted)
    spec = EvalSpec(task="lamp3", method="user-prior", data_dir=str(data_dir), seed=0)
    metrics = run_eval(spec, tmp_path / "run", chunk_users=3)
    assert metrics["n_users"] == 40 and made[0] == 40
    assert 3 <= peak[0] <= 2 * 3
    monkeypatch.setattr(lamp_module, "User", runner.User)
    assert set(predictions_by_query(tmp_path / "run")) == {u.id for u in whole_file("lamp3", "dev", str(data_dir))}


def test_a_torn_line_longer_than_a_read_block_is_cut(tmp_path: Path) -> None:
    path = tmp_path / "predictions.jsonl"
    complete = '{"query_id": "1"}\n{"query_id": "2"}\n'
    path.write_text(complete + '{"query_id": "3", "prediction": "' + "x" * 200_000)
    assert [r["query_id"] for r in read_predictions(path)] == ["1", "2"]
    assert path.read_text() == complete
    path.write_text("x" * 70_000)  # no complete line at all
    assert read_predictions(path) == [] and path.read_text() == ""
