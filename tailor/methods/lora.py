"""Weight-space baselines: multi-task LoRA, per-user LoRA and OPPU, on the per-row LoRA edit.

- MT-LoRA / LoRA-C (P2P appendix C, PerFit appendix D.2): one LoRA trained on every training user's history, each
  item asked as the task's question (`Task.example`) with the k items BM25 ranks highest among the rest of that
  user's history in the prompt. Task-level adaptation: nothing per user but the history retrieval reads from.
- LoRA-P (PerFit appendix D.2): a LoRA per user, from scratch, on that user's history alone.
- OPPU (Tan et al. 2024, "Democratizing LLMs via One PEFT Per User"): a per-user LoRA trained on top of the frozen
  MT-LoRA base, retrieval (and optionally the PAG profile summary) in the prompt for training and inference alike;
  at inference base + MT-LoRA + user LoRA.

Defaults follow the papers (r=8, α=8 on q and v projections, AdamW) except where this CPU forces a budget: a cap on
training examples, a small fixed number of steps per user (8 steps of 4 examples, lr 1e-3: on LaMP-2N training users
that took the training loss from ~3.3 to ~0.2-1.1 and the gold label's log-probability on their held-out query
from -3.2 to -0.4; lr 3e-3 overfit, -0.6). Per-user training is cheap where it can be: the backbone is loaded once,
examples are tokenised once and batched by length, and users can train together in one batch (`group`), each row
through its own adapter (the same per-row edit that serves mixed-user batches). Every user's loss is averaged over
its own tokens and clipped on its own, AdamW is elementwise and every user takes the same number of steps, so a
user's adapter is the same whether it was trained alone or beside others.
"""

from __future__ import annotations

import json
import random
import time
from abc import abstractmethod
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Mapping, Sequence

import torch
from torch import Tensor
from typing_extensions import TypeVar

from tailor.backbone.edits import Edit, HookSet, hooked
from tailor.backbone.layers import Site
from tailor.backbone.lora import LoRAStack, combine, load_peft, lora_sites, rank_concat, save_peft, user_seed
from tailor.backbone.model import Backbone
from tailor.methods.base import Personalizer, Progress, Share
from tailor.methods.checkpoint import Checkpoint
from tailor.methods.profile import ProfileSummarizer, format_history
from tailor.methods.prompting import RAG, RAGConfig, profile_header, retrieve_earlier
from tailor.retrieval import BM25Index
from tailor.store.state import UserState
from tailor.tasks.records import HistoryItem, User

CHECKPOINT_EVERY = 20
"""Steps between checkpoints of a multi-task fit, so that a killed fit resumes instead of restarting."""


@dataclass
class LoRAConfig(RAGConfig):
    """What every LoRA baseline shares. Names follow PEFT's LoraConfig where it has one."""

    r: int = 8
    alpha: float = 8.0
    targets: str = "q_proj,v_proj"
    """Comma-separated projections adapted in every layer (PEFT's target_modules)."""
    dropout: float = 0.0
    lr: float = 1e-3
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    train_batch: int = 8
    """Training examples per step (per user when users train together)."""
    max_examples: int = 16
    """Newest history items of a user turned into training examples."""
    max_target_tokens: int = 48
    seed: int = 0
    k: int = 1
    history_tokens: int = 128


EXAMPLE_SOURCES = ("history", "queries", "both")
"""Where MT-LoRA's training examples come from (MTLoRAConfig.examples)."""


@dataclass
class MTLoRAConfig(LoRAConfig):
    """OPPU's base recipe (official task_LoRA.py: r=8, alpha=8 on q, k and v, 3 epochs). What differs: lr 5e-4 for
    its 1e-4 (its batch of 16 over whole training sets takes far more steps than this budget of 1,024 examples),
    no dropout (0.05 there), and by default the examples are training users' history items, where OPPU's base reads
    other users' queries (`examples="queries"`)."""

    targets: str = "q_proj,k_proj,v_proj"
    lr: float = 5e-4
    epochs: int = 3
    max_examples: int = 8
    max_total: int = 1024
    """Training examples over all users at most: each user's newest items are taken in turn, user by user, so
    every user contributes before any contributes twice."""
    examples: str = "history"
    """What the task adapter learns from: "history" (each training user's newest `max_examples` history items, each
    prompt retrieving from the items before it), "queries" (each training user's LaMP queries with their golds, each
    prompt retrieving from the user's whole history, which is older than the query: what OPPU's official base trains
    on, and the only paraphrasing examples LaMP-7 has, whose history items hold tweets alone), or "both" (a user's
    queries taken before their history items)."""

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.examples not in EXAMPLE_SOURCES:
            raise ValueError(f"examples must be one of {', '.join(EXAMPLE_SOURCES)}, not {self.examples!r}")


