"""BM25 over one user's history, the retriever of LaMP's RAG baseline and of PAG, OPPU and P2P profiles.

The index is built once per user (it is part of the user's state for the prompting methods) and queried per input.
Scores come from bm25s with k1=1.5, b=0.75 as in LaMP's rank_bm25, but with Lucene's IDF, log(1 + (N-df+.5)/(df+.5)):
with the classic Okapi IDF a word found in half of a 4-item history weighs zero or less, and LaMP-3/LaMP-7 histories
are that short here. Text is lower-cased and split into word tokens, with no stemming or stop-word list. Ties, which are common in short
histories, go to the newer item, because recency is the better prior when the words say nothing.
"""

from __future__ import annotations

import logging
from typing import Sequence

import bm25s
import numpy as np

# bm25s sets its own logger to DEBUG, which floods any application that configures root logging.
logging.getLogger("bm25s").setLevel(logging.WARNING)


def _tokens(texts: Sequence[str]) -> list[list[str]]:
    return bm25s.tokenize(list(texts), lower=True, stopwords=None, return_ids=False, show_progress=False)


class BM25Index:
    """A BM25 index over a list of documents (a user's history items, oldest first)."""

    def __init__(self, documents: Sequence[str]):
        self.size = len(documents)
        self._bm25 = bm25s.BM25(method="lucene", k1=1.5, b=0.75)
        tokens = _tokens(documents)
        # bm25s cannot index a corpus whose documents are all empty; such a user simply gets recency order.
        self._empty = not any(tokens)
        if not self._empty:
            self._bm25.index(tokens, show_progress=False)

    def scores(self, query: str) -> np.ndarray:
        if self._empty or self.size == 0:
            return np.zeros(self.size)
        words = _tokens([query])[0]
        known = [w for w in words if w in self._bm25.vocab_dict]
        return self._bm25.get_scores(known) if known else np.zeros(self.size)

    def top_k(self, query: str, k: int) -> list[int]:
        """Indices of the k best documents, best first; ties broken towards later (newer) documents."""
        if k <= 0 or self.size == 0:
            return []
        scores = self.scores(query)
        order = np.lexsort((-np.arange(self.size), -scores))
        return order[:k].tolist()
