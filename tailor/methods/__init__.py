"""Personalization methods, all behind the `Personalizer` interface; `build_method` makes one by name.

The registry names each method's class by import path, so listing methods imports none of them (the LoRA family pulls
in peft, DPO pulls in trl) and a method module is only loaded when it is used.
"""

from __future__ import annotations

from importlib import import_module
from typing import Any

from tailor.backbone.model import Backbone
from tailor.methods.base import LMPersonalizer, Personalizer, Prediction
from tailor.tasks.lamp import Task

REGISTRY: dict[str, str] = {
    "global-prior": "tailor.methods.priors:GlobalPrior",
    "user-prior": "tailor.methods.priors:UserPrior",
    "item-prior": "tailor.methods.priors:ItemPrior",
    "none": "tailor.methods.prompting:NonPersonalized",
    "rag": "tailor.methods.prompting:RAG",
    "pag": "tailor.methods.prompting:PAG",
    "full": "tailor.methods.prompting:FullHistory",
    "chameleon": "tailor.methods.chameleon:Chameleon",
    "perfit": "tailor.methods.perfit:PerFit",
    "dpo": "tailor.methods.dpo:TimeConstrainedDPO",
    "mt-lora": "tailor.methods.lora:MTLoRA",
    "lora-p": "tailor.methods.lora:LoRAP",
    "oppu": "tailor.methods.lora:OPPU",
    "stylevector": "tailor.methods.stylevector:StyleVector",
    "p2p": "tailor.methods.p2p:P2P",
    "fusion": "tailor.methods.fusion:Fusion",
    "lexical": "tailor.methods.lexical:LexicalFusion",
}


def method_class(name: str) -> type[Personalizer]:
    """A registered method by name, or any `Personalizer` subclass by import path ("package.module:Class"), so that
    a method written outside tailor runs through `tailor eval`, `tailor personalize` and `tailor serve` unchanged
    (examples/latest_items.py is one)."""
    target = REGISTRY.get(name) or (name if ":" in name else None)
    if target is None:
        raise KeyError(f"unknown method {name!r}; known methods: {', '.join(REGISTRY)}, or module:Class for your own")
    module, _, attr = target.partition(":")
    try:
        cls = getattr(import_module(module), attr)
    except (ImportError, AttributeError) as error:
        if name in REGISTRY:
            raise  # a broken install, not a mistyped --method
        raise KeyError(f"method {name!r}: cannot import {attr} from {module} ({error}); is the folder holding "
                       f"{module.split('.')[0]} on PYTHONPATH?") from None
    if not (isinstance(cls, type) and issubclass(cls, Personalizer)):
        raise KeyError(f"method {name!r} is not a tailor.methods.Personalizer subclass")
    if name in REGISTRY and cls.name != name:
        raise RuntimeError(f"REGISTRY[{name!r}] names {target}, whose name is {cls.name!r}")
    return cls


def build_method(name: str, task: Task, backbone: Backbone | None = None, **options: Any) -> Personalizer:
    cls = method_class(name)
    return cls(task, backbone if cls.needs_backbone else None, **options)


__all__ = ["REGISTRY", "LMPersonalizer", "Personalizer", "Prediction", "build_method", "method_class"]
