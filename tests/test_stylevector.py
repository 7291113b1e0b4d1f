"""StyleVector on the tiny random model: the vector is the difference of means it claims, mixed-user batches equal
each user alone, answer-only steering leaves the prompt alone, own answers are cached, resumed runs keep users."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from tailor.backbone.edits import ForwardContext
from tailor.backbone.layers import Site
from tailor.backbone.model import Backbone
from tailor.data.lamp import load_users
from tailor.methods.stylevector import Steer, StyleVector
from tailor.tasks import get_task

pytestmark = pytest.mark.usefixtures("private_cache", "one_thread")


def test_vector_is_the_difference_of_mean_hidden_states(backbone: Backbone, lamp_dir: Path) -> None:
    task = get_task("lamp7")
    method = StyleVector(task, backbone, layer=1, max_items=4, answer_tokens=6)
    user = load_users(task, "dev", lamp_dir)[0]
    state = method.personalize(user)
    items = user.profile[-4:]
    inputs = [task.example(item)[0] for item in items]
    own = [task.parse(t) for t in backbone.generate(inputs, 6)]
    site = Site("layer", 1)
    real = backbone.capture([backbone.render(x) + task.example(i)[1] for x, i in zip(inputs, items)], [site],
                            render=False)[site]
    model = backbone.capture([backbone.render(x) + y for x, y in zip(inputs, own)], [site], render=False)[site]
    expected = real.mean(0) - model.mean(0)
    assert state.header["items"] == 4 and state.tensors["vector"].shape == (backbone.hidden_size,)
    assert torch.allclose(state.tensors["vector"], expected, atol=5e-3)  # hidden states are cached as float16
    assert expected.norm() > 0.1


def test_the_vectors_change_the_answers(backbone: Backbone, lamp_dir: Path) -> None:
    task = get_task("lamp7")
    options = dict(layer=1, max_items=3, answer_tokens=6, max_new_tokens=6)
    method = StyleVector(task, backbone, scale=4.0, **options)
    users = load_users(task, "dev", lamp_dir)[:3]
    requests = [(s, u.queries[0]) for s, u in zip(method.personalize_many(users), users)]
    plain = StyleVector(task, backbone, scale=0.0, **options)
    assert [p.text for p in plain.predict(requests)] != [p.text for p in method.predict(requests)]


def test_answer_positions_steer_only_the_last_prompt_token_and_after() -> None:
    vectors = torch.tensor([[1.0, 1.0], [10.0, 10.0]])
    hidden = torch.zeros(2, 4, 2)
    ctx = ForwardContext(rows=torch.tensor([1, 0]), positions=torch.tensor([[0, 0, 1, 2], [0, 1, 2, 3]]),
                         prompt_lengths=torch.tensor([3, 2]), mask=torch.tensor([[0, 1, 1, 1], [1, 1, 1, 1]]).bool())
    out = Steer(vectors, 0.5, "answer")(hidden, ctx)
    assert out[0, :, 0].tolist() == [0.0, 0.0, 0.0, 5.0]  # row 0: prompt of 3 tokens, left-padded by one
    assert out[1, :, 0].tolist() == [0.0, 0.5, 0.5, 0.5]  # row 1: last prompt token (position 1) onwards
    every = Steer(vectors, 0.5, "all")(hidden, ctx)
    assert every[1, :, 1].tolist() == [0.5] * 4


def test_own_answers_are_generated_once(backbone: Backbone, lamp_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    task = get_task("lamp7")
    users = load_users(task, "dev", lamp_dir)[:2]
    StyleVector(task, backbone, layer=1, max_items=3, answer_tokens=6).personalize_many(users)
    calls = []
    original = Backbone.generate
    monkeypatch.setattr(Backbone, "generate", lambda self, *a, **k: calls.append(1) or original(self, *a, **k))
    again = StyleVector(task, backbone, layer=1, scale=2.0, max_items=3, answer_tokens=6).personalize_many(users)
    assert calls == [] and again[0].tensors["vector"].norm() > 0


def test_layer_outside_the_model_is_refused(backbone: Backbone) -> None:
    with pytest.raises(ValueError, match="layers 0..1"):
        StyleVector(get_task("lamp7"), backbone, layer=5)