@dataclass
class LoRAPConfig(LoRAConfig):
    k: int = 0
    steps: int = 8
    """Optimizer steps per user, whatever the history length: examples are cycled in length-bucketed batches."""
    train_batch: int = 4
    group: int = 1
    """Users trained together, one adapter per row group, in one batch per step. On a CPU a bigger batch is no
    faster per token, so the default trains users one by one; on an accelerator, raise it."""
    max_examples: int = 32


@dataclass
class OPPUConfig(LoRAPConfig):
    k: int = 1
    profile: bool = False
    """Put the PAG profile summary in front of the retrieved items (OPPU's PAG variant)."""
    summary_items: int = 16
    summary_history_tokens: int = 768
    summary_tokens: int = 128
    base_targets: str = MTLoRAConfig.targets
    base_lr: float = MTLoRAConfig.lr
    base_epochs: int = MTLoRAConfig.epochs
    base_max_examples: int = MTLoRAConfig.max_examples
    base_max_total: int = MTLoRAConfig.max_total
    base_train_batch: int = MTLoRAConfig.train_batch


# --- training data ------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Example:
    """One pre-tokenised training sequence: prompt + target (+ end of turn), labels -100 on the prompt."""

    ids: tuple[int, ...]
    labels: tuple[int, ...]
    prompt_length: int


def tokenise(backbone: Backbone, pairs: Sequence[tuple[str, str]], max_target_tokens: int,
             chunk: int = 64) -> list[Example]:
    """Tokenise (prompt, target) pairs once, exactly as `Backbone.sft_batch` does, and keep them unpadded."""
    out: list[Example] = []
    for start in range(0, len(pairs), chunk):
        part = pairs[start:start + chunk]
        batch = backbone.sft_batch([p for p, _ in part], [t for _, t in part], max_target_tokens)
        assert batch.labels is not None
        for row in range(len(part)):
            real = batch.mask[row].bool()
            out.append(Example(tuple(batch.ids[row][real].tolist()), tuple(batch.labels[row][real].tolist()),
                               int(batch.prompt_lengths[row])))
    return out


TRAIN_TOKENS = 2048
"""Padded tokens per training forward. A step's batch is run in groups of rows within this budget, each group's
loss backpropagated before the next, so one step's gradient is the same as in one forward while activation memory
stays bounded: P2P's batch of the 8 longest LaMP-3 reviews (about 1,000 tokens each) in one forward used the 24 GB
machine's memory up."""


def token_groups(lengths: Sequence[int], budget: int | None = None) -> list[list[int]]:
    """Positions 0..n-1 in consecutive groups whose padded size (rows x longest row) stays within `budget`
    (default TRAIN_TOKENS); a row longer than the budget is a group of its own."""
    budget = TRAIN_TOKENS if budget is None else budget
    groups: list[list[int]] = []
    longest = 0
    for i, length in enumerate(lengths):
        if groups and max(longest, length) * (len(groups[-1]) + 1) <= budget:
            groups[-1].append(i)
            longest = max(longest, length)
        else:
            groups.append([i])
            longest = length
    return groups


def labelled_tokens(example: Example) -> int:
    """Target tokens the SFT loss averages over (labels shift by one: the first position predicts nothing)."""
    return sum(label != -100 for label in example.labels[1:])


def length_batches(lengths: Sequence[int], batch: int, rng: random.Random, pool: int = 16) -> list[list[int]]:
    """One epoch of batches of similar length: shuffle, sort pools of `pool` batches by length, shuffle batches."""
    order = list(range(len(lengths)))
    rng.shuffle(order)
    batches = []
    for start in range(0, len(order), batch * pool):
        chunk = sorted(order[start:start + batch * pool], key=lambda i: lengths[i])
        batches.extend(chunk[i:i + batch] for i in range(0, len(chunk), batch))
    rng.shuffle(batches)
    return batches


