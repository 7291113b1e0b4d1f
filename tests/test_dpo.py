"""Time-constrained DPO on CHAMELEON's pairs: it trains within the budget and serves through per-row LoRA."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from tailor.backbone.model import Backbone
from tailor.data.lamp import load_users
from tailor.methods.dpo import TimeConstrainedDPO
from tailor.tasks import Task, get_task
from tests.test_chameleon import scripted_answers

pytestmark = pytest.mark.usefixtures("private_cache")


def one_step_dpo(task: Task, backbone: Backbone, **config: object) -> TimeConstrainedDPO:
    """A tiny DPO with a zero budget (so one step per user) on scripted CHAMELEON answers."""
    method = TimeConstrainedDPO(task, backbone, history=4, insight_tokens=4, budget_s=0.0, r=4, alpha=8,
                                max_length=256, **config)
    method._answers = scripted_answers  # type: ignore[method-assign]
    return method


def test_dpo_trains_within_its_budget_and_predicts(backbone: Backbone, lamp_dir: Path) -> None:
    task = get_task("lamp2n")
    users = load_users(task, "dev", lamp_dir)[:2]
    method = TimeConstrainedDPO(task, backbone, history=4, insight_tokens=4, budget_s=600.0, r=4, alpha=8, lr=5e-2,
                                train_batch=1, max_length=256)
    method._answers = scripted_answers  # type: ignore[method-assign]
    before = [p.detach().clone() for p in backbone.model.parameters()]
    states = method.personalize_many(users)
    for state in states:
        assert state.header["dpo_steps"] >= 2  # a whole epoch
        b_weights = [t for name, t in state.tensors.items() if name.endswith("lora_B")]
        assert b_weights and any(t.abs().sum() > 0 for t in b_weights)  # B starts at zero: it was trained
    assert all(torch.equal(a, b) for a, b in zip(before, backbone.model.parameters()))  # backbone untouched
    predictions = method.predict([(s, u.queries[0]) for s, u in zip(states, users)])
    assert all(p.text in task.labels for p in predictions)


def test_the_deadline_stops_training_after_one_step_and_that_step_trains(backbone: Backbone, lamp_dir: Path) -> None:
    """Warm-up must not take the only step a budget allows: at learning rate 0 the adapter would stay zero."""
    task = get_task("lamp2n")
    method = one_step_dpo(task, backbone)
    state = method.personalize_many(load_users(task, "dev", lamp_dir)[:1])[0]
    assert state.header["dpo_steps"] == 1
    assert any(t.abs().sum() > 0 for name, t in state.tensors.items() if name.endswith("lora_B"))


def test_dpo_needs_a_budget(backbone: Backbone, lamp_dir: Path) -> None:
    task = get_task("lamp2n")
    method = TimeConstrainedDPO(task, backbone, history=2, insight_tokens=4)
    method._answers = scripted_answers  # type: ignore[method-assign]
    with pytest.raises(ValueError, match="budget"):
        method.personalize_many(load_users(task, "dev", lamp_dir)[:1])


@pytest.mark.parametrize("bf16", [False, True])
def test_training_precision_follows_the_config_without_recomputation(backbone: Backbone, lamp_dir: Path, bf16: bool,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """trl's DPO by default autocasts to bfloat16 and recomputes activations; a CPU without bfloat16 arithmetic emulates
    the first, and the second is a second forward pass per step that memory does not call for at this size."""
    import trl

    seen: list[tuple[bool, bool]] = []

    class Watched(trl.DPOTrainer):
        def training_step(self, model, inputs, *args, **kwargs):  # noqa: ANN001, ANN002, ANN003 - trl's API
            inner = next(m for m in model.modules() if isinstance(m, torch.nn.Linear))  # inside trl's autocast
            hook = inner.register_forward_hook(lambda *_: seen.append(
                (torch.is_autocast_enabled("cpu"), bool(getattr(self.model, "is_gradient_checkpointing", False)))))
            try:
                return super().training_step(model, inputs, *args, **kwargs)
            finally:
                hook.remove()

    monkeypatch.setattr(trl, "DPOTrainer", Watched)
    task = get_task("lamp2n")
    method = one_step_dpo(task, backbone, bf16=bf16)
    method.personalize_many(load_users(task, "dev", lamp_dir)[:1])
    assert seen and all(state == (bf16, False) for state in seen)
