"""Profile-to-PEFT (Tan et al. 2025, "Instant Personalized LLM Adaptation via Hypernetwork"): one hypernetwork,
trained across users, writes any user's LoRA from their profile in one forward pass.

Section 3.1, model architecture:

- User profile encoding. The profile of user u for input x is p = [s_u || R(x, H_u, k)]: the global summary the
  base model writes of the history with the paper's profiler prompt (appendix J, `tailor.methods.profile`; cached on
  disk per model, task and history, so per user and history version), then the k history items BM25 ranks highest
  for x (k = 2, section 4). A pre-existing profile (`profiles_file`) replaces the summary as is. A frozen encoder
  turns the text into e_x: the packaged sentence embedder, or (`encoder="backbone"`, the paper's table 4 row that
  uses the base LLM) the backbone's mean-pooled last-layer hidden state of the profile wrapped in the paper's
  embedding prompt. Both are L2-normalised, so the hypernetwork sees inputs of one scale whichever encoder is used.
- Position-aware input. For module m at layer l the hypernetwork reads phi = [e_x || E_mod[m] || E_dep[l]].
- Parameter generation. An MLP f_theta maps phi to a flat vector, unflattened into A (r, in) and B (out, r), for
  every target position (m, l) at once. q_proj and v_proj differ in shape, so the MLP's last layer is one linear head
  per module kind over a shared trunk. The heads start where PEFT starts a LoRA: the B part of each head is zero
  (so an untrained hypernetwork writes B = 0, exactly the base model) and the A part has PEFT's A initialisation
  as bias plus a small input-dependent weight (so A already differs between users and B gets gradients at once).

Section 3.2 and appendix E, training: the loss is the SFT loss of the frozen backbone plus the generated LoRA on the
user's later interactions H_u^{>=t}, with the profile built from the earlier history H_u^{<t} only. Here a training
user's newest `later_items` history items (asked as the task's own questions) and their train-split queries are the
later interactions; the rest is the history their summary and retrieval read. Each batch row is one (user, example)
with its own generated LoRA (the per-row LoRA edit, `tailor.backbone.lora`), rows are drawn from several users, and
with users of several tasks every batch holds up to `tasks_per_batch` tasks drawn with weights proportional to the
square root of each task's number of examples. The paper's 20,000 steps of batch 32 at lr 2e-5 do not fit a CPU: the
defaults are a small, fixed budget (`steps`, `batch`) at a larger rate, and the fit checkpoints every
CHECKPOINT_EVERY steps so that a killed fit resumes, writing its loss curve (loss.csv) beside the checkpoint.
With held-out training users (`val_users`) it ends with the weights of its lowest validation loss (`keep_best`).

Deployment (section 3.2): `personalize(user)` = summary (cached) -> profile -> embedding -> one hypernetwork pass
over all of the user's adapters. Because the profile holds the items retrieved for the input, an adapter belongs to
an input: the state keeps one LoRA per query the user has when personalized (one for all inputs when k = 0), and
`predict` writes the LoRA of any other input on the fly from the summary and history the state also holds. The LLM
itself reads the query alone; all personalization is in the weights. Adapters export in PEFT's format.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import math
import random
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, Mapping, Sequence

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from tailor.atomic import atomic_path
from tailor.backbone.cache import HiddenCache
from tailor.backbone.edits import Edit, hooked
from tailor.backbone.layers import Site
from tailor.backbone.lora import LoRAStack, lora_sites, projection, save_peft
from tailor.backbone.textcache import TextCache, text_key
from tailor.data.splits import subset
from tailor.methods.base import LMConfig, LMPersonalizer, Prediction, Progress, Request, Share
from tailor.methods.checkpoint import Checkpoint
from tailor.methods.lora import Example, token_groups, tokenise
from tailor.methods.profile import ProfileSummarizer, format_history
from tailor.methods.prompting import bm25_of, history_of, profile_header
from tailor.retrieval.bm25 import BM25Index
from tailor.retrieval.embed import default_embedder
from tailor.store.state import UserState
from tailor.tasks.lamp import Task, get_task
from tailor.tasks.records import HistoryItem, Query, User

CHECKPOINT_EVERY = 5
"""Steps between checkpoints of the hypernetwork fit (a step costs ~9 s on the packaged model and one thread)."""

EMBED_PROMPT = """# Instruction:
Extract and represent key personalization features that reflect the user's unique characteristics, preferences, and behavioral patterns from the provided user information. Focus on demographics, stated and implicit preferences, interaction history, behavioral trends, and other traits that can inform task-specific personalization. Pay special attention to features relevant for the following task: {task_description}

