"""What the frozen backbone computes, computed once: generated text and hidden states, cached on disk.

The backbone never changes, so the answer it writes greedily to a prompt, the label it scores best, and a text's
hidden states never change either. Profile summaries, CHAMELEON's insights and synthetic answers and the hidden
states it reads at every layer are therefore cached per model, so re-personalizing a user (new scales, other layers,
a group fit) does not pay for them again.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Callable, Literal, Sequence

import numpy as np
import torch
from torch import Tensor

from tailor.backbone.layers import Site
from tailor.backbone.loading import cache_root
from tailor.backbone.model import Backbone
from tailor.backbone.textcache import KeyValueStore, TextCache, text_key

SAVE_EVERY = 8
"""Batches answered between two writes to the text cache: a run killed while it writes many answers (P2P's summaries
of 160 training users take half an hour) keeps all but the last few batches, and a rerun generates only those."""


def _saved_in_steps(todo: list[tuple[str, object]], batch_size: int) -> list[list[tuple[str, object]]]:
    step = max(1, batch_size) * SAVE_EVERY
    return [todo[i:i + step] for i in range(0, len(todo), step)]


def cached_generate(backbone: Backbone, prompts: Sequence[str], max_new_tokens: int, batch_size: int = 8,
                    cache: TextCache | None = None, progress: Callable[[int], None] | None = None) -> list[str]:
    """Greedy answers to prompts; only prompts not answered before by this model are generated, in batches.
    `progress` is told how many more of the prompts have their answer: the cached ones at once, then each step's."""
    cache = cache or TextCache()
    keys = [text_key("generate", backbone.model_id, str(backbone.dtype), max_new_tokens, p) for p in prompts]
    known = cache.get_many(keys)
    todo = sorted({k: p for k, p in zip(keys, prompts) if k not in known}.items())
    asked = Counter(keys)
    if progress:
        progress(sum(n for k, n in asked.items() if k in known))
    for step in _saved_in_steps(todo, batch_size):
        fresh = dict(zip([k for k, _ in step], backbone.generate([p for _, p in step], max_new_tokens, batch_size)))
        cache.put_many(fresh)
        known.update(fresh)
        if progress:
            progress(sum(asked[k] for k in fresh))
    return [known[k] for k in keys]


def cached_best_label(backbone: Backbone, prompts: Sequence[str], labels: Sequence[str], batch_size: int = 8,
                      cache: TextCache | None = None, content_free: Sequence[str] | None = None) -> list[str]:
    """The label with the highest log-likelihood after each prompt (label scoring), cached like generations.

    With `content_free` (one prompt per prompt, its content replaced by "N/A"), labels are ranked by contextual
    calibration instead: log p(label | prompt) - log p(label | content-free prompt), each over the label set.
    """
    cache = cache or TextCache()
    references = list(content_free) if content_free is not None else [None] * len(prompts)
    if len(references) != len(prompts):
        raise ValueError(f"{len(prompts)} prompts but {len(references)} content-free prompts")
    jobs = list(zip(prompts, references))
    keys = [text_key("best-label", backbone.model_id, str(backbone.dtype), list(labels), p) if r is None else
            text_key("best-label-calibrated", backbone.model_id, str(backbone.dtype), list(labels), p, r)
            for p, r in jobs]
    known = cache.get_many(keys)
    todo = sorted({k: job for k, job in zip(keys, jobs) if k not in known}.items())
    for step in _saved_in_steps(todo, batch_size):
        scores = backbone.score_labels([p for _, (p, _) in step], labels, batch_size)
        if content_free is not None:
            scores = backbone.calibrate(scores, [r for _, (_, r) in step], labels, batch_size)
        fresh = {k: labels[int(i)] for (k, _), i in zip(step, scores.argmax(axis=1))}
        cache.put_many(fresh)
        known.update(fresh)
    return [known[k] for k in keys]


class HiddenCache:
    """Hidden states per (model, sites, reduction, text), stored as float16.

    Every caller gets the float16-rounded values, fresh or cached, so a cached run gives exactly the numbers of the
    run that filled the cache.
    """

    def __init__(self, path: str | Path | None = None):
        self.store: KeyValueStore[bytes] = KeyValueStore(
            Path(path) if path else cache_root() / "hidden-cache.sqlite", "hidden", "BLOB")

    def capture(self, backbone: Backbone, texts: Sequence[str], sites: Sequence[Site],
                reduce: Literal["last", "mean"] = "last", render: bool = True,
                batch_size: int = 8) -> dict[Site, Tensor]:
        """Like `Backbone.capture`, reading what is cached and computing (and storing) only the rest."""
        names = [str(s) for s in sites]
        keys = [text_key("hidden", backbone.model_id, str(backbone.dtype), reduce, render, names, t) for t in texts]
        found = self.store.get_many(keys)
        missing = sorted({k: t for k, t in zip(keys, texts) if k not in found}.items())
        if missing:
            fresh = backbone.capture([t for _, t in missing], sites, reduce=reduce, render=render,
                                     batch_size=batch_size)
            stacked = torch.stack([fresh[s] for s in sites], dim=1).numpy().astype(np.float16)  # (n, sites, d)
            rows = {key: stacked[i].tobytes() for i, (key, _) in enumerate(missing)}
            self.store.put_many(rows)
            found.update(rows)
        d = backbone.hidden_size
        array = np.stack([np.frombuffer(found[k], dtype=np.float16).reshape(len(sites), d) for k in keys]) \
            if keys else np.zeros((0, len(sites), d), dtype=np.float16)
        tensor = torch.from_numpy(array.astype(np.float32))
        return {site: tensor[:, i] for i, site in enumerate(sites)}
