"""Personalization methods, all behind the `Personalizer` interface; `build_method` makes one by name."""

from __future__ import annotations

from typing import Any

from tailor.backbone.model import Backbone
from tailor.methods.base import LMPersonalizer, Personalizer, Prediction
from tailor.methods.priors import GlobalPrior, UserPrior
from tailor.methods.prompting import PAG, RAG, FullHistory, NonPersonalized
from tailor.tasks.lamp import Task

METHODS: dict[str, type[Personalizer]] = {
    cls.name: cls for cls in (GlobalPrior, UserPrior, NonPersonalized, RAG, PAG, FullHistory)
}


def build_method(name: str, task: Task, backbone: Backbone | None = None, **options: Any) -> Personalizer:
    cls = METHODS.get(name)
    if cls is None:
        raise KeyError(f"unknown method {name!r}; known methods: {', '.join(METHODS)}")
    return cls(task, backbone if cls.needs_backbone else None, **options)


__all__ = ["METHODS", "LMPersonalizer", "Personalizer", "Prediction", "build_method"]
