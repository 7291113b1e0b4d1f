"""The LoRA family on tiny random models: training lowers the loss, adapters stay isolated, mixed-adapter batches
equal each row alone, PEFT round trips give the same logits, an interrupted multi-user run keeps finished users."""

from __future__ import annotations

import copy
import dataclasses
import math
from pathlib import Path

import pytest
import torch

from tailor.backbone.edits import hooked
from tailor.backbone.lora import LoRAStack, load_peft, lora_sites, save_peft, user_seed
from tailor.backbone.model import Backbone
from tailor.data.lamp import load_users
from tailor.methods.lora import (OPPU, LoRAP, MTLoRA, StackTrainer, plan, round_robin, token_groups, tokenise,
                                 train_users)
from tailor.tasks import get_task
from tailor.tasks.records import HistoryItem, Query, User

pytestmark = pytest.mark.usefixtures("private_cache", "one_thread")

PROMPTS = ["which tag does this movie relate to", "the review is great, what is the score", "paraphrase the tweet"]
LABELS = ["comedy", "action", "dark comedy", "politics"]
FAST = dict(r=4, alpha=8.0, lr=2e-2, train_batch=4, max_examples=6, history_tokens=48, max_target_tokens=8)


def random_stack(backbone: Backbone, users: int, seed: int = 0) -> LoRAStack:
    """Adapters with non-zero B, so that every one of them changes the model's output."""
    stack = LoRAStack.init(backbone.model, lora_sites(backbone.model, ["q_proj", "v_proj"]), 4, 8.0,
                           [seed + u for u in range(users)])
    generator = torch.Generator().manual_seed(seed)
    for site in stack.sites:
        stack.B[site] = torch.randn(stack.B[site].shape, generator=generator) * 0.5
    return stack


def users_of(lamp_dir: Path, split: str = "dev", task: str = "lamp2n"):
    return load_users(get_task(task), split, lamp_dir)


def test_init_follows_peft_and_depends_only_on_the_seed(backbone: Backbone) -> None:
    sites = lora_sites(backbone.model, ["q_proj", "v_proj"])
    stack = LoRAStack.init(backbone.model, sites, 4, 8.0, [7, 9])
    alone = LoRAStack.init(backbone.model, sites, 4, 8.0, [9])
    q = sites[0]
    assert stack.A[q].shape == (2, 4, backbone.hidden_size) and stack.B[q].abs().sum() == 0
    assert stack.A[q].abs().max() <= 1 / math.sqrt(backbone.hidden_size)
    assert torch.equal(stack.A[q][1], alone.A[q][0])
    assert stack.scaling == 2.0 and stack.parameters_per_user == sum(
        stack.A[s][0].numel() + stack.B[s][0].numel() for s in sites)


def test_a_few_steps_lower_the_training_loss(backbone: Backbone, lamp_dir: Path) -> None:
    method = LoRAP(get_task("lamp2n"), backbone, **FAST)
    user = users_of(lamp_dir)[0]
    data = tokenise(backbone, method.training_pairs(user, 6), 8)
    init = LoRAStack.init(backbone.model, method.sites, 4, 8.0, [1])
    steps = plan([len(e.ids) for e in data], 4, seed=1, steps=40)
    trained, losses = train_users(backbone, init, [data], [steps], dataclasses.replace(method.config, lr=0.1))
    assert losses.shape == (40, 1)
    assert losses[-3:].mean() < losses[:3].mean() - 0.2  # a random 2-layer model moves slowly through q and v
    assert all(not p.requires_grad for p in backbone.model.parameters())
    assert any(trained.B[s].abs().max() > 0 for s in trained.sites)


def test_users_trained_together_get_the_adapters_they_get_alone(backbone: Backbone, lamp_dir: Path) -> None:
    method = LoRAP(get_task("lamp2n"), backbone, **FAST, steps=4, group=2)
    a, b = users_of(lamp_dir)[:2]
    together = method.personalize_many([a, b])
    alone_a = method.personalize(a)
    alone_b = method.personalize(b)
    for name, tensor in alone_a.tensors.items():
        assert torch.allclose(together[0].tensors[name], tensor, atol=1e-5), name
        assert torch.allclose(together[1].tensors[name], alone_b.tensors[name], atol=1e-5), name
    diff = max((alone_a.tensors[n] - alone_b.tensors[n]).abs().max().item() for n in alone_a.tensors)
    assert diff > 1e-3  # two users really get different adapters
    assert together[0].header["steps"] == 4 and together[0].header["train_s"] > 0