def plan(lengths: Sequence[int], batch: int, seed: int, steps: int | None = None,
         epochs: int | None = None) -> list[list[int]]:
    """Batches for `epochs` epochs, or exactly `steps` batches cycling through as many epochs as that takes."""
    if not lengths:
        return []
    rng = random.Random(seed)
    out: list[list[int]] = []
    if steps is None:
        for _ in range(epochs or 1):
            out.extend(length_batches(lengths, batch, rng))
        return out
    while len(out) < steps:
        out.extend(length_batches(lengths, batch, rng))
    return out[:steps]


def round_robin(per_user: Sequence[Sequence[tuple[str, str]]], limit: int) -> list[tuple[str, str]]:
    """At most `limit` pairs: every user's newest first, then every user's next newest, and so on."""
    out: list[tuple[str, str]] = []
    depth = 0
    while len(out) < limit and any(depth < len(p) for p in per_user):
        out.extend(p[len(p) - 1 - depth] for p in per_user if depth < len(p))
        depth += 1
    return out[:limit]


# --- training -----------------------------------------------------------------------------------------------------
class StackTrainer:
    """AdamW on a stack of adapters, row r of each batch training adapter `rows[r]`.

    The loss is the sum over adapters of each adapter's token-averaged cross-entropy, and gradients are clipped per
    adapter, so adapters trained in one batch do not influence each other.
    """

    def __init__(self, backbone: Backbone, stack: LoRAStack, config: LoRAConfig,
                 frozen: Mapping[Site, Edit] | None = None):
        self.backbone = backbone
        self.stack = stack.to(backbone.device).trainable()
        self.config = config
        self.frozen = frozen
        self.optimizer = torch.optim.AdamW(self.stack.parameters(), lr=config.lr, weight_decay=config.weight_decay)

    def edits(self) -> dict[Site, Edit]:
        return combine(self.frozen, self.stack.edits(dropout=self.config.dropout))

    def step(self, hooks: HookSet, rows: Sequence[tuple[int, Example]]) -> Tensor:
        """One optimizer step on (adapter, example) rows; returns each adapter's loss (NaN for absent adapters)."""
        users, device = self.stack.users, self.backbone.device
        adapters = torch.tensor([a for a, _ in rows], dtype=torch.long, device=device)
        tokens = torch.tensor([max(labelled_tokens(e), 1) for _, e in rows], dtype=torch.float32, device=device)
        token_sum = torch.zeros(users, device=device).index_add_(0, adapters, tokens)
        per_adapter = torch.zeros(users, device=device)
        self.optimizer.zero_grad(set_to_none=True)
        for group in token_groups([len(e.ids) for _, e in rows]):
            part = [rows[i][1] for i in group]
            batch = self.backbone.batch([e.ids for e in part], [e.prompt_length for e in part],
                                        [e.labels for e in part])
            per_row = self.backbone.sft_loss(batch, hooks, adapters[group], reduction="per_row")
            share = torch.zeros(users, device=device).index_add(0, adapters[group], per_row.float() * tokens[group])
            share = share / token_sum.clamp(min=1)
            share.sum().backward()
            per_adapter += share.detach()
        self._clip()
        self.optimizer.step()
        return torch.where(token_sum > 0, per_adapter.detach(), torch.full_like(per_adapter, float("nan"))).cpu()

    def _clip(self) -> None:
        if self.config.max_grad_norm <= 0:
            return
        params = [p for p in self.stack.parameters() if p.grad is not None]
        squared = sum(p.grad.pow(2).flatten(1).sum(1) for p in params)  # type: ignore[union-attr]
        factor = (self.config.max_grad_norm / (squared.sqrt() + 1e-6)).clamp(max=1.0)  # type: ignore[union-attr]
        for p in params:
            p.grad.mul_(factor.view(-1, *[1] * (p.dim() - 1)))  # type: ignore[union-attr]


