"""PerFit (Liu et al., "Exploring Personalization Shifts in Representation Space of LLMs"): two-stage low-rank
representation fine-tuning, a collective shift shared by all users and a personal shift per user (section 3).

- Stage 1 (`fit`): one LoReFT intervention phi_1 per chosen layer, trained on every training user's history turned
  into (question, answer) examples with the LM loss on the answer tokens, each question preceded by the k history
  items BM25 retrieves from that user's earlier items (OPPU's recipe, which PerFit trains with).
- Stage 2 (`personalize`): for one user, a new intervention phi_2 per layer trained on that user's history alone,
  applied on top of the frozen phi_1 (eq. 1: phi_2(phi_1(h))). The user's state is phi_2's (R, W, b) per layer
  (plus the history the prompt retrieves from, as for RAG).
- `stages="1"` answers with stage 1 alone and `stages="2"` trains stage 2 without a stage 1 (the paper's ablation,
  table 4; stage 2 alone is LoReFT per user, and rank2 = rank1 + rank2 gives its "C+P" row).

Section 4.1's settings: AdamW, weight decay 1e-2, gradient clipping at 0.3, batch 16, 3 epochs for stage 1 and 2 for
stage 2, a linear learning-rate decay; ranks, layers and positions come from a random search on training users
(benchmarks/perfit_search.py). The learning rates and the stage-2 batch size are searched too: the paper's 1e-4 and
batch 16 suit users with 55 to 960 history items (its table 5); users here have a median of 3 to 18, and with 1e-4
their interventions would not move in the two to eight steps they get. Too large a rate fails the other way: Adam's
first steps on W then shift the residual stream by far more than the loss can repair in so few steps.

Per-user training is cheap because of what stays frozen (`tailor.backbone.partial`): every layer below the lowest
intervened layer, and with last-token positions every prompt token before the edited ones. These are computed once
per user; each of the 2 epochs then runs only the edited tokens and the answer through the layers above.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import random
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Mapping, Sequence

import torch
from safetensors.torch import load_file, save_file
from torch.nn.utils import parametrize

from tailor.backbone.edits import hooked
from tailor.backbone.layers import Site, site_module
from tailor.backbone.model import Backbone, Batch
from tailor.backbone.partial import FrozenBatch, freeze, suffix_loss
from tailor.methods.base import Progress, Share
from tailor.methods.checkpoint import Checkpoint
from tailor.methods.profile import format_history
from tailor.methods.prompting import RAG, RAGConfig, profile_header, retrieve_earlier
from tailor.methods.reft import LowRankIntervention, Params, PerFitEdit, Positions, count_parameters
from tailor.retrieval.bm25 import BM25Index
from tailor.store.state import UserState
from tailor.tasks.lamp import Task
from tailor.tasks.records import HistoryItem, User

log = logging.getLogger(__name__)

Example = tuple[str, str]
"""(prompt, answer): a question in the task's wording with retrieved history in front, and the user's output."""

STAGE1_FIELDS = ("k", "history_tokens", "layers", "positions", "rank1", "lr1", "epochs1", "batch1", "weight_decay",
                 "max_grad_norm", "stage1_examples", "max_target_tokens", "seed")


@dataclass
class PerFitConfig(RAGConfig):
    k: int = 1
    history_tokens: int = 256
    stages: Literal["1+2", "1", "2"] = "1+2"
    """Which interventions answer: both (PerFit), the collective one only, or a per-user one only (table 4)."""
    layers: str = "auto"
    """Decoder layers whose output (residual stream) is intervened, comma-separated; auto: the layers the random
    search chose on SmolLM2-135M's 30 (4, 11, 19, 26), at the same relative depths of the backbone in use."""
    positions: str = "l5"
    """Edited prompt tokens in LoReFT's notation: f5+l5 = first 5 and last 5, l5 = last 5."""
    rank1: int = 8
    rank2: int = 4
    lr1: float = 1e-3
    lr2: float = 2e-3
    epochs1: int = 3
    epochs2: int = 2
    batch1: int = 16
    batch2: int = 4
    """The paper's 16 would give most users here (median 3 to 18 history items) one step per epoch."""
    weight_decay: float = 0.01
    max_grad_norm: float = 0.3
    stage1_examples: int = 0
    """Stage-1 examples sampled from all training users' history and queries (0 = all of them, the paper's stage 1,
    which trains on every training user: 3,662 queries on LaMP-2N)."""
    stage2_examples: int = 0
    """Stage 2 trains on the user's most recent items only, at most this many (0 = all, the paper's recipe). Stage
    2's cost grows with the user's prompt tokens (one frozen forward over each), so this bounds the cost per user."""
    stage2_init: Literal["identity", "loreft"] = "identity"
    """Stage 2 starts as phi_2(h) = h, or from LoReFT's random W, b."""
    max_target_tokens: int = 48
    seed: int = 0

    def __post_init__(self) -> None:
        """Bad values fail here, before a model is loaded (`tailor eval` checks the config first)."""
        super().__post_init__()
        if str(self.stages) not in ("1+2", "1", "2"):  # `--set stages=1` arrives as an int
            raise ValueError(f"stages must be 1+2, 1 or 2, not {self.stages!r}")
        if self.layers != AUTO_LAYERS:
            parse_layers(self.layers)
        Positions.parse(self.positions)


