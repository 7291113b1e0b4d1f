"""Reading LaMP files: our shared data, the official layouts, and one test per kind of bad input, for both the
whole-file reader and the streaming one."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tailor.data import DataError, HistoryItem, User, available_tasks, load_users, resolve_data_dir
from tailor.data import lamp as lamp_module
from tailor.data.lamp import iter_users, question_ids
from tailor.data.splits import subset, subset_positions
from tailor.tasks import get_task

# (train, dev) users per task, from /work/shared/lamp/README.md.
SHARED_COUNTS = {
    "LaMP-2N": (148, 42),
    "LaMP-2M": (206, 59),
    "LaMP-3": (745, 213),
    "LaMP-4": (192, 55),
    "LaMP-7": (510, 146),
}


def _shared_dir() -> Path:
    try:
        return resolve_data_dir()
    except DataError:
        pytest.skip("the shared LaMP data folder is not on this machine")


def _write(path: Path, doc: object) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(doc), encoding="utf-8")
    return path


def _news_question(qid: object = 2100001, n_items: int = 2) -> dict:
    return {
        "id": qid,
        "input": "Which category does this article relate to? article: a story",
        "profile": [{"id": f"{qid}00{i}", "text": f"text {i}", "title": f"title {i}", "category": "politics",
                     "date": f"2020-01-{i + 1:02d}"} for i in range(n_items)],
    }


def _movie_question(qid: object = 2200001) -> dict:
    return {
        "id": qid,
        "input": "Which tag does this movie relate to? description: a film",
        "profile": [{"id": f"{qid}000", "description": "a movie", "tag": "comedy"},
                    {"id": int(f"{qid}001"), "description": "another", "tag": "classic"}],
    }


def _outputs(task: str, golds: dict) -> dict:
    return {"task": task, "golds": [{"id": qid, "output": out} for qid, out in golds.items()]}


def _flat_task(root: Path, task_dir: str, split: str, questions: list, outputs: dict | None) -> Path:
    """Our flat layout: <root>/<task_dir>/<split>_questions.json (+ outputs)."""
    path = _write(root / task_dir / f"{split}_questions.json", questions)
    if outputs is not None:
        _write(root / task_dir / f"{split}_outputs.json", outputs)
    return path


# --- the shared data -------------------------------------------------------------------------------------------

@pytest.mark.parametrize("task", sorted(SHARED_COUNTS))
@pytest.mark.parametrize("split", ["train", "dev"])
def test_shared_data_loads_with_readme_counts(task: str, split: str) -> None:
    users = load_users(task, split, _shared_dir())
    assert len(users) == SHARED_COUNTS[task][split == "dev"]
    spec = get_task(task)
    assert len({u.id for u in users}) == len(users)
    for user in users:
        assert user.task == spec.name and user.profile and len(user.queries) == 1
        assert user.queries[0].id == user.id and user.queries[0].gold
        assert all(set(spec.item_fields) <= item.fields.keys() for item in user.profile)
        assert all(isinstance(v, str) for item in user.profile for v in item.fields.values())


def test_shared_data_tasks_available() -> None:
    assert available_tasks(_shared_dir()) == ["LaMP-2N", "LaMP-2M", "LaMP-3", "LaMP-4", "LaMP-7"]


def test_shared_first_user_matches_file() -> None:
    data_dir = _shared_dir()
    raw = json.loads((data_dir / "LaMP_2N" / "dev_questions.json").read_text())[0]
    user = load_users("lamp2n", "dev", data_dir)[0]
    assert user.id == raw["id"] and user.queries[0].input == raw["input"]
    assert [item.id for item in user.profile] == [item["id"] for item in raw["profile"]]
    assert user.profile[0]["category"] == raw["profile"][0]["category"]


def test_shared_data_has_no_test_split() -> None:
    with pytest.raises(DataError, match="looked for .*test_questions.json"):
        load_users("LaMP-3", "test", _shared_dir())


# --- where the data is ---------------------------------------------------------------------------------------------

def test_env_var_sets_data_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _flat_task(tmp_path, "LaMP_2N", "dev", [_news_question("21")], _outputs("LaMP_2N", {"21": "politics"}))
    monkeypatch.setenv("TAILOR_DATA", str(tmp_path))
    assert resolve_data_dir() == tmp_path.resolve()
    assert [u.id for u in load_users("LaMP-2N", "dev")] == ["21"]


def test_flag_beats_env_var(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TAILOR_DATA", str(tmp_path / "elsewhere"))
    assert resolve_data_dir(tmp_path) == tmp_path.resolve()


def test_missing_data_dir_says_how_to_set_it(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TAILOR_DATA", str(tmp_path / "nope"))
    with pytest.raises(DataError, match="TAILOR_DATA"):
        resolve_data_dir()
    monkeypatch.delenv("TAILOR_DATA")
    monkeypatch.setattr(lamp_module, "_default_data_dirs", lambda: [tmp_path / "a", tmp_path / "b"])
    with pytest.raises(DataError) as err:
        resolve_data_dir()
    message = str(err.value)
    assert str(tmp_path / "a") in message and "--data-dir" in message and "tailor data download" in message


# --- official layouts --------------------------------------------------------------------------------------------

def test_official_nested_layout_with_int_ids(tmp_path: Path) -> None:
    questions = [{"id": 310, "input": "What is the score? review: ok",
                  "profile": [{"id": 3100, "text": "fine", "score": 4}, {"id": "3101", "text": "meh", "score": 2.0}]}]
    _write(tmp_path / "LaMP_3" / "dev" / "dev_questions.json", questions)
    _write(tmp_path / "LaMP_3" / "dev" / "dev_outputs.json", _outputs("LaMP_3", {310: "4"}))
    [user] = load_users("LaMP-3", "dev", tmp_path)
    assert user == User(id="310", task="LaMP-3", queries=user.queries, profile=(
        HistoryItem("3100", {"text": "fine", "score": "4"}), HistoryItem("3101", {"text": "meh", "score": "2"})))
    assert user.queries[0].gold == "4" and user.queries[0].id == "310"


def test_official_lamp2_dirs_are_told_apart(tmp_path: Path) -> None:
    _write(tmp_path / "LaMP_2" / "train" / "train_questions.json", [_news_question(110)])
    _write(tmp_path / "LaMP_2" / "train" / "train_outputs.json", _outputs("LaMP_2", {110: "politics"}))
    _write(tmp_path / "LaMP_2" / "new" / "train" / "train_questions.json", [_movie_question(120)])
    _write(tmp_path / "LaMP_2" / "new" / "train" / "train_outputs.json", _outputs("LaMP_2", {"120": "comedy"}))
    news = load_users("LaMP-2N", "train", tmp_path)
    movies = load_users("LaMP-2M", "train", tmp_path)
    assert [u.id for u in news] == ["110"] and news[0].profile[0]["category"] == "politics"
    assert [u.id for u in movies] == ["120"] and movies[0].profile[1].id == "120001"
    assert available_tasks(tmp_path) == ["LaMP-2N", "LaMP-2M"]


def test_lamp2_dir_holding_movies_is_not_read_as_news(tmp_path: Path) -> None:
    _flat_task(tmp_path, "LaMP_2", "dev", [_movie_question("9")], _outputs("LaMP-2", {"9": "comedy"}))
    assert [u.id for u in load_users("LaMP-2M", "dev", tmp_path)] == ["9"]
    with pytest.raises(DataError, match="no dev questions for LaMP-2N"):
        load_users("LaMP-2N", "dev", tmp_path)
    assert available_tasks(tmp_path) == ["LaMP-2M"]


def test_time_variant_reads_time_folder_and_keeps_dates(tmp_path: Path) -> None:
    _write(tmp_path / "time" / "LaMP_2" / "dev" / "dev_questions.json", [_news_question(5)])
    _write(tmp_path / "time" / "LaMP_2" / "dev" / "dev_outputs.json", _outputs("LaMP_2", {5: "politics"}))
    [user] = load_users("LaMP-2N", "dev", tmp_path, variant="time")
    assert [item.date for item in user.profile] == ["2020-01-01", "2020-01-02"]
    assert available_tasks(tmp_path) == []
    assert available_tasks(tmp_path, variant="time") == ["LaMP-2N"]


def test_test_split_has_no_golds(tmp_path: Path) -> None:
    _write(tmp_path / "LaMP_7" / "test" / "test_questions.json",
           [{"id": "7", "input": "Paraphrase: hi", "profile": [{"id": "70", "text": "hey", "lang": "en", "n": 3}]}])
    [user] = load_users("LaMP-7", "test", tmp_path)
    assert user.queries[0].gold is None
    assert dict(user.profile[0].fields) == {"text": "hey", "lang": "en"}


def test_unknown_task_split_or_variant(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="unknown task"):
        load_users("LaMP-9", "dev", tmp_path)
    with pytest.raises(DataError, match="unknown split"):
        load_users("LaMP-3", "validation", tmp_path)
    with pytest.raises(DataError, match="unknown variant"):
        load_users("LaMP-3", "dev", tmp_path, variant="date")


def test_reload_sees_a_changed_file(tmp_path: Path) -> None:
    outputs = _outputs("LaMP_2N", {"1": "politics"})
    path = _flat_task(tmp_path, "LaMP_2N", "dev", [_news_question("1")], outputs)
    assert [u.id for u in load_users("LaMP-2N", "dev", tmp_path)] == ["1"]
    _write(path, [_news_question("1", n_items=3)])
    assert len(load_users("LaMP-2N", "dev", tmp_path)[0].profile) == 3


# --- bad input: one DataError naming file, id and field ------------------------------------------------------------

def _stream(task: str, split: str, data_dir: Path) -> list[User]:
    return list(iter_users(question_ids(task, split, data_dir)))


def _load_bad(tmp_path: Path, questions: object, outputs: object | None = None, raw: str | None = None,
              same_when_streamed: bool = True) -> str:
    """Write a dev split of LaMP-2N and return the message of the DataError that loading it raises; streaming it
    must raise the same message (unless the JSON itself is broken, which the two parsers word differently)."""
    path = tmp_path / "LaMP_2N" / "dev_questions.json"
    if raw is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(raw, encoding="utf-8")
    else:
        _write(path, questions)
    if outputs is None:
        ids = [q["id"] for q in questions if isinstance(q, dict) and "id" in q] if isinstance(questions, list) else []
        outputs = _outputs("LaMP_2N", {qid: "politics" for qid in ids})
    _write(tmp_path / "LaMP_2N" / "dev_outputs.json", outputs)
    with pytest.raises(DataError) as err:
        load_users("LaMP-2N", "dev", tmp_path)
    if same_when_streamed:
        with pytest.raises(DataError) as streamed:
            _stream("LaMP-2N", "dev", tmp_path)
        assert str(streamed.value) == str(err.value)
    return str(err.value)


def test_truncated_json(tmp_path: Path) -> None:
    text = json.dumps([_news_question("2100148")])
    message = _load_bad(tmp_path, None, outputs=_outputs("LaMP_2N", {}), raw=text[: len(text) // 2],
                        same_when_streamed=False)
    assert "dev_questions.json" in message and "invalid JSON at line 1 column" in message
    assert "truncated" in message
    with pytest.raises(DataError, match=r"dev_questions.json: invalid JSON \(parse error: premature EOF.*truncated"):
        question_ids("LaMP-2N", "dev", tmp_path)


def test_missing_item_field(tmp_path: Path) -> None:
    question = _news_question("2100148")
    del question["profile"][1]["category"]
    message = _load_bad(tmp_path, [question])
    assert message.endswith(
        "dev_questions.json: question 2100148, profile item 2100148001: field 'category' is missing")


def test_missing_question_keys(tmp_path: Path) -> None:
    for key in ("input", "profile"):
        question = _news_question("2100148")
        del question[key]
        message = _load_bad(tmp_path, [question])
        assert message.endswith(f"dev_questions.json: question 2100148: field '{key}' is missing")
    message = _load_bad(tmp_path, [_news_question("1"), {"input": "x", "profile": []}])
    assert message.endswith("dev_questions.json: question #1: field 'id' is missing")


def test_missing_output(tmp_path: Path) -> None:
    outputs = {"task": "LaMP_2N", "golds": [{"id": "2100148"}]}
    message = _load_bad(tmp_path, [_news_question("2100148")], outputs=outputs)
    assert message.endswith("dev_outputs.json: question 2100148: field 'output' is missing")


def test_ids_differ_between_questions_and_outputs(tmp_path: Path) -> None:
    questions = [_news_question(str(i)) for i in (11, 12, 13)]
    message = _load_bad(tmp_path, questions, outputs=_outputs("LaMP_2N", {"11": "politics", "99": "crime"}))
    assert "dev_outputs.json: field 'id'" in message
    assert "2 question(s) of dev_questions.json have no gold, e.g. 12, 13" in message
    assert "1 gold(s) match no question of dev_questions.json, e.g. 99" in message


def test_empty_profile(tmp_path: Path) -> None:
    question = _news_question("2100148")
    question["profile"] = []
    message = _load_bad(tmp_path, [question])
    assert "dev_questions.json: question 2100148: field 'profile' is empty" in message


def test_wrong_types(tmp_path: Path) -> None:
    question = _news_question("2100148")
    question["profile"][0]["text"] = 5
    message = _load_bad(tmp_path, [question])
    assert message.endswith("question 2100148, profile item 2100148000: field 'text' must be a string, got integer")
    question = _news_question("2100148")
    question["input"] = ["not", "text"]
    assert _load_bad(tmp_path, [question]).endswith("question 2100148: field 'input' must be a string, got array")
    assert _load_bad(tmp_path, {"questions": []}, same_when_streamed=False).endswith(
        "dev_questions.json: top level must be an array of questions, got object")
    with pytest.raises(DataError, match="dev_questions.json: top level must be an array of questions, but the file "
                                        "starts with '{'"):
        question_ids("LaMP-2N", "dev", tmp_path)
    message = _load_bad(tmp_path, [_news_question(True)], outputs=_outputs("LaMP_2N", {}))
    assert message.endswith("question #0: field 'id' must be a string or an integer, got boolean")
    message = _load_bad(tmp_path, [_news_question("1")], outputs={"task": "LaMP_2N", "golds": {"1": "x"}})
    assert message.endswith("dev_outputs.json: field 'golds' must be an array, got object")


def test_duplicate_question_ids(tmp_path: Path) -> None:
    message = _load_bad(tmp_path, [_news_question("2100148"), _news_question(2100148)])
    assert message.endswith("dev_questions.json: question 2100148: field 'id' is duplicated: each question (user) "
                            "must appear once")


def test_outputs_of_another_task(tmp_path: Path) -> None:
    message = _load_bad(tmp_path, [_news_question("1")], outputs=_outputs("LaMP_3", {"1": "politics"}))
    assert message.endswith("dev_outputs.json: field 'task' is 'LaMP_3', but this file was read as LaMP-2N")


def test_missing_outputs_file(tmp_path: Path) -> None:
    _flat_task(tmp_path, "LaMP_2N", "train", [_news_question("1")], None)
    with pytest.raises(DataError, match="train_outputs.json: is missing"):
        load_users("LaMP-2N", "train", tmp_path)


# --- streaming -------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("task", sorted(SHARED_COUNTS))
def test_streamed_users_equal_loaded_users(task: str) -> None:
    data_dir = _shared_dir()
    loaded = load_users(task, "dev", data_dir)
    index = question_ids(task, "dev", data_dir)
    assert index.ids == tuple(u.id for u in loaded)
    assert list(iter_users(index)) == loaded
    positions = subset_positions(len(index.ids), 7, seed=3)
    assert list(iter_users(index, frozenset(positions))) == subset(loaded, 7, seed=3)


def test_streaming_holds_one_question_at_a_time(tmp_path: Path) -> None:
    """The reader yields a user before it has read the rest of the file: the file is cut after the first question,
    and the first user still comes out before the parser reaches the cut."""
    path = _flat_task(tmp_path, "LaMP_2N", "dev", [_news_question(str(i), n_items=50) for i in range(40)],
                      _outputs("LaMP_2N", {str(i): "politics" for i in range(40)}))
    index = question_ids("LaMP-2N", "dev", tmp_path)
    text = path.read_text()
    path.write_text(text[: text.index('{"id": "1"')])  # the file now ends inside the array
    users = iter_users(index)
    assert next(users).id == "0"
    with pytest.raises(DataError, match="invalid JSON"):
        next(users)


def test_a_file_changed_after_indexing_is_refused(tmp_path: Path) -> None:
    path = _flat_task(tmp_path, "LaMP_2N", "dev", [_news_question("1"), _news_question("2")],
                      _outputs("LaMP_2N", {"1": "politics", "2": "politics"}))
    index = question_ids("LaMP-2N", "dev", tmp_path)
    _write(path, [_news_question("1"), _news_question("3")])
    with pytest.raises(DataError, match="question 3: has changed since it was indexed"):
        list(iter_users(index))