# User Information:
{user_profile}"""
"""Appendix J's user profile embedding prompt, for the instruction-following backbone used as the encoder."""

ANY_INPUT = "*"
"""The adapter key of a profile that does not depend on the input (k = 0)."""


@dataclass
class P2PConfig(LMConfig):
    """Profile, hypernetwork and training options; names follow PEFT's LoraConfig where it has one."""

    # profile (section 3.1)
    k: int = 2
    """History items retrieved for the input into the profile (section 4: 2 by default)."""
    history_tokens: int = 256
    """Token budget of the retrieved items in the profile text."""
    summary: bool = True
    """Put the profiler summary in the profile (False: the "retrieved history only" ablation; k=0 is "summary only")."""
    summary_items: int = 16
    summary_history_tokens: int = 768
    summary_tokens: int = 128
    profiles_file: str | None = None
    """A JSON object {user id: profile text}: pre-existing profiles, used as is instead of a generated summary."""
    encoder: Literal["sentence", "backbone"] = "sentence"
    history_stats: bool = True
    """End the profile of a classification task with the user's label counts, in the official code's form
    ("## User History Statistics: total=12 | politics=7 (58.3%), sports=5 (41.7%)")."""
    # hypernetwork (section 3.1) and the LoRA it writes (appendix E; the official code's r=8, alpha=16, rsLoRA)
    r: int = 8
    alpha: float = 16.0
    rslora: bool = True
    """Scale the LoRA by alpha / sqrt(r) (rank-stabilised, 16 / sqrt(8) = 5.66) instead of alpha / r."""
    targets: str = "q_proj,v_proj"
    hidden: int = 256
    module_dim: int = 32
    depth_dim: int = 32
    # training (section 3.2, appendix E)
    steps: int = 4000
    """Optimizer steps at most; `budget_s` usually ends the fit first."""
    budget_s: float = 1800.0
    """Seconds of training (over every process of a resumed fit, not counting the preparation of the training set:
    summaries, retrieval, embeddings) after which the fit stops; 0: no budget. The
    official run trains 10,000 updates of 24 rows on a GPU; on 2 CPU cores 30 minutes is what one task affords."""
    label_smoothing: float = 0.1
    l2_generated: float = 1e-3
    """The official regulariser on the written LoRAs: coefficient x (mean(A^2) + mean(B^2)), summed over modules."""
    val_users: int = 12
    """Training users held out of the fit whose loss is the learning curve (curve.csv, curve.png); 0: none."""
    keep_best: bool = True
    """End with the weights of the lowest validation loss seen (every `eval_every` steps and at the start), not the
    last step's: on LaMP-3's 0.5B fit the held-out loss was 0.39 at step 50 and 0.57 at the budget's step 101."""
    eval_every: int = 25
    batch: int = 8
    """Rows per step; each row is one (user, example) with its own generated LoRA."""
    tasks_per_batch: int = 4
    lr: float = 2e-4
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    train_users: int | None = 160
    """A seeded sample of the training users the hypernetwork is trained on (None: all). Each needs a summary
    (a few seconds), so the largest LaMP training sets (500-750 users) are sampled on this CPU."""
    later_items: int = 4
    """Newest history items of a training user used as its later interactions (at most half of its history)."""
    max_target_tokens: int = 48
    seed: int = 0