def train_users(backbone: Backbone, init: LoRAStack, data: Sequence[Sequence[Example]],
                plans: Sequence[list[list[int]]], config: LoRAConfig,
                frozen: Mapping[Site, Edit] | None = None) -> tuple[LoRAStack, Tensor]:
    """Train adapter u of `init` on data[u] following plans[u] (all plans equally long), all users in one batch per
    step. Returns the trained stack and the loss history, shape (steps, users)."""
    trainer = StackTrainer(backbone, init, config, frozen)
    losses = []
    with hooked(backbone.model, trainer.edits()) as hooks:
        for t in range(len(plans[0]) if plans else 0):
            rows = [(u, data[u][i]) for u in range(len(data)) for i in plans[u][t]]
            losses.append(trainer.step(hooks, rows))
    return trainer.stack.detach(), torch.stack(losses) if losses else torch.zeros(0, init.users)


# --- the methods --------------------------------------------------------------------------------------------------
FC = TypeVar("FC", bound=LoRAConfig, default=LoRAConfig)
PC = TypeVar("PC", bound=LoRAPConfig, default=LoRAPConfig)


class LoRAFamily(RAG[FC]):
    """Prompts, training examples and adapter bookkeeping the three LoRA baselines share."""

    version = 2  # 2: training prompts retrieve from earlier items only; LaMP-7 examples language-model the tweets

    @property
    def sites(self) -> list[Site]:
        return lora_sites(self.backbone.model, [t.strip() for t in self.config.targets.split(",") if t.strip()])

    def compose(self, query_input: str, items: Sequence[HistoryItem], summary: str | None = None) -> str:
        """The RAG prompt (retrieved items in the task's template, then the question), after the profile if any."""
        formatted = format_history(self.task, self.backbone, items, self.config.history_tokens)
        block = self.task.join_history(formatted, query_input)
        return f"User profile: {summary}\n\n{block}" if summary else block

    def prompt(self, state: UserState, query_input: str) -> str:
        items = self.retrieve(state, query_input) if self.config.k > 0 else []
        return self.compose(query_input, items, state.header.get("summary"))

    def training_pairs(self, user: User, limit: int, summary: str | None = None) -> list[tuple[str, str]]:
        """The user's newest `limit` history items as (prompt, output), each prompt retrieving from the items before
        it only (`retrieve_earlier`), as OPPU and PerFit train."""
        items = user.profile
        pairs = []
        for i in range(max(len(items) - limit, 0), len(items)):
            question, output = self.task.example(items[i])
            pairs.append((self.compose(question, retrieve_earlier(self.task, items, i, self.config.k), summary),
                          output))
        return pairs

    def export_peft(self, state: UserState, folder: str | Path) -> Path:
        """The adapter that answers for this user, in PEFT's format."""
        return save_peft(self.adapter(state), self.backbone.model, folder, base_model=self.backbone.name)

    @abstractmethod
    def adapter(self, state: UserState) -> LoRAStack:
        """The LoRA that answers for this user (all of it: base and personal parts)."""


