"""One contract, every registered method (peft's TestMixedAdapterBatches is the pattern).

Each method runs with tiny options on the tiny random model and must: personalize users into states that survive a
save and load unchanged and answer the same after it; answer a batch mixing three users exactly as it answers each
user alone; refuse, through the runner, a state another backbone made; keep the users a killed run finished and not
personalize them again; and, where it claims its state is the history (`state_is_history`), give from `update` what
`personalize` gives on the grown history. A method added to the registry without a case here fails
`test_every_registered_method_has_a_case`.

Precision: every method answers in float32 and in bfloat16 alike, label log-likelihoods within BF16_TOLERANCE (the
largest gap measured on these cases was 0.010) and the same labels; a state made in float32 is cast when a bfloat16
backbone applies it (`UserState`), except PerFit's, which is refused: its phi_2 was trained on another stage 1.
"""

from __future__ import annotations

import copy
import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import pytest
import torch

from tailor.backbone.model import Backbone
from tailor.data.lamp import load_users
from tailor.eval.runner import run_eval
from tailor.methods import REGISTRY, method_class
from tailor.methods.base import Personalizer, Prediction
from tailor.runs.chunks import personalize_with_states
from tailor.runs.fits import fit_method
from tailor.runs.spec import EvalSpec, run_users
from tailor.store.state import StateError, UserState
from tailor.tasks import get_task
from tailor.tasks.records import Query, User
from tests.conftest import tiny_backbone
from tests.test_chameleon import scripted_answers

pytestmark = pytest.mark.usefixtures("one_thread")


@dataclass(frozen=True)
class Case:
    task: str
    options: dict[str, Any] = field(default_factory=dict)
    scripted: bool = False
    """CHAMELEON's synthetic answers scripted: the random model answers both agents alike, so no pair would be kept
    and no edit made, and the contract would hold trivially."""


LORA = dict(r=4, alpha=8.0, lr=2e-2, train_batch=4, max_examples=4, history_tokens=48, max_target_tokens=8)
CASES: dict[str, Case] = {
    "global-prior": Case("lamp3"),
    "user-prior": Case("lamp2n"),
    "item-prior": Case("lamp3"),
    "none": Case("lamp2n"),
    "rag": Case("lamp2n", dict(k=2, history_tokens=48)),
    "pag": Case("lamp3", dict(k=1, history_tokens=48, summary_items=3, summary_history_tokens=48,
                               summary_tokens=6)),
    "full": Case("lamp7", dict(history_tokens=64, max_new_tokens=6)),
    "chameleon": Case("lamp2n", dict(history=4, layers=1, ccs_restarts=1, ccs_steps=20, insight_tokens=6),
                      scripted=True),
    "perfit": Case("lamp2n", dict(layers="0,1", positions="f1+l2", rank1=2, rank2=3, lr1=1e-2, lr2=5e-2, epochs1=1,
                                  epochs2=2, batch1=4, batch2=4, stage1_examples=16, history_tokens=48,
                                  max_target_tokens=8)),
    "dpo": Case("lamp2n", dict(history=4, insight_tokens=4, budget_s=0.0, r=4, alpha=8, lr=5e-2, max_length=256),
                scripted=True),
    "mt-lora": Case("lamp2n", dict(LORA, k=1, max_total=16)),
    "lora-p": Case("lamp3", dict(LORA, steps=2, group=2)),
    "oppu": Case("lamp2n", dict(LORA, k=1, steps=2, base_max_examples=2, base_max_total=16)),
    "stylevector": Case("lamp7", dict(layer=1, scale=4.0, max_items=3, answer_tokens=6, max_new_tokens=6)),
    "fusion": Case("lamp2n", dict(base_options="r=4,lr=0.02,max_total=16,epochs=1,max_examples=4,history_tokens=48,"
                                                "max_target_tokens=8")),
    "lexical": Case("lamp7"),
    "p2p": Case("lamp2n", dict(summary_tokens=8, summary_items=4, summary_history_tokens=64, history_tokens=48, r=4,
                               hidden=32, module_dim=8, depth_dim=8, batch=4, later_items=2, max_target_tokens=8,
                               encoder="backbone", steps=2, lr=1e-2)),
}
METHODS = sorted(CASES)
BF16_TOLERANCE = 0.05
"""Largest difference allowed between a label's log-likelihood in float32 and in bfloat16, in nats."""
HISTORY_METHODS = [name for name in METHODS if method_class(name).state_is_history]