AUTO_LAYERS = "auto"
SEARCHED_LAYERS, SEARCHED_DEPTH = (4, 11, 19, 26), 30
"""The layers perfit_search chose on SmolLM2-135M, and its number of layers: `auto` keeps their relative depths."""


def parse_layers(text: str | int, n_layers: int | None = None) -> list[int]:
    """The intervened layers: a comma-separated list, or `auto` for a backbone of `n_layers` layers."""
    if str(text) == AUTO_LAYERS:
        if n_layers is None:
            raise ValueError("layers=auto needs the backbone's number of layers")
        return sorted({min(n_layers - 1, round(n_layers * layer / SEARCHED_DEPTH)) for layer in SEARCHED_LAYERS})
    layers = sorted({int(part) for part in str(text).split(",") if part.strip()})
    if not layers:
        raise ValueError(f"no layers in {text!r}")
    return layers


# --- training examples ---------------------------------------------------------------------------------------------

def history_examples(task: Task, backbone: Backbone, user: User, k: int, history_tokens: int,
                     indices: Sequence[int] | None = None) -> list[Example]:
    """The user's history items as training examples, each with the k best of the user's earlier items in front.

    Only earlier items are visible to an item, as in OPPU: the model learns to use retrieved history the way it will
    at inference, where the query is newer than the whole profile.
    """
    items = user.profile
    out = []
    for index in indices if indices is not None else range(len(items)):
        question, answer = task.example(items[index])
        retrieved = retrieve_earlier(task, items, index, k)
        out.append((task.join_history(format_history(task, backbone, retrieved, history_tokens), question), answer))
    return out


def query_examples(task: Task, backbone: Backbone, user: User, k: int, history_tokens: int) -> list[Example]:
    """A training user's own queries with their gold answers, with history retrieved from the whole profile."""
    index = BM25Index([task.document(it) for it in user.profile])
    out = []
    for query in user.queries:
        if query.gold is None:
            continue
        retrieved = [user.profile[i] for i in index.top_k(task.retrieval_query(query.input), k)]
        formatted = format_history(task, backbone, retrieved, history_tokens)
        out.append((task.join_history(formatted, query.input), query.gold))
    return out


# --- the training loop shared by both stages -------------------------------------------------------------------------

def length_grouped(lengths: Sequence[int], batch_size: int, rng: random.Random) -> list[list[int]]:
    """Batches of similar length in random order (Hugging Face's group_by_length, which OPPU and PerFit train with):
    shuffle, sort within mega-batches of 16 batches, cut, shuffle the batches."""
    order = list(range(len(lengths)))
    rng.shuffle(order)
    mega = batch_size * 16
    batches = []
    for start in range(0, len(order), mega):
        chunk = sorted(order[start:start + mega], key=lambda i: -lengths[i])
        batches += [chunk[i:i + batch_size] for i in range(0, len(chunk), batch_size)]
    rng.shuffle(batches)
    return batches


