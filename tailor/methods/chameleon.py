"""CHAMELEON (Zhang et al. 2025, "Personalize Your LLM: Fake it then Align it"): training-free personalization.

Section 3.1, self-generated preference data, per user:
  1. history selection: embed the user's history items with the sentence embedder, take the top principal
     components of those embeddings and keep the items whose projections on them are largest (eqs. 1-2);
  2. insights: the backbone writes what characterises this user (personalized insight) and what a generic,
     impersonal answer looks like (neutral insight);
  3. preference pairs: for each selected history item, asked as a query, the backbone answers once guided by the
     personalized insight and once by the neutral one (appendix A.3 prompts); identical answers are dropped. Each
     answer is joined to the user's history and the query, which gives the pair (p^P, p^N).
Section 3.2, representation editing: at every decoder layer the MLP outputs of both sides give theta_P (SVD) and
theta_N (CCS probe), see `tailor.methods.subspace`; at inference the MLP outputs of the L layers with the lowest CCS
loss are edited. Section 3.3, group scale: the pairs of a group of users are pooled and one set of directions serves
them all, which also personalizes users with no history of their own.

Modes (`scope`): "user" (the user's own pairs), "group" (the user's pairs pooled with those of the nearest fitted
group, users grouped by the embedding of their personalized insight), "unseen" (section 4.3: nothing of the user is
used, neither history nor anything generated; the pairs of every fitted training user give one set of directions,
and the question is asked alone), "nearest-group" (nothing is generated for the user, but the group whose users'
histories are closest to the user's history lends its directions: a generation-free scope of tailor's own, not the
paper's unseen users).

Synthetic answers (`answers`): "generate", as the paper does, writes each answer freely under the insight-guided
prompt and parses it to the task's label or score for the pair text; "score" takes the label the backbone scores
highest under each prompt instead (tailor's first recipe: on small models both insights rarely move the argmax, and
most pairs were identical and dropped). At inference (`insight_prompt`) the question is asked in the paper's
personalized template, with the user's selected history and personalized insight; off, it is LaMP's history-then-
question prompt the paper gives its baselines.
"""

from __future__ import annotations

import hashlib
import json
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, Mapping, Sequence

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from torch import Tensor
from typing_extensions import TypeVar

from tailor.backbone.cache import HiddenCache, cached_best_label, cached_generate
from tailor.backbone.layers import Site
from tailor.methods.base import LMConfig, LMPersonalizer, Progress
from tailor.methods.profile import format_history
from tailor.methods.subspace import MIN_PAIRS, ProjectionEdit, ccs_layers, personal_direction
from tailor.retrieval.embed import Embedder, default_embedder
from tailor.store.state import UserState
from tailor.tasks.lamp import Task
from tailor.tasks.records import HistoryItem, User


@dataclass(frozen=True)
class PromptStyle:
    """The task-specific words of the appendix A.3 templates."""

    activity: str
    new_item: str
    question: str
    goal: str
    answer_rule: str


def _labels(task: Task) -> str:
    return ", ".join(task.labels)


