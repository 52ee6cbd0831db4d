"""TAS-B: topic-aware, balanced-margin batch sampling (Hofstätter et al., SIGIR 2021).

Queries are clustered once with FAISS k-means on their embeddings; every batch is drawn from a
single cluster, so the in-batch negatives of a query are documents of topically related queries
(cheap hard negatives, no index refresh). With teacher scores, each query's hard negative is picked
so that the teacher margins ``t(q, d⁺) - t(q, d⁻)`` seen in training are spread evenly over
``n_bins`` equal-width bins instead of piling up where the mined margins are dense.
"""

from __future__ import annotations

from typing import Iterator, Sequence

import numpy as np


def cluster_queries(query_embeddings: np.ndarray, n_clusters: int, seed: int = 0, niter: int = 20,
                    nredo: int = 3) -> np.ndarray:
    """Cluster id per query (FAISS k-means, inner product on L2-normalised embeddings)."""
    import faiss

    x = np.ascontiguousarray(query_embeddings, dtype=np.float32)
    if x.ndim != 2 or len(x) == 0:
        raise ValueError(f"expected a non-empty [queries, dim] array, got shape {x.shape}")
    n_clusters = max(1, min(n_clusters, len(x)))
    if n_clusters == 1:
        return np.zeros(len(x), dtype=np.int64)
    x = x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)
    kmeans = faiss.Kmeans(x.shape[1], n_clusters, niter=niter, nredo=nredo, seed=seed, spherical=True,
                          min_points_per_centroid=1, max_points_per_centroid=1 << 20, verbose=False)
    kmeans.train(x)
    _, assign = kmeans.index.search(x, 1)
    return assign[:, 0].astype(np.int64)


def balanced_margin_choice(margins: Sequence[float], n_bins: int, rng: np.random.Generator,
                           bounds: tuple[float, float] | None = None) -> int:
    """Index of one negative such that its margin bin is chosen uniformly among the occupied bins.

    ``bounds`` fixes the bin range (the training set's min and max margin) so bins mean the same
    thing for every query; by default the query's own margins define it.
    """
    m = np.asarray(margins, dtype=np.float64)
    if m.size == 0:
        raise ValueError("no negatives to choose from")
    lo, hi = bounds if bounds is not None else (float(m.min()), float(m.max()))
    if hi <= lo:
        return int(rng.integers(m.size))
    bins = np.clip(((m - lo) / (hi - lo) * n_bins).astype(np.int64), 0, n_bins - 1)
    chosen_bin = rng.choice(np.unique(bins))
    return int(rng.choice(np.flatnonzero(bins == chosen_bin)))


class TopicAwareBatchSampler:
    """Yields lists of example indices; every list comes from one query cluster.

    Args:
        clusters: cluster id per example (see :func:`cluster_queries`).
        batch_size: queries per batch; a cluster's last batch may be smaller (never mixed).
        seed: shuffles clusters and their members; ``set_epoch`` reshuffles.
        drop_last: drop batches smaller than ``batch_size`` (and always those of one query, which
            would have no in-batch negative).

    Requirements:
        Query embeddings from the model being trained (or any sentence encoder), computed once.

    References:
        - Hofstätter et al., "Efficiently Teaching an Effective Dense Retriever with Balanced Topic
          Aware Sampling", SIGIR 2021. https://arxiv.org/abs/2104.06967
    """

    def __init__(self, clusters: Sequence[int], batch_size: int, seed: int = 0, drop_last: bool = False):
        if batch_size < 2:
            raise ValueError("batch_size must be at least 2 for in-batch negatives")
        self.clusters = np.asarray(clusters, dtype=np.int64)
        self.batch_size = batch_size
        self.seed = seed
        self.drop_last = drop_last
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def batches(self) -> list[list[int]]:
        rng = np.random.default_rng((self.seed, self.epoch))
        out: list[list[int]] = []
        for cluster in np.unique(self.clusters):
            members = rng.permutation(np.flatnonzero(self.clusters == cluster))
            for start in range(0, len(members), self.batch_size):
                chunk = members[start:start + self.batch_size].tolist()
                if len(chunk) < 2 or (self.drop_last and len(chunk) < self.batch_size):
                    continue
                out.append(chunk)
        order = rng.permutation(len(out))  # interleave topics across the epoch
        return [out[i] for i in order]

    def full_batches_order(self) -> list[int]:
        """A flat epoch order in which every consecutive ``batch_size`` block is one full, single-cluster
        batch (the layout a trainer that slices fixed-size batches needs). A cluster's last, short batch
        is completed with other members of the same cluster; clusters smaller than a batch are skipped
        (merge them first)."""
        rng = np.random.default_rng((self.seed, self.epoch, 1))
        blocks: list[list[int]] = []
        for cluster in np.unique(self.clusters):
            members = rng.permutation(np.flatnonzero(self.clusters == cluster))
            if len(members) < self.batch_size:
                continue
            for start in range(0, len(members), self.batch_size):
                chunk = members[start:start + self.batch_size].tolist()
                if len(chunk) < self.batch_size:
                    others = [m for m in members.tolist() if m not in set(chunk)]
                    chunk += rng.choice(others, size=self.batch_size - len(chunk), replace=False).tolist()
                blocks.append(chunk)
        return [i for j in rng.permutation(len(blocks)) for i in blocks[j]]

    def __iter__(self) -> Iterator[list[int]]:
        return iter(self.batches())

    def __len__(self) -> int:
        return len(self.batches())
