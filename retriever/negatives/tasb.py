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
from retriever.distributed import gather_with_grad
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
    student_scale: float | None = Field(None, gt=0, description="multiplier on student scores before distillation "
                                        "(default 1 / training.temperature: normalised cosine scores in [-1, 1] "
                                        "cannot match a cross-encoder's margins at scale 1)")
    inbatch_weight: float = Field(1.0, ge=0.0, description="weight of the in-batch teacher term (dual supervision: "
                                  "other queries' documents the data has teacher scores for); 0: pairwise only")


@register_strategy("tasb")
class TASBStrategy(NegativeStrategy):
    Options = TASBOptions

    @classmethod
    def uses_trainer_loss(cls, options: TASBOptions) -> bool:
        return options.loss == "contrastive"  # the distillation losses run in micro_step

    def __init__(self, options=None):
        super().__init__(options)
        self.sampler: TopicAwareBatchSampler | None = None
        self.clusters: np.ndarray | None = None
        self.teacher: dict[tuple[str, str], float] = {}
        self.margin_bounds: tuple[float, float] | None = None
        self.student_scale = self.options.student_scale or 20.0
        self._order: tuple[int, np.ndarray] | None = None  # (epoch, order): built once per epoch
        self.last_inbatch_pairs = 0
        self._inbatch_pairs: list[int] = []

    def prepare(self, trainer: Any) -> None:
        from retriever.checkpoint import load_strategy_state
        from retriever.modeling import BiEncoder

        examples = trainer.train_examples
        if self.options.loss != "contrastive" and self.options.hard_per_query == 0:
            raise ValueError(f"loss {self.options.loss} distils teacher scores of hard negatives: set hard_per_query >= 1")
        self.student_scale = self.options.student_scale or 1.0 / trainer.config.training.temperature
        seed = trainer.config.training.seed
        saved = load_strategy_state(trainer.resume_from).get("clusters") if trainer.resume_from else None
        if saved is not None:  # resume: the original run's clusters, not a re-clustering with trained weights
            clusters = np.asarray(saved, dtype=np.int64)
            if len(clusters) != len(examples):
                raise ValueError(f"checkpoint {trainer.resume_from} holds TAS-B clusters for {len(clusters)} "
                                 f"queries but the data has {len(examples)}; resume with the run's own data")
            self.use_clusters(examples, clusters, trainer.global_batch, seed)
            return
        model = BiEncoder.from_pretrained(self.options.cluster_model) if self.options.cluster_model else trainer.model
        emb = model.encode([ex.query for ex in examples], kind="query")
        n_clusters = self.options.n_clusters or max(1, len(examples) // (4 * trainer.global_batch))
        self.setup(examples, emb, n_clusters, trainer.global_batch, seed)

    def setup(self, examples: list[TrainingExample], query_emb: np.ndarray, n_clusters: int, batch_size: int,
              seed: int) -> None:
        clusters = merge_small_clusters(cluster_queries(query_emb, n_clusters, seed=seed), query_emb, batch_size)
        self.use_clusters(examples, clusters, batch_size, seed)

    def use_clusters(self, examples: list[TrainingExample], clusters: np.ndarray, batch_size: int, seed: int) -> None:
        """Batch from these clusters; index the teacher scores and the margin range of the data."""
        self.clusters = np.asarray(clusters, dtype=np.int64)
        self.sampler = TopicAwareBatchSampler(self.clusters, batch_size, seed=seed)
        self._order = None
        margins = []
        for ex in examples:
            if ex.positive_scores and ex.negative_scores:
                for text, score in zip(ex.positives, ex.positive_scores):
                    self.teacher[(ex.query, text)] = float(score)
                for text, score in zip(ex.negatives, ex.negative_scores):
                    self.teacher[(ex.query, text)] = float(score)
                # any positive may be the one drawn: the margin range covers every (positive, negative) pair
                margins.extend(float(p) - float(n) for p in ex.positive_scores for n in ex.negative_scores)
        if margins:
            self.margin_bounds = (float(np.min(margins)), float(np.max(margins)))
        elif self.options.loss != "contrastive":
            raise ValueError(f"loss {self.options.loss} needs teacher scores (pos_scores / neg_scores) in the data")

    # ------------------------------------------------------------------ hooks
    def epoch_order(self, num_examples: int, seed: int, epoch: int) -> np.ndarray:
        """Built once per epoch (the trainer asks at every step; at 503k queries a build takes ~1 s)."""
        if self._order is None or self._order[0] != epoch:
            self.sampler.set_epoch(epoch)
            self._order = (epoch, np.asarray(self.sampler.full_batches_order(), dtype=np.int64))
        return self._order[1]

    def negatives_for(self, example: TrainingExample, rng: np.random.Generator) -> list[str]:
        """Without a drawn positive (direct calls), margins are taken against the best-scored positive."""
        best = int(np.argmax(example.positive_scores)) if example.positive_scores else 0
        return self.negatives_given_positive(example, best, rng)

    def negatives_given_positive(self, example: TrainingExample, positive: int, rng: np.random.Generator) -> list[str]:
        n = self.options.hard_per_query
        if not n:
            return []
        pool = example.negatives
        if not pool:
            raise ValueError(f"query {example.query_id or example.query[:60]!r} has no hard negatives")
        scored = self.options.balanced_margins and example.negative_scores and example.positive_scores
        if scored:
            pos = example.positive_scores[positive]  # the positive actually in the batch
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
        # Pairwise term: each query's drawn positive (row i) against its own hard negatives.
        cands = [[batch.documents[i]] + batch.documents[b + i * n:b + (i + 1) * n] for i in range(b)]
        student = self.student_scale * torch.einsum("bd,bcd->bc", q, torch.stack([d[i] for i in _rows(b, n)]).view(b, 1 + n, -1))
        teacher = torch.tensor([[self.teacher[(qt, t)] for t in c] for qt, c in zip(batch.queries, cands)],
                               device=student.device)
        if self.options.loss == "margin_mse":
            loss = MarginMSELoss()(student[:, 0], student[:, 1:], teacher[:, 0], teacher[:, 1:])
        else:
            loss = DistillKLDivLoss(self.options.distill_temperature)(student, teacher)
        if self.options.inbatch_weight > 0:
            inbatch = self.inbatch_loss(batch, q, gather_with_grad(d, trainer.dist), student[:, 0], teacher[:, 0], cands)
            if inbatch is not None:
                loss = loss + self.options.inbatch_weight * inbatch
        (loss * scale).backward()
        return float(loss.detach())

    def inbatch_loss(self, batch, q: torch.Tensor, d_all: torch.Tensor, student_pos: torch.Tensor,
                     teacher_pos: torch.Tensor, own: list[list[str]]) -> torch.Tensor | None:
        """TAS-B's in-batch teacher term: query i against the other queries' documents of the global batch,
        wherever the data holds a teacher score for that (query, document) pair. ``margin_mse``: MarginMSE of
        every such (drawn positive, in-batch document) margin; ``distill_kl``: KL over each query's positive
        plus its scored in-batch documents. None when the batch has no such pair."""
        docs = batch.global_documents
        known = torch.zeros(len(batch.queries), len(docs), dtype=torch.bool)
        values = torch.zeros(len(batch.queries), len(docs))
        for i, query in enumerate(batch.queries):
            mine = set(own[i])
            for j, text in enumerate(docs):
                score = self.teacher.get((query, text))
                if score is not None and text not in mine and not batch.exclude[i, j]:
                    known[i, j], values[i, j] = True, score
        self.last_inbatch_pairs = int(known.sum())
        self._inbatch_pairs.append(self.last_inbatch_pairs)
        if not known.any():
            return None
        known, values = known.to(q.device), values.to(q.device)
        student = self.student_scale * (q @ d_all.T)
        if self.options.loss == "margin_mse":
            student_margin = student_pos[:, None] - student
            teacher_margin = teacher_pos[:, None] - values
            return torch.nn.functional.mse_loss(student_margin[known], teacher_margin[known])
        rows = known.any(dim=1)
        t = self.options.distill_temperature
        s_list = torch.cat([student_pos[:, None], student.masked_fill(~known, torch.finfo(student.dtype).min)], dim=1)[rows]
        t_list = torch.cat([teacher_pos[:, None], values.masked_fill(~known, float("-inf"))], dim=1)[rows]
        s_log = torch.log_softmax(s_list / t, dim=1)
        t_log = torch.log_softmax(t_list / t, dim=1)
        keep = torch.isfinite(t_log)
        kl = (t_log.exp() * (t_log - s_log)).masked_fill(~keep, 0.0).sum(1)
        return kl.mean() * t ** 2

    def log_metrics(self) -> dict:
        if self.options.loss == "contrastive" or not self.options.inbatch_weight:
            return {}
        pairs = float(np.mean(self._inbatch_pairs)) if self._inbatch_pairs else 0.0
        self._inbatch_pairs = []
        return {"tasb_inbatch_pairs": round(pairs, 3)}

    def state_dict(self) -> dict:
        return {"clusters": None if self.clusters is None else self.clusters.copy()}


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
