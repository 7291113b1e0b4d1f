"""StyleVector (Zhang et al. 2025, "Personalized Text Generation with Contrastive Activation Steering").

Section 3.2, style vector extraction: for every history item the user's real output y_u and the model's own,
style-agnostic answer ŷ to the same input x are read at one layer, at the last token of (x, y); the user's style
vector is the difference of the means, s_u = mean h_l(x ⊕ y_u) − mean h_l(x ⊕ ŷ) (the paper's mean-difference
variant, which it finds as good as the learned ones). Section 3.3, steering: at inference s_u, times a scale α, is
added to the hidden state of that layer, so a user costs one vector of the backbone's width and no prompt tokens.

The model's own answers are what the backbone says to x with no history: greedy text for generation tasks, the
best-scoring label for label-scored tasks (the answer the non-personalized model would give); both are cached on
disk, as are the hidden states. Steering covers either every token (`positions="all"`) or, as the vector was read
at the last token of (x, y), the last prompt token and what follows it (`positions="answer"`): the tokens that
produce the answer.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Sequence

import torch
from torch import Tensor

from tailor.backbone.cache import HiddenCache, cached_best_label, cached_generate
from tailor.backbone.edits import ForwardContext
from tailor.backbone.layers import Site
from tailor.methods.base import LMConfig, LMPersonalizer, Progress
from tailor.store.state import UserState
from tailor.tasks.records import User


@dataclass
class StyleVectorConfig(LMConfig):
    layer: int = 3
    """Decoder layer whose output is read and steered. Layer 3 and scale 0.5 were the best of 8 layers x 4 scales by
    the gold answer's NLL on 24 LaMP-2N training users (`benchmarks.lora_family --search-stylevector`, BENCHMARKS.md);
    the other tasks have not been searched yet."""
    scale: float = 0.5
    positions: Literal["all", "answer"] = "answer"
    max_items: int = 32
    """Newest history items the vector is averaged over."""
    answer_tokens: int | None = None
    """Length of the model's own answers on generation tasks (default: the task's max_new_tokens)."""


class Steer:
    """Add `scale · vectors[rows[b]]` to row b's hidden states, at every token or from the last prompt token on."""

    def __init__(self, vectors: Tensor, scale: float, positions: Literal["all", "answer"]):
        self.vectors = vectors
        self.scale = scale
        self.positions = positions

    def untouched(self, prompt_lengths: Tensor) -> Tensor:
        """Steering from the last prompt token on leaves every earlier token alone; steering all tokens, none."""
        return (prompt_lengths - 1).clamp(min=0) if self.positions == "answer" else torch.zeros_like(prompt_lengths)

    def __call__(self, hidden: Tensor, ctx: ForwardContext, inputs: Tensor | None = None) -> Tensor:
        vec = self.vectors[ctx.rows] if ctx.rows is not None else self.vectors[:1].expand(hidden.shape[0], -1)
        shift = self.scale * vec[:, None, :].to(hidden.dtype)
        if self.positions == "all":
            return hidden + shift
        assert ctx.positions is not None and ctx.prompt_lengths is not None
        answer = ctx.positions >= (ctx.prompt_lengths[:, None] - 1)
        if ctx.mask is not None:
            answer = answer & ctx.mask
        return hidden + shift * answer[:, :, None].to(hidden.dtype)


class StyleVector(LMPersonalizer[StyleVectorConfig]):
    name = "stylevector"
    version = 2  # 2: LaMP-7 contrasts the user's tweets with the model's own, after "tweet:"
    update_note = "the style vector is a mean over every history item's hidden states: rebuilt (the hidden-state " \
                  "cache serves unchanged items)"

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        if not 0 <= self.config.layer < self.backbone.n_layers:
            raise ValueError(f"stylevector layer {self.config.layer}: the model has layers "
                             f"0..{self.backbone.n_layers - 1}")
        self.hidden = HiddenCache()

    @property
    def site(self) -> Site:
        return Site("layer", self.config.layer)

    def own_answers(self, inputs: Sequence[str]) -> list[str]:
        """The backbone's answers to the bare questions, as the non-personalized model gives them."""
        if self.scoring:
            return cached_best_label(self.backbone, inputs, self.task.labels, self.config.batch_size)
        max_new = self.config.answer_tokens or self.task.max_new_tokens
        raw = cached_generate(self.backbone, list(inputs), max_new, self.config.batch_size)
        return [self.task.parse(text) for text in raw]

    def contrast(self, users: Sequence[User], sites: Sequence[Site]) -> list[tuple[Tensor, Tensor, int]]:
        """Per user: hidden states (items, sites, d) after the user's outputs and after the model's, and how many
        items the model already answered as the user did (their difference is zero)."""
        examples = [[self.task.example(item) for item in u.profile[-self.config.max_items:]] for u in users]
        inputs = [x for pairs in examples for x, _ in pairs]
        own = self.own_answers(inputs)
        texts = []
        for (x, y_user), y_model in zip([p for pairs in examples for p in pairs], own):
            rendered = self.backbone.render(x)
            texts.extend([rendered + y_user, rendered + y_model])
        captured = self.hidden.capture(self.backbone, texts, sites, render=False,
                                       batch_size=self.config.batch_size) if texts else {}
        stacked = torch.stack([captured[s] for s in sites], dim=1) if texts else \
            torch.zeros(0, len(sites), self.backbone.hidden_size)
        out, start = [], 0
        for pairs in examples:
            n = len(pairs)
            block = stacked[2 * start:2 * (start + n)]
            same = sum(1 for (_, y), o in zip(pairs, own[start:start + n]) if y.strip() == o.strip())
            out.append((block[0::2], block[1::2], same))
            start += n
        return out

    def personalize(self, user: User) -> UserState:
        return self.personalize_many([user])[0]

    def personalize_many(self, users: Sequence[User], progress: Progress = None) -> list[UserState]:
        states = []
        for user, (h_user, h_model, same) in zip(users, self.contrast(users, [self.site])):
            vector = (h_user[:, 0].mean(0) - h_model[:, 0].mean(0)) if len(h_user) else \
                torch.zeros(self.backbone.hidden_size)
            header = {"layer": self.config.layer, "items": len(h_user), "same_answer": same,
                      "norm": round(float(vector.norm()), 4)}
            states.append(self.new_state(user, header, {"vector": vector.float()}))
        if progress:
            progress(len(users))
        return states

    def prompt(self, state: UserState, query_input: str) -> str:
        return query_input

    def edits(self, states: Sequence[UserState]) -> dict[Site, Steer]:
        layers = {int(s.header["layer"]) for s in states}
        if layers != {self.config.layer}:
            raise ValueError(f"states made at layer(s) {sorted(layers)}, this StyleVector steers layer "
                             f"{self.config.layer}; personalize the users again")
        vectors = torch.stack([s.tensors["vector"].to(self.backbone.device) for s in states])
        return {self.site: Steer(vectors, self.config.scale, self.config.positions)}
