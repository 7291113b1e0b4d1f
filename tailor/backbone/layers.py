"""Find the decoder layers, their MLPs and attention blocks in any decoder-only Hugging Face model.

Hook-based libraries break when a family names its modules differently (pyreft fails on Qwen3, Gemma3, Phi-3), so
tailor resolves names in exactly one place: the decoder stack is the `ModuleList` whose length is the model's layer
count, and inside a layer the MLP and attention are found by the attribute names the families use. An override
table covers anything that does not follow the pattern.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from torch import nn

SiteKind = Literal["layer", "mlp", "attn", "q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                   "down_proj"]
_BLOCKS = ("layer", "mlp", "attn")
_PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")

# model_type -> dotted path of the decoder ModuleList, for families the search below would not find.
LAYER_PATH_OVERRIDES: dict[str, str] = {}
_MLP_NAMES = ("mlp", "feed_forward", "ffn")
_ATTN_NAMES = ("self_attn", "attention", "attn")


@dataclass(frozen=True, order=True)
class Site:
    """A place in the network whose output an edit reads or changes: a whole layer, its MLP, its attention, or one of
    their linear projections (q_proj, v_proj, ... found by name inside the layer)."""

    kind: SiteKind
    layer: int

    def __str__(self) -> str:
        return f"{self.kind}.{self.layer}"

    @classmethod
    def parse(cls, text: str) -> "Site":
        kind, _, layer = text.partition(".")
        if kind not in (*_BLOCKS, *_PROJECTIONS) or not layer.isdigit():
            raise ValueError(f"bad site {text!r}: expected KIND.N with KIND one of {', '.join(_BLOCKS + _PROJECTIONS)}")
        return cls(kind, int(layer))  # type: ignore[arg-type]


def num_layers(model: nn.Module) -> int:
    config = getattr(model, "config", None)
    config = getattr(config, "text_config", None) or config
    n = getattr(config, "num_hidden_layers", None)
    if n is None:
        raise ValueError(f"{type(model).__name__} has no config.num_hidden_layers; cannot find its decoder layers")
    return int(n)


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The model's stack of decoder layers."""
    model_type = getattr(getattr(model, "config", None), "model_type", "")
    if model_type in LAYER_PATH_OVERRIDES:
        return model.get_submodule(LAYER_PATH_OVERRIDES[model_type])  # type: ignore[return-value]
    n = num_layers(model)
    candidates = [
        (name, module) for name, module in model.named_modules()
        if isinstance(module, nn.ModuleList) and len(module) == n and name.split(".")[-1] in ("layers", "h", "blocks")
    ]
    if not candidates:
        raise ValueError(
            f"no decoder layer list of length {n} in {type(model).__name__}; "
            f"add its path to tailor.backbone.layers.LAYER_PATH_OVERRIDES[{model_type!r}]"
        )
    # The shortest path is the language model's own stack (a vision tower would sit deeper or elsewhere).
    return min(candidates, key=lambda c: c[0].count("."))[1]  # type: ignore[return-value]


def _child(layer: nn.Module, names: tuple[str, ...], what: str, index: int) -> nn.Module:
    for name in names:
        child = getattr(layer, name, None)
        if isinstance(child, nn.Module):
            return child
    raise ValueError(f"decoder layer {index} ({type(layer).__name__}) has no {what} among {names}")


def site_module(model: nn.Module, site: Site) -> nn.Module:
    layers = decoder_layers(model)
    if not 0 <= site.layer < len(layers):
        raise ValueError(f"site {site}: the model has layers 0..{len(layers) - 1}")
    layer = layers[site.layer]
    if site.kind == "layer":
        return layer
    if site.kind == "mlp":
        return _child(layer, _MLP_NAMES, "MLP", site.layer)
    if site.kind == "attn":
        return _child(layer, _ATTN_NAMES, "attention", site.layer)
    matches = [m for name, m in layer.named_modules() if name.split(".")[-1] == site.kind]
    if len(matches) != 1:
        raise ValueError(f"decoder layer {site.layer} ({type(layer).__name__}) has {len(matches)} modules named "
                         f"{site.kind!r}; fused projections (e.g. Phi-3's qkv_proj) cannot be edited one by one")
    return matches[0]