class MTLoRA(LoRAFamily[MTLoRAConfig]):
    """Multi-task LoRA: one adapter for the task, trained on every training user's history; state = the history."""

    name = "mt-lora"

    @property
    def fits(self) -> bool:
        return True

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.stack: LoRAStack | None = None
        self.fit_log: dict = {}

    def fit_pairs(self, user: User) -> list[tuple[str, str]]:
        """One training user's (prompt, target) pairs, oldest first (`round_robin` takes the newest first): the history
        items, then the queries, as `examples` says."""
        history = self.training_pairs(user, self.config.max_examples) if self.config.examples != "queries" else []
        return history + (self.query_pairs(user) if self.config.examples != "history" else [])

    def query_pairs(self, user: User) -> list[tuple[str, str]]:
        """The user's queries that have a gold, as (prompt, gold); the prompt retrieves as inference does, from the
        whole history (a query is newer than every history item)."""
        asked = [q for q in user.queries if q.gold is not None]
        if not asked:
            return []
        index = BM25Index([self.task.document(item) for item in user.profile]) if self.config.k > 0 else None
        pairs = []
        for query in asked:
            top = index.top_k(self.task.retrieval_query(query.input), self.config.k) if index else []
            pairs.append((self.compose(query.input, [user.profile[i] for i in top]), str(query.gold)))
        return pairs

    def fit(self, users: Sequence[User], progress: Progress = None, workdir: Path | None = None) -> None:
        cfg = self.config
        checkpoint = Checkpoint(workdir, every=CHECKPOINT_EVERY)  # its clock counts the preparation too
        pairs = round_robin([self.fit_pairs(user) for user in users], cfg.max_total)
        if not pairs:
            raise ValueError(f"mt-lora: no training examples in {len(users)} training users of {self.task.name} "
                             f"(examples={cfg.examples!r})")
        examples = tokenise(self.backbone, pairs, cfg.max_target_tokens)
        batches = plan([len(e.ids) for e in examples], cfg.train_batch, cfg.seed, epochs=cfg.epochs)
        init = LoRAStack.init(self.backbone.model, self.sites, cfg.r, cfg.alpha, [user_seed(cfg.seed, self.task.name)])
        trainer = StackTrainer(self.backbone, init, cfg)
        losses: list[float] = []
        saved = checkpoint.restore()
        if saved is not None:
            losses = saved["losses"]
            with torch.no_grad():
                for param, value in zip(trainer.stack.parameters(), saved["params"]):
                    param.copy_(value)
            trainer.optimizer.load_state_dict(saved["optimizer"])
            torch.set_rng_state(saved["rng"])
        advance = Share(progress, len(users), len(batches))  # in training users, as every fit reports
        advance(checkpoint.step)  # the steps a resumed fit does not redo
        with hooked(self.backbone.model, trainer.edits()) as hooks:
            for t in range(checkpoint.step, len(batches)):
                losses.append(float(trainer.step(hooks, [(0, examples[i]) for i in batches[t]])[0]))
                checkpoint.save(t + 1, len(batches), lambda: {
                    "params": [p.detach() for p in trainer.stack.parameters()], "losses": losses,
                    "optimizer": trainer.optimizer.state_dict(), "rng": torch.get_rng_state()})
                advance(1)
        self.stack = trainer.stack.detach()
        self.fit_log = {"users": len(users), "examples": len(examples), "steps": len(batches),
                        "tokens": sum(len(e.ids) for e in examples), "seconds": round(checkpoint.seconds, 2),
                        "resumed": saved is not None, "loss_first": losses[:5], "loss_last": losses[-5:]}

    def save_fit(self, folder: Path) -> None:
        assert self.stack is not None
        save_peft(self.stack, self.backbone.model, folder / "adapter", base_model=self.backbone.name)
        if self.fit_log:
            (folder / "fit.json").write_text(json.dumps(self.fit_log, indent=2))

    def load_fit(self, folder: Path) -> None:
        self.stack = load_peft(folder / "adapter", self.backbone.model)

    def edits(self, states: Sequence[UserState]) -> dict[Site, Edit]:
        if self.stack is None:
            raise RuntimeError("mt-lora needs fit(train_users) or load_fit first")
        return dict(self.stack.edits(shared=True))

    def adapter(self, state: UserState) -> LoRAStack:
        if self.stack is None:
            raise RuntimeError("mt-lora needs fit(train_users) or load_fit first")
        return self.stack