def prompt_style(task: Task) -> PromptStyle:
    if task.name == "LaMP-2M":
        return PromptStyle("movie tagging", "description",
                           "Which tag does this movie relate to among the following tags? Just answer with only ONE "
                           f"tag name without further explanation. tags: [{_labels(task)}]",
                           "predict the movie tagging that the user preferred based on their history",
                           f"Answer only with one tag name ({_labels(task)}).")
    if task.name == "LaMP-2N":
        return PromptStyle("news categorization", "article",
                           "Which category does this article relate to among the following categories? Just answer "
                           f"with only ONE category name without further explanation. categories: [{_labels(task)}]",
                           "predict the category the user gives to the article based on their history",
                           f"Answer only with one category name ({_labels(task)}).")
    if task.name == "LaMP-3":
        return PromptStyle("product rating based on the user's review of the product", "review by the user",
                           "What is the rating score of the following review on a scale of 1 to 5? Just answer with "
                           "1, 2, 3, 4, or 5 without further explanation.",
                           "predict the rating of the product based on the user history ratings",
                           "Just answer with 1, 2, 3, 4, or 5 without further explanation.")
    if task.name == "LaMP-7":
        return PromptStyle("tweets that shows their preferred way of speaking", "twitter post",
                           "Paraphrase the tweet in the style the user likes without any explanation before or "
                           "after it.", "paraphrase the tweet in the style the user likes based on the history", "")
    if task.name == "LaMP-4":
        return PromptStyle("news headline writing", "article",
                           "Generate a headline for the article in the style the user likes without any explanation.",
                           "write the headline the way this user writes headlines based on the history", "")
    if task.name == "LaMP-5":
        return PromptStyle("paper title writing", "abstract",
                           "Generate a title for the abstract in the style the user likes without any explanation.",
                           "write the title the way this user writes titles based on the history", "")
    return PromptStyle("citation choice", "paper", "Which reference is related? Just answer with [1] or [2].",
                       "predict the reference this user would cite based on their history",
                       "Just answer with [1] or [2] without explanation.")


def history_block(style: PromptStyle, formatted: Sequence[str]) -> str:
    numbered = "\n".join(f"{i + 1}. {text.strip()}" for i, text in enumerate(formatted))
    return f"Suppose you are a user with the following user profile history of {style.activity}:\n{numbered}"


def insight_prompts(style: PromptStyle, history: str) -> tuple[str, str]:
    """Prompts for the personalized and the neutral insight (section 3.1, "Insight Generation").

    The paper gives the templates that use the insights ("The user prefers [INSIGHT]", "Your answer should
    [INSIGHT]") but not the prompts that write them, so these ask for exactly those sentence completions.
    """
    personal = (f"{history}\n\nAnalyze this history and describe this user's preferences, behaviors and style in one "
                "short phrase that completes the sentence: \"The user prefers ...\". Answer with the phrase only.")
    neutral = (f"{history}\n\nDescribe how a generic and impersonal assistant, who does not consider this user's "
               "preferences or history, answers such questions, in one short phrase that completes the sentence: "
               "\"Your answer should ...\". Answer with the phrase only.")
    return personal, neutral


def preference_prompt(style: PromptStyle, history: str, query: str, insight: str, personal: bool) -> str:
    """Appendix A.3: the prompt asking for a personalized (or neutral) answer guided by the insight."""
    agent = (f"You are a helpfully personalized assistant. You try to {style.goal}. The user prefers {insight}."
             if personal else
             "You are a generic and impersonal assistant. You do not consider the user's preferences or profile "
             f"history when responding. Your answer should {insight}.")
    rule = f" {style.answer_rule}" if style.answer_rule else ""
    return (f"{history}\n\nNow, given a new {style.new_item}: {query}\n\nQuestion: {style.question}\n\n"
            f"{agent}{rule}\n\nYour answer:")


_LEADS = re.compile(r'^\s*(the user prefers|your answer should|the user\'s preferences?( are| is)?)\s*:?\s*',
                    re.IGNORECASE)


def clean_insight(text: str) -> str:
    """The phrase that completes "The user prefers ..." / "Your answer should ...", as the A.3 templates use it.

    Small models often repeat the lead-in or wrap the phrase in quotes; both are removed, and only the first line
    is kept.
    """
    phrase = text.strip().split("\n")[0]
    for _ in range(3):
        phrase = _LEADS.sub("", phrase).strip().rstrip(".").strip('"\'').strip()
    return phrase or "nothing in particular"


