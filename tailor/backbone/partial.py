"""Run part of the decoder: from a cached residual stream upward, with a frozen prompt prefix kept as keys/values.

Why: an edit of the residual stream at layers >= L (PerFit's interventions) cannot change anything below L, and an
edit of the last prompt tokens cannot change any earlier token (attention is causal). When such an edit is trained
for several epochs on the same examples, the residual stream entering layer L and the keys/values of every token
before the first edited one are the same at every step. `freeze` computes them once (no gradient); `suffix_loss`
then runs only the remaining tokens through layers L..n-1, so a training step costs a few tokens times a few layers
instead of the whole sequence through the whole network.

Running decoder layers outside the model's own forward needs the causal mask and the rotary embeddings built exactly
as the model builds them; `layer_inputs` follows transformers 5's LlamaModel / Qwen2Model / Gemma3TextModel forward:
one mask per attention type (masking_utils' LAYER_PATTERN_TO_MASK_FUNCTION_MAPPING), rotary embeddings per layer type
when the rotary module takes one (Gemma3), and a cache sized by the first layer of each type that is run. Forward
hooks (tailor's edits) fire as in a full forward, because the layers are called as modules.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from transformers import DynamicCache
from transformers.masking_utils import LAYER_PATTERN_TO_MASK_FUNCTION_MAPPING

from tailor.backbone.edits import HookSet
from tailor.backbone.layers import decoder_layers
from tailor.backbone.model import Backbone, Batch


def _config(backbone: Backbone):
    return backbone.model.config.get_text_config(decoder=True)


def _base(backbone: Backbone) -> nn.Module:
    """The decoder stack's owner (embeddings, rotary embedding, final norm): LlamaModel and its relatives."""
    return backbone.model.get_decoder()


def layer_types(backbone: Backbone) -> list[str]:
    """The attention type of each layer, as the model's forward picks its mask.

    Families with `config.layer_types` (Qwen2/3, Gemma3) say it per layer; the others (Llama, Mistral, Phi-3) use a
    sliding-window mask everywhere when `config.sliding_window` is set and a full causal mask otherwise.
    """
    config = _config(backbone)
    types = getattr(config, "layer_types", None)
    if types:
        return list(types)[:backbone.n_layers]
    kind = "sliding_attention" if getattr(config, "sliding_window", None) is not None else "full_attention"
    return [kind] * backbone.n_layers


def _sliding_window(backbone: Backbone) -> int | None:
    if "sliding_attention" not in layer_types(backbone):
        return None
    return getattr(_config(backbone), "sliding_window", None)


@dataclass
class LayerInputs:
    """What every decoder layer receives besides the hidden state: its mask and rotary embedding, by layer type."""

    masks: dict[str, Any]
    rotary: dict[str, tuple[Tensor, Tensor]]
    positions: Tensor
    types: list[str]


def layer_inputs(backbone: Backbone, hidden: Tensor, mask: Tensor, positions: Tensor,
                 cache: DynamicCache | None = None, start: int = 0) -> LayerInputs:
    """Masks and rotary embeddings for running layers `start`.. on `hidden` (batch, tokens, d).

    `mask` covers the cached tokens and then these tokens (batch, cached + tokens); `positions` are these tokens'
    absolute positions. Each mask is sized by the first layer of its type at or after `start`, since with a cache
    only those layers hold keys.
    """
    config = _config(backbone)
    if getattr(config, "use_bidirectional_attention", False):
        raise ValueError("partial forwards support causal decoders only (this config uses bidirectional attention)")
    types = layer_types(backbone)
    base = _base(backbone)
    masks: dict[str, Any] = {}
    rotary: dict[str, tuple[Tensor, Tensor]] = {}
    per_type = "layer_type" in inspect.signature(base.rotary_emb.forward).parameters
    for index in range(start, len(types)):
        kind = types[index]
        if kind in masks:
            continue
        masks[kind] = LAYER_PATTERN_TO_MASK_FUNCTION_MAPPING[kind](
            config=config, inputs_embeds=hidden, attention_mask=mask, cache=cache, position_ids=positions,
            layer_idx=index if cache is not None else None)
        rotary[kind] = base.rotary_emb(hidden, positions, kind) if per_type else base.rotary_emb(hidden, positions)
    return LayerInputs(masks, rotary, positions, types)


