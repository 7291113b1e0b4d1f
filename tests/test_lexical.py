"""Lexical fusion on synthetic headline writers: it adds the words a user always uses and the input lacks, deletes
the input's filler words, takes those words from whoever's history it is given (the swapped control loses them), and
refuses tasks with labels."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest

from benchmarks.leaderboard import learned_numbers
from tailor.methods.lexical import FACTORS, LexicalFusion, words_of
from tailor.runs.fits import fit_method
from tailor.tasks import get_task
from tailor.tasks.metrics import compute_metrics
from tailor.tasks.records import HistoryItem, Query, User

TOPICS = ["budget", "river", "school", "stadium", "vaccine", "bridge", "festival", "court", "harbor", "museum"]
FILLER = "the report said that officials on monday were"


def writer(index: int, rng: random.Random, items: int = 6) -> User:
    """A user whose every headline is their signature word and the article's topic; the articles are the topic in
    filler and never hold the signature."""
    signature = f"sig{index}"

    def article(topic: str) -> tuple[str, str]:
        return f"{FILLER} discussing the {topic} plan", f"{signature} {topic} plan"

    history = []
    for i in range(items):
        text, title = article(rng.choice(TOPICS))
        history.append(HistoryItem(f"{index}-{i}", {"text": text, "title": title}))
    text, title = article(rng.choice(TOPICS))
    query = Query(f"q{index}", f"Generate a headline for the following article: {text}", title)
    return User(f"u{index}", "LaMP-4", tuple(history), (query,))


@pytest.fixture(scope="module")
def fitted() -> tuple[LexicalFusion, list[User]]:
    rng = random.Random(0)
    train = [writer(i, rng) for i in range(30)]
    dev = [writer(100 + i, rng) for i in range(8)]
    method = LexicalFusion(get_task("lamp4"))
    method.fit(train)
    return method, dev


def test_it_beats_copying_by_adding_the_users_words_and_deleting_filler(fitted) -> None:
    method, dev = fitted
    task = method.task
    answers = [p.text for p in method.predict([(method.personalize(u), u.queries[0]) for u in dev])]
    golds = [u.queries[0].gold for u in dev]
    copies = [task.retrieval_query(u.queries[0].input) for u in dev]
    assert all(f"sig{100 + i}" in words_of(a) for i, a in enumerate(answers))
    assert all("monday" not in words_of(a) for a in answers)
    probabilities = dict(method.word_probabilities(method.personalize(dev[0]), dev[0].queries[0]))
    assert probabilities["sig100"] > 0.5 > probabilities["monday"]
    assert compute_metrics(task, answers, golds)["rouge1"] > compute_metrics(task, copies, golds)["rouge1"] + 0.3
    log = method.fit_log
    assert set(log["by_factor"]) == set(FACTORS)
    assert log["examples"] == 30 * 5 > log["queries"] == 30  # each user's last 4 items asked too
    assert log["weights"]["user added"] > 0


def test_another_users_history_gives_that_users_words(fitted) -> None:
    method, dev = fitted
    own, other = dev[0], dev[1]
    answer = method.predict([(method.personalize(other), own.queries[0])])[0].text
    assert "sig101" in words_of(answer) and "sig100" not in words_of(answer)


def test_a_saved_fit_answers_the_same(fitted, tmp_path: Path) -> None:
    method, dev = fitted
    method.save_fit(tmp_path)
    loaded = LexicalFusion(method.task)
    loaded.load_fit(tmp_path)
    requests = [(method.personalize(u), u.queries[0]) for u in dev]
    assert [p.text for p in loaded.predict(requests)] == [p.text for p in method.predict(requests)]


def test_the_fit_cache_counts_the_numbers_it_learned(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """Its fit is a logistic model and a table of word rates, no tensors: the count is recorded beside the fit, so
    the leaderboard's "fit params" is not 0."""
    monkeypatch.setenv("TAILOR_CACHE", str(tmp_path))
    rng = random.Random(0)
    method = LexicalFusion(get_task("lamp4"))
    [folder] = fit_method(method, [writer(i, rng) for i in range(10)])
    assert not list(folder.rglob("*.safetensors"))
    recorded = json.loads((folder / "DONE").read_text())["parameters"]
    assert learned_numbers(folder) == recorded >= method.model.coef_.size + 2 + 10  # 10 users' signature words
    done = json.loads((folder / "DONE").read_text())
    assert "other_cores" in done and done["seconds"] > 0  # its wall time, and whether others shared the CPU meanwhile


def test_without_additions_it_only_deletes(fitted) -> None:
    _, dev = fitted
    rng = random.Random(1)
    method = LexicalFusion(get_task("lamp4"), add=False, length_factor=1.0)
    method.fit([writer(i, rng) for i in range(30)])
    assert method.factor == 1.0
    for user in dev:
        answer = method.predict([(method.personalize(user), user.queries[0])])[0].text
        assert set(words_of(answer)) <= set(words_of(user.queries[0].input))


def test_tasks_with_labels_are_refused() -> None:
    with pytest.raises(ValueError, match="LaMP-2N is a classification task"):
        LexicalFusion(get_task("lamp2n"))
    with pytest.raises(RuntimeError, match="call fit"):
        LexicalFusion(get_task("lamp4")).predict([])