@dataclass
class Trainer:
    """AdamW with weight decay on W and b, a linear decay to zero, clipping of the stage's gradient norm."""

    backbone: Backbone
    layers: list[int]
    positions: Positions
    frozen_stages: list[list[Params]]
    """Per layer, the already-trained stages applied before the one being trained (stage 1 under stage 2)."""
    modules: list[LowRankIntervention]
    lr: float
    weight_decay: float
    max_grad_norm: float
    total_steps: int

    def __post_init__(self) -> None:
        decayed = [p for m in self.modules for p in m.decayed()]
        rotations = [p for m in self.modules for p in m.rotation_parameters()]
        self.optimizer = torch.optim.AdamW([{"params": decayed, "weight_decay": self.weight_decay},
                                            {"params": rotations, "weight_decay": 0.0}], lr=self.lr)
        self.schedule = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lambda step: max(0.0, 1 - step / max(self.total_steps, 1)))

    @property
    def start(self) -> int:
        return self.layers[0]

    def freeze(self, batch: Batch) -> FrozenBatch:
        return freeze(self.backbone, batch, self.start, self.positions.untouched(batch.prompt_lengths))

    def step(self, batch: FrozenBatch | Batch) -> float:
        """One optimiser step on a frozen batch, or on a plain batch run through the whole network (the same loss
        and gradients, at full cost: what `freeze` saves)."""
        with parametrize.cached():
            edits = {Site("layer", layer): PerFitEdit([*below, module.params()], self.positions)
                     for layer, below, module in zip(self.layers, self.frozen_stages, self.modules)}
            with hooked(self.backbone.model, edits) as hooks:
                if isinstance(batch, FrozenBatch):
                    loss = suffix_loss(self.backbone, batch, hooks)
                else:
                    loss = self.backbone.sft_loss(batch, hooks)
            loss.backward()
        params = [p for m in self.modules for p in m.parameters()]
        torch.nn.utils.clip_grad_norm_(params, self.max_grad_norm)
        self.optimizer.step()
        self.schedule.step()
        self.optimizer.zero_grad(set_to_none=True)
        return loss.item()


def stacked(modules: Sequence[LowRankIntervention]) -> dict[str, torch.Tensor]:
    """The trained (R, W, b) of every layer as tensors (layers, r, d), (layers, r, d), (layers, r)."""
    with torch.no_grad():
        params = [m.params() for m in modules]
        return {name: torch.stack([p[i].detach().clone() for p in params]) for i, name in enumerate("RWb")}