def select_history(embeddings: np.ndarray, n: int) -> list[int]:
    """Eqs. 1-2: indices (in history order) of the n items with the largest projections on the top n components.

    The projection z_i = (e_i - mean) W_u onto the top principal components measures how much of the user's
    variation item i carries; its norm ranks the items.
    """
    count = len(embeddings)
    if count <= n:
        return list(range(count))
    centred = embeddings - embeddings.mean(axis=0)
    _, _, vt = np.linalg.svd(centred, full_matrices=False)
    z = centred @ vt[:n].T
    top = np.argsort(-np.linalg.norm(z, axis=1), kind="stable")[:n]
    return sorted(top.tolist())


@dataclass
class ChameleonConfig(LMConfig):
    history: int = 10
    """History items selected per user (the paper uses up to 10)."""
    layers: int = 3
    """Edited layers: the L with the lowest CCS loss."""
    scale_p: float = 1.0
    scale_n: float = 1.0
    direction: Literal["both", "personal", "neutral", "random"] = "both"
    """Ablations of the paper's Table 3, plus random unit directions as a control that must not help."""
    scope: Literal["user", "group", "unseen", "nearest-group"] = "user"
    answers: Literal["generate", "score"] = "generate"
    """How the synthetic answers are written: generated under the insight prompt and parsed (the paper), or the
    label the backbone scores highest under it (classification tasks only; generation tasks always generate)."""
    insight_prompt: bool = True
    """Ask the question at inference in the paper's personalized template with the user's insight (off: LaMP's
    prompt with the selected history, as the paper's baselines are asked)."""
    groups: int = 4
    group_users: int = 100
    """Training users whose pairs the group fit pools (the paper pools 100)."""
    insight_tokens: int = 40
    answer_tokens: int | None = None
    history_tokens: int = 384
    ccs_restarts: int = 4
    ccs_steps: int = 300
    history_in_prompt: bool = True
    """Put the selected history in the prompt at inference, as the paper's comparisons do ("the same prompt format
    and the same pre-selected user history profile"). Unseen users have no history to show."""

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.scope not in ("user", "group", "unseen", "nearest-group"):
            raise ValueError(f"scope must be user, group, unseen or nearest-group, not {self.scope!r}")
        if self.answers not in ("generate", "score"):
            raise ValueError(f"answers must be generate or score, not {self.answers!r}")
    seed: int = 0


@dataclass
class UserPairs:
    """One user's self-generated preference data and its hidden states (section 3.1), with timings."""

    user_id: str
    selected: list[str]
    history: list[str]
    """The selected items in the task's LaMP format, for the inference prompt."""
    insight_p: str
    insight_n: str
    kept: int
    dropped: int
    hidden_p: Tensor  # (pairs, layers, d): MLP outputs at the last token of p^P
    hidden_n: Tensor
    history_embedding: np.ndarray
    examples: list[tuple[str, str, str]] = field(default_factory=list)
    """Kept pairs as (question with the user's history, personalized answer, neutral answer): the DPO baseline's
    preference data."""
    seconds: dict[str, float] = field(default_factory=dict)


@dataclass
class Directions:
    layers: list[int]
    theta_p: Tensor  # (L, d)
    theta_n: Tensor
    ccs_loss: list[float]  # every layer's CCS loss, for the report
    seconds: float


CC = TypeVar("CC", bound=ChameleonConfig, default=ChameleonConfig)


