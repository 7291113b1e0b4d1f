"""Prompting baselines, priors, calibration and user states on the tiny model and synthetic LaMP data."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from tailor.backbone.model import Backbone
from tailor.backbone.textcache import TextCache
from tailor.data.lamp import load_users
from tailor.methods import build_method
from tailor.methods.base import content_free
from tailor.methods.profile import format_history
from tailor.store.state import StateError, UserState
from tailor.tasks import get_task
from tailor.tasks.records import HistoryItem, Query, User

NEWS = get_task("lamp2n")


def news_user(categories: list[str], uid: str = "u1") -> User:
    items = tuple(HistoryItem(f"{uid}{i:03d}", {"text": f"text about {c} number {i}", "title": f"title {i}",
                                                "category": c}) for i, c in enumerate(categories))
    query = Query(f"{uid}q", "Which category ... article: a story about politics and sports", "politics")
    return User(uid, NEWS.name, items, (query,))


def test_user_prior_takes_most_frequent_label_with_ties_to_the_newest() -> None:
    prior = build_method("user-prior", NEWS)
    state = prior.personalize(news_user(["sports", "travel", "sports", "travel", "crime"]))
    # sports and travel tie at 2; travel was used more recently
    assert prior.predict([(state, Query("q", "x"))])[0].text == "travel"


def test_user_prior_for_scores_and_generation() -> None:
    review = get_task("lamp3")
    user = User("r", review.name, tuple(HistoryItem(str(i), {"text": "t", "score": s}) for i, s in
                                        enumerate(["5", "4", "4"])), ())
    prior = build_method("user-prior", review)
    assert prior.predict([(prior.personalize(user), Query("q", "review: x"))])[0].text == "4.3333"
    tweets = get_task("lamp7")
    user = User("t", tweets.name, (HistoryItem("1", {"text": "i love my dog so much"}),
                                   HistoryItem("2", {"text": "stuck in traffic again"})), ())
    prior = build_method("user-prior", tweets)
    query = Query("q", "Paraphrase the following tweet without any explanation before or after it: heavy traffic")
    assert prior.predict([(prior.personalize(user), query)])[0].text == "stuck in traffic again"


def test_rating_priors_answer_with_the_median_when_asked() -> None:
    review = get_task("lamp3")
    user = User("r", review.name, tuple(HistoryItem(str(i), {"text": "t", "score": s}) for i, s in
                                        enumerate(["5", "5", "1"])), (Query("rq", "review: x", "5"),))
    others = [User(f"o{i}", review.name, (), (Query(f"q{i}", "review: y", g),)) for i, g in enumerate("55512")]
    for center, user_answer, global_answer in (("mean", "3.6667", "3.6"), ("median", "5", "5")):
        prior = build_method("user-prior", review, center=center)
        assert prior.predict([(prior.personalize(user), Query("q", "review: x"))])[0].text == user_answer
        fitted = build_method("global-prior", review, center=center)
        fitted.fit(others)
        assert fitted.predict([(fitted.personalize(user), Query("q", "review: x"))])[0].text == global_answer
    with pytest.raises(ValueError, match="mean or median"):
        build_method("user-prior", review, center="middle")


def test_global_prior_needs_fit_and_uses_training_golds(lamp_dir: Path) -> None:
    prior = build_method("global-prior", NEWS)
    users = load_users(NEWS, "dev", lamp_dir)
    with pytest.raises(RuntimeError, match="fit"):
        prior.predict([(prior.personalize(users[0]), users[0].queries[0])])
    train = load_users(NEWS, "train", lamp_dir)
    prior.fit(train)
    golds = [u.queries[0].gold for u in train]
    assert prior.predict([(prior.personalize(users[0]), users[0].queries[0])])[0].text == \
        max(set(golds), key=golds.count)


def movie_user(uid: str, tagged: dict[str, str], asks: str | None = None, gold: str | None = None) -> User:
    """A LaMP-2M user who tagged the movies of `tagged` (description -> tag) and asks about `asks`."""
    movies = get_task("lamp2m")
    history = tuple(HistoryItem(f"{uid}-{i}", {"description": d, "tag": t}) for i, (d, t) in enumerate(tagged.items()))
    queries = (Query(f"{uid}-q", movies.ask(asks), gold),) if asks else ()
    return User(uid, movies.name, history, queries)


def test_item_prior_answers_with_what_the_crowd_gave_the_same_item() -> None:
    movies = get_task("lamp2m")
    train = [movie_user("a", {"A ship sinks.": "romance", "Robots rise.": "sci-fi"}),
             movie_user("b", {"a  SHIP sinks.": "romance", "Robots rise.": "action"}, "Robots rise.", "sci-fi"),
             movie_user("c", {"Robots rise.": "comedy"}, "A heist.", "comedy"),
             movie_user("d", {}, "A caper.", "comedy")]
    prior = build_method("item-prior", movies)
    prior.fit(train)
    asked = [prior.predict([(prior.personalize(train[0]), Query("q", movies.ask(d)))])[0].text
             for d in ("A ship  sinks.", "Robots rise.", "Never seen.")]
    # case and spacing are folded; sci-fi (a's history, b's query) outvotes action and comedy; an unknown movie gets
    # the global prior's answer, the training queries' most common gold
    assert asked == ["romance", "sci-fi", "comedy"]
    assert prior.items.for_query(movies.ask("Robots rise."), ["sci-fi", "action"], without=train[1]) == [1.0, 0.0]
    review = get_task("lamp3")
    raters = [User(f"r{i}", review.name, (HistoryItem(f"r{i}", {"text": "Great pan.", "score": s}),), ())
              for i, s in enumerate("2245")]
    for center, answer in (("mean", "3.25"), ("median", "3")):
        prior = build_method("item-prior", review, center=center)
        prior.fit([*raters, User("q", review.name, (), (Query("rq", review.ask("x"), "1"),))])
        assert prior.predict([(prior.personalize(raters[0]), Query("q", review.ask("great pan.")))])[0].text == answer
    with pytest.raises(ValueError, match="LaMP-7 has none"):
        build_method("item-prior", get_task("lamp7"))


def test_rag_prompt_holds_the_best_matches_in_lamp_format(backbone: Backbone) -> None:
    rag = build_method("rag", NEWS, backbone, k=2)
    user = news_user(["sports", "politics", "travel", "crime"])
    prompt = rag.prompt(rag.personalize(user), user.queries[0].input)
    assert prompt.endswith(user.queries[0].input)
    assert prompt.count("the category for the article:") == 2
    assert 'is "politics"' in prompt and 'is "sports"' in prompt  # the two items sharing words with the query
    assert 'is "travel"' not in prompt


def test_history_block_respects_the_token_budget(backbone: Backbone) -> None:
    long_items = [HistoryItem(str(i), {"text": "word " * 300, "title": "t", "category": "crime"}) for i in range(3)]
    formatted = format_history(NEWS, backbone, long_items, budget=90)
    assert sum(backbone.count_tokens(f) for f in formatted) <= 90 + 3
    assert all(f.startswith('the category for the article: "word') for f in formatted)


def test_full_history_is_newest_first_within_budget(backbone: Backbone) -> None:
    user = news_user(["sports", "politics", "travel", "crime", "religion"])
    cost = [backbone.count_tokens(NEWS.format_item(item)) + 2 for item in user.profile]
    full = build_method("full", NEWS, backbone, history_tokens=sum(cost[-3:]))
    prompt = full.prompt(full.personalize(user), "Q")
    assert prompt.index('"religion"') < prompt.index('"crime"') < prompt.index('"travel"')
    assert "politics" not in prompt and "sports" not in prompt  # the two oldest items did not fit


def test_pag_summaries_are_generated_once_and_cached(backbone: Backbone, tmp_path: Path,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TAILOR_CACHE", str(tmp_path))
    pag = build_method("pag", NEWS, backbone, k=1, summary_tokens=4)
    calls = []
    original = backbone.generate
    monkeypatch.setattr(backbone, "generate", lambda *a, **kw: calls.append(a[0]) or original(*a, **kw))
    users = [news_user(["sports", "crime"], "a"), news_user(["travel", "crime"], "b")]
    states = pag.personalize_many(users)
    again = pag.personalize_many(users)
    assert len(calls) == 1 and len(calls[0]) == 2  # both users in one batch, and only once
    assert [s.header["summary"] for s in states] == [s.header["summary"] for s in again]
    assert "User profile:" in pag.prompt(states[0], users[0].queries[0].input)
    assert TextCache(tmp_path / "text-cache.sqlite").path.exists()


def test_content_free_input_replaces_the_content() -> None:
    question = "Which category ... categories: [a, b] article: the real article text"
    assert content_free(NEWS, question) == "Which category ... categories: [a, b] article: N/A"
    citation = get_task("lamp1")
    assert content_free(citation, 'title "A", which? [1]: "B" [2]: "C"') == 'title "N/A", which? [1]: "N/A" [2]: "N/A"'


def test_scoring_calibration_and_generation_modes(backbone: Backbone, lamp_dir: Path) -> None:
    users = load_users(NEWS, "dev", lamp_dir)[:3]
    for options, mode in (({}, "scoring"), ({"calibrate": True}, "scoring-calibrated"),
                          ({"mode": "generation", "max_new_tokens": 3}, "generation")):
        method = build_method("none", NEWS, backbone, **options)
        requests = [(method.personalize(u), u.queries[0]) for u in users]
        predictions = method.predict(requests)
        assert {p.mode for p in predictions} == {mode}
        if mode != "generation":
            assert all(p.text in NEWS.labels for p in predictions)
            assert all(len(p.scores or ()) == len(NEWS.labels) for p in predictions)
    raw = build_method("none", NEWS, backbone)
    calibrated = build_method("none", NEWS, backbone, calibrate=True)
    r = raw.predict([(raw.personalize(users[0]), users[0].queries[0])])[0]
    c = calibrated.predict([(calibrated.personalize(users[0]), users[0].queries[0])])[0]
    assert r.scores != c.scores


def test_state_round_trip_and_refusals(tmp_path: Path) -> None:
    state = UserState("chameleon", 2, "u1", "tiny/2x32", {"layers": [1, 2]}, {"theta": torch.randn(2, 32)})
    path = state.save(tmp_path / "u1.safetensors")
    loaded = UserState.load(path, method="chameleon", version=2, model_id="tiny/2x32")
    assert loaded.header == state.header and torch.equal(loaded.tensors["theta"], state.tensors["theta"])
    with pytest.raises(StateError, match="version 2.*needs version 3"):
        UserState.load(path, version=3)
    with pytest.raises(StateError, match="backbone"):
        UserState.load(path, model_id="other/30x576")
    data = bytearray(path.read_bytes())
    data[-5] ^= 0xFF  # flip a bit inside the tensor data
    path.write_bytes(bytes(data))
    with pytest.raises(StateError, match="checksum"):
        UserState.load(path)
    path.write_bytes(bytes(data[:40]))
    with pytest.raises(StateError, match="corrupt or truncated"):
        UserState.load(path)
    assert not list(tmp_path.glob(".*.tmp"))


def test_lamp7_training_examples_do_not_hold_their_own_answer(backbone: Backbone) -> None:
    """LaMP-7's history items are the user's tweets alone. Asked as "paraphrase this tweet", an item's input would hold
    its own target, and every method trained on it would learn to copy its input; the example is the tweet after
    OPPU's "tweet:" prompt instead, and the item is still asked as the task's question where a question is meant."""
    from tailor.methods.lora import LoRAP
    from tailor.methods.perfit import history_examples

    task = get_task("lamp7")
    tweets = ["off to the gym again lol", "cant believe the game last night!!", "coffee first then emails ugh"]
    user = User("u", task.name, tuple(HistoryItem(f"i{i}", {"text": t}) for i, t in enumerate(tweets)))
    for prompt, target in [task.example(item) for item in user.profile] \
            + LoRAP(task, backbone, k=1, history_tokens=64).training_pairs(user, limit=3) \
            + history_examples(task, backbone, user, 1, 64):
        assert target in tweets and target not in prompt
    assert task.question(user.profile[0]).endswith(tweets[0])  # CHAMELEON's queries still ask the paraphrase
    assert get_task("lamp2n").example(news_user(["sports"]).profile[0])[0].startswith("Which category")