# --- section 3.1: the hypernetwork --------------------------------------------------------------------------------
class LoRAHypernetwork(nn.Module):
    """f_theta: [e || E_mod[m] || E_dep[l]] -> (A, B) for every target position (m, l), batched over users."""

    def __init__(self, embedding_dim: int, sites: Sequence[Site], shapes: Mapping[str, tuple[int, int]],
                 n_layers: int, r: int, hidden: int, module_dim: int, depth_dim: int):
        super().__init__()
        self.sites = sorted(sites)
        self.kinds = sorted({s.kind for s in self.sites})
        self.shapes = {kind: tuple(shapes[kind]) for kind in self.kinds}
        self.r = r
        # Unit-norm rows on average, like the L2-normalised user embedding, so neither part swamps the other.
        self.module_embedding = nn.Embedding(len(self.kinds), module_dim)
        self.depth_embedding = nn.Embedding(n_layers, depth_dim)
        nn.init.normal_(self.module_embedding.weight, std=1 / math.sqrt(module_dim))
        nn.init.normal_(self.depth_embedding.weight, std=1 / math.sqrt(depth_dim))
        self.trunk = nn.Sequential(nn.Linear(embedding_dim + module_dim + depth_dim, hidden), nn.LayerNorm(hidden),
                                   nn.SiLU(), nn.Linear(hidden, hidden), nn.SiLU())
        self.heads = nn.ModuleDict({kind: nn.Linear(hidden, r * (fan_in + fan_out))
                                    for kind, (fan_in, fan_out) in self.shapes.items()})
        self.register_buffer("kind_index", torch.tensor([self.kinds.index(s.kind) for s in self.sites]),
                             persistent=False)
        self.register_buffer("layer_index", torch.tensor([s.layer for s in self.sites]), persistent=False)
        self._init_heads(hidden)

    def _init_heads(self, hidden: int) -> None:
        """B = 0 (the untrained hypernetwork is the base model); A = PEFT's U(±1/sqrt(in)) init as the bias, plus a
        weight whose output is about as large, so that A depends on the user from the start."""
        with torch.no_grad():
            for kind, head in self.heads.items():
                fan_in, _ = self.shapes[kind]
                a = self.r * fan_in
                head.weight.zero_()
                head.bias.zero_()
                head.weight[:a].normal_(0.0, 1 / math.sqrt(fan_in * hidden))
                head.bias[:a].uniform_(-1 / math.sqrt(fan_in), 1 / math.sqrt(fan_in))

    def forward(self, users: Tensor) -> tuple[dict[Site, Tensor], dict[Site, Tensor]]:
        """A[site] (users, r, in) and B[site] (users, out, r) for embeddings `users` (users, dim), in one pass."""
        n, positions = users.shape[0], len(self.sites)
        phi = torch.cat([users[:, None, :].expand(n, positions, -1),
                         self.module_embedding(self.kind_index)[None].expand(n, -1, -1),
                         self.depth_embedding(self.layer_index)[None].expand(n, -1, -1)], dim=-1)
        hidden = self.trunk(phi)
        A: dict[Site, Tensor] = {}
        B: dict[Site, Tensor] = {}
        for kind in self.kinds:
            columns = [i for i, s in enumerate(self.sites) if s.kind == kind]
            fan_in, fan_out = self.shapes[kind]
            flat = self.heads[kind](hidden[:, columns])
            a, b = flat.split([self.r * fan_in, fan_out * self.r], dim=-1)
            a = a.reshape(n, len(columns), self.r, fan_in)
            b = b.reshape(n, len(columns), fan_out, self.r)
            for j, column in enumerate(columns):
                A[self.sites[column]] = a[:, j]
                B[self.sites[column]] = b[:, j]
        return A, B


# --- section 3.2 / appendix E: which example each training step reads ------------------------------------------
@dataclass
class TrainingSet:
    """Every training example, tokenised, with the embedding of the profile its LoRA is generated from."""

    examples: list[Example]
    embeddings: Tensor
    users: list[int]
    tasks: list[str]


def sqrt_weights(sizes: Mapping[str, int]) -> dict[str, float]:
    """Appendix E: tasks are sampled with weights proportional to the square root of their number of examples, so
    a large task does not drown the small ones (as proportional sampling would) nor do small ones repeat endlessly."""
    total = sum(math.sqrt(n) for n in sizes.values())
    return {task: math.sqrt(n) / total for task, n in sizes.items()}