def embed(backbone: Backbone, ids: Tensor) -> Tensor:
    """Token embeddings as the model's forward makes them (Gemma3's embedding module applies its own scale)."""
    return _base(backbone).embed_tokens(ids)


def run_layers(backbone: Backbone, hidden: Tensor, inputs: LayerInputs, start: int, stop: int,
               cache: DynamicCache | None = None) -> Tensor:
    """The residual stream after running decoder layers start..stop-1 on `hidden` (the stream entering `start`)."""
    layers = decoder_layers(backbone.model)
    for index in range(start, stop):
        kind = inputs.types[index]
        hidden = layers[index](hidden, attention_mask=inputs.masks[kind], position_embeddings=inputs.rotary[kind],
                               position_ids=inputs.positions, cache=cache, use_cache=cache is not None)
    return hidden


def logits(backbone: Backbone, hidden: Tensor) -> Tensor:
    """Final norm, LM head and (Gemma) logit soft-capping, as the causal-LM forward applies them."""
    out = backbone.model.get_output_embeddings()(_base(backbone).norm(hidden))
    cap = getattr(_config(backbone), "final_logit_softcapping", None)
    return torch.tanh(out / cap) * cap if cap else out


@dataclass
class FrozenBatch:
    """A training batch cut where edits begin, with everything the edits cannot change computed once.

    Row b's first `split[b]` tokens (the frozen prefix) are kept only as keys/values of layers >= `start`, left-padded
    to a common width; the remaining tokens (the suffix: edited prompt tokens and the target) are right-padded and
    kept as the residual stream entering layer `start`, with their absolute positions and labels.
    """

    start: int
    keys: list[Tensor]
    values: list[Tensor]
    prefix_mask: Tensor
    hidden: Tensor
    mask: Tensor
    positions: Tensor
    prompt_lengths: Tensor
    labels: Tensor | None

    @property
    def prefix_width(self) -> int:
        return self.prefix_mask.shape[1]

    def cache(self, backbone: Backbone) -> DynamicCache | None:
        """A fresh cache holding the prefix keys/values (a step appends to it, so each step needs its own)."""
        if not self.prefix_width:
            return None
        data: list[tuple[Tensor | None, Tensor | None]] = [(None, None)] * self.start
        data += list(zip(self.keys, self.values))
        return DynamicCache(data, config=backbone.model.config)


def _rows_to(sequences: list[list[int]], width: int, fill: int, side: Literal["left", "right"]) -> Tensor:
    out = torch.full((len(sequences), width), fill, dtype=torch.long)
    for row, seq in enumerate(sequences):
        if seq:
            if side == "left":
                out[row, width - len(seq):] = torch.tensor(seq)
            else:
                out[row, :len(seq)] = torch.tensor(seq)
    return out