class Chameleon(LMPersonalizer[CC]):
    name = "chameleon"
    version = 2  # 2: generated answers, the insight prompt, no edit from one pair, unseen users contribute nothing
    update_note = ("CHAMELEON's history selection (a PCA over all items), insights, pairs and CCS probes depend on the "
                   "whole history; rebuilt, with unchanged generations and hidden states read from the caches")

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.style = prompt_style(self.task)
        self.hidden = HiddenCache()
        self.groups: list[dict] = []
        self.pooled: Directions | None = None

    @property
    def fits(self) -> bool:
        return self.config.scope != "user"


    @property
    def _embed(self) -> Embedder:
        """The sentence embedder, where the backbone runs."""
        return default_embedder(str(self.backbone.device))

    @property
    def sites(self) -> list[Site]:
        return [Site("mlp", layer) for layer in range(self.backbone.n_layers)]

    # --- section 3.1: self-generated preference data -------------------------------------------------------------
    def _formatted(self, items: Sequence[HistoryItem]) -> list[str]:
        return format_history(self.task, self.backbone, items, self.config.history_tokens)

    def _insights(self, prompts: list[str]) -> list[str]:
        texts = cached_generate(self.backbone, prompts, self.config.insight_tokens, self.config.batch_size)
        return [clean_insight(text) for text in texts]

    def _answers(self, prompts: list[str], content_free: list[str] | None) -> list[str]:
        """The synthetic answers: generated under each insight prompt and parsed to the task's label or score (the
        paper), or, with `answers="score"` on a classification task, the label the backbone scores highest (raw or
        calibrated, as this configuration answers queries)."""
        if self.scoring and self.config.answers == "score":
            return cached_best_label(self.backbone, prompts, self.task.labels, self.config.batch_size,
                                     content_free=content_free)
        max_new = self.config.answer_tokens or self.max_new_tokens
        raw = cached_generate(self.backbone, prompts, max_new, self.config.batch_size)
        return [self.task.parse(text) for text in raw]

    def preference_data(self, users: Sequence[User]) -> list[UserPairs]:
        """Selection, insights, pairs and their hidden states for several users, each stage batched across users."""
        clock = time.perf_counter()
        embedder = self._embed
        selections, histories = [], []
        for user in users:
            embeddings = embedder([self.task.format_item(item) for item in user.profile])
            chosen = [user.profile[i] for i in select_history(embeddings, self.config.history)]
            formatted = self._formatted(chosen)
            selections.append((chosen, embeddings.mean(axis=0), formatted))
            histories.append(history_block(self.style, formatted))
        select_s = (time.perf_counter() - clock) / max(len(users), 1)

        clock = time.perf_counter()
        insights = self._insights([p for h in histories for p in insight_prompts(self.style, h)])
        insight_s = (time.perf_counter() - clock) / max(len(users), 1)

        clock = time.perf_counter()
        jobs = []  # (user index, query input, pair context, personalized prompt, neutral prompt)
        calibrate = self.scoring and self.config.calibrate and self.config.answers == "score"
        content_free = []  # the two prompts with the new item replaced by "N/A" (calibrated scoring only)
        for u, (chosen, _, _) in enumerate(selections):
            for item in chosen:
                others = self._formatted([other for other in chosen if other.id != item.id])
                history = history_block(self.style, others)
                query_input = self.task.question(item)
                query = self.task.retrieval_query(query_input)
                jobs.append((u, query_input, self.task.join_history(others, query_input),
                             preference_prompt(self.style, history, query, insights[2 * u], True),
                             preference_prompt(self.style, history, query, insights[2 * u + 1], False)))
                if calibrate:
                    content_free += [preference_prompt(self.style, history, "N/A", insights[2 * u], True),
                                     preference_prompt(self.style, history, "N/A", insights[2 * u + 1], False)]
        answers = self._answers([p for job in jobs for p in job[3:]], content_free if calibrate else None)
        pairs_s = (time.perf_counter() - clock) / max(len(users), 1)

        clock = time.perf_counter()
        kept_jobs = [(job, answers[2 * j], answers[2 * j + 1]) for j, job in enumerate(jobs)
                     if answers[2 * j].strip() != answers[2 * j + 1].strip()]
        texts = [t for job, a_p, a_n in kept_jobs for t in (self.backbone.render(job[2]) + a_p,
                                                            self.backbone.render(job[2]) + a_n)]
        captured = self.hidden.capture(self.backbone, texts, self.sites, render=False,
                                       batch_size=self.config.batch_size) if texts else None
        stacked = torch.stack([captured[s] for s in self.sites], dim=1) if captured else \
            torch.zeros(0, len(self.sites), self.backbone.hidden_size)
        hidden_s = (time.perf_counter() - clock) / max(len(users), 1)

        result = []
        for u, user in enumerate(users):
            rows = [k for k, (job, _, _) in enumerate(kept_jobs) if job[0] == u]
            total = sum(1 for job in jobs if job[0] == u)
            chosen, history_embedding, formatted = selections[u]
            result.append(UserPairs(
                user.id, [i.id for i in chosen], formatted, insights[2 * u], insights[2 * u + 1], len(rows),
                total - len(rows), stacked[[2 * k for k in rows]], stacked[[2 * k + 1 for k in rows]],
                history_embedding, [(kept_jobs[k][0][2], kept_jobs[k][1], kept_jobs[k][2]) for k in rows],
                {"selection": select_s, "insights": insight_s, "pairs": pairs_s, "hidden_states": hidden_s}))
        return result

    # --- section 3.2: directions and layer choice ----------------------------------------------------------------
    def directions(self, hidden_p: Tensor, hidden_n: Tensor) -> Directions | None:
        """theta_P and theta_N at every layer; keep the L layers with the lowest CCS loss. None (no edit) with fewer
        than two pairs, which CCS cannot probe (`subspace.MIN_PAIRS`)."""
        if len(hidden_p) < MIN_PAIRS:
            return None
        clock = time.perf_counter()
        thetas_p = [personal_direction(hidden_p[:, layer]) for layer in range(hidden_p.shape[1])]
        probes = ccs_layers(hidden_p, hidden_n, self.config.ccs_restarts, self.config.ccs_steps, seed=self.config.seed)
        thetas_n = [probe.direction for probe in probes]
        losses = [probe.loss for probe in probes]
        chosen = sorted(np.argsort(np.array(losses), kind="stable")[:self.config.layers].tolist())
        return Directions(chosen, torch.stack([thetas_p[i] for i in chosen]),
                          torch.stack([thetas_n[i] for i in chosen]), losses, time.perf_counter() - clock)

    # --- states ------------------------------------------------------------------------------------------------
    def _state(self, user: User, found: Directions | None, header: dict) -> UserState:
        d = self.backbone.hidden_size
        if found is None:
            tensors = {"layers": torch.zeros(0, dtype=torch.long), "theta_p": torch.zeros(0, d),
                       "theta_n": torch.zeros(0, d)}
        else:
            theta_p, theta_n = found.theta_p, found.theta_n
            if self.config.direction == "random":
                seed = int(hashlib.sha256(user.id.encode()).hexdigest()[:8], 16)
                generator = torch.Generator().manual_seed(self.config.seed + seed)
                theta_p = torch.nn.functional.normalize(torch.randn(theta_p.shape, generator=generator), dim=-1)
                theta_n = torch.nn.functional.normalize(torch.randn(theta_n.shape, generator=generator), dim=-1)
            # float16 halves the state (3 layers: 7 KiB); the edit computes in float32 either way.
            tensors = {"layers": torch.tensor(found.layers, dtype=torch.long), "theta_p": theta_p.half(),
                       "theta_n": theta_n.half()}
            header = {**header, "ccs_loss": [round(x, 5) for x in found.ccs_loss],
                      "seconds": {**header.get("seconds", {}), "directions": round(found.seconds, 4)}}
        gain_p = 0.0 if self.config.direction == "neutral" else self.config.scale_p
        gain_n = 0.0 if self.config.direction == "personal" else self.config.scale_n
        return self.new_state(user, {**header, "scope": self.config.scope, "gain_p": gain_p, "gain_n": gain_n},
                              tensors)

    @staticmethod
    def _pairs_header(pairs: UserPairs) -> dict:
        return {"selected": pairs.selected, "history": pairs.history, "insight_p": pairs.insight_p,
                "insight_n": pairs.insight_n, "pairs_kept": pairs.kept, "pairs_dropped": pairs.dropped,
                "seconds": {k: round(v, 4) for k, v in pairs.seconds.items()}}

    def personalize(self, user: User) -> UserState:
        return self.personalize_many([user])[0]

    def personalize_many(self, users: Sequence[User], progress: Progress = None) -> list[UserState]:
        if self.config.scope != "user" and not self.groups:
            raise RuntimeError(f"chameleon scope={self.config.scope!r} needs fit(train_users) first")
        if self.config.scope == "unseen":
            states = [self._state(user, self.pooled, {"scope_note": "no user data: the fitted pool's directions"})
                      for user in users]
        elif self.config.scope == "nearest-group":
            states = [self._nearest_group_state(user) for user in users]
        else:
            states = []
            for user, pairs in zip(users, self.preference_data(users)):
                hidden_p, hidden_n, header = pairs.hidden_p, pairs.hidden_n, self._pairs_header(pairs)
                if self.config.scope == "group":
                    group = self._nearest("insight_centroid", self._embed([pairs.insight_p])[0])
                    hidden_p = torch.cat([self.groups[group]["hidden_p"], hidden_p])
                    hidden_n = torch.cat([self.groups[group]["hidden_n"], hidden_n])
                    header["group"] = group
                states.append(self._state(user, self.directions(hidden_p, hidden_n), header))
        if progress:
            progress(len(users))
        return states

    # --- section 3.3: groups ----------------------------------------------------------------------------------
    def fit(self, users: Sequence[User], progress: Progress = None, workdir: Path | None = None) -> None:
        """Pool the preference data of `group_users` training users into `groups` groups (section 3.3).

        The group scope pools a user's pairs with the nearest group's, the unseen scope uses every group's pairs
        together (`pooled`), nearest-group lends a group's own directions; per-user CHAMELEON has nothing to fit.
        """
        from sklearn.cluster import KMeans

        if not self.fits:
            return
        rng = np.random.default_rng(self.config.seed)
        chosen = [users[i] for i in sorted(rng.choice(len(users), min(self.config.group_users, len(users)),
                                                      replace=False))]
        data: list[UserPairs] = []
        for start in range(0, len(chosen), 16):
            data.extend(self.preference_data(chosen[start:start + 16]))
            if progress:
                progress(len(chosen[start:start + 16]))
        insight_vectors = self._embed([p.insight_p for p in data])
        k = min(self.config.groups, len(data))
        labels = KMeans(k, n_init=10, random_state=self.config.seed).fit_predict(insight_vectors)
        self.groups = []
        for g in sorted(set(labels.tolist())):  # identical insights can leave fewer distinct clusters than k
            members = [p for p, label in zip(data, labels) if label == g]
            # Rounded to float16 as `save_fit` keeps them, so a fit used at once and one loaded later edit alike.
            hidden_p = torch.cat([p.hidden_p for p in members]).half().float()
            hidden_n = torch.cat([p.hidden_n for p in members]).half().float()
            self.groups.append({
                "users": [p.user_id for p in members],
                "insight_centroid": insight_vectors[labels == g].mean(axis=0),
                "history_centroid": np.stack([p.history_embedding for p in members]).mean(axis=0),
                "hidden_p": hidden_p, "hidden_n": hidden_n,
                "directions": self.directions(hidden_p, hidden_n),
            })
        self._pool()

    def _nearest(self, key: str, vector: np.ndarray) -> int:
        centroids = np.stack([g[key] for g in self.groups])
        cosine = centroids @ vector / (np.linalg.norm(centroids, axis=1) * np.linalg.norm(vector) + 1e-12)
        return int(np.argmax(cosine))

    def _pool(self) -> None:
        """Directions from the pairs of every fitted training user together: what an unseen user is edited with."""
        self.pooled = self.directions(torch.cat([g["hidden_p"] for g in self.groups]),
                                      torch.cat([g["hidden_n"] for g in self.groups])) if self.groups else None

    def _nearest_group_state(self, user: User) -> UserState:
        """The group whose users' histories are closest to this user's history (mean embeddings), nothing
        generated."""
        clock = time.perf_counter()
        vector = self._embed([self.task.format_item(item) for item in user.profile]).mean(axis=0)
        group = self._nearest("history_centroid", vector)
        header = {"group": group, "seconds": {"assign": round(time.perf_counter() - clock, 4)}}
        return self._state(user, self.groups[group]["directions"], header)

    def save_fit(self, folder: Path) -> None:
        tensors, meta = {}, []
        for g, group in enumerate(self.groups):
            tensors[f"{g}.hidden_p"] = group["hidden_p"].to(torch.float16)
            tensors[f"{g}.hidden_n"] = group["hidden_n"].to(torch.float16)
            tensors[f"{g}.insight_centroid"] = torch.from_numpy(group["insight_centroid"])
            tensors[f"{g}.history_centroid"] = torch.from_numpy(group["history_centroid"])
            meta.append({"users": group["users"]})
        save_file(tensors, str(folder / "groups.safetensors"))
        (folder / "groups.json").write_text(json.dumps(meta, indent=1))

    def load_fit(self, folder: Path) -> None:
        tensors = load_file(str(folder / "groups.safetensors"))
        meta = json.loads((folder / "groups.json").read_text())
        self.groups = []
        for g, info in enumerate(meta):
            hidden_p, hidden_n = tensors[f"{g}.hidden_p"].float(), tensors[f"{g}.hidden_n"].float()
            self.groups.append({"users": info["users"], "hidden_p": hidden_p, "hidden_n": hidden_n,
                                "insight_centroid": tensors[f"{g}.insight_centroid"].numpy(),
                                "history_centroid": tensors[f"{g}.history_centroid"].numpy(),
                                "directions": self.directions(hidden_p, hidden_n)})
        self._pool()

    # --- section 3.2 at inference: the edit ----------------------------------------------------------------------
    def prompt(self, state: UserState, query_input: str) -> str:
        """The paper's personalized template with the user's insight and selected history (appendix A.3, the prompt
        the insight guided the synthetic answers with), or LaMP's prompt: history, then the question. A state with
        no insight (unseen, nearest-group) is asked in LaMP's prompt, an unseen user with the question alone."""
        history = state.header.get("history", []) if self.config.history_in_prompt else []
        insight = state.header.get("insight_p") if self.config.insight_prompt else None
        if insight:
            return preference_prompt(self.style, history_block(self.style, history),
                                     self.task.retrieval_query(query_input), insight, True)
        return self.task.join_history(history, query_input)

    def edits(self, states: Sequence[UserState]) -> Mapping[Site, ProjectionEdit] | None:
        """One ProjectionEdit per layer any user in the batch edits; users who do not edit a layer get zero gains.

        A state whose gains are both zero (the "no edit" control) edits nothing, so its rows cost no hook at all."""
        d = self.backbone.hidden_size
        layers = sorted({int(layer) for s in states if s.header["gain_p"] or s.header["gain_n"]
                         for layer in s.tensors["layers"].tolist()})
        if not layers:
            return None
        edits = {}
        for layer in layers:
            theta_p = torch.zeros(len(states), d)
            theta_n = torch.zeros(len(states), d)
            gain_p = torch.zeros(len(states))
            gain_n = torch.zeros(len(states))
            for row, state in enumerate(states):
                where = (state.tensors["layers"] == layer).nonzero()
                if len(where):
                    i = int(where[0, 0])
                    theta_p[row] = state.tensors["theta_p"][i].float()
                    theta_n[row] = state.tensors["theta_n"][i].float()
                    gain_p[row], gain_n[row] = state.header["gain_p"], state.header["gain_n"]
            device = self.backbone.device
            edits[Site("mlp", layer)] = ProjectionEdit(theta_p.to(device), theta_n.to(device), gain_p.to(device),
                                                       gain_n.to(device))
        return edits