class LoRAP(LoRAFamily[PC]):
    """A LoRA per user from scratch on the user's own history (PerFit's LoRA-P); state = the user's A and B."""

    name = "lora-p"
    state_is_history = False
    update_note = "a per-user LoRA is trained on the whole history: rebuilt"

    def base_edits(self) -> Mapping[Site, Edit] | None:
        """Edits every user trains and answers on top of (none here; OPPU's multi-task LoRA)."""
        return None

    def summaries(self, users: Sequence[User]) -> list[str | None]:
        return [None] * len(users)

    def personalize(self, user: User) -> UserState:
        return self.personalize_many([user])[0]

    @property
    def personalize_group(self) -> int | None:
        return self.config.group

    def personalize_many(self, users: Sequence[User], progress: Progress = None) -> list[UserState]:
        states = []
        for start in range(0, len(users), self.config.group):
            group = users[start:start + self.config.group]
            states.extend(self._train_group(group))
            if progress:
                progress(len(group))
        return states

    def _train_group(self, users: Sequence[User]) -> list[UserState]:
        """Users train together, one adapter each; each state records the group's wall time per user."""
        cfg = self.config
        started = time.perf_counter()
        summaries = self.summaries(users)
        data = [tokenise(self.backbone, self.training_pairs(u, cfg.max_examples, s), cfg.max_target_tokens)
                for u, s in zip(users, summaries)]
        seeds = [user_seed(cfg.seed, u.id) for u in users]
        init = LoRAStack.init(self.backbone.model, self.sites, cfg.r, cfg.alpha, seeds).to(self.backbone.device)
        with_data = [i for i, d in enumerate(data) if d]
        trained, losses = init, torch.zeros(0, len(users))
        if with_data:
            plans = [plan([len(e.ids) for e in data[i]], cfg.train_batch, seeds[i], steps=cfg.steps)
                     for i in with_data]
            part, part_losses = train_users(self.backbone, init.select(with_data), [data[i] for i in with_data],
                                            plans, cfg, self.base_edits())
            trained = LoRAStack.concat([part.select([with_data.index(i)]) if i in with_data else init.select([i])
                                        for i in range(len(users))])
            losses = torch.full((len(part_losses), len(users)), float("nan"))
            losses[:, with_data] = part_losses
        per_user = (time.perf_counter() - started) / len(users)
        states = []
        for u, (user, summary) in enumerate(zip(users, summaries)):
            header = {**(profile_header(user) if cfg.k > 0 else {}), "alpha": cfg.alpha, "train_s": round(per_user, 4),
                      "examples": len(data[u]), "steps": len(losses) if u in with_data else 0,
                      "group": len(users), "loss": [round(float(x), 4) for x in losses[:, u]]}
            if summary is not None:
                header["summary"] = summary
            states.append(self.new_state(user, header, trained.to_tensors(u)))
        return states

    def user_stack(self, states: Sequence[UserState]) -> LoRAStack:
        return LoRAStack.concat([LoRAStack.from_tensors(s.tensors, float(s.header["alpha"])) for s in states])

    def edits(self, states: Sequence[UserState]) -> dict[Site, Edit]:
        return combine(self.base_edits(), self.user_stack(states).edits())

    def adapter(self, state: UserState) -> LoRAStack:
        return self.user_stack([state])


class OPPU(LoRAP[OPPUConfig]):
    """One PEFT Per User on top of the multi-task LoRA, with retrieval (and optionally the profile) in the prompt."""

    name = "oppu"

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.base = self.base_method()

    def base_method(self) -> MTLoRA:
        """The multi-task LoRA this OPPU sits on: same prompts and adapter shape, the base_* training options, and
        inference options left at their defaults so that an `mt-lora` run with the same options shares its fit."""
        names = {f.name for f in fields(LoRAConfig)} - {f.name for f in fields(RAGConfig)} | {"k", "history_tokens"}
        options = {n: getattr(self.config, n) for n in names}
        options.update(targets=self.config.base_targets, lr=self.config.base_lr, epochs=self.config.base_epochs,
                       max_examples=self.config.base_max_examples, max_total=self.config.base_max_total,
                       train_batch=self.config.base_train_batch)
        return MTLoRA(self.task, self.backbone, MTLoRAConfig(**options))

    def prerequisites(self) -> Sequence[Personalizer]:
        return (self.base,)

    def fit(self, users: Sequence[User], progress: Progress = None, workdir: Path | None = None) -> None:
        """Fit the multi-task LoRA underneath, unless the runner has fitted (or loaded) it as a prerequisite."""
        if self.base.stack is None:
            self.base.fit(users, progress, workdir)

    def base_edits(self) -> Mapping[Site, Edit]:
        if self.base.stack is None:
            raise RuntimeError("oppu needs fit(train_users) first (it trains on top of mt-lora)")
        return self.base.stack.edits(shared=True)

    def summaries(self, users: Sequence[User]) -> list[str | None]:
        if not self.config.profile:
            return [None] * len(users)
        cfg = self.config
        summarizer = ProfileSummarizer(self.task, self.backbone, cfg.summary_items, cfg.summary_history_tokens,
                                       cfg.summary_tokens, cfg.batch_size)
        return list(summarizer.summaries(users))

    def adapter(self, state: UserState) -> LoRAStack:
        """Base and personal LoRA as one adapter of rank 2r (exactly their sum), for PEFT and multi-LoRA servers."""
        return rank_concat([self.base.adapter(state), self.user_stack([state])])

