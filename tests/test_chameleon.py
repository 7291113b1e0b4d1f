"""CHAMELEON: SVD and CCS recover known directions, the edit touches only its layers and rows, end to end."""

from __future__ import annotations

import dataclasses

from pathlib import Path

import numpy as np
import pytest
import torch

from tailor.backbone.cache import cached_best_label
from tailor.backbone.edits import ForwardContext
from tailor.backbone.layers import Site
from tailor.backbone.model import Backbone, log_normalise
from tailor.data.lamp import load_users
from tailor.methods.chameleon import Chameleon, select_history
from tailor.methods.subspace import ProjectionEdit, ccs_direction, ccs_layers, personal_direction, project_edit
from tailor.store.state import UserState
from tailor.tasks import get_task

pytestmark = pytest.mark.usefixtures("private_cache")


def unit(v: torch.Tensor) -> torch.Tensor:
    return v / v.norm()


def test_svd_recovers_the_dominant_direction() -> None:
    torch.manual_seed(0)
    true = unit(torch.randn(16))
    personal = 5 * torch.rand(40, 1) * true + 0.1 * torch.randn(40, 16)
    found = personal_direction(personal)
    assert abs(float(found @ true)) > 0.99
    assert float(found @ true) > 0  # sign fixed so the data project positively


def test_ccs_recovers_a_separating_direction_without_labels() -> None:
    torch.manual_seed(1)
    true = unit(torch.randn(12))
    base = torch.randn(60, 12) * 0.3
    sign = torch.sign(torch.randn(60, 1))  # each pair's personalized side is on a random side: no mean offset helps
    personal = base + 2.0 * sign * true
    neutral = base - 2.0 * sign * true
    result = ccs_direction(personal, neutral, restarts=3, steps=300)
    # CCS finds a separating hyperplane, not the generating direction exactly: once the probe saturates, small
    # off-direction components cost almost nothing. A random direction in 12 dims has |cos| of about 0.23.
    assert abs(float(result.direction @ true)) > 0.8
    noise = ccs_direction(torch.randn(60, 12), torch.randn(60, 12), restarts=3, steps=300)
    assert result.loss < noise.loss  # separable layers get lower CCS loss, which is how layers are chosen


def test_project_edit_follows_the_paper_equations() -> None:
    torch.manual_seed(2)
    x, tp, tn = torch.randn(5, 8), torch.randn(8), torch.randn(8)
    edited = project_edit(x, tp, tn, torch.tensor(1.0), torch.tensor(1.0))
    step1 = x + (x @ tp)[:, None] / (tp @ tp) * tp
    expected = step1 - (step1 @ tn)[:, None] / (tn @ tn) * tn
    assert torch.allclose(edited, expected, atol=1e-5)
    assert torch.allclose(edited @ tn, torch.zeros(5), atol=1e-4)  # theta_N is removed


def test_projection_edit_changes_only_rows_with_a_gain() -> None:
    torch.manual_seed(3)
    hidden = torch.randn(3, 4, 8)
    edit = ProjectionEdit(torch.randn(2, 8), torch.randn(2, 8), torch.tensor([1.0, 0.0]), torch.tensor([1.0, 0.0]))
    out = edit(hidden, ForwardContext(rows=torch.tensor([0, 1, 0])))
    assert torch.equal(out[1], hidden[1])
    assert not torch.allclose(out[0], hidden[0]) and not torch.allclose(out[2], hidden[2])


def test_insights_are_cleaned_to_the_phrase_the_templates_expect() -> None:
    from tailor.methods.chameleon import clean_insight

    assert clean_insight('The user prefers: "The user prefers: "dark comedies".\nMore') == "dark comedies"
    assert clean_insight("Your answer should be short and neutral.") == "be short and neutral"
    assert clean_insight("  ") == "nothing in particular"


