"""CHAMELEON's representation editing math (Zhang et al. 2025, section 3.2 and appendix A.4).

From the hidden states of self-generated personalized and neutral answers at one layer:

- theta_P, the personalized direction: the top right singular vector of the personalized embeddings H^P (eq. 3).
- theta_N, the non-personalized direction: the normal of the hyperplane a Contrast-Consistent Search probe
  (Burns et al. 2023) finds between the two sides, trained without labels. The probe g(v) = sigmoid(theta^T v + b)
  minimises, averaged over pairs, the consistency loss [g(N) - (1 - g(P))]^2 plus the confidence loss
  min{g(N), g(P)}, as appendix A.4 writes them. Its final loss also ranks layers: CHAMELEON edits the layers where
  the two sides separate best (lowest CCS loss).
- the edit of an MLP output x: strengthen theta_P, x <- x + a_P <x, theta_P>/<theta_P, theta_P> theta_P, then remove
  theta_N, x <- x - a_N <x, theta_N>/<theta_N, theta_N> theta_N. The paper's equations use a_P = a_N = 1.

`ProjectionEdit` applies that edit with a different (theta_P, theta_N, a_P, a_N) on every row of a batch.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from tailor.backbone.edits import ForwardContext


def personal_direction(personal: Tensor) -> Tensor:
    """Top right singular vector of H^P (rows are the personalized embeddings), unit norm.

    A singular vector's sign is arbitrary; it is fixed so that the personalized embeddings project positively on
    it, which makes "strengthen theta_P" mean the same thing for every user.
    """
    _, _, vh = torch.linalg.svd(personal.double(), full_matrices=False)
    direction = vh[0]
    if (personal.double() @ direction).mean() < 0:
        direction = -direction
    return direction.float()


@dataclass
class CCSResult:
    direction: Tensor
    """theta_N as a unit vector in the hidden-state space."""
    bias: float
    loss: float
    """Final CCS loss (consistency + confidence) of the best restart: low means the two sides separate."""


def ccs_loss(probe_p: Tensor, probe_n: Tensor, dim: int | None = None) -> Tensor:
    """Appendix A.4: mean over pairs of [g(N) - (1 - g(P))]^2 + min{g(N), g(P)}."""
    consistency = (probe_n - (1 - probe_p)) ** 2
    confidence = torch.minimum(probe_n, probe_p)
    total = consistency + confidence
    return total.mean() if dim is None else total.mean(dim=dim)


def ccs_direction(personal: Tensor, neutral: Tensor, restarts: int = 4, steps: int = 300, lr: float = 1e-2,
                  seed: int = 0) -> CCSResult:
    """Train a CCS probe on paired embeddings (row i of each side comes from the same query): see ccs_layers."""
    return ccs_layers(personal[:, None], neutral[:, None], restarts, steps, lr, seed)[0]


MIN_PAIRS = 2
"""Pairs CCS needs: with one, each side centred on its own mean is zero, no gradient reaches the probe, θN stays its
random start and every layer's loss ties, so layers would be chosen by index."""


def ccs_layers(personal: Tensor, neutral: Tensor, restarts: int = 4, steps: int = 300, lr: float = 1e-2,
               seed: int = 0) -> list[CCSResult]:
    """One CCS probe per layer for (pairs, layers, dim) embeddings, all layers and restarts trained at once.

    As in Burns et al., each side is centred on its own mean before probing, so the probe cannot solve the task by
    the mean offset alone and must find a direction that separates the pairs consistently; both sides of a layer are
    scaled by one common factor so the learning rate does not depend on the layer's norm. Centring and a common
    scale do not rotate the space, so a probe's weight is a direction in the original hidden-state space. Of the
    restarts, each layer keeps the probe with the lowest final loss.
    """
    if personal.shape != neutral.shape or personal.dim() != 3:
        raise ValueError(f"CCS needs two (pairs, layers, dim) tensors of one shape, got {personal.shape} and "
                         f"{neutral.shape}")
    if personal.shape[0] < MIN_PAIRS:
        raise ValueError(f"CCS needs at least {MIN_PAIRS} pairs, got {personal.shape[0]}: centring one pair on its "
                         "own means leaves both sides zero, and the probe would learn nothing")
    p = personal.double() - personal.double().mean(0)
    n = neutral.double() - neutral.double().mean(0)
    scale = torch.cat([p, n]).norm(dim=2).mean(0).clamp(min=1e-8)  # (layers,)
    p = (p / scale[None, :, None]).float().transpose(0, 1)  # (layers, pairs, dim)
    n = (n / scale[None, :, None]).float().transpose(0, 1)
    layers, _, dim = p.shape
    generator = torch.Generator().manual_seed(seed)
    theta = (torch.randn(restarts, layers, dim, generator=generator) / dim ** 0.5).requires_grad_(True)
    bias = torch.zeros(restarts, layers, 1, requires_grad=True)
    optimizer = torch.optim.Adam([theta, bias], lr=lr)

    def losses() -> Tensor:  # (restarts, layers)
        probe_p = torch.sigmoid(torch.einsum("lkd,rld->rlk", p, theta) + bias)
        probe_n = torch.sigmoid(torch.einsum("lkd,rld->rlk", n, theta) + bias)
        return ccs_loss(probe_p, probe_n, dim=-1)

    for _ in range(steps):
        loss = losses()
        optimizer.zero_grad()
        loss.sum().backward()  # restarts and layers are independent, so the sum trains each on its own loss
        optimizer.step()
    with torch.no_grad():
        final = losses()
        best = final.argmin(dim=0)
        results = []
        for layer in range(layers):
            weight = theta[best[layer], layer]
            results.append(CCSResult(weight / weight.norm().clamp(min=1e-12), bias[best[layer], layer, 0].item(),
                                     final[best[layer], layer].item()))
    return results


def project_edit(x: Tensor, theta_p: Tensor, theta_n: Tensor, gain_p: Tensor, gain_n: Tensor) -> Tensor:
    """Section 3.2's two steps for hidden states x (..., d) with broadcastable directions (..., d) and gains (...)."""
    coef_p = (x * theta_p).sum(-1, keepdim=True) / (theta_p * theta_p).sum(-1, keepdim=True).clamp(min=1e-12)
    edited = x + gain_p[..., None] * coef_p * theta_p
    coef_n = (edited * theta_n).sum(-1, keepdim=True) / (theta_n * theta_n).sum(-1, keepdim=True).clamp(min=1e-12)
    return edited - gain_n[..., None] * coef_n * theta_n


class ProjectionEdit:
    """The CHAMELEON edit of one layer's MLP output for a batch of users.

    Row b uses theta_p[rows[b]], theta_n[rows[b]] and gains[rows[b]]; a user who does not edit this layer has
    gains of zero. Every position of the row is edited, prompt and generated tokens alike, as the paper edits the
    representation for each query.
    """

    def __init__(self, theta_p: Tensor, theta_n: Tensor, gain_p: Tensor, gain_n: Tensor):
        self.theta_p, self.theta_n, self.gain_p, self.gain_n = theta_p, theta_n, gain_p, gain_n

    def __call__(self, hidden: Tensor, ctx: ForwardContext, inputs: Tensor | None = None) -> Tensor:
        rows = ctx.rows if ctx.rows is not None else torch.zeros(hidden.shape[0], dtype=torch.long,
                                                                 device=self.theta_p.device)
        tp, tn = self.theta_p[rows][:, None, :], self.theta_n[rows][:, None, :]
        gp, gn = self.gain_p[rows][:, None], self.gain_n[rows][:, None]
        return project_edit(hidden.float(), tp, tn, gp, gn).to(hidden.dtype)
