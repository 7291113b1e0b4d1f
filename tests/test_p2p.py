"""Profile-to-PEFT on tiny random models: the hypernetwork writes the same LoRA for the same profile and different
ones for different profiles, an untrained one is the base model, training lowers the loss, a killed fit resumes to
the same weights, unseen users are personalized, and an exported adapter gives the same logits in PEFT."""

from __future__ import annotations

import copy
import dataclasses
import json
from pathlib import Path

import pytest
import torch

from tailor.backbone.edits import hooked
from tailor.backbone.model import Backbone
from tailor.data.lamp import load_users
from tailor.methods import build_method
from tailor.methods.p2p import P2P, TrainingSet, plan_steps, sqrt_weights
from tailor.store.state import UserState
from tailor.tasks import get_task
from tailor.tasks.records import HistoryItem, Query, User

pytestmark = pytest.mark.usefixtures("private_cache", "one_thread")

FAST = dict(summary_tokens=8, summary_items=4, summary_history_tokens=64, history_tokens=48, r=4, hidden=32,
            module_dim=8, depth_dim=8, batch=4, later_items=2, max_target_tokens=8, encoder="backbone")


def users_of(lamp_dir: Path, split: str = "dev", task: str = "lamp2n") -> list[User]:
    return load_users(get_task(task), split, lamp_dir)


def method(backbone: Backbone, **options) -> P2P:
    built = build_method("p2p", get_task("lamp2n"), backbone, **{**FAST, **options})
    assert isinstance(built, P2P)
    return built


def _logits(model: torch.nn.Module, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids).logits