def test_every_registered_method_has_a_case() -> None:
    assert set(CASES) == set(REGISTRY)
    assert all(method_class(name).name == name for name in REGISTRY)  # the registry key is the class's name


@pytest.fixture(scope="module")
def cache(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """One fit cache for the module: each method fits once, and the runs below load that fit."""
    folder = tmp_path_factory.mktemp("cache")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("TAILOR_CACHE", str(folder))
        yield folder


def build(name: str, backbone: Backbone, cls: type[Personalizer] | None = None, task: str | None = None
          ) -> Personalizer:
    case = CASES[name]
    method = (cls or method_class(name))(get_task(task or case.task),
                                         backbone if method_class(name).needs_backbone else None, **case.options)
    if case.scripted:
        method._answers = scripted_answers  # type: ignore[attr-defined]
    return method


def users(lamp_dir: Path, name: str, split: str = "dev") -> list[User]:
    return load_users(get_task(CASES[name].task), split, lamp_dir)


@dataclass
class Personalized:
    method: Personalizer
    users: list[User]
    states: list[UserState]


@pytest.fixture(scope="module")
def personalized(backbone: Backbone, lamp_dir: Path, cache: Path) -> dict[str, Personalized]:
    """Each method fitted (through the fit cache) and three dev users personalized, made on first use."""
    made: dict[str, Personalized] = {}

    class Lazy(dict):
        def __missing__(self, name: str) -> Personalized:
            method = build(name, backbone)
            fit_method(method, users(lamp_dir, name, "train"))
            chosen = users(lamp_dir, name)[:3]
            made[name] = Personalized(method, chosen, method.personalize_many(chosen))
            return made[name]

    return Lazy()


def answers_equal(a: Prediction, b: Prediction) -> bool:
    if a.text != b.text or a.mode != b.mode:
        return False
    return a.scores is None and b.scores is None or torch.allclose(torch.tensor(a.scores), torch.tensor(b.scores),
                                                                   atol=1e-4)


def states_equal(a: UserState, b: UserState) -> bool:
    return ((a.method, a.version, a.user_id, a.model_id, a.header) == (b.method, b.version, b.user_id, b.model_id,
                                                                       b.header)
            and a.tensors.keys() == b.tensors.keys()
            and all(torch.equal(a.tensors[k], b.tensors[k]) for k in a.tensors))


@pytest.mark.parametrize("name", METHODS)
def test_states_survive_a_save_and_load(name: str, personalized: dict[str, Personalized], tmp_path: Path) -> None:
    done = personalized[name]
    method = done.method
    for user, state in zip(done.users, done.states):
        assert state.method == name and state.user_id == user.id and state.model_id == method.model_id
        loaded = UserState.load(state.save(tmp_path / f"{user.id}.safetensors"), method=name,
                                version=method.version, model_id=method.model_id)
        assert states_equal(loaded, state)
        query = user.queries[0]
        assert answers_equal(method.predict([(loaded, query)])[0], method.predict([(state, query)])[0])


@pytest.mark.parametrize("name", METHODS)
def test_a_mixed_batch_equals_each_user_alone(name: str, personalized: dict[str, Personalized]) -> None:
    """Every user is asked every user's question, the rows interleaved; one batch gives what each user gets alone."""
    done = personalized[name]
    questions = [u.queries[0] for u in done.users]
    rows = [(state, Query(f"{state.user_id}/{q.id}", q.input)) for q in questions for state in done.states]
    mixed = done.method.predict(rows)
    for state in done.states:
        own = [i for i, (s, _) in enumerate(rows) if s is state]
        alone = done.method.predict([rows[i] for i in own])
        assert all(answers_equal(mixed[i], a) for i, a in zip(own, alone)), state.user_id


@pytest.mark.parametrize("name", [n for n in METHODS if method_class(n).needs_backbone])
def test_a_state_from_another_backbone_is_refused(name: str, personalized: dict[str, Personalized],
                                                  tmp_path: Path) -> None:
    done = personalized[name]
    done.states[0].save(tmp_path / f"{done.users[0].id}.safetensors")
    elsewhere = build(name, tiny_backbone("qwen2"))
    assert elsewhere.model_id != done.method.model_id
    with pytest.raises(StateError, match="backbone"):
        personalize_with_states(elsewhere, done.users[:1], tmp_path)


@pytest.mark.parametrize("name", METHODS)
def test_a_killed_run_keeps_its_finished_users(name: str, backbone: Backbone, lamp_dir: Path, cache: Path,
                                               tmp_path: Path) -> None:
    """Killed while personalizing its second chunk: the first chunk's states and answers are kept, and the resumed
    run personalizes only the users it had not finished."""
    case = CASES[name]
    cls = method_class(name)
    spec = EvalSpec(task=case.task, method=name, options=case.options, data_dir=str(lamp_dir), users=4,
                    model=backbone.name if cls.needs_backbone else None)
    first_chunk = set(run_users(spec).ids[:2])
    seen: list[str] = []

    class Killed(Exception):
        pass

    def dying(self: Personalizer, group, progress=None):  # noqa: ANN001 - the personalize_many signature
        if any(u.id not in first_chunk for u in group):
            raise Killed
        seen.extend(u.id for u in group)
        return cls.personalize_many(self, group, progress)

    def counting(self: Personalizer, group, progress=None):  # noqa: ANN001
        seen.extend(u.id for u in group)
        return cls.personalize_many(self, group, progress)

    with pytest.raises(Killed):
        run_eval(spec, tmp_path, backbone, build(name, backbone, type("Dying", (cls,), {"personalize_many": dying})),
                 chunk_users=2)
    first = list(seen)
    kept = {p.name: p.read_bytes() for p in (tmp_path / "states").glob("*.safetensors")}
    assert set(first) == first_chunk and len(kept) == 2
    seen.clear()
    metrics = run_eval(spec, tmp_path, backbone,
                       build(name, backbone, type("Counting", (cls,), {"personalize_many": counting})), chunk_users=2)
    assert metrics["n_users"] == 4 and len(seen) == 2 and not set(seen) & set(first)
    assert all((tmp_path / "states" / n).read_bytes() == content for n, content in kept.items())


@pytest.mark.parametrize("name", HISTORY_METHODS)
def test_update_equals_a_fresh_personalize(name: str, personalized: dict[str, Personalized]) -> None:
    done = personalized[name]
    user = max(done.users, key=len)
    before = dataclasses.replace(user, profile=user.profile[:-2])
    updated = done.method.update(done.method.personalize(before), user, user.profile[-2:])
    assert updated is not None and states_equal(updated, done.method.personalize(user))


@pytest.fixture(scope="module")
def bf16_backbone(backbone: Backbone) -> Backbone:
    """The tiny model in bfloat16, under the same name: the same backbone in another precision."""
    return Backbone(copy.deepcopy(backbone.model).to(torch.bfloat16), backbone.tokenizer, backbone.name)


@pytest.mark.parametrize("name", METHODS)
def test_float32_and_bfloat16_agree(name: str, backbone: Backbone, bf16_backbone: Backbone, lamp_dir: Path,
                                    cache: Path) -> None:
    """Each method fitted, personalized and asked in either precision: the same labels, and scores within
    BF16_TOLERANCE. Generation tasks are asked as LaMP-2N here, so that answers compare as scores (a method without a
    backbone, which has no precision, keeps its own task)."""
    generation = get_task(CASES[name].task).family == "generation"
    task = "lamp2n" if generation and method_class(name).needs_backbone else CASES[name].task
    methods = [build(name, b, task=task) for b in (backbone, bf16_backbone)]
    chosen = load_users(get_task(task), "dev", lamp_dir)[:3]
    answers, states = [], []
    for method in methods:
        fit_method(method, load_users(get_task(task), "train", lamp_dir))
        states.append(method.personalize_many(chosen))
        answers.append(method.predict([(s, u.queries[0]) for s, u in zip(states[-1], chosen)]))
    assert [s.dtype for s in states[1]] == (["bfloat16"] * 3 if method_class(name).needs_backbone else [None] * 3)
    for full, half in zip(*answers):
        assert full.text == half.text
        if full.scores is not None:
            assert max(abs(a - b) for a, b in zip(full.scores, half.scores)) <= BF16_TOLERANCE
    requests = [(s, u.queries[0]) for s, u in zip(states[0], chosen)]  # float32 states, bfloat16 backbone
    if name == "perfit":
        with pytest.raises(ValueError, match="stage1"):
            methods[1].predict(requests)
        return
    for full, cast in zip(answers[0], methods[1].predict(requests)):
        assert full.text == cast.text
        if full.scores is not None:
            assert max(abs(a - b) for a, b in zip(full.scores, cast.scores)) <= BF16_TOLERANCE