@torch.no_grad()
def freeze(backbone: Backbone, batch: Batch, start: int, split: Tensor) -> FrozenBatch:
    """Compute once what edits at layers >= `start` on tokens at positions >= `split[b]` cannot change.

    `split` may be all zeros (edits reach the first prompt token): then only the layers below `start` are saved.
    A model with sliding-window layers keeps no prefix when a sequence is longer than its window (its cache would
    drop keys the full forward still attends to), so the split then falls back to zero.
    """
    lengths = batch.mask.sum(1)
    split = torch.minimum(split.to(torch.long).clamp(min=0), lengths)
    window = _sliding_window(backbone)
    if window is not None and int(lengths.max()) > window:
        split = torch.zeros_like(split)
    width = batch.ids.shape[1]
    device = backbone.device
    real = [batch.ids[row, width - int(n):].tolist() for row, n in enumerate(lengths)]
    labels = [batch.labels[row, width - int(n):].tolist() for row, n in enumerate(lengths)] \
        if batch.labels is not None else None
    prefixes = [seq[:int(s)] for seq, s in zip(real, split)]
    suffixes = [seq[int(s):] for seq, s in zip(real, split)]
    pad = backbone.tokenizer.pad_token_id
    prefix_width = max(len(p) for p in prefixes)
    suffix_width = max(len(s) for s in suffixes)
    prefix_mask = _rows_to([[1] * len(p) for p in prefixes], prefix_width, 0, "left").to(device)
    suffix_mask = _rows_to([[1] * len(s) for s in suffixes], suffix_width, 0, "right").to(device)
    suffix_ids = _rows_to(suffixes, suffix_width, pad, "right").to(device)
    positions = (split[:, None] + torch.arange(suffix_width)[None, :]).to(device)
    keys: list[Tensor] = []
    values: list[Tensor] = []
    cache = None
    if prefix_width:
        prefix_ids = _rows_to(prefixes, prefix_width, pad, "left").to(device)
        prefix_positions = (prefix_mask.cumsum(-1) - 1).clamp(min=0)
        cache = DynamicCache(config=backbone.model.config)
        hidden = embed(backbone, prefix_ids)
        inputs = layer_inputs(backbone, hidden, prefix_mask, prefix_positions, cache)
        run_layers(backbone, hidden, inputs, 0, backbone.n_layers, cache)
        keys = [cache.layers[i].keys for i in range(start, backbone.n_layers)]
        values = [cache.layers[i].values for i in range(start, backbone.n_layers)]
    hidden = embed(backbone, suffix_ids)
    full_mask = torch.cat([prefix_mask, suffix_mask], dim=1)
    if start:
        inputs = layer_inputs(backbone, hidden, full_mask, positions, cache)
        hidden = run_layers(backbone, hidden, inputs, 0, start, cache)
    suffix_labels = _rows_to([lab[int(s):] for lab, s in zip(labels, split)], suffix_width, -100, "right").to(device) \
        if labels is not None else None
    return FrozenBatch(start, keys, values, prefix_mask, hidden, suffix_mask, positions,
                       batch.prompt_lengths.to(device), suffix_labels)


def suffix_hidden(backbone: Backbone, frozen: FrozenBatch, hooks: HookSet | None = None,
                  rows: Tensor | None = None) -> Tensor:
    """The last layer's residual stream for the suffix tokens, with whatever edits `hooks` holds applied."""
    if hooks is not None:
        hooks.ctx.rows = rows
        hooks.ctx.positions = frozen.positions
        hooks.ctx.prompt_lengths = frozen.prompt_lengths
        hooks.ctx.mask = frozen.mask.bool()
    cache = frozen.cache(backbone)
    full_mask = torch.cat([frozen.prefix_mask, frozen.mask], dim=1)
    inputs = layer_inputs(backbone, frozen.hidden, full_mask, frozen.positions, cache, frozen.start)
    return run_layers(backbone, frozen.hidden, inputs, frozen.start, backbone.n_layers, cache)


def suffix_loss(backbone: Backbone, frozen: FrozenBatch, hooks: HookSet | None = None, rows: Tensor | None = None,
                reduction: Literal["mean", "per_row"] = "mean") -> Tensor:
    """`Backbone.sft_loss` on a frozen batch: next-token cross-entropy on the labelled tokens.

    Only the positions that predict a labelled token go through the LM head (a 49k-word head costs a fifth of a
    SmolLM2 forward per token).
    """
    assert frozen.labels is not None
    hidden = suffix_hidden(backbone, frozen, hooks, rows)
    target = frozen.labels[:, 1:]
    where = (target != -100).nonzero(as_tuple=True)
    predicted = logits(backbone, hidden[:, :-1][where]).float()
    loss = F.cross_entropy(predicted, target[where], reduction="none")
    counts = (target != -100).sum(-1)
    if reduction == "mean":
        return loss.sum() / counts.sum().clamp(min=1)
    per_row = torch.zeros(target.shape[0], dtype=loss.dtype, device=loss.device).index_add(0, where[0], loss)
    return per_row / counts.clamp(min=1)