def test_token_groups_bound_the_padded_size_and_keep_the_order() -> None:
    assert token_groups([3, 5, 2, 9, 1], budget=10) == [[0, 1], [2], [3], [4]]
    assert token_groups([3, 3, 3], budget=9) == [[0, 1, 2]]
    assert token_groups([], budget=9) == []


def test_a_step_in_token_groups_equals_one_forward(backbone: Backbone, lamp_dir: Path,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    method = LoRAP(get_task("lamp2n"), backbone, **FAST)
    a, b = users_of(lamp_dir)[:2]
    rows = [(0, e) for e in tokenise(backbone, method.training_pairs(a, 3), 8)] + \
        [(1, e) for e in tokenise(backbone, method.training_pairs(b, 3), 8)]
    init = LoRAStack.init(backbone.model, method.sites, 4, 8.0, [1, 2])
    init = LoRAStack({s: t for s, t in init.A.items()}, {s: torch.randn_like(t) * 0.1 for s, t in init.B.items()},
                     init.alpha)
    results = []
    for budget in (10_000, 1):  # everything in one forward; every row in a forward of its own
        monkeypatch.setattr("tailor.methods.lora.TRAIN_TOKENS", budget)
        trainer = StackTrainer(backbone, init, method.config)
        with hooked(backbone.model, trainer.edits()) as hooks:
            losses = trainer.step(hooks, rows)
        results.append((losses, trainer.stack.detach()))
    (one, stack_one), (groups, stack_groups) = results
    assert len(token_groups([len(e.ids) for _, e in rows], 1)) == len(rows)
    assert torch.allclose(one, groups, atol=1e-5)
    for site in stack_one.sites:
        assert torch.allclose(stack_one.A[site], stack_groups.A[site], atol=1e-6)
        assert torch.allclose(stack_one.B[site], stack_groups.B[site], atol=1e-6)
    assert any((stack_one.B[s] - init.B[s]).abs().max() > 1e-4 for s in init.sites), "the step moved the adapters"


def test_mixed_adapter_batch_equals_each_row_alone(backbone: Backbone) -> None:
    stack = random_stack(backbone, 3)
    rows = [2, 0, 1]
    edits = stack.edits()
    mixed = backbone.score_labels(PROMPTS, LABELS, batch_size=3, edits=edits, rows=rows)
    mixed_gen = backbone.generate(PROMPTS, 5, batch_size=3, edits=edits, rows=rows)
    for i, prompt in enumerate(PROMPTS):
        alone = stack.select([rows[i]]).edits()
        assert mixed[i] == pytest.approx(backbone.score_labels([prompt], LABELS, edits=alone)[0], abs=1e-4)
        assert mixed_gen[i] == backbone.generate([prompt], 5, edits=alone)[0]
    plain = backbone.score_labels(PROMPTS, LABELS)
    assert abs(plain - mixed).max() > 1e-2  # the adapters really change the answers


def _logits(model: torch.nn.Module, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids).logits


def test_peft_export_loads_in_peft_with_the_same_logits(backbone: Backbone, tmp_path: Path) -> None:
    from peft import PeftModel

    stack = random_stack(backbone, 2, seed=3)
    folder = save_peft(stack, backbone.model, tmp_path / "adapter", user=1)
    assert {p.name for p in folder.iterdir()} == {"adapter_config.json", "adapter_model.safetensors"}
    ids = torch.tensor([backbone.encode(PROMPTS[0])])
    with hooked(backbone.model, stack.select([1]).edits()):
        ours = _logits(backbone.model, ids)
    theirs = _logits(PeftModel.from_pretrained(copy.deepcopy(backbone.model), folder), ids)
    assert (ours - _logits(backbone.model, ids)).abs().max() > 1e-2
    assert torch.allclose(ours, theirs, atol=1e-5)
    back = load_peft(folder, backbone.model)
    assert back.alpha == 8.0 and back.sites == stack.sites
    assert all(torch.equal(back.A[s][0], stack.A[s][1]) and torch.equal(back.B[s][0], stack.B[s][1])
               for s in stack.sites)


def test_an_edited_task_or_training_user_gets_a_fit_of_its_own(backbone: Backbone, lamp_dir: Path) -> None:
    """A task file edited, or a users file whose records change under the same ids, must not be served the fit made
    from the old ones."""
    import dataclasses

    from tailor.runs.fits import fit_folder
    from tailor.tasks.records import User

    task = get_task("lamp2n")
    train = users_of(lamp_dir, "train")[:3]
    folder = fit_folder(MTLoRA(task, backbone), train)
    assert fit_folder(MTLoRA(task, backbone), users_of(lamp_dir, "train")[:3]) == folder  # same content, same fit
    edited = dataclasses.replace(task, question_template="Which category? " + task.question_template)
    assert fit_folder(MTLoRA(edited, backbone), train) != folder
    fewer = [User(train[0].id, train[0].task, train[0].profile[:-1], train[0].queries), *train[1:]]
    assert fit_folder(MTLoRA(task, backbone), fewer) != folder


def test_default_oppu_trains_on_the_default_mt_lora_fit(backbone: Backbone, lamp_dir: Path) -> None:
    """OPPU's per-user stage has its own batch and steps; its base must still be exactly a default `mt-lora`, so
    that the two share one cached fit (and OPPU's cost is not a second multi-task fit)."""
    from tailor.runs.fits import fit_folder

    task = get_task("lamp2n")
    train = users_of(lamp_dir, "train")[:3]
    oppu = OPPU(task, backbone)
    assert oppu.config.train_batch != MTLoRA(task, backbone).config.train_batch  # the per-user stage differs
    assert fit_folder(oppu.base_method(), train) == fit_folder(MTLoRA(task, backbone), train)


def test_oppu_exports_base_plus_user_as_one_peft_adapter(backbone: Backbone, lamp_dir: Path,
                                                         tmp_path: Path) -> None:
    from peft import PeftModel

    task = get_task("lamp2n")
    method = OPPU(task, backbone, **FAST, steps=3, k=1, base_epochs=1, base_max_examples=2)
    method.fit(users_of(lamp_dir, "train")[:3])
    user = users_of(lamp_dir)[0]
    state = method.personalize(user)
    folder = method.export_peft(state, tmp_path / "oppu")
    prompt = method.prompt(state, user.queries[0].input)
    ours = backbone.score_labels([prompt], task.labels, edits=method.edits([state]))
    peft_model = PeftModel.from_pretrained(copy.deepcopy(backbone.model), folder)
    ids = torch.tensor([backbone.encode(backbone.render(prompt))])
    for j, label in enumerate(task.labels[:3]):
        label_ids = backbone.tokenizer(label, add_special_tokens=False)["input_ids"]
        logp = torch.log_softmax(_logits(peft_model, torch.cat([ids, torch.tensor([label_ids[:-1]])], 1))[0], -1)
        total = sum(logp[ids.shape[1] - 1 + n, t].item() for n, t in enumerate(label_ids))
        assert total == pytest.approx(ours[0, j], abs=1e-3)


def test_oppu_fits_its_base_once_through_the_fit_cache(backbone: Backbone, lamp_dir: Path, tmp_path: Path) -> None:
    """OPPU's fit is its MT-LoRA base's, a prerequisite fitted in the base's own place in the fit cache: the first
    OPPU shows the base's bar and ends it full; a second one loads the base, with no bar standing at 0."""
    from tailor.runs.fits import fit_folder, fit_method, made_seconds

    task, train = get_task("lamp2n"), users_of(lamp_dir, "train")[:3]
    options = dict(FAST, steps=1, base_epochs=1, base_max_examples=2)
    bars: dict[str, list[int]] = {}

    def progress(description: str, done: int, total: int):
        bars[description] = [done, total]
        return lambda n: bars[description].__setitem__(0, bars[description][0] + n)

    first = OPPU(task, backbone, **options)
    fit_method(first, train, progress)
    assert bars == {"fit mt-lora": [3, 3]} and (fit_folder(first.base, train) / "DONE").exists()
    bars.clear()
    second = OPPU(task, backbone, **options)
    fit_method(second, train, progress)
    assert bars == {}
    made = made_seconds([fit_folder(first.base, train)])  # the second OPPU spent only loading; fitting cost this
    assert made is not None and made > 0
    (tmp_path / "old").mkdir()
    (tmp_path / "old" / "DONE").write_text('{"users": 3}')  # a fit cached before its seconds were recorded
    assert made_seconds([fit_folder(first.base, train), tmp_path / "old"]) is None
    assert first.base.stack is not None and second.base.stack is not None
    assert all(torch.equal(first.base.stack.B[s], second.base.stack.B[s]) for s in first.base.stack.sites)


def test_mt_lora_fit_resumes_from_its_checkpoint(backbone: Backbone, lamp_dir: Path, tmp_path: Path,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    import tailor.methods.lora as lora_module

    task = get_task("lamp2n")
    train = users_of(lamp_dir, "train")[:4]
    options = dict(FAST, k=1, max_examples=4, epochs=2)
    full = MTLoRA(task, backbone, **options)
    full.fit(train)
    monkeypatch.setattr(lora_module, "CHECKPOINT_EVERY", 2)

    class Killed(Exception):
        pass

    calls = {"n": 0}
    original = lora_module.StackTrainer.step

    def dying_step(self, hooks, rows):
        calls["n"] += 1
        if calls["n"] == 4:
            raise Killed
        return original(self, hooks, rows)

    monkeypatch.setattr(lora_module.StackTrainer, "step", dying_step)
    with pytest.raises(Killed):
        MTLoRA(task, backbone, **options).fit(train, workdir=tmp_path)
    saved = torch.load(tmp_path / "checkpoint.pt", weights_only=False)
    saved["seconds"] = 1000.0  # as if the killed process had trained for 1000 s: the fit's time must include it
    torch.save(saved, tmp_path / "checkpoint.pt")
    monkeypatch.setattr(lora_module.StackTrainer, "step", original)
    resumed = MTLoRA(task, backbone, **options)
    resumed.fit(train, workdir=tmp_path)
    assert full.stack is not None and resumed.stack is not None
    assert resumed.fit_log["steps"] == full.fit_log["steps"] > 3
    assert resumed.fit_log["resumed"] and 1000.0 < resumed.fit_log["seconds"] < 1000.0 + 600
    for site in full.stack.sites:
        assert torch.allclose(full.stack.B[site], resumed.stack.B[site], atol=1e-6)


def test_user_seed_is_stable_and_distinct() -> None:
    assert user_seed(0, "u1") == user_seed(0, "u1") != user_seed(0, "u2") != user_seed(1, "u1")


def test_training_examples_retrieve_from_earlier_items_only(backbone: Backbone) -> None:
    """A history item's training prompt may show the user's items before it, never after: at inference the query is
    newer than the whole profile, and a later item would leak a future the model never sees then."""
    task = get_task("lamp2n")

    def item(i: int, text: str, category: str) -> HistoryItem:
        return HistoryItem(f"i{i}", {"text": text, "title": f"t{i}", "category": category})

    user = User("u", task.name, (item(0, "golf open final round birdie", "sports"),
                                 item(1, "senate vote on the budget bill", "politics"),
                                 item(2, "golf open final round eagle putt", "sports")))
    method = LoRAP(task, backbone, k=1, history_tokens=64)
    prompts = [prompt for prompt, _ in method.training_pairs(user, limit=3)]
    assert "eagle" not in prompts[0] and "senate" not in prompts[0]  # item 0 has nothing before it
    assert "birdie" in prompts[2] and "senate" not in prompts[2]  # item 2 retrieves its best earlier match


def test_mt_lora_examples_come_from_the_history_the_queries_or_both(backbone: Backbone) -> None:
    """`examples="queries"` trains on each training user's queries with their golds, the prompt retrieving from the
    whole history as inference does; "history" never shows a query's gold; "both" takes the query first."""
    task = get_task("lamp2n")

    def item(i: int, text: str, category: str) -> HistoryItem:
        return HistoryItem(f"i{i}", {"text": text, "title": f"t{i}", "category": category})

    query = Query("q", task.ask("golf open final round eagle putt"), "sports")
    user = User("u", task.name, (item(0, "golf open final round birdie", "sports"),
                                 item(1, "senate vote on the budget bill", "politics")), (query,))
    pairs = {source: MTLoRA(task, backbone, examples=source, k=1, history_tokens=64).fit_pairs(user)
             for source in ("history", "queries", "both")}
    assert [target for _, target in pairs["history"]] == ["sports", "politics"]
    [(prompt, target)] = pairs["queries"]
    assert target == "sports" and "eagle putt" in prompt and "birdie" in prompt and "senate" not in prompt
    assert pairs["both"] == pairs["history"] + pairs["queries"]
    assert round_robin([pairs["both"]], 1) == pairs["queries"]
    with pytest.raises(ValueError, match="examples must be one of"):
        MTLoRA(task, backbone, examples="tweets")
