"""Partial forwards equal the full forward: from a cached layer upward, and with a frozen prefix kept as keys/values."""

from __future__ import annotations

import pytest
import torch

from tailor.backbone.edits import ForwardContext, hooked
from tailor.backbone.layers import Site
from tailor.backbone.model import Backbone
from tailor.backbone.partial import freeze, layer_types, logits, suffix_hidden, suffix_loss
from tests.conftest import tiny_backbone

pytestmark = pytest.mark.usefixtures("one_thread")

FAMILIES = ["llama", "qwen2", "gemma3", "qwen3", "mistral", "phi3"]
PROMPTS = ["which tag does this movie relate to", "the review is great and the product is good, what is the score",
           "paraphrase"]
TARGETS = ["dark comedy", "5", "the user love this tweet"]


def full_logits(bb: Backbone, batch) -> torch.Tensor:
    with torch.no_grad():
        return bb.model(input_ids=batch.ids, attention_mask=batch.mask, position_ids=batch.positions).logits


class LastTokens:
    """A test edit: add a per-row vector to the last `n` prompt tokens only (what PerFit's "l" positions touch)."""

    def __init__(self, vectors: torch.Tensor, n: int):
        self.vectors, self.n = vectors, n

    def __call__(self, hidden: torch.Tensor, ctx: ForwardContext, inputs=None) -> torch.Tensor:
        assert ctx.positions is not None and ctx.prompt_lengths is not None and ctx.mask is not None
        lengths = ctx.prompt_lengths[:, None]
        chosen = (ctx.positions < lengths) & (ctx.positions >= lengths - self.n) & ctx.mask
        vec = self.vectors[ctx.rows] if ctx.rows is not None else self.vectors.expand(hidden.shape[0], -1)
        return hidden + chosen[..., None] * vec[:, None, :]


def suffix_logits_match(bb: Backbone, batch, start: int, split: torch.Tensor) -> float:
    """Largest difference between the full forward's logits and the frozen batch's, over every suffix token."""
    expected = full_logits(bb, batch)
    frozen = freeze(bb, batch, start, split)
    with torch.no_grad():
        out = logits(bb, suffix_hidden(bb, frozen))
    lengths, width, worst = batch.mask.sum(1), batch.ids.shape[1], 0.0
    for row in range(batch.ids.shape[0]):
        s, n = int(frozen.positions[row, 0]), int(lengths[row])
        worst = max(worst, (out[row, :n - s] - expected[row, width - n + s:]).abs().max().item())
    return worst


@pytest.mark.parametrize("family", FAMILIES)
def test_running_from_a_cached_layer_equals_the_full_forward(family: str) -> None:
    bb = tiny_backbone(family)
    batch = bb.sft_batch(PROMPTS, TARGETS)
    for start in range(bb.n_layers + 1):
        frozen = freeze(bb, batch, start, torch.zeros(len(PROMPTS), dtype=torch.long))
        assert frozen.prefix_width == 0 and frozen.hidden.shape[1] == batch.ids.shape[1]
        assert suffix_logits_match(bb, batch, start, torch.zeros(len(PROMPTS), dtype=torch.long)) < 1e-5, start


@pytest.mark.parametrize("family", FAMILIES)
def test_frozen_prefix_and_cached_layers_equal_the_full_forward(family: str) -> None:
    bb = tiny_backbone(family)
    batch = bb.sft_batch(PROMPTS, TARGETS)
    split = torch.tensor([batch.prompt_lengths[0] - 2, 0, batch.prompt_lengths[2] - 1])  # one row keeps no prefix
    for start in (0, 1, 2):
        assert freeze(bb, batch, start, split).prefix_width == int(split.max())
        assert suffix_logits_match(bb, batch, start, split) < 1e-5, start
    frozen = freeze(bb, batch, 1, split)
    assert torch.allclose(suffix_loss(bb, frozen), bb.sft_loss(batch), atol=1e-5)
    assert torch.allclose(suffix_loss(bb, frozen, reduction="per_row"), bb.sft_loss(batch, reduction="per_row"),
                          atol=1e-5)


@pytest.mark.parametrize("family", ["llama", "qwen2", "gemma3"])
def test_edits_and_their_gradients_match_the_full_forward(family: str) -> None:
    bb = tiny_backbone(family)
    batch = bb.sft_batch(PROMPTS, TARGETS)
    rows = torch.tensor([1, 0, 1])
    vectors = torch.zeros(2, bb.hidden_size).normal_(generator=torch.Generator().manual_seed(3)).requires_grad_()
    edits = {Site("layer", 1): LastTokens(vectors, 2)}
    with hooked(bb.model, edits) as hooks:
        reference = bb.sft_loss(batch, hooks, rows)
    (expected_grad,) = torch.autograd.grad(reference, vectors)
    frozen = freeze(bb, batch, 1, batch.prompt_lengths - 2)
    assert frozen.hidden.shape[1] < batch.ids.shape[1]  # the prefix really left the trained part
    with hooked(bb.model, edits) as hooks:
        loss = suffix_loss(bb, frozen, hooks, rows)
    (grad,) = torch.autograd.grad(loss, vectors)
    assert loss.item() == pytest.approx(reference.item(), abs=1e-5)
    assert torch.allclose(grad, expected_grad, atol=1e-5)
    assert expected_grad.abs().sum() > 0
    with torch.no_grad():
        plain = bb.sft_loss(batch)
    assert abs(plain.item() - reference.item()) > 1e-4  # the edit is not a no-op


def test_sliding_window_models_keep_no_prefix_longer_than_the_window() -> None:
    bb = tiny_backbone("gemma3")  # sliding window of 64 tokens
    assert "sliding_attention" in layer_types(bb)
    batch = bb.sft_batch([" ".join(["movie"] * 80), "paraphrase"], ["comedy", "5"])
    frozen = freeze(bb, batch, 1, batch.prompt_lengths - 1)
    assert frozen.prefix_width == 0
    assert suffix_loss(bb, frozen).item() == pytest.approx(bb.sft_loss(batch).item(), abs=1e-5)
