"""Exact inner-product top-k search that streams over the corpus in blocks.

Each block is searched with ``faiss.knn`` (BLAS, blocked internally, no copy of the block) and
merged into a running top-k heap (``faiss.ResultHeap``), so memory is the embeddings you hand
in plus ``n_queries × k`` results: never a query × corpus score matrix.
"""

from __future__ import annotations

from typing import Iterable, Iterator

import numpy as np

DEFAULT_BLOCK = 65_536


def iter_blocks(matrix: np.ndarray, block_size: int = DEFAULT_BLOCK) -> Iterator[np.ndarray]:
    """Row blocks of ``matrix`` as views (no copy when the matrix is float32 and C-contiguous)."""
    for start in range(0, matrix.shape[0], block_size):
        yield matrix[start:start + block_size]


class TopK:
    """Running top-k by inner product over document blocks fed one at a time."""

    def __init__(self, query_emb: np.ndarray, k: int):
        import faiss

        self.queries = np.ascontiguousarray(query_emb, dtype=np.float32)
        if self.queries.ndim != 2:
            raise ValueError(f"query embeddings must be 2-D, got shape {self.queries.shape}")
        self.k = int(k)
        self.heap = faiss.ResultHeap(self.queries.shape[0], self.k, keep_max=True)
        self.seen = 0

    def add(self, block: np.ndarray) -> None:
        import faiss

        block = np.ascontiguousarray(block, dtype=np.float32)
        if block.ndim != 2 or block.shape[1] != self.queries.shape[1]:
            raise ValueError(f"document block has shape {block.shape}; expected (n, {self.queries.shape[1]})")
        if block.shape[0]:
            kb = min(self.k, block.shape[0])
            scores, rows = faiss.knn(self.queries, block, kb, metric=faiss.METRIC_INNER_PRODUCT)
            self.heap.add_result(scores, rows + self.seen)
        self.seen += block.shape[0]

    def result(self) -> tuple[np.ndarray, np.ndarray]:
        """(scores, rows), each ``n_queries × k``, best first; rows = -1 where the corpus ran out."""
        self.heap.finalize()
        scores, rows = self.heap.D, self.heap.I
        rows[scores <= -np.finfo(np.float32).max] = -1  # faiss leaves -FLT_MAX in unfilled slots
        return scores, rows


def exact_search(query_emb: np.ndarray, docs: np.ndarray | Iterable[np.ndarray], k: int,
                 block_size: int = DEFAULT_BLOCK) -> tuple[np.ndarray, np.ndarray]:
    """Top-``k`` documents per query by inner product (cosine for normalised embeddings).

    ``docs`` is a ``n_docs × dim`` matrix or an iterable of row blocks (e.g. embeddings encoded
    block by block, or memory-mapped shards); row numbers count across blocks in order.
    """
    top = TopK(query_emb, k)
    blocks = iter_blocks(docs, block_size) if isinstance(docs, np.ndarray) else docs
    for block in blocks:
        top.add(block)
    return top.result()
