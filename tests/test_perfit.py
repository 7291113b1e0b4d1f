"""PerFit on the tiny random model: eq. 2, orthonormal R, the two stages, mixed-user batches, states, end to end."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from tailor.backbone.edits import ForwardContext, hooked
from tailor.backbone.layers import Site
from tailor.backbone.model import Backbone
from tailor.data.lamp import load_users
from tailor.eval.runner import run_eval
from tailor.methods.perfit import PerFit, history_examples, length_grouped, parameter_counts, parse_layers
from tailor.methods.reft import LowRankIntervention, PerFitEdit, Positions, count_parameters, loreft
from tailor.runs.spec import EvalSpec
from tailor.serve.worker import rebuild_reason
from tailor.store.state import UserState
from tailor.tasks import get_task
from tailor.tasks.records import HistoryItem, User

pytestmark = pytest.mark.usefixtures("one_thread")

NEWS = get_task("lamp2n")
TINY = dict(layers="0,1", positions="f1+l2", rank1=2, rank2=3, lr1=1e-2, lr2=5e-2, epochs1=2, epochs2=3, batch1=4,
            batch2=4, stage1_examples=24, history_tokens=48, max_target_tokens=8, batch_size=4)


@pytest.fixture()
def cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("TAILOR_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


@pytest.fixture(scope="module")
def fitted(backbone: Backbone, lamp_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> PerFit:
    method = PerFit(NEWS, backbone, **TINY)
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("TAILOR_CACHE", str(tmp_path_factory.mktemp("cache")))
        method.fit(load_users(NEWS, "train", lamp_dir))
    return method


def test_intervention_equals_equation_2_on_random_tensors() -> None:
    g = torch.Generator().manual_seed(0)
    d, r = 16, 3
    h = torch.randn(2, 5, d, generator=g)
    R = torch.linalg.qr(torch.randn(d, r, generator=g))[0].T
    W, b = torch.randn(r, d, generator=g), torch.randn(r, generator=g)
    expected = torch.stack([torch.stack([x + R.T @ (W @ x + b - R @ x) for x in row]) for row in h])
    assert torch.allclose(loreft(h, R, W, b), expected, atol=1e-5)
    # per-row parameters (a leading user dimension) give each row its own formula
    R2, W2, b2 = torch.stack([R, R.flip(0)]), torch.stack([W, -W]), torch.stack([b, 2 * b])
    per_row = loreft(h, R2, W2, b2)
    assert torch.allclose(per_row[1], loreft(h[1], R.flip(0), -W, 2 * b), atol=1e-5)
    module = LowRankIntervention(d, r, g)
    R3, W3, b3 = module.params()
    assert torch.allclose(R3 @ R3.T, torch.eye(r), atol=1e-5)
    assert torch.allclose(module(h), h + (h @ W3.T + b3 - h @ R3.T) @ R3, atol=1e-5)
    identity = LowRankIntervention(d, r, g, identity=True)
    assert torch.allclose(identity(h), h, atol=1e-5)
    assert count_parameters(r, d, 2) == sum(p.numel() for p in module.parameters()) * 2


def test_positions_edit_first_and_last_prompt_tokens_only() -> None:
    assert Positions.parse("f2+l3") == Positions(2, 3) and str(Positions.parse("l5")) == "l5"
    with pytest.raises(ValueError):
        Positions.parse("last5")
    # row 0: prompt of 6 tokens then 2 generated, left-padded by 1; row 1: prompt of 9 tokens
    positions = torch.tensor([[0, 0, 1, 2, 3, 4, 5, 6, 7], list(range(9))])
    mask = torch.tensor([[False] + [True] * 8, [True] * 9])
    ctx = ForwardContext(positions=positions, prompt_lengths=torch.tensor([6, 9]), mask=mask)
    chosen = Positions(1, 2).select(ctx)
    assert chosen[0].tolist() == [False, True, False, False, False, True, True, False, False]
    assert chosen[1].tolist() == [True] + [False] * 6 + [True, True]
    generating = ForwardContext(positions=torch.tensor([[6], [9]]), prompt_lengths=torch.tensor([6, 9]),
                                mask=torch.ones(2, 1, dtype=torch.bool))
    assert not Positions(1, 2).select(generating).any()
    assert Positions(0, 2).untouched(torch.tensor([6, 1])).tolist() == [4, 0]
    assert Positions(1, 2).untouched(torch.tensor([6, 1])).tolist() == [0, 0]


def test_r_stays_orthonormal_under_the_trainer_with_weight_decay(backbone: Backbone, cache: Path) -> None:
    method = PerFit(NEWS, backbone, **{**TINY, "stages": "2", "weight_decay": 0.1})
    trainer = method._trainer(3, 5e-2, 10, 0, False, [[], []])
    before = [m.params()[0].detach().clone() for m in trainer.modules]
    frozen = trainer.freeze(backbone.sft_batch(["which category is this", "a news article"], ["sports", "crime"]))
    losses = [trainer.step(frozen) for _ in range(10)]
    assert losses[-1] < losses[0]
    for module, start in zip(trainer.modules, before):
        R = module.params()[0].detach()
        assert torch.allclose(R @ R.T, torch.eye(3), atol=1e-5)
        assert (R - start).abs().max() > 1e-3  # R was trained, not frozen


def test_frozen_training_equals_training_through_the_whole_network(backbone: Backbone, cache: Path,
                                                                  lamp_dir: Path) -> None:
    method = PerFit(NEWS, backbone, **{**TINY, "stages": "2", "positions": "l2"})
    trainer = method._trainer(3, 1e-2, 1, 0, False, [[], []])
    batch = backbone.sft_batch(["which category is this article about", "a news article"], ["sports", "crime"])
    frozen = trainer.freeze(batch)
    assert frozen.prefix_width > 0  # last-token positions keep most of the prompt out of training
    edits = {Site("layer", layer): PerFitEdit([m.params()], trainer.positions)
             for layer, m in zip(trainer.layers, trainer.modules)}
    with torch.no_grad(), hooked(backbone.model, edits) as hooks:
        expected = backbone.sft_loss(batch, hooks).item()
    assert trainer.step(frozen) == pytest.approx(expected, abs=1e-5)
    user = load_users(NEWS, "dev", lamp_dir)[2]
    phases: dict[str, float] = {}
    cached = method.stage2(user, phases=phases)
    examples = history_examples(NEWS, backbone, user, method.config.k, method.config.history_tokens)
    prompts = backbone.sft_batch([q for q, _ in examples], [a for _, a in examples]).prompt_lengths
    assert phases["prompt_tokens"] == int(prompts.sum())  # the frozen pass's floor, as the cost benchmark reports it
    assert phases["optimiser_steps"] == method.config.epochs2 * -(-len(examples) // method.config.batch2)
    assert min(phases[k] for k in ("examples", "frozen_pass", "steps")) > 0
    assert len(user.profile) > 2
    capped = PerFit(NEWS, backbone, **{**TINY, "stages": "2", "positions": "l2", "stage2_examples": 2})
    capped_phases: dict[str, float] = {}
    capped_state = capped.stage2(user, phases=capped_phases)
    recent = history_examples(NEWS, backbone, user, method.config.k, method.config.history_tokens,
                              range(len(user.profile) - 2, len(user.profile)))
    assert recent == examples[-2:]  # the most recent items, each with the history retrieved from all before it
    recent_prompts = backbone.sft_batch([q for q, _ in recent], [a for _, a in recent]).prompt_lengths
    assert capped_phases["prompt_tokens"] == int(recent_prompts.sum())
    assert not torch.allclose(capped_state["W"], cached["W"])
    torch.rand(7)  # a user's phi_2 must not depend on the global RNG (torch's orthogonal completion draws from it)
    uncached = method.stage2(user, cached=False)
    assert all(torch.allclose(cached[k], uncached[k], atol=1e-5) for k in "RWb")


def test_stage2_leaves_stage1_untouched_and_learns_the_user(fitted: PerFit, lamp_dir: Path) -> None:
    stage1 = {k: v.clone() for k, v in fitted.stage1.items()}
    user = load_users(NEWS, "dev", lamp_dir)[0]
    state = fitted.personalize(user)
    assert all(torch.equal(stage1[k], fitted.stage1[k]) for k in stage1)
    assert not any(t.requires_grad for t in fitted.stage1.values())
    assert state.tensors["R"].shape == (2, 3, backbone_width(fitted))
    R = state.tensors["R"]
    assert torch.allclose(R @ R.mT, torch.eye(3).expand(2, 3, 3), atol=1e-5)
    assert (state.tensors["W"] - R).abs().max() > 1e-3  # moved away from its identity start
    examples = history_examples(NEWS, fitted.backbone, user, 1, 48)
    assert len(examples) == len(user.profile) and examples[0][1] == user.profile[0]["category"]
    assert examples[0][0] == NEWS.example(user.profile[0])[0]  # the oldest item has no earlier history to retrieve
    later = {item["text"][:30] for item in user.profile[2:]}
    assert not any(text in examples[1][0] for text in later)  # only earlier items are retrieved
    assert user.profile[0]["text"][:30] in examples[1][0]
    # with stage 1 and stage 2, the user's own training loss is lower than with stage 1 alone (phi_2 = identity)
    batch = fitted.backbone.sft_batch([p for p, _ in examples], [a for _, a in examples])
    zeros = {k: torch.zeros_like(v) for k, v in state.tensors.items()}
    stage1_only = fitted.new_state(user, fitted._header(user), zeros)
    losses = []
    for edits in (fitted.edits([stage1_only]), fitted.edits([state])):
        with torch.no_grad(), hooked(fitted.backbone.model, edits) as hooks:
            losses.append(fitted.backbone.sft_loss(batch, hooks, torch.zeros(len(examples), dtype=torch.long)).item())
    assert losses[1] < losses[0]


def backbone_width(method: PerFit) -> int:
    assert method.backbone is not None
    return method.backbone.hidden_size


def test_changing_one_users_phi2_changes_only_that_users_rows(fitted: PerFit, lamp_dir: Path) -> None:
    states = [fitted.personalize(u) for u in load_users(NEWS, "dev", lamp_dir)[:3]]
    edits = fitted.edits(states)
    hidden = torch.randn(3, 4, backbone_width(fitted))
    ctx = ForwardContext(rows=torch.tensor([0, 1, 2]), positions=torch.arange(4).expand(3, 4),
                         prompt_lengths=torch.tensor([4, 4, 4]), mask=torch.ones(3, 4, dtype=torch.bool))
    before = edits[Site("layer", 1)](hidden, ctx)
    states[1].tensors["b"] = states[1].tensors["b"] + 1.0
    after = fitted.edits(states)[Site("layer", 1)](hidden, ctx)
    assert torch.equal(before[0], after[0]) and torch.equal(before[2], after[2])
    assert (before[1] - after[1]).abs().max() > 0.1


def test_a_state_of_another_stage1_is_refused(fitted: PerFit, lamp_dir: Path) -> None:
    user = load_users(NEWS, "dev", lamp_dir)[1]
    state = fitted.personalize(user)
    assert state.nbytes == 2 * (2 * 3 * backbone_width(fitted) + 3) * 4
    state.header["stage1"] = "another-stage-1"
    with pytest.raises(ValueError, match="stage1"):
        fitted.predict([(state, user.queries[0])])


def test_end_to_end_fit_personalize_predict_and_stage1_reuse(backbone: Backbone, lamp_dir: Path,
                                                            tmp_path: Path, cache: Path) -> None:
    spec = EvalSpec(task="lamp2n", method="perfit", options=TINY, data_dir=str(lamp_dir), users=3)
    both = run_eval(spec, tmp_path / "both", backbone=backbone, method=PerFit(NEWS, backbone, **TINY))
    assert both["n_users"] == 3 and 0 <= both["metrics"]["accuracy"]["value"] <= 1
    states = sorted((tmp_path / "both" / "states").glob("*.safetensors"))
    assert len(states) == 3 and UserState.load(states[0]).tensors["R"].shape == (2, 3, backbone.hidden_size)
    fits = list((cache / "fits" / "perfit").iterdir())
    assert len(fits) == 1
    only1 = PerFit(NEWS, backbone, **{**TINY, "stages": 1, "rank2": 7})  # as `--set stages=1` passes it
    assert only1.fits
    run_eval(EvalSpec(task="lamp2n", method="perfit", options={**TINY, "stages": 1, "rank2": 7},
                      data_dir=str(lamp_dir), users=3), tmp_path / "stage1", backbone=backbone, method=only1)
    assert len(list((cache / "fits" / "perfit").iterdir())) == 1  # the stage-1 fit was reused, not redone
    assert UserState.load(next((tmp_path / "stage1" / "states").iterdir())).tensors == {}
    only2 = PerFit(NEWS, backbone, **{**TINY, "stages": "2"})
    assert not only2.fits and only2.edits([only2.personalize(load_users(NEWS, "dev", lamp_dir)[0])])
    counts = parameter_counts(backbone, only2.config)
    assert counts["stage2_per_user"] == 2 * (2 * 3 * 32 + 3)
    assert counts["oppu_lora_r8_per_user"] == 2 * 8 * ((32 + 32) + (32 + 16))  # q: 32->32, v: 32->16 (2 kv heads)
    assert json.loads((fits[0] / "stage1.json").read_text())["layers"] == [0, 1]


def test_stage1_progress_advances_every_step_and_totals_the_training_users(backbone: Backbone, lamp_dir: Path,
                                                                          cache: Path) -> None:
    users = load_users(NEWS, "train", lamp_dir)[:6]
    ticks: list[int] = []
    PerFit(NEWS, backbone, **TINY).fit(users, ticks.append)
    assert sum(ticks) == len(users)
    assert len(ticks) > TINY["epochs1"]  # not only at the end of each epoch


def test_length_grouped_batches_cover_every_example_once() -> None:
    import random

    lengths = [5, 1, 9, 3, 7, 2, 8]
    batches = length_grouped(lengths, 3, random.Random(0))
    assert sorted(i for b in batches for i in b) == list(range(7))
    assert all(len(b) <= 3 for b in batches)


STAGE2 = dict(stages="2", layers="0,1", positions="f1+l2", rank2=2, epochs2=2, batch2=4, history_tokens=48,
              max_target_tokens=8, k=1, batch_size=4)


def news_user(n: int) -> User:
    return User("u", NEWS.name, tuple(HistoryItem(f"i{i}", {"text": f"sports game {i} won", "title": f"t{i}",
                                                           "category": "sports"}) for i in range(n)))


def test_update_continues_stage2_from_the_old_state(backbone: Backbone) -> None:
    method = PerFit(NEWS, backbone, **STAGE2)
    old = method.personalize(news_user(4))
    grown = news_user(6)
    still = PerFit(NEWS, backbone, **{**STAGE2, "lr2": 0.0})  # training that cannot move the parameters
    kept = still.update(old, grown, grown.profile[4:])
    assert kept is not None
    for name in "RWb":  # so the update started from the old phi_2, not from the identity as personalize does
        assert torch.allclose(kept.tensors[name], old.tensors[name], atol=1e-5)
    assert not torch.allclose(still.personalize(grown).tensors["W"], old.tensors["W"], atol=1e-3)

    moved = method.update(old, grown, grown.profile[4:])
    assert moved is not None and moved.header["stage2_updates"] == 1
    assert len(moved.header["profile"]) == 6
    assert not torch.allclose(moved.tensors["W"], old.tensors["W"], atol=1e-4)
    same = method.update(old, news_user(4), ())  # nothing new: the old phi_2 as it was
    assert same is not None and torch.equal(same.tensors["W"], old.tensors["W"])

    other = PerFit(NEWS, backbone, **{**STAGE2, "rank2": 3})
    assert other.update(old, grown, grown.profile[4:]) is None
    assert "other settings" in rebuild_reason(other, old)


def test_default_layers_keep_the_searched_depths_on_any_backbone(backbone: Backbone) -> None:
    """The searched layers (4, 11, 19, 26 of SmolLM2's 30) at the same relative depth of a 24-layer Qwen2.5-0.5B and
    of the 2-layer test model, where an explicit list past the last layer is refused."""
    assert parse_layers("auto", 30) == [4, 11, 19, 26] and parse_layers("auto", 24) == [3, 9, 15, 21]
    assert PerFit(get_task("lamp2n"), backbone).layers == parse_layers("auto", backbone.n_layers) == [0, 1]
    with pytest.raises(ValueError, match="beyond the backbone's 2 layers"):
        PerFit(get_task("lamp2n"), backbone, layers="4,11,19,26")