def test_pca_selection_prefers_the_items_that_carry_the_variation() -> None:
    rng = np.random.default_rng(0)
    embeddings = rng.normal(0, 0.01, (8, 6))
    embeddings[[2, 5], 0] = [3.0, -3.0]  # two items far from the rest along one component
    assert set(select_history(embeddings, 2)) == {2, 5}
    assert select_history(embeddings[:3], 5) == [0, 1, 2]


def scripted_answers(prompts: list[str], content_free: list[str] | None) -> list[str]:
    """A random 2-layer model answers both prompts alike, so tests script the answers: the personalized agent says
    "politics", the neutral one "sports", except for every third query, where both agree (a pair to drop).
    Prompts arrive as (personalized, neutral) per query; content-free twins are built only for calibrated scoring."""
    assert all("personalized assistant" in p for p in prompts[::2]) and content_free is None
    return ["crime" if (i // 2) % 3 == 0 else "politics" if i % 2 == 0 else "sports" for i in range(len(prompts))]


def scripted_insights(prompts: list[str]) -> list[str]:
    """Two kinds of users, by a stable property of their history, so the group fit finds two groups."""
    return ["action and violence" if len(p) % 2 else "quiet romance" for p in prompts]


def test_personalize_then_predict_on_the_tiny_model(backbone: Backbone, lamp_dir: Path, tmp_path: Path,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    task = get_task("lamp2n")
    users = load_users(task, "dev", lamp_dir)[:3]
    method = Chameleon(task, backbone, history=4, layers=1, ccs_restarts=1, ccs_steps=20, insight_tokens=6)
    monkeypatch.setattr(method, "_answers", scripted_answers)
    states = method.personalize_many(users)
    for state in states:
        assert state.header["pairs_kept"] + state.header["pairs_dropped"] == len(state.header["selected"])
        assert len(state.tensors["layers"]) == (1 if state.header["pairs_kept"] else 0)
        assert state.nbytes < 8 * 1024
    assert all(s.header["pairs_kept"] for s in states)
    assert sum(s.header["pairs_dropped"] for s in states) > 0
    predictions = method.predict([(s, u.queries[0]) for s, u in zip(states, users)])
    assert all(p.text in task.labels for p in predictions)

    again = method.personalize_many(users)  # generations and hidden states come from the caches
    assert all(torch.equal(a.tensors["theta_p"], b.tensors["theta_p"]) for a, b in zip(states, again))


def test_calibrated_best_label_ranks_against_the_content_free_prompt(backbone: Backbone) -> None:
    labels = ["politics", "sports", "crime"]
    prompts = ["Which category fits: the vote?", "Which category fits: the match?"]
    content_free = ["Which category fits: N/A", "Which category fits: N/A"]
    expected = (log_normalise(backbone.score_labels(prompts, labels))
                - log_normalise(backbone.score_labels(content_free, labels))).argmax(axis=1)
    calibrated = cached_best_label(backbone, prompts, labels, content_free=content_free)
    assert calibrated == [labels[i] for i in expected]
    assert cached_best_label(backbone, prompts, labels, content_free=content_free) == calibrated  # from the cache
    plain = backbone.score_labels(prompts, labels).argmax(axis=1)
    assert cached_best_label(backbone, prompts, labels) == [labels[i] for i in plain]
    with pytest.raises(ValueError, match="content-free"):
        cached_best_label(backbone, prompts, labels, content_free=content_free[:1])


@pytest.mark.parametrize("options, answered_by", [
    ({}, "generation"), ({"calibrate": True}, "generation"), ({"mode": "generation"}, "generation"),
    ({"answers": "score"}, "scoring"), ({"answers": "score", "calibrate": True}, "calibrated")])
def test_synthetic_answers_are_generated_as_the_paper_does_or_scored_when_asked(
        backbone: Backbone, lamp_dir: Path, monkeypatch: pytest.MonkeyPatch, options: dict, answered_by: str) -> None:
    """The paper generates each synthetic answer under its insight prompt and reads the label from it; scoring the
    labels instead (raw or calibrated, as the method answers) is kept as an option. Label scoring answered "1" to
    every LaMP-3 prompt here, so every scored pair was dropped."""
    import tailor.methods.chameleon as chameleon

    calls: list[str] = []

    def best_label(backbone: Backbone, prompts: list[str], labels: list[str], batch_size: int = 8, cache: object = None,
                   content_free: list[str] | None = None) -> list[str]:
        calls.append("scoring" if content_free is None else "calibrated")
        if content_free is not None:
            assert len(content_free) == len(prompts) and all(": N/A\n" in p for p in content_free)
        return [labels[0]] * len(prompts)

    def generate(backbone: Backbone, prompts: list[str], *args: object, **kwargs: object) -> list[str]:
        if "Your answer:" not in prompts[0]:
            return ["likes things"] * len(prompts)  # the insights
        calls.append("generation")
        return ["3"] * len(prompts)

    monkeypatch.setattr(chameleon, "cached_best_label", best_label)
    monkeypatch.setattr(chameleon, "cached_generate", generate)
    task = get_task("lamp3")
    method = Chameleon(task, backbone, history=2, layers=1, ccs_restarts=1, ccs_steps=5, insight_tokens=4, **options)
    method.preference_data(load_users(task, "dev", lamp_dir)[:1])
    assert calls == [answered_by]


def test_edit_acts_only_on_the_chosen_layers_and_rows(backbone: Backbone) -> None:
    task = get_task("lamp2n")
    method = Chameleon(task, backbone)
    d = backbone.hidden_size
    edited = UserState("chameleon", 1, "a", backbone.model_id, {"gain_p": 4.0, "gain_n": 1.0, "history": []},
                       {"layers": torch.tensor([1]), "theta_p": torch.randn(1, d), "theta_n": torch.randn(1, d)})
    plain = UserState("chameleon", 1, "b", backbone.model_id, {"gain_p": 4.0, "gain_n": 1.0, "history": []},
                      {"layers": torch.zeros(0, dtype=torch.long), "theta_p": torch.zeros(0, d),
                       "theta_n": torch.zeros(0, d)})
    edits = method.edits([edited, plain])
    assert edits is not None and set(edits) == {Site("mlp", 1)}
    prompts = ["which category is this article", "which category is this article"]
    mixed = backbone.score_labels(prompts, task.labels, edits=edits, rows=[0, 1])
    base = backbone.score_labels(prompts[:1], task.labels)
    assert np.allclose(mixed[1], base[0], atol=1e-4)  # the user without an edit is untouched in the mixed batch
    assert not np.allclose(mixed[0], base[0], atol=1e-3)
    off = UserState("chameleon", 1, "c", backbone.model_id, {"gain_p": 0.0, "gain_n": 0.0, "history": []},
                    dict(edited.tensors))
    assert method.edits([off, plain]) is None  # zero gains: the control runs no hook at all
    assert set(method.edits([off, edited])) == {Site("mlp", 1)}


def test_group_and_unseen_scopes(backbone: Backbone, lamp_dir: Path, tmp_path: Path,
                                 monkeypatch: pytest.MonkeyPatch) -> None:
    task = get_task("lamp2n")
    train = load_users(task, "train", lamp_dir)
    dev = load_users(task, "dev", lamp_dir)[:2]
    options = dict(history=3, layers=1, ccs_restarts=1, ccs_steps=10, insight_tokens=6, groups=2, group_users=6)
    group = Chameleon(task, backbone, scope="group", **options)
    monkeypatch.setattr(group, "_answers", scripted_answers)
    monkeypatch.setattr(group, "_insights", scripted_insights)
    with pytest.raises(RuntimeError, match="fit"):
        group.personalize_many(dev)
    group.fit(train)
    assert len(group.groups) == 2 and sum(len(g["users"]) for g in group.groups) == 6
    assert all(g["directions"] is not None for g in group.groups)
    states = group.personalize_many(dev)
    assert all("group" in s.header for s in states)

    nearest = Chameleon(task, backbone, scope="nearest-group", **options)
    nearest.groups = group.groups
    state = nearest.personalize(dev[0])
    assert state.header["group"] in (0, 1) and "insight_p" not in state.header  # nothing was generated
    assert torch.equal(state.tensors["theta_p"], group.groups[state.header["group"]]["directions"].theta_p.half())
    group.save_fit(tmp_path)
    unseen = Chameleon(task, backbone, scope="unseen", **options)
    unseen.load_fit(tmp_path)
    assert [g["users"] for g in unseen.groups] == [g["users"] for g in group.groups]
    assert unseen.pooled is not None and torch.equal(unseen.pooled.theta_p, group.pooled.theta_p)


def test_an_unseen_user_contributes_nothing(backbone: Backbone, lamp_dir: Path, tmp_path: Path,
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    """Section 4.3's unseen users have no history: every unseen user gets the fitted pool's directions and is asked
    the question alone, whatever their own history says (it once chose a group by the user's history)."""
    task = get_task("lamp2n")
    options = dict(history=3, layers=1, ccs_restarts=1, ccs_steps=10, insight_tokens=6, groups=2, group_users=6)
    fitted = Chameleon(task, backbone, scope="unseen", **options)
    monkeypatch.setattr(fitted, "_answers", scripted_answers)
    monkeypatch.setattr(fitted, "_insights", scripted_insights)
    fitted.fit(load_users(task, "train", lamp_dir))
    a, b = load_users(task, "dev", lamp_dir)[:2]
    stranger = dataclasses.replace(b, profile=a.profile[::-1] + b.profile)  # another history entirely
    states = fitted.personalize_many([a, b, stranger])
    assert fitted.pooled is not None
    for state in states:
        assert "history" not in state.header and "insight_p" not in state.header and "group" not in state.header
        assert torch.equal(state.tensors["theta_p"], fitted.pooled.theta_p.half())
    assert fitted.prompt(states[0], a.queries[0].input) == a.queries[0].input


def test_one_kept_pair_gives_no_edit(backbone: Backbone) -> None:
    """With one pair, centring each side on its own mean leaves nothing to probe: CHAMELEON must not edit (it once
    edited layers 0-2, chosen by index among losses that all tied)."""
    method = Chameleon(get_task("lamp2n"), backbone, layers=2, ccs_restarts=1, ccs_steps=5)
    one = torch.randn(1, backbone.n_layers, backbone.hidden_size)
    assert method.directions(one, one + 1.0) is None
    two = torch.randn(2, backbone.n_layers, backbone.hidden_size)
    assert method.directions(two, two + torch.randn_like(two)) is not None
    with pytest.raises(ValueError, match="at least 2 pairs"):
        ccs_layers(one, one + 1.0)


def test_the_question_is_asked_with_the_users_insight_unless_ablated(backbone: Backbone) -> None:
    """Appendix A.3's personalized template, with the user's selected history and personalized insight, is the
    inference prompt; `insight_prompt=False` asks LaMP's prompt, as the paper's baselines are asked."""
    task = get_task("lamp2n")
    header = {"history": ['the category for the article: "golf" is "sports" '], "insight_p": "sports news",
              "gain_p": 1.0, "gain_n": 1.0}
    state = UserState("chameleon", 2, "u", backbone.model_id, header)
    question = task.question_template.format(text="a match report")
    with_insight = Chameleon(task, backbone).prompt(state, question)
    assert "The user prefers sports news." in with_insight and "a match report" in with_insight
    assert "golf" in with_insight and with_insight.endswith("Your answer:")
    plain = Chameleon(task, backbone, insight_prompt=False).prompt(state, question)
    assert plain == task.join_history(header["history"], question) and "prefers" not in plain
