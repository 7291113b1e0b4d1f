"""Retrieval over a user's history: BM25 (bm25s) and the packaged sentence embedder."""

from tailor.retrieval.bm25 import BM25Index
from tailor.retrieval.embed import Embedder, default_embedder

__all__ = ["BM25Index", "Embedder", "default_embedder"]