def plan_steps(data: TrainingSet, steps: int, batch: int, tasks_per_batch: int, seed: int) -> list[list[int]]:
    """The example rows of every step, fixed by the seed (so a resumed fit replays the same batches).

    Each step draws up to `tasks_per_batch` distinct tasks (square-root weights) and shares its rows among them;
    within a task, users are taken in a shuffled cycle (every user once before any user twice) and each user's
    examples in a shuffled cycle of their own, so a batch holds several users and every example is seen in turn.
    """
    rng = random.Random(seed)
    by_task: dict[str, dict[int, list[int]]] = {}
    for i, (task, user) in enumerate(zip(data.tasks, data.users)):
        by_task.setdefault(task, {}).setdefault(user, []).append(i)
    weights = sqrt_weights({t: sum(len(v) for v in users.values()) for t, users in by_task.items()})
    user_queue: dict[str, list[int]] = {t: [] for t in by_task}
    example_queue: dict[int, list[int]] = {}

    def next_user(task: str) -> int:
        if not user_queue[task]:
            user_queue[task] = list(by_task[task])
            rng.shuffle(user_queue[task])
        return user_queue[task].pop()

    def next_example(task: str, user: int) -> int:
        if not example_queue.get(user):
            example_queue[user] = list(by_task[task][user])
            rng.shuffle(example_queue[user])
        return example_queue[user].pop()

    plan = []
    for _ in range(steps):
        pool = dict(weights)
        chosen = []
        while pool and len(chosen) < tasks_per_batch:
            task = rng.choices(list(pool), weights=list(pool.values()))[0]
            chosen.append(task)
            del pool[task]
        rows = []
        for j, task in enumerate(chosen):
            for _ in range(batch // len(chosen) + (j < batch % len(chosen))):
                rows.append(next_example(task, next_user(task)))
        plan.append(rows)
    return plan


# --- the method ---------------------------------------------------------------------------------------------------
class P2P(LMPersonalizer[P2PConfig]):
    """Profile-to-PEFT: a user's state is their summary, history and the LoRAs the hypernetwork wrote for them."""

    name = "p2p"
    version = 3  # 2: the official profile statistics, rsLoRA scale, label smoothing and L2; a time-budgeted fit;
    # 3: the fit keeps the weights of its lowest validation loss (`keep_best`)
    update_note = "the profile summary and the LoRAs the hypernetwork writes depend on the whole history: rebuilt"

    @property
    def fits(self) -> bool:
        return True

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.hypernet: LoRAHypernetwork | None = None
        self.fit_log: dict = {}
        self._hidden_cache: HiddenCache | None = None
        self.text_cache: TextCache | None = None
        """Where summaries are cached (default: tailor's shared text cache); a benchmark gives a fresh one to time
        summaries cold."""

    # --- profile -> embedding -> LoRA --------------------------------------------------------------------------
    @property
    def sites(self) -> list[Site]:
        return lora_sites(self.backbone.model, [t.strip() for t in self.config.targets.split(",") if t.strip()])

    def task_of(self, user: User) -> Task:
        return get_task(user.task) if user.task else self.task

    def summaries(self, users: Sequence[User], progress: Progress = None) -> list[str]:
        """Each user's profile summary: the pre-existing profile when there is one, else the profiler's (cached);
        `progress` is told how many more users have theirs."""
        cfg = self.config
        if not cfg.summary:
            return [""] * len(users)
        given: dict[str, str] = json.loads(Path(cfg.profiles_file).read_text()) if cfg.profiles_file else {}
        out = {i: given[u.id] for i, u in enumerate(users) if u.id in given}
        if progress and out:
            progress(len(out))
        by_task: dict[str, list[int]] = {}
        for i, user in enumerate(users):
            if i not in out:
                by_task.setdefault(self.task_of(user).name, []).append(i)
        for name, index in by_task.items():
            summarizer = ProfileSummarizer(get_task(name), self.backbone, cfg.summary_items,
                                           cfg.summary_history_tokens, cfg.summary_tokens, cfg.batch_size,
                                           self.text_cache)
            out.update(zip(index, summarizer.summaries([users[i] for i in index], progress)))
        return [out[i] for i in range(len(users))]

    def profile_text(self, task: Task, summary: str, retrieved: Sequence[HistoryItem],
                     history: Sequence[HistoryItem] = ()) -> str:
        """p = [s || R(x, H, k)]: the summary, then the retrieved items in the task's RAG template, then (official
        code, classification tasks) the label counts of the history the profile is built from."""
        items = format_history(task, self.backbone, retrieved, self.config.history_tokens)
        text = "\n".join(part for part in (summary, *items) if part)
        stats = history_statistics(task, history) if self.config.history_stats else ""
        return f"{text}\n\n## User History Statistics: {stats}" if stats else text

    def embed(self, texts: Sequence[str], task: Task | None = None) -> Tensor:
        """e = Enc(p), L2-normalised, one row per profile text."""
        if self.config.encoder == "sentence":
            vectors = torch.from_numpy(default_embedder(str(self.backbone.device))(list(texts))).float()
        else:
            task = task or self.task
            prompts = [EMBED_PROMPT.format(task_description=task.description, user_profile=t) for t in texts]
            if self._hidden_cache is None:
                self._hidden_cache = HiddenCache()
            last = Site("layer", self.backbone.n_layers - 1)
            vectors = self._hidden_cache.capture(self.backbone, prompts, [last], reduce="mean",
                                                 batch_size=self.config.batch_size)[last]
        return torch.nn.functional.normalize(vectors, dim=-1)

    def embedding_dim(self) -> int:
        return default_embedder(str(self.backbone.device)).dim if self.config.encoder == "sentence" \
            else self.backbone.hidden_size

    def new_hypernet(self) -> LoRAHypernetwork:
        """A freshly initialised hypernetwork (seeded, without touching the global random state)."""
        cfg = self.config
        sites = self.sites
        shapes = {s.kind: (projection(self.backbone.model, s).in_features,
                           projection(self.backbone.model, s).out_features) for s in sites}
        with torch.random.fork_rng(devices=[]):  # initialised on the CPU: the same weights on every device
            torch.manual_seed(cfg.seed)
            net = LoRAHypernetwork(self.embedding_dim(), sites, shapes, self.backbone.n_layers, cfg.r, cfg.hidden,
                                   cfg.module_dim, cfg.depth_dim)
        return net.to(self.backbone.device)

    def generate(self, embeddings: Tensor, hypernet: LoRAHypernetwork | None = None) -> LoRAStack:
        """Gen_theta: one hypernetwork pass writing one LoRA per embedding row (differentiable when training)."""
        net = hypernet or self._fitted()
        A, B = net(embeddings.to(self.backbone.device))
        return LoRAStack(A, B, self.lora_alpha)

    @property
    def lora_alpha(self) -> float:
        """The alpha that gives the LoRA its scale under the usual alpha / r: with rsLoRA, alpha * sqrt(r), so that
        the scale is alpha / sqrt(r) here, in a state's header and in an exported PEFT adapter alike."""
        cfg = self.config
        return cfg.alpha * math.sqrt(cfg.r) if cfg.rslora else cfg.alpha

    def _fitted(self) -> LoRAHypernetwork:
        if self.hypernet is None:
            raise RuntimeError("p2p needs fit(train_users) or load_fit first (its hypernetwork writes the LoRAs)")
        return self.hypernet

    # --- training (section 3.2) -----------------------------------------------------------------------------------
    def training_set(self, users: Sequence[User], progress: Progress = None) -> TrainingSet:
        """Each user's later interactions as (question, output) examples, each with the embedding of the profile
        built from the user's earlier history: summary of H^{<t} plus the items retrieved for that question
        (`progress` counts the users whose summary is written)."""
        cfg = self.config
        splits = []
        for user in users:
            later = min(cfg.later_items, len(user.profile) // 2)
            splits.append(len(user.profile) - later)
        earlier = [dataclasses.replace(u, profile=u.profile[:cut]) for u, cut in zip(users, splits)]
        summaries = self.summaries(earlier, progress)
        examples: list[Example] = []
        embeddings: list[Tensor] = []
        owners: list[int] = []
        tasks: list[str] = []
        for u, (user, cut, summary) in enumerate(zip(users, splits, summaries)):
            task = self.task_of(user)
            pairs = [task.example(item) for item in user.profile[cut:]]
            pairs += [(q.input, q.gold) for q in user.queries if q.gold is not None]
            if not pairs:
                continue
            history = user.profile[:cut]
            index = BM25Index([task.document(item) for item in history])
            texts = [self.profile_text(task, summary, [history[i] for i in
                                                      index.top_k(task.retrieval_query(q), cfg.k)], history)
                     for q, _ in pairs]
            examples += tokenise(self.backbone, pairs, cfg.max_target_tokens)
            embeddings.append(self.embed(texts, task))
            owners += [u] * len(pairs)
            tasks += [task.name] * len(pairs)
        dim = self.embedding_dim()
        return TrainingSet(examples, torch.cat(embeddings) if embeddings else torch.zeros(0, dim), owners, tasks)

    def row_losses(self, hypernet: LoRAHypernetwork, data: TrainingSet, rows: Sequence[int],
                   label_smoothing: float = 0.0) -> tuple[Tensor, Tensor]:
        """Each row's token-averaged SFT loss, row r through the LoRA written for its profile, in one forward; and
        the official L2 penalty of those LoRAs: mean(A^2) + mean(B^2) per module kind, summed over kinds."""
        examples = [data.examples[i] for i in rows]
        batch = self.backbone.batch([e.ids for e in examples], [e.prompt_length for e in examples],
                                    [e.labels for e in examples])
        stack = self.generate(data.embeddings[list(rows)], hypernet)
        kinds = sorted({site.kind for site in stack.sites})
        l2 = sum(torch.stack([stack.A[s].pow(2).mean() for s in stack.sites if s.kind == kind]).mean()
                 + torch.stack([stack.B[s].pow(2).mean() for s in stack.sites if s.kind == kind]).mean()
                 for kind in kinds)
        with hooked(self.backbone.model, stack.edits()) as hooks:
            losses = self.backbone.sft_loss(batch, hooks, torch.arange(len(rows)), reduction="per_row",
                                            label_smoothing=label_smoothing)
        return losses, l2  # type: ignore[return-value]

    def batch_loss(self, hypernet: LoRAHypernetwork, data: TrainingSet, rows: Sequence[int],
                   backward: bool = False) -> float:
        """The training objective over rows (mean of the rows' label-smoothed losses plus the L2 penalty), computed
        in groups of rows within TRAIN_TOKENS; with `backward`, each group's share is backpropagated as it is computed
        (the gradient of the whole, in bounded memory). Without `backward`, the plain mean loss (validation)."""
        cfg = self.config
        total = 0.0
        for group in token_groups([len(data.examples[rows[i]].ids) for i in range(len(rows))]):
            losses, l2 = self.row_losses(hypernet, data, [rows[i] for i in group],
                                         cfg.label_smoothing if backward else 0.0)
            share = losses.sum() / len(rows)
            if backward:
                (share + cfg.l2_generated * l2 * len(group) / len(rows)).backward()
            total += float(share.detach())
        return total

    def train_step(self, hypernet: LoRAHypernetwork, optimizer: torch.optim.Optimizer, data: TrainingSet,
                   rows: Sequence[int]) -> float:
        optimizer.zero_grad(set_to_none=True)
        loss = self.batch_loss(hypernet, data, rows, backward=True)
        if self.config.max_grad_norm > 0:
            nn.utils.clip_grad_norm_(hypernet.parameters(), self.config.max_grad_norm)
        optimizer.step()
        return loss

    def fit(self, users: Sequence[User], progress: Progress = None, workdir: Path | None = None) -> None:
        """Train the hypernetwork end to end on the training users (resuming from `workdir`'s checkpoint) until
        `steps` or `budget_s`, recording the loss of `val_users` held-out training users every `eval_every` steps."""
        cfg = self.config
        started = time.perf_counter()
        total = len(users)  # what the caller's progress bar counts: its first half the summaries, then training
        chosen = subset(users, (cfg.train_users or len(users)) + cfg.val_users, cfg.seed)
        held_out = chosen[len(chosen) - min(cfg.val_users, len(chosen) // 4):] if cfg.val_users else []
        users = chosen[:len(chosen) - len(held_out)]
        preparing = Share(progress, total // 2 if cfg.summary else 0, len(chosen))
        data = self.training_set(users, preparing)
        validation = self.training_set(held_out, preparing) if held_out else None
        prepared = time.perf_counter() - started
        # The budget is for training: the summaries that preparation writes (once, then read from the text cache)
        # can take most of 30 minutes on 2 CPU cores, and counting them would leave the hypernetwork a few steps.
        checkpoint = Checkpoint(workdir, every=CHECKPOINT_EVERY)
        plan = plan_steps(data, cfg.steps, cfg.batch, cfg.tasks_per_batch, cfg.seed) if data.examples else []
        hypernet = self.new_hypernet()
        optimizer = torch.optim.AdamW(hypernet.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
        losses: list[float] = []
        curve: list[list[float]] = []  # [step, mean training loss since the last point, validation loss]
        best: dict = {}  # the weights with the lowest validation loss so far: {"step", "loss", "hypernet"}
        saved = checkpoint.restore()
        if saved is not None:
            losses, curve, best = saved["losses"], saved["curve"], saved.get("best", {})
            hypernet.load_state_dict(saved["hypernet"])
            optimizer.load_state_dict(saved["optimizer"])

        def validate(step: int) -> None:
            if validation is None or not validation.examples:
                return
            with torch.no_grad():
                val = self.batch_loss(hypernet, validation, list(range(len(validation.examples))))
            recent = losses[len(losses) - min(cfg.eval_every, len(losses)):]
            curve.append([step, sum(recent) / max(len(recent), 1), val])
            if cfg.keep_best and (not best or val < best["loss"]):
                best.update(step=step, loss=val,
                            hypernet={k: v.detach().clone() for k, v in hypernet.state_dict().items()})

        if saved is None:
            validate(0)
        done, reported, start = checkpoint.step, preparing.reported, preparing.units
        for t in range(checkpoint.step, len(plan)):
            losses.append(self.train_step(hypernet, optimizer, data, plan[t]))
            done = t + 1
            out_of_time = 0 < cfg.budget_s <= checkpoint.seconds
            if done % cfg.eval_every == 0 or out_of_time or done == len(plan):
                validate(done)
            state = lambda: {"hypernet": hypernet.state_dict(), "optimizer": optimizer.state_dict(),  # noqa: E731
                             "losses": losses, "curve": curve, "best": best}
            if checkpoint.save(done, done if out_of_time else len(plan), state) and workdir is not None:
                write_loss_curve(workdir / "loss.csv", losses)
            if progress:  # the share of the steps or of the time budget used, whichever is larger
                used = max(done / len(plan), checkpoint.seconds / cfg.budget_s if cfg.budget_s > 0 else 0.0)
                now = min(total, start + int((total - start) * used))
                progress(now - reported)
                reported = now
            if out_of_time:
                break
        if progress:
            progress(total - reported)
        if best:
            hypernet.load_state_dict(best["hypernet"])
        self.hypernet = hypernet.eval()
        for param in self.hypernet.parameters():
            param.requires_grad_(False)
        self.fit_log = {"users": len(users), "validation_users": len(held_out), "examples": len(data.examples),
                        "steps": done, "planned_steps": len(plan), "budget_s": cfg.budget_s,
                        "tasks": sorted(set(data.tasks)), "prepare_s": round(prepared, 2),
                        "seconds": round(checkpoint.seconds, 2), "resumed": saved is not None,
                        "kept_step": best.get("step", done), "kept_validation_loss": best.get("loss"),
                        "losses": losses, "curve": curve}

    def save_fit(self, folder: Path) -> None:
        hypernet = self._fitted()
        folder.mkdir(parents=True, exist_ok=True)
        save_file({k: v.cpu().contiguous() for k, v in hypernet.state_dict().items()},
                  str(folder / "hypernet.safetensors"))
        log = {k: v for k, v in self.fit_log.items() if k not in ("losses", "curve")}
        (folder / "fit.json").write_text(json.dumps(log, indent=2))
        write_loss_curve(folder / "loss.csv", self.fit_log.get("losses", []))
        write_learning_curve(folder, self.fit_log.get("curve", []))

    def load_fit(self, folder: Path) -> None:
        hypernet = self.new_hypernet()
        hypernet.load_state_dict(load_file(str(folder / "hypernet.safetensors")))
        self.hypernet = hypernet.eval().requires_grad_(False)

    # --- deployment -------------------------------------------------------------------------------------------
    def adapter_key(self, query_input: str) -> str:
        """Which adapter answers an input: one per input when the profile retrieves for it, else one for all."""
        return text_key("p2p-input", query_input)[:16] if self.config.k > 0 else ANY_INPUT

    def personalize(self, user: User) -> UserState:
        return self.personalize_many([user])[0]

    def personalize_many(self, users: Sequence[User], progress: Progress = None) -> list[UserState]:
        """Summaries (cached), then every profile embedded and every adapter written in one hypernetwork pass.

        The state records the time of each part, per user, for the deployment-cost benchmark."""
        cfg = self.config
        started = time.perf_counter()
        summaries = self.summaries(users)
        summarised = time.perf_counter()
        texts: list[str] = []
        keys: list[list[str]] = []
        for user, summary in zip(users, summaries):
            task = self.task_of(user)
            if cfg.k == 0:
                inputs: list[str] = [ANY_INPUT]
                texts.append(self.profile_text(task, summary, [], user.profile))
            else:
                inputs = list(dict.fromkeys(q.input for q in user.queries))
                index = BM25Index([task.document(item) for item in user.profile])
                texts += [self.profile_text(task, summary, [user.profile[i] for i in
                                                            index.top_k(task.retrieval_query(x), cfg.k)],
                                            user.profile)
                          for x in inputs]
            keys.append([ANY_INPUT if x == ANY_INPUT else self.adapter_key(x) for x in inputs])
        embeddings = self.embed(texts) if texts else torch.zeros(0, self.embedding_dim())
        embedded = time.perf_counter()
        with torch.no_grad():
            stack = self.generate(embeddings) if texts else None
        generated = time.perf_counter()
        n = max(len(users), 1)
        timing = {"summary_s": (summarised - started) / n, "embed_s": (embedded - summarised) / n,
                  "hypernet_s": (generated - embedded) / n}
        states, row = [], 0
        for user, summary, user_keys in zip(users, summaries, keys):
            tensors: dict[str, Tensor] = {}
            for j, _ in enumerate(user_keys):
                assert stack is not None
                tensors.update({f"{j}/{name}": t for name, t in stack.to_tensors(row).items()})
                row += 1
            header = {**profile_header(user), "summary": summary, "alpha": self.lora_alpha, "adapters": user_keys,
                      **{k: round(v, 5) for k, v in timing.items()}}
            states.append(self.new_state(user, header, tensors))
        if progress:
            progress(len(users))
        return states

    def stored_adapter(self, state: UserState, key: str) -> LoRAStack | None:
        """The LoRA the state holds for adapter `key`, or None when it was not written at personalize time."""
        keys = state.header.get("adapters", [])
        if key not in keys:
            return None
        j = keys.index(key)
        cached = state.runtime.setdefault("adapters", {})
        if j not in cached:
            prefix = f"{j}/"
            cached[j] = LoRAStack.from_tensors({n[len(prefix):]: t for n, t in state.tensors.items()
                                                if n.startswith(prefix)}, float(state.header["alpha"]))
        return cached[j]

    def adapters_for(self, requests: Sequence[tuple[UserState, str]]) -> list[LoRAStack]:
        """The LoRA for each (state, input): stored ones as they are, the others written now in one pass from the
        profile the state's summary and history give for that input."""
        out: list[LoRAStack | None] = [self.stored_adapter(s, self.adapter_key(x)) for s, x in requests]
        missing = [i for i, found in enumerate(out) if found is None]
        if missing:
            texts = []
            for i in missing:
                state, query_input = requests[i]
                task = get_task(state.header["task"]) if state.header.get("task") else self.task
                retrieved = [history_of(state)[j] for j in bm25_of(task, state).top_k(
                    task.retrieval_query(query_input), self.config.k)]
                texts.append(self.profile_text(task, state.header.get("summary", ""), retrieved, history_of(state)))
            with torch.no_grad():
                fresh = self.generate(self.embed(texts))
            for j, i in enumerate(missing):
                out[i] = fresh.select([j])
        return [a for a in out if a is not None]

    def predict(self, requests: Sequence[Request], progress: Progress = None) -> list[Prediction]:
        """Answer through per-row LoRAs: requests sharing a (user, adapter) share a row of the LoRA stack."""
        views: dict[tuple[int, str], UserState] = {}
        pending: list[tuple[UserState, str]] = []
        routed = []
        for state, query in requests:
            ident = (id(state), self.adapter_key(query.input))
            if ident not in views:
                views[ident] = UserState(state.method, state.version, state.user_id, state.model_id)
                pending.append((state, query.input))
            routed.append((views[ident], query))
        for view, adapter in zip(views.values(), self.adapters_for(pending)):
            view.runtime["lora"] = adapter
        return super().predict(routed, progress)

    def prompt(self, state: UserState, query_input: str) -> str:
        """The LLM reads the question alone: the user is in the weights."""
        return query_input

    def edits(self, states: Sequence[UserState]) -> dict[Site, Edit]:
        return dict(LoRAStack.concat([s.runtime["lora"] for s in states]).edits())

    def export_peft(self, state: UserState, folder: str | Path, query: Query | None = None) -> Path:
        """One adapter of this user in PEFT's format: the one for `query`, or the user's only adapter."""
        if query is None:
            if len(state.header.get("adapters", [])) != 1:
                raise ValueError("this user's adapters depend on the input (k > 0): name the query to export")
            adapter = self.stored_adapter(state, state.header["adapters"][0])
        else:
            adapter = self.adapters_for([(state, query.input)])[0]
        assert adapter is not None
        return save_peft(adapter, self.backbone.model, folder, base_model=self.backbone.name)


def write_learning_curve(folder: Path, curve: Sequence[Sequence[float]]) -> None:
    """curve.csv (step, training loss, validation loss on held-out training users) and curve.png, its plot."""
    if not curve:
        return
    with atomic_path(folder / "curve.csv") as tmp, tmp.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["step", "train_loss", "validation_loss"])
        writer.writerows([int(step), round(train, 6), round(val, 6)] for step, train, val in curve)
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(6, 3.5))
    steps = [point[0] for point in curve]
    axis.plot(steps[1:], [point[1] for point in curve[1:]], label="training loss (label-smoothed)")
    axis.plot(steps, [point[2] for point in curve], marker="o", label="validation loss (held-out training users)")
    axis.set_xlabel("step")
    axis.set_ylabel("loss")
    axis.legend()
    figure.tight_layout()
    with atomic_path(folder / "curve.png") as tmp:
        figure.savefig(tmp, format="png", dpi=120)
    plt.close(figure)


def history_statistics(task: Task, history: Sequence[HistoryItem]) -> str:
    """The user's label counts as the official code writes them: "total=N | label=n (p%), ...", most frequent
    first (ties by label), on classification tasks only; "" otherwise or without history."""
    if task.family != "classification":
        return ""
    counts = Counter(task.item_output(item) for item in history if task.item_output(item))
    total = sum(counts.values())
    if not total:
        return ""
    parts = [f"{label}={n} ({100.0 * n / total:.1f}%)" for label, n in sorted(counts.items(),
                                                                                key=lambda kv: (-kv[1], kv[0]))]
    return f"total={total} | " + ", ".join(parts)


def write_loss_curve(path: Path, losses: Sequence[float]) -> None:
    """step,loss rows, rewritten whole (atomically) so a reader never sees half a curve."""
    with atomic_path(path) as tmp, tmp.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["step", "loss"])
        writer.writerows((i + 1, round(loss, 6)) for i, loss in enumerate(losses))
