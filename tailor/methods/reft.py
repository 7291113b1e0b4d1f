"""PerFit's intervention (section 3, eq. 2): a LoReFT edit of the residual stream, and its two-stage composition.

    phi(h) = h + R^T (W h + b - R h),    R, W in R^{r x d},  b in R^r,  R R^T = I_r           (eq. 2)
    Phi_PerFit(h) = phi_2(phi_1(h))                                                        (eq. 1)

R is row-orthonormal: it projects h onto an r-dimensional subspace, and R^T maps the edited coordinates back, so
phi replaces the subspace coordinates R h by W h + b and leaves the orthogonal complement alone. As in LoReFT
(Wu et al. 2024) R is kept orthonormal by an orthogonal parametrization (torch's, Householder reflectors for an
r x d matrix), not by a penalty. Weight decay is applied to W and b only: the Householder parametrization stores
the sign of each reflector on the diagonal of its raw tensor, and decaying that raw tensor zeroes rows of R.

The edit touches prompt positions only, the first `first` and the last `last` prompt tokens (LoReFT's "f+l"
positions): generated and target tokens are never edited, in training, label scoring and generation alike, so a
cached prompt is edited once at prefill and the generated tokens read it as they did in training.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Sequence

import torch
from torch import Tensor, nn
from torch.nn.utils.parametrizations import orthogonal

from tailor.backbone.edits import ForwardContext

Params = tuple[Tensor, Tensor, Tensor]
"""(R, W, b) of one layer: (r, d), (r, d), (r,), or with a leading user dimension for a mixed batch."""


def loreft(h: Tensor, R: Tensor, W: Tensor, b: Tensor) -> Tensor:
    """Eq. 2 on hidden states h (..., tokens, d); R, W (..., r, d) and b (..., r) broadcast over the tokens."""
    return h + (h @ W.mT + b.unsqueeze(-2) - h @ R.mT) @ R


@dataclass(frozen=True)
class Positions:
    """Which prompt tokens are edited: the first `first` and the last `last` of each prompt (their union)."""

    first: int
    last: int

    @classmethod
    def parse(cls, text: str) -> "Positions":
        """LoReFT's notation: "f5+l5", "l3", "f1"."""
        found = dict(re.findall(r"([fl])(\d+)", text))
        if not found or re.sub(r"[fl]\d+", "", text).strip("+") != "":
            raise ValueError(f"bad positions {text!r}: expected fN, lN or fN+lM")
        return cls(int(found.get("f", 0)), int(found.get("l", 0)))

    def __str__(self) -> str:
        return "+".join(f"{k}{n}" for k, n in (("f", self.first), ("l", self.last)) if n)

    def select(self, ctx: ForwardContext) -> Tensor:
        """(batch, tokens) mask of edited tokens: real tokens whose absolute position is one of the chosen ones."""
        assert ctx.positions is not None and ctx.prompt_lengths is not None
        pos = ctx.positions
        lengths = ctx.prompt_lengths.to(pos.device)[:, None]
        chosen = (pos < lengths) & ((pos < self.first) | (pos >= lengths - self.last))
        return chosen & ctx.mask if ctx.mask is not None else chosen

    def untouched(self, prompt_lengths: Tensor) -> Tensor:
        """Per row, how many leading tokens no edit reaches (all tokens before the first edited one)."""
        if self.first:
            return torch.zeros_like(prompt_lengths)
        return (prompt_lengths - self.last).clamp(min=0)


class LowRankIntervention(nn.Module):
    """The trainable (R, W, b) of one layer; R stays row-orthonormal through an orthogonal parametrization.

    `identity=True` starts from phi(h) = h (W = R, b = 0), so a second stage begins exactly at the first stage's
    output; otherwise W and b get nn.Linear's initialisation, as LoReFT does.
    """

    def __init__(self, d: int, rank: int, generator: torch.Generator, identity: bool = False):
        super().__init__()
        self.rotate = nn.Linear(d, rank, bias=False)
        self.source = nn.Linear(d, rank)
        with torch.no_grad():
            start = torch.empty(d, rank)
            nn.init.orthogonal_(start, generator=generator)
            self.rotate.weight.copy_(start.T)
            bound = d ** -0.5
            self.source.weight.uniform_(-bound, bound, generator=generator)
            self.source.bias.uniform_(-bound, bound, generator=generator)
        # The parametrization completes R to a square orthogonal base with torch's global RNG; seeding it from our
        # generator (without touching the caller's RNG) makes a user's phi_2 independent of who was trained before.
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(int(torch.randint(2 ** 62, (1,), generator=generator)))
            orthogonal(self.rotate, "weight")
        if identity:
            with torch.no_grad():
                self.source.weight.copy_(self.rotate.weight)
                self.source.bias.zero_()

    def params(self) -> Params:
        return self.rotate.weight, self.source.weight, self.source.bias

    def decayed(self) -> list[nn.Parameter]:
        return [self.source.weight, self.source.bias]

    def rotation_parameters(self) -> list[nn.Parameter]:
        return list(self.rotate.parameters())

    def forward(self, h: Tensor) -> Tensor:
        return loreft(h, *self.params())


def count_parameters(rank: int, d: int, layers: int) -> int:
    """Trainable numbers of one stage: (R, W, b) per layer, r*d + r*d + r (R counted as its r x d entries)."""
    return layers * (2 * rank * d + rank)


class PerFitEdit:
    """Eq. 1 at one layer for a batch: phi_2(phi_1(h)) on the chosen prompt positions, h elsewhere.

    `stages` are applied in order; a stage whose tensors carry a leading user dimension is gathered per row with
    `ctx.rows` (row b uses user rows[b]), so a batch mixing users runs in one forward; a stage without it (the
    collective stage 1) is shared by every row.
    """

    def __init__(self, stages: Sequence[Params], positions: Positions):
        self.stages = list(stages)
        self.positions = positions

    def untouched(self, prompt_lengths: Tensor) -> Tensor:
        """The leading prompt tokens no stage edits: with last-position edits only, a prefix the rows share."""
        return self.positions.untouched(prompt_lengths)

    def __call__(self, hidden: Tensor, ctx: ForwardContext, inputs: Tensor | None = None) -> Tensor:
        # Only the chosen tokens are computed: a handful per row, and none at all in the label-scoring passes that
        # continue a cached prompt.
        batch, token = self.positions.select(ctx).nonzero(as_tuple=True)
        if batch.numel() == 0:
            return hidden
        x = hidden[batch, token].float().unsqueeze(-2)  # (n, 1, d): one "token" per chosen position
        for R, W, b in self.stages:
            R, W, b = R.to(x.device), W.to(x.device), b.to(x.device)  # no-op where they already are
            if R.dim() == 3:
                rows = ctx.rows if ctx.rows is not None else torch.zeros(hidden.shape[0], dtype=torch.long,
                                                                         device=x.device)
                user = rows.to(batch.device)[batch]
                R, W, b = R[user], W[user], b[user]
            x = loreft(x, R, W, b)
        return hidden.index_put((batch, token), x.squeeze(-2).to(hidden.dtype))