def fingerprint(tensors: Mapping[str, torch.Tensor]) -> str:
    digest = hashlib.sha256()
    for name in sorted(tensors):
        digest.update(name.encode() + tensors[name].detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()[:16]


def parameter_counts(backbone: Backbone, config: PerFitConfig) -> dict[str, int]:
    """Trainable numbers of stage 1, of stage 2 (per user), of OPPU's per-user LoRA (r=8 on q_proj and v_proj of
    every layer, OPPU's setting) and of the backbone."""
    d, n = backbone.hidden_size, len(parse_layers(config.layers, backbone.n_layers))
    lora = 0
    for layer in range(backbone.n_layers):
        for kind in ("q_proj", "v_proj"):
            module = site_module(backbone.model, Site(kind, layer))
            lora += 8 * (module.in_features + module.out_features)
    return {"stage1": count_parameters(config.rank1, d, n), "stage2_per_user": count_parameters(config.rank2, d, n),
            "oppu_lora_r8_per_user": lora, "backbone": sum(p.numel() for p in backbone.model.parameters())}


# --- the method ---------------------------------------------------------------------------------------------------

class PerFit(RAG[PerFitConfig]):
    name = "perfit"
    version = 2  # 2: LaMP-7 examples language-model the tweets; stage 1 on every training example by default
    state_is_history = False
    update_note = "stage 2 continued from the old phi_2 on the new items only"

    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.layers = parse_layers(self.config.layers, self.backbone.n_layers)
        self.positions = Positions.parse(self.config.positions)
        self.stages = str(self.config.stages)  # checked by the config
        if self.layers[-1] >= self.backbone.n_layers:
            raise ValueError(f"layers {self.layers} beyond the backbone's {self.backbone.n_layers} layers")
        self.stage1: dict[str, torch.Tensor] | None = None
        self.stage1_id: str | None = None
        """Fingerprint of the fitted stage 1, written into every state so a state never meets another stage 1."""

    @property
    def fits(self) -> bool:
        return "1" in self.stages

    def fit_settings(self) -> dict[str, Any]:
        """Stage 1 depends on its own settings only, so runs that differ in stage-2 settings or in `stages` share
        it."""
        return {"method": self.name, "version": self.version,
                "stage1": {name: getattr(self.config, name) for name in STAGE1_FIELDS}}

    @property
    def uses_stage2(self) -> bool:
        return "2" in self.stages

    def _trainer(self, rank: int, lr: float, steps: int, seed: int, identity: bool,
                 below: list[list[Params]]) -> Trainer:
        generator = torch.Generator().manual_seed(seed)  # on the CPU: the same start on every device
        modules = [LowRankIntervention(self.backbone.hidden_size, rank, generator, identity).to(self.backbone.device)
                   for _ in self.layers]
        return Trainer(self.backbone, self.layers, self.positions, below, modules, lr, self.config.weight_decay,
                       self.config.max_grad_norm, steps)

    def _batch(self, examples: Sequence[Example]) -> Batch:
        return self.backbone.sft_batch([p for p, _ in examples], [a for _, a in examples],
                                       self.config.max_target_tokens)

    def _stage1_params(self) -> list[list[Params]]:
        if not self.fits:
            return [[] for _ in self.layers]
        if self.stage1 is None:
            raise RuntimeError("PerFit stage 1 is not fitted: call fit (the runner does) or load_fit first")
        s = self.stage1
        return [[(s["R"][i], s["W"][i], s["b"][i])] for i in range(len(self.layers))]

    # --- stage 1 ---------------------------------------------------------------------------------------------------
    def collective_examples(self, users: Sequence[User]) -> list[Example]:
        """Every training user's history items and answered queries, sampled down to `stage1_examples`."""
        slots = [(u, i) for u in users for i in range(len(u.profile))] + [(u, -1) for u in users if u.queries]
        if 0 < self.config.stage1_examples < len(slots):
            slots = random.Random(self.config.seed).sample(slots, self.config.stage1_examples)
        by_user: dict[str, list[int]] = {}
        owner = {u.id: u for u, _ in slots}
        for user, index in slots:
            by_user.setdefault(user.id, []).append(index)
        cfg, out = self.config, []
        for user_id, indices in by_user.items():
            user = owner[user_id]
            items = sorted(i for i in indices if i >= 0)
            out += history_examples(self.task, self.backbone, user, cfg.k, cfg.history_tokens, items)
            if -1 in indices:
                out += query_examples(self.task, self.backbone, user, cfg.k, cfg.history_tokens)
        return out

    def fit(self, users: Sequence[User], progress: Progress = None, workdir: Path | None = None) -> None:
        """Train the collective intervention phi_1 (section 3, stage 1); resumes from its last finished epoch."""
        if not self.fits:
            return
        examples = self.collective_examples(users)
        if not examples:
            raise ValueError("PerFit stage 1 needs training users with history")
        cfg = self.config
        lengths = [len(p) + len(a) for p, a in examples]
        steps = math.ceil(len(examples) / cfg.batch1) * cfg.epochs1
        trainer = self._trainer(cfg.rank1, cfg.lr1, steps, cfg.seed, False, [[] for _ in self.layers])
        checkpoint = Checkpoint(workdir)  # after every epoch
        saved = checkpoint.restore()
        if saved is not None:
            for module, state in zip(trainer.modules, saved["modules"]):
                module.load_state_dict(state)
            trainer.optimizer.load_state_dict(saved["optimizer"])
            trainer.schedule.load_state_dict(saved["schedule"])
        log.info("PerFit stage 1: %d examples, %d steps; parameters %s", len(examples), steps,
                 parameter_counts(self.backbone, cfg))
        rng = random.Random(cfg.seed)
        plans = [length_grouped(lengths, cfg.batch1, rng) for _ in range(cfg.epochs1)]
        advance = Share(progress, len(users), sum(map(len, plans)))  # in training users, as every fit reports
        advance(sum(map(len, plans[:checkpoint.step])))  # the epochs a resumed fit does not redo
        for epoch in range(checkpoint.step, cfg.epochs1):
            losses = []
            for batch in plans[epoch]:
                losses.append(trainer.step(trainer.freeze(self._batch([examples[i] for i in batch]))))
                advance(1)
            log.info("PerFit stage 1 epoch %d: mean loss %.4f", epoch + 1, sum(losses) / len(losses))
            checkpoint.save(epoch + 1, cfg.epochs1, lambda: {
                "modules": [m.state_dict() for m in trainer.modules], "optimizer": trainer.optimizer.state_dict(),
                "schedule": trainer.schedule.state_dict()})
        self._set_stage1(stacked(trainer.modules))

    def save_fit(self, folder: Path) -> None:
        assert self.stage1 is not None
        save_file({name: t.cpu() for name, t in self.stage1.items()}, str(folder / "stage1.safetensors"))
        (folder / "stage1.json").write_text(json.dumps(
            {"layers": self.layers, "positions": str(self.positions), "rank": self.config.rank1,
             "fingerprint": self.stage1_id}, indent=1))

    def load_fit(self, folder: Path) -> None:
        meta = json.loads((folder / "stage1.json").read_text())
        if meta["layers"] != self.layers or meta["rank"] != self.config.rank1:
            raise ValueError(f"{folder}: stage 1 for layers {meta['layers']} rank {meta['rank']}, not "
                             f"{self.layers} rank {self.config.rank1}")
        self._set_stage1(load_file(str(folder / "stage1.safetensors")))

    def _set_stage1(self, tensors: dict[str, torch.Tensor]) -> None:
        self.stage1 = {name: t.to(self.backbone.device) for name, t in tensors.items()}
        self.stage1_id = fingerprint(tensors)

    # --- stage 2 ---------------------------------------------------------------------------------------------------
    def _header(self, user: User) -> dict[str, Any]:
        return {**profile_header(user), "layers": self.layers, "positions": str(self.positions),
                "rank": self.config.rank2, "stage1": self.stage1_id}

    def _user_seed(self, user: User) -> int:
        return self.config.seed * 1_000_003 + int(hashlib.sha256(user.id.encode()).hexdigest()[:8], 16)

    def personalize(self, user: User, phases: dict[str, float] | None = None) -> UserState:
        """Train phi_2 on the user's history on top of the frozen phi_1 (section 3, stage 2); `phases` as in
        `stage2`."""
        header = self._header(user)
        if not self.uses_stage2:
            return self.new_state(user, header)
        return self.new_state(user, header, self.stage2(user, phases=phases))

    def stage2(self, user: User, cached: bool = True,
               phases: dict[str, float] | None = None) -> dict[str, torch.Tensor]:
        """phi_2's (R, W, b) for one user. What no edit changes is computed once per example (`freeze`) unless
        `cached=False`, which runs every step through the whole network (benchmarks/perfit_cost.py times both).

        `phases`, when given, receives where the time went (seconds building examples with their retrieval and
        tokens, in the frozen pass, in the optimiser steps) and the prompt and answer tokens trained on: the frozen
        pass is one forward over every prompt token, so a user's prompt tokens set the floor of stage 2's cost.
        """
        cfg = self.config
        started = time.perf_counter()
        first = max(0, len(user.profile) - cfg.stage2_examples) if cfg.stage2_examples else 0
        examples = history_examples(self.task, self.backbone, user, cfg.k, cfg.history_tokens,
                                    range(first, len(user.profile)))
        if not examples:  # nothing to learn from: phi_2 = identity (R = W = 0, b = 0)
            shape = (len(self.layers), cfg.rank2, self.backbone.hidden_size)
            return {"R": torch.zeros(shape), "W": torch.zeros(shape), "b": torch.zeros(shape[:2])}
        steps = math.ceil(len(examples) / cfg.batch2) * cfg.epochs2
        trainer = self._trainer(cfg.rank2, cfg.lr2, steps, self._user_seed(user), cfg.stage2_init == "identity",
                                self._stage1_params())
        rng = random.Random(self._user_seed(user))
        plan = length_grouped([len(p) + len(a) for p, a in examples], cfg.batch2, rng)
        batches = [self._batch([examples[i] for i in batch]) for batch in plan]
        built = time.perf_counter()
        prepared: list[FrozenBatch | Batch] = [trainer.freeze(b) for b in batches] if cached else list(batches)
        frozen = time.perf_counter()
        for _ in range(cfg.epochs2):
            for index in rng.sample(range(len(prepared)), len(prepared)):
                trainer.step(prepared[index])
        if phases is not None:
            phases.update(examples=built - started, frozen_pass=frozen - built, steps=time.perf_counter() - frozen,
                          prompt_tokens=float(sum(int(b.prompt_lengths.sum()) for b in batches)),
                          tokens=float(sum(int(b.mask.sum()) for b in batches)), optimiser_steps=float(steps))
        return stacked(trainer.modules)

    def update(self, old: UserState, user: User, new_items: Sequence[HistoryItem]) -> UserState | None:
        """Continue stage 2 from the old phi_2 on the new items only (each with its retrieved earlier items, as in
        `personalize`), instead of from the identity on every item. The cost scales with the new items; the result
        is not what a from-scratch stage 2 gives (older items are not revisited). A state made with other layers,
        positions, rank or stage 1 gives None: rebuilt. With stage 1 only, the state is the history."""
        if not self.uses_stage2:
            return self.personalize(user)
        try:
            self._check(old)
        except ValueError:
            return None
        cfg = self.config
        old_items = len(user.profile) - len(new_items)
        examples = history_examples(self.task, self.backbone, user, cfg.k, cfg.history_tokens,
                                    range(old_items, len(user.profile)))
        header = {**self._header(user), "stage2_updates": int(old.header.get("stage2_updates", 0)) + 1}
        if not examples:
            return self.new_state(user, header, dict(old.tensors))
        seed = self._user_seed(user) + old_items
        trainer = self._trainer(cfg.rank2, cfg.lr2, math.ceil(len(examples) / cfg.batch2) * cfg.epochs2, seed, True,
                                self._stage1_params())
        with torch.no_grad():
            for i, module in enumerate(trainer.modules):
                here = module.source.weight.device  # through the orthogonal parametrization's inverse:
                module.rotate.weight = old.tensors["R"][i].float().to(here)
                module.source.weight.copy_(old.tensors["W"][i])
                module.source.bias.copy_(old.tensors["b"][i])
        rng = random.Random(seed)
        plan = length_grouped([len(p) + len(a) for p, a in examples], cfg.batch2, rng)
        prepared: list[FrozenBatch | Batch] = [trainer.freeze(self._batch([examples[i] for i in b])) for b in plan]
        for _ in range(cfg.epochs2):
            for index in rng.sample(range(len(prepared)), len(prepared)):
                trainer.step(prepared[index])
        return self.new_state(user, header, stacked(trainer.modules))

    # --- inference -------------------------------------------------------------------------------------------------
    def _check(self, state: UserState) -> None:
        """Refuse a state made with other layers, positions, rank or another stage 1: its phi_2 means nothing here."""
        header = state.header
        expected = {"layers": self.layers, "positions": str(self.positions), "stage1": self.stage1_id}
        if self.uses_stage2:
            expected["rank"] = self.config.rank2
        for key in expected:
            if header.get(key) != expected[key]:
                raise ValueError(f"state of user {state.user_id!r} was made with {key}={header.get(key)!r}, this "
                                 f"PerFit uses {expected[key]!r}; personalize the user again")

    def edits(self, states: Sequence[UserState]) -> Mapping[Site, PerFitEdit] | None:
        """Eq. 1 at every chosen layer; row r of the batch uses states[r]'s phi_2 (gathered in one forward)."""
        for state in states:
            self._check(state)
        stages = self._stage1_params()
        if self.uses_stage2:
            R = torch.stack([s.tensors["R"] for s in states])
            W = torch.stack([s.tensors["W"] for s in states])
            b = torch.stack([s.tensors["b"] for s in states])
            stages = [[*below, (R[:, i], W[:, i], b[:, i])] for i, below in enumerate(stages)]
        return {Site("layer", layer): PerFitEdit(s, self.positions) for layer, s in zip(self.layers, stages)}


def describe_counts(backbone: Backbone, config: PerFitConfig) -> str:
    """One line for logs and benchmark output: the parameter counts and how many fewer than OPPU's LoRA."""
    c = parameter_counts(backbone, config)
    lora = c["oppu_lora_r8_per_user"]
    return (f"stage 1: {c['stage1']:,} parameters; stage 2: {c['stage2_per_user']:,} per user, "
            f"{100 * (1 - c['stage2_per_user'] / lora):.1f}% fewer than OPPU's LoRA r=8 ({lora:,}); "
            f"backbone {c['backbone']:,}")