@pytest.fixture(scope="module")
def trained(backbone: Backbone, lamp_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> P2P:
    """A hypernetwork trained a few steps at a high rate, so that the LoRAs it writes are far from zero."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("TAILOR_CACHE", str(tmp_path_factory.mktemp("cache")))
        fitted = method(backbone, steps=6, lr=1e-2, keep_best=False)
        fitted.fit(users_of(lamp_dir, "train"))
    return fitted


def test_same_profile_same_lora_other_profile_other_lora(trained: P2P, lamp_dir: Path) -> None:
    a, b = users_of(lamp_dir)[:2]
    twin = dataclasses.replace(a, id="twin-of-a")  # same history and queries under another id
    sa, st, sb = trained.personalize_many([a, twin, b])
    alone = trained.personalize(twin)
    assert sa.tensors.keys() == st.tensors.keys() == sb.tensors.keys()
    assert all(torch.equal(sa.tensors[n], st.tensors[n]) for n in sa.tensors)
    assert all(torch.allclose(alone.tensors[n], st.tensors[n], atol=1e-6) for n in sa.tensors)
    for part in ("lora_A", "lora_B"):
        gap = max((sa.tensors[n] - sb.tensors[n]).abs().max().item() for n in sa.tensors if n.endswith(part))
        assert gap > 1e-4, part


def test_profile_holds_summary_and_retrieved_items(trained: P2P, lamp_dir: Path) -> None:
    user = users_of(lamp_dir)[0]
    state = trained.personalize(user)
    assert state.header["summary"] and len(state.header["adapters"]) == len(user.queries) == 1
    assert state.header["adapters"] != ["*"]
    # k=0: the profile is the summary alone, so one adapter answers every input.
    k0 = P2P(trained.task, trained.backbone, dataclasses.replace(trained.config, k=0))
    k0.hypernet = trained.hypernet
    assert k0.personalize(user).header["adapters"] == ["*"]
    task = trained.task
    text = trained.profile_text(task, "SUMMARY", list(user.profile[:2]))
    assert text.startswith("SUMMARY\n") and text.count("\n") == 2


def test_untrained_hypernetwork_is_the_base_model(backbone: Backbone, lamp_dir: Path) -> None:
    fresh = method(backbone, steps=0)
    fresh.fit(users_of(lamp_dir, "train")[:2])
    user = users_of(lamp_dir)[0]
    state = fresh.personalize(user)
    assert all(t.abs().max() == 0 for n, t in state.tensors.items() if n.endswith("lora_B"))
    assert any(t.abs().max() > 0 for n, t in state.tensors.items() if n.endswith("lora_A"))
    prompt = user.queries[0].input
    personal = backbone.score_labels([prompt], get_task("lamp2n").labels, edits=fresh.edits(
        [_view(fresh, state, user.queries[0])]))
    plain = backbone.score_labels([prompt], get_task("lamp2n").labels)
    assert personal == pytest.approx(plain, abs=1e-5)


def _view(p2p: P2P, state: UserState, query: Query) -> UserState:
    view = UserState(state.method, state.version, state.user_id, state.model_id)
    view.runtime["lora"] = p2p.adapters_for([(state, query.input)])[0]
    return view


def test_a_few_steps_lower_the_loss(backbone: Backbone, lamp_dir: Path, tmp_path: Path) -> None:
    p2p = method(backbone, steps=12, lr=1e-2)
    users = users_of(lamp_dir, "train")
    data = p2p.training_set(users)
    rows = list(range(len(data.examples)))
    before = p2p.batch_loss(p2p.new_hypernet(), data, rows)
    p2p.fit(users, workdir=tmp_path)
    assert p2p.hypernet is not None
    with torch.no_grad():
        after = p2p.batch_loss(p2p.hypernet, data, rows)
    assert after < before - 0.1
    assert all(not p.requires_grad for p in backbone.model.parameters())
    curve = (tmp_path / "loss.csv").read_text().splitlines()
    assert curve[0] == "step,loss" and len(curve) == 13


def test_fit_resumes_from_its_checkpoint(backbone: Backbone, lamp_dir: Path, tmp_path: Path,
                                         monkeypatch: pytest.MonkeyPatch) -> None:
    import tailor.methods.p2p as p2p_module

    users = users_of(lamp_dir, "train")[:6]
    full = method(backbone, steps=6, lr=1e-2)
    full.fit(users)
    monkeypatch.setattr(p2p_module, "CHECKPOINT_EVERY", 2)

    class Killed(Exception):
        pass

    calls = {"n": 0}
    original = P2P.train_step

    def dying_step(self, *args):
        calls["n"] += 1
        if calls["n"] == 4:
            raise Killed
        return original(self, *args)

    monkeypatch.setattr(P2P, "train_step", dying_step)
    with pytest.raises(Killed):
        method(backbone, steps=6, lr=1e-2).fit(users, workdir=tmp_path)
    saved = torch.load(tmp_path / "checkpoint.pt", weights_only=False)
    assert saved["step"] == 2
    saved["seconds"] = 1000.0  # as if the killed process had trained for 1000 s: the fit's time must include it
    torch.save(saved, tmp_path / "checkpoint.pt")
    resumed_steps = {"n": 0}

    def counting_step(self, *args):
        resumed_steps["n"] += 1
        return original(self, *args)

    monkeypatch.setattr(P2P, "train_step", counting_step)
    resumed = method(backbone, steps=6, lr=1e-2)
    resumed.fit(users, workdir=tmp_path)
    assert resumed_steps["n"] == 4  # steps 3..6 only
    assert resumed.fit_log["resumed"] and 1000.0 < resumed.fit_log["seconds"] < 1000.0 + 600
    assert full.hypernet is not None and resumed.hypernet is not None
    assert full.fit_log["losses"] == pytest.approx(resumed.fit_log["losses"], abs=1e-5)
    for (name, a), (_, b) in zip(full.hypernet.state_dict().items(), resumed.hypernet.state_dict().items()):
        assert torch.allclose(a, b, atol=1e-6), name


def test_unseen_users_are_answered_with_loras_written_for_their_questions(trained: P2P, lamp_dir: Path) -> None:
    train_ids = {u.id for u in users_of(lamp_dir, "train")}
    users = [u for u in users_of(lamp_dir) if u.id not in train_ids][:3]
    loaded = trained.personalize_many(users)
    requests = [(s, q) for s, u in zip(loaded, users) for q in u.queries]
    mixed = trained.predict(requests)
    assert len(mixed) == len(requests) and all(p.text in get_task("lamp2n").labels for p in mixed)
    # Written on the fly at predict time (no queries known when personalized), the LoRA is the stored one.
    bare = trained.personalize(dataclasses.replace(users[0], queries=()))
    assert bare.header["adapters"] == [] and not bare.tensors
    assert trained.predict([(bare, users[0].queries[0])])[0].scores == pytest.approx(mixed[0].scores, abs=1e-5)
    # A new question (not known at personalize time) gets its LoRA written on the fly from the stored profile.
    new = Query("new", users[0].queries[0].input + " politics crime")
    assert trained.predict([(loaded[0], new)])[0].scores != pytest.approx(mixed[0].scores, abs=1e-6)
    plain = build_method("none", get_task("lamp2n"), trained.backbone).predict(
        [(s, q) for s, q in requests])
    assert max(abs(a - b) for p, q in zip(mixed, plain) for a, b in zip(p.scores, q.scores)) > 1e-3


def test_exported_adapter_gives_the_same_logits_in_peft(trained: P2P, lamp_dir: Path, tmp_path: Path) -> None:
    from peft import PeftModel

    backbone = trained.backbone
    assert backbone is not None
    user = users_of(lamp_dir)[1]
    state = trained.personalize(user)
    folder = trained.export_peft(state, tmp_path / "adapter")
    ids = torch.tensor([backbone.encode(backbone.render(user.queries[0].input))])
    with hooked(backbone.model, trained.edits([_view(trained, state, user.queries[0])])):
        ours = _logits(backbone.model, ids)
    theirs = _logits(PeftModel.from_pretrained(copy.deepcopy(backbone.model), folder), ids)
    assert (ours - _logits(backbone.model, ids)).abs().max() > 1e-3  # the adapter really changes the model
    assert torch.allclose(ours, theirs, atol=1e-5)


def test_fit_saves_and_loads(trained: P2P, tmp_path: Path, lamp_dir: Path) -> None:
    trained.save_fit(tmp_path)
    again = P2P(trained.task, trained.backbone, trained.config)
    again.load_fit(tmp_path)
    user = users_of(lamp_dir)[2]
    a, b = trained.personalize(user), again.personalize(user)
    assert all(torch.equal(a.tensors[n], b.tensors[n]) for n in a.tensors)
    assert (tmp_path / "loss.csv").exists() and (tmp_path / "fit.json").exists()


def test_the_sentence_encoder_embeds_profiles(backbone: Backbone, lamp_dir: Path) -> None:
    p2p = method(backbone, encoder="sentence", steps=0)
    vectors = p2p.embed(["a user who loves politics", "a user who loves politics", "short tweets about food"])
    assert vectors.shape == (3, 384) and torch.allclose(vectors.norm(dim=-1), torch.ones(3), atol=1e-5)
    assert torch.equal(vectors[0], vectors[1]) and not torch.allclose(vectors[0], vectors[2])


def test_task_mixing_uses_square_root_weights() -> None:
    weights = sqrt_weights({"big": 400, "small": 100})
    assert weights["big"] == pytest.approx(2 / 3) and weights["small"] == pytest.approx(1 / 3)
    tasks = ["big"] * 40 + ["small"] * 10 + ["tiny"] * 2
    users = [i // 5 for i in range(50)] + [99, 99]
    data = TrainingSet([], torch.zeros(52, 2), users, tasks)
    plan = plan_steps(data, steps=200, batch=4, tasks_per_batch=2, seed=0)
    assert plan == plan_steps(data, steps=200, batch=4, tasks_per_batch=2, seed=0)
    assert all(len(rows) == 4 and len({tasks[i] for i in rows}) == 2 for rows in plan)
    counts = {t: sum(tasks[i] == t for rows in plan for i in rows) for t in ("big", "small", "tiny")}
    assert counts["big"] > counts["small"] > counts["tiny"] > 0
    firsts = [plan[s][0] for s in range(len(plan))]
    assert len({users[i] for i in firsts}) > 3  # rows come from many users


def test_a_step_in_token_groups_has_the_gradient_of_one_forward(backbone: Backbone, lamp_dir: Path,
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    p2p = method(backbone)
    data = p2p.training_set(users_of(lamp_dir, "train")[:3])
    rows = list(range(min(len(data.examples), 6)))
    grads, losses = [], []
    for budget in (100_000, 1):  # one forward; one forward per row
        monkeypatch.setattr("tailor.methods.lora.TRAIN_TOKENS", budget)
        hypernet = p2p.new_hypernet()
        losses.append(p2p.batch_loss(hypernet, data, rows, backward=True))
        grads.append([p.grad.clone() for p in hypernet.parameters() if p.grad is not None])
    assert len(rows) > 1 and losses[0] == pytest.approx(losses[1], abs=1e-5)
    assert len(grads[0]) == len(grads[1]) > 0
    assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(*grads))


def test_profile_ends_with_the_official_label_statistics_on_classification_tasks(backbone: Backbone) -> None:
    from tailor.methods.p2p import history_statistics

    news = get_task("lamp2n")
    items = [HistoryItem(str(i), {"text": "t", "title": "x", "category": c})
             for i, c in enumerate(["sports", "politics", "politics", "crime", "politics", "sports"])]
    assert history_statistics(news, items) == ("total=6 | politics=3 (50.0%), sports=2 (33.3%), crime=1 (16.7%)")
    p2p = method(backbone)
    assert p2p.profile_text(news, "SUMMARY", [], items).endswith(
        "\n\n## User History Statistics: total=6 | politics=3 (50.0%), sports=2 (33.3%), crime=1 (16.7%)")
    assert history_statistics(get_task("lamp3"), [HistoryItem("1", {"text": "t", "score": "5"})]) == ""
    without = P2P(news, backbone, dataclasses.replace(p2p.config, history_stats=False))
    assert without.profile_text(news, "SUMMARY", [], items) == "SUMMARY"


def test_rslora_scale_label_smoothing_and_the_l2_penalty(backbone: Backbone, lamp_dir: Path) -> None:
    import math

    p2p = method(backbone)
    assert p2p.lora_alpha == pytest.approx(16 * math.sqrt(8 if p2p.config.r == 8 else p2p.config.r))
    stack = p2p.generate(torch.randn(2, p2p.embedding_dim()), p2p.new_hypernet())
    assert stack.scaling == pytest.approx(p2p.config.alpha / math.sqrt(p2p.config.r))
    data = p2p.training_set(users_of(lamp_dir, "train")[:3])
    losses, l2 = p2p.row_losses(p2p.new_hypernet(), data, [0, 1])
    written = p2p.generate(data.embeddings[[0, 1]], p2p.new_hypernet())
    kinds = sorted({s.kind for s in written.sites})
    expected = sum(torch.stack([written.A[s].pow(2).mean() for s in written.sites if s.kind == k]).mean()
                   + torch.stack([written.B[s].pow(2).mean() for s in written.sites if s.kind == k]).mean()
                   for k in kinds)
    assert float(l2) == pytest.approx(float(expected), rel=1e-5) and float(l2) > 0
    smoothed, _ = p2p.row_losses(p2p.new_hypernet(), data, [0, 1], label_smoothing=0.1)
    assert not torch.allclose(losses, smoothed)


def test_a_budgeted_fit_stops_in_time_and_writes_its_learning_curve(backbone: Backbone, lamp_dir: Path,
                                                                   tmp_path: Path) -> None:
    import csv

    p2p = method(backbone, steps=400, budget_s=1e-6, eval_every=1, val_users=3)
    p2p.fit(users_of(lamp_dir, "train"), workdir=tmp_path)
    p2p.save_fit(tmp_path)
    log = json.loads((tmp_path / "fit.json").read_text())
    assert log["steps"] == 1 and log["planned_steps"] == 400 and log["validation_users"] == 3
    rows = list(csv.reader((tmp_path / "curve.csv").open()))
    assert rows[0] == ["step", "train_loss", "validation_loss"] and [r[0] for r in rows[1:]] == ["0", "1"]
    assert (tmp_path / "curve.png").stat().st_size > 1000


def test_the_budget_counts_training_not_the_preparation_of_the_training_set(
        backbone: Backbone, lamp_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Summaries can take most of a 30-minute budget on a CPU: a slow preparation must leave training its budget."""
    import time

    p2p = method(backbone, steps=6, budget_s=0.5, eval_every=100, val_users=0)
    prepare = p2p.training_set

    def slow(users, progress=None):  # noqa: ANN001, ANN202 - the method's own signature
        time.sleep(1.0)
        return prepare(users, progress)

    monkeypatch.setattr(p2p, "training_set", slow)
    p2p.fit(users_of(lamp_dir, "train"), workdir=tmp_path)
    assert p2p.fit_log["steps"] > 1 and p2p.fit_log["prepare_s"] >= 1.0


def test_the_fit_ends_with_the_weights_of_its_lowest_validation_loss(backbone: Backbone, lamp_dir: Path) -> None:
    """At a rate this high the held-out loss rises after the first steps: the fit keeps the best step's weights,
    which are exactly those of a fit stopped at that step."""
    users = users_of(lamp_dir, "train")
    options = dict(steps=6, lr=0.1, eval_every=1, val_users=3)
    best = method(backbone, **options)
    best.fit(users)
    log = best.fit_log
    kept = min(log["curve"], key=lambda point: point[2])
    assert (log["kept_step"], log["kept_validation_loss"]) == (kept[0], kept[2])
    assert log["kept_step"] < log["steps"] == 6  # the rate makes the last step worse than an earlier one
    stopped = method(backbone, **{**options, "steps": log["kept_step"], "keep_best": False})
    stopped.fit(users)
    assert best.hypernet is not None and stopped.hypernet is not None
    for (name, a), (_, b) in zip(best.hypernet.state_dict().items(), stopped.hypernet.state_dict().items()):
        assert torch.allclose(a, b, atol=1e-6), name


def test_the_fit_bar_moves_while_summaries_are_written(backbone: Backbone, lamp_dir: Path,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    """Writing the training users' summaries can take most of an hour on a CPU: the fit's bar gives them its first
    half, reached before the first training step, and ends at its total."""
    users = users_of(lamp_dir, "train")
    p2p = method(backbone, steps=2, eval_every=100, val_users=1)
    told: list[int] = []
    at_first_step: list[int] = []
    step = p2p.train_step

    def first(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202 - the method's own signature
        at_first_step.append(sum(told))
        return step(*args, **kwargs)

    monkeypatch.setattr(p2p, "train_step", first)
    p2p.fit(users, progress=told.append)
    assert at_first_step[0] == len(users) // 2 > 0
    assert sum(told) == len(users) and min(told) >= 0
