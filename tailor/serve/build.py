"""Load what a server config names: one backbone per (model, device, precision), shared by every deployment that names
it, and each deployment's method on it, fitted through the fit cache.

The process that answers and the personalize worker each call `build_methods` on the same config, so each has its own
copy; the first fits (or loads the fit an earlier run cached), the second finds the fit in the cache.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Callable

from tailor.backbone.device import dtype_name, resolve_device, resolve_dtype
from tailor.backbone.model import Backbone
from tailor.data.lamp import DataError, load_users
from tailor.methods import build_method, method_class
from tailor.methods.base import Personalizer
from tailor.runs.fits import fit_method
from tailor.serve.config import DeploymentConfig, ServerConfig
from tailor.tasks.lamp import get_task
from tailor.tasks.records import User

log = logging.getLogger(__name__)


def build_methods(config: ServerConfig, say: Callable[[str], None] = log.info) -> dict[str, Personalizer]:
    """Every deployment's method by deployment name, fitted; `say` hears what takes time."""
    backbones: dict[tuple[str, str, str], Backbone] = {}
    training: dict[str, list[User] | DataError] = {}
    methods: dict[str, Personalizer] = {}
    for spec in config.deployments:
        backbone = _backbone(spec, backbones, say) if method_class(spec.method).needs_backbone else None
        options = {"batch_size": config.batching.max_batch, **spec.options}
        method = build_method(spec.method, get_task(spec.task), backbone, **options)
        users = _training_users(method, config.data_dir, training, say)
        if users:
            if method.fits or method.prerequisites():
                say(f"fitting {spec.name} ({spec.method}) on {len(users)} training users (cached after the first "
                    "time)")
            fit_method(method, users)
        methods[spec.name] = method
    return methods


def _backbone(spec: DeploymentConfig, loaded: dict[tuple[str, str, str], Backbone],
              say: Callable[[str], None]) -> Backbone:
    where = resolve_device(spec.device)
    precision = dtype_name(resolve_dtype(spec.dtype, where))
    key = (spec.model, str(where), precision)
    if key not in loaded:
        say(f"loading {spec.model} on {where} in {precision}")
        loaded[key] = Backbone.load(spec.model, device=str(where), dtype=precision)
    return loaded[key]


def _training_users(method: Personalizer, data_dir: Path | None, cache: dict[str, list[User] | DataError],
                    say: Callable[[str], None]) -> list[User]:
    """The task's training users; none where the data has none and the method does not fit."""
    task = method.task.name
    if task not in cache:
        try:
            cache[task] = load_users(method.task, "train", data_dir)
        except DataError as error:
            cache[task] = error
    found = cache[task]
    if isinstance(found, DataError):
        if method.fits:
            raise found
        say(f"no training users of {task} ({found}); {method.name} does not need them")
        return []
    return found
