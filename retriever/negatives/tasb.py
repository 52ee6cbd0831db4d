"""TAS-B batching (topic-aware, balanced-margin) with an optional distillation loss.

Hofstätter et al., "Efficiently Teaching an Effective Dense Retriever with Balanced Topic Aware
Sampling", SIGIR 2021. The training queries are embedded once (by ``cluster_model``, default the model
being trained) and clustered with FAISS k-means; every global batch is drawn from one cluster, so the
in-batch negatives are topically close. With teacher scores in the data (``pos_scores`` /
``neg_scores`` in FlagEmbedding JSONL, e.g. a cross-encoder's), each query's hard negative is chosen so
its teacher margin falls in a uniformly drawn margin bin, and ``loss`` may distil the teacher:
``margin_mse`` (:class:`retriever.losses.margin_mse.MarginMSELoss`) or ``distill_kl``
(:class:`retriever.losses.distill_kl.DistillKLDivLoss`), instead of the contrastive loss.
"""

from __future__ import annotations

import logging
from typing import Any, Literal

import numpy as np
import torch
from pydantic import Field

from retriever.data import TrainingExample
from retriever.modeling import autocast
from retriever.negatives.base import NegativeStrategy, StrategyOptions, register_strategy
from retriever.tasb import TopicAwareBatchSampler, balanced_margin_choice, cluster_queries

logger = logging.getLogger(__name__)


class TASBOptions(StrategyOptions):
    n_clusters: int | None = Field(None, gt=0, description="k-means clusters (default: queries / (4 x batch))")
    cluster_model: str | None = Field(None, description="model embedding the queries (default: the starting model)")
    hard_per_query: int = Field(0, ge=0, description="hard negatives per query from the data (0: in-batch only)")
    balanced_margins: bool = Field(True, description="pick hard negatives by uniformly drawn teacher-margin bin")
    margin_bins: int = Field(10, gt=1)
    loss: Literal["contrastive", "margin_mse", "distill_kl"] = "contrastive"
    distill_temperature: float = Field(1.0, gt=0, description="softmax temperature of distill_kl")
    student_scale: float = Field(1.0, gt=0, description="multiplier on student scores before distillation "
                                 "(bring cosine scores into the teacher's range)")


@register_strategy("tasb")
class TASBStrategy(NegativeStrategy):
    Options = TASBOptions

    def __init__(self, options=None):
        super().__init__(options)
        self.sampler: TopicAwareBatchSampler | None = None
        self.clusters: np.ndarray | None = None
        self.teacher: dict[tuple[str, str], float] = {}
        self.margin_bounds: tuple[float, float] | None = None

    def prepare(self, trainer: Any) -> None:
        from retriever.modeling import BiEncoder

        examples = trainer.train_examples
        if self.options.loss != "contrastive" and self.options.hard_per_query == 0:
            raise ValueError(f"loss {self.options.loss} distils teacher scores of hard negatives: set hard_per_query >= 1")
        model = BiEncoder.from_pretrained(self.options.cluster_model) if self.options.cluster_model else trainer.model
        emb = model.encode([ex.query for ex in examples], kind="query")
        n_clusters = self.options.n_clusters or max(1, len(examples) // (4 * trainer.global_batch))
        self.setup(examples, emb, n_clusters, trainer.global_batch, trainer.config.training.seed)

    def setup(self, examples: list[TrainingExample], query_emb: np.ndarray, n_clusters: int, batch_size: int,
              seed: int) -> None:
        self.clusters = merge_small_clusters(cluster_queries(query_emb, n_clusters, seed=seed), query_emb, batch_size)
        self.sampler = TopicAwareBatchSampler(self.clusters, batch_size, seed=seed)
        margins = []
        for ex in examples:
            if ex.positive_scores and ex.negative_scores:
                pos = max(ex.positive_scores)
                for text, score in zip(ex.positives, ex.positive_scores):
                    self.teacher[(ex.query, text)] = float(score)
                for text, score in zip(ex.negatives, ex.negative_scores):
                    self.teacher[(ex.query, text)] = float(score)
                    margins.append(pos - float(score))
        if margins:
            self.margin_bounds = (float(np.min(margins)), float(np.max(margins)))
        elif self.options.loss != "contrastive":
            raise ValueError(f"loss {self.options.loss} needs teacher scores (pos_scores / neg_scores) in the data")

    # ------------------------------------------------------------------ hooks
    def epoch_order(self, num_examples: int, seed: int, epoch: int) -> np.ndarray:
        self.sampler.set_epoch(epoch)
        return np.asarray(self.sampler.full_batches_order(), dtype=np.int64)

    def negatives_for(self, example: TrainingExample, rng: np.random.Generator) -> list[str]:
        n = self.options.hard_per_query
        if not n:
            return []
        pool = example.negatives
        if not pool:
            raise ValueError(f"query {example.query_id or example.query[:60]!r} has no hard negatives")
        scored = self.options.balanced_margins and example.negative_scores and example.positive_scores
        if scored:
            pos = max(example.positive_scores)
            margins = [pos - s for s in example.negative_scores]
            return [pool[balanced_margin_choice(margins, self.options.margin_bins, rng, self.margin_bounds)]
                    for _ in range(n)]
        return [pool[i] for i in rng.choice(len(pool), size=n, replace=len(pool) < n)]

    def micro_step(self, trainer: Any, batch, scale: float) -> float | None:
        if self.options.loss == "contrastive":
            return None
        from retriever.losses.distill_kl import DistillKLDivLoss
        from retriever.losses.margin_mse import MarginMSELoss

        model, b, n = trainer.model, len(batch.queries), self.options.hard_per_query
        with autocast(model.device, trainer.bf16):
            q = model.embed(model.tokenize(batch.queries, "query"), "query").float()
            d = model.embed(model.tokenize(batch.documents, "document"), "document").float()
        cands = [[batch.documents[i]] + batch.documents[b + i * n:b + (i + 1) * n] for i in range(b)]
        student = self.options.student_scale * torch.einsum("bd,bcd->bc", q, torch.stack([d[i] for i in _rows(b, n)]).view(b, 1 + n, -1))
        teacher = torch.tensor([[self.teacher[(qt, t)] for t in c] for qt, c in zip(batch.queries, cands)])
        if self.options.loss == "margin_mse":
            loss = MarginMSELoss()(student[:, 0], student[:, 1:], teacher[:, 0], teacher[:, 1:])
        else:
            loss = DistillKLDivLoss(self.options.distill_temperature)(student, teacher)
        (loss * scale).backward()
        return float(loss.detach())

    def state_dict(self) -> dict:
        return {"clusters": None if self.clusters is None else self.clusters.tolist()}


def _rows(b: int, n: int) -> list[int]:
    """Row of each candidate in ``batch.documents``, query-major: positive, then its n negatives."""
    return [r for i in range(b) for r in [i] + list(range(b + i * n, b + (i + 1) * n))]


def merge_small_clusters(clusters: np.ndarray, emb: np.ndarray, batch_size: int) -> np.ndarray:
    """Move members of clusters smaller than a batch into the nearest cluster (by centroid) that is not."""
    clusters = clusters.copy()
    ids, sizes = np.unique(clusters, return_counts=True)
    big = ids[sizes >= batch_size]
    if len(big) == 0:
        return np.zeros_like(clusters)
    centroids = np.stack([emb[clusters == c].mean(0) for c in big])
    for c in ids[sizes < batch_size]:
        members = np.flatnonzero(clusters == c)
        clusters[members] = big[np.argmax(emb[members] @ centroids.T, axis=1)]
    return clusters
