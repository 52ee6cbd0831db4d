"""ADORE: train the query encoder against negatives it retrieves itself, live, from a frozen index.

Zhan et al., "Optimizing Dense Retrieval Model Training with Hard Negatives", SIGIR 2021. The document
encoder is frozen and the corpus is encoded into a FAISS index once. At every step the current query
encoder embeds the batch's queries, retrieves their top-k from that index (positives excluded) and is
trained with the ΔMRR-weighted LambdaLoss over positive + retrieved negatives
(:class:`retriever.losses.lambda_rank.LambdaRankLoss`). Document embeddings are read from the index's
store, never recomputed, so a step costs one query forward pass and one ANN search; and because the
negatives are what the *current* model retrieves, training optimises exactly the ranking it will serve.

A single-tower model is split: the query tower keeps training, a frozen copy becomes the document
tower, and the saved model has separate ``query/`` and ``document/`` towers. Usually run after STAR
(``configs/scifact-star-adore.yaml``).
"""

from __future__ import annotations

import copy
import logging
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from pydantic import Field

from retriever.data import Corpus
from retriever.losses.lambda_rank import LambdaRankLoss
from retriever.modeling import autocast
from retriever.negatives.base import NegativeStrategy, StrategyOptions, register_strategy
from retriever.negatives.corpus_index import build_index, corpus_path

logger = logging.getLogger(__name__)


class ADOREOptions(StrategyOptions):
    k: int = Field(100, gt=0, description="negatives retrieved live per query (after removing positives)")
    cutoff: int | None = Field(10, gt=0, description="MRR cutoff of the ΔMRR weights (None: full MRR)")
    mode: Literal["lambda", "listwise"] = "lambda"
    scale: float | None = Field(None, gt=0, description="score multiplier (default 1 / training.temperature)")
    corpus: str | None = Field(None, description="corpus to index (default: the data's)")
    encode_batch_size: int = Field(64, gt=0)


@register_strategy("adore")
class ADORENegatives(NegativeStrategy):
    Options = ADOREOptions

    def __init__(self, options=None):
        super().__init__(options)
        self.index = None
        self.doc_ids: list[str] = []
        self.doc_emb: torch.Tensor | None = None
        self.positive_emb: dict[str, torch.Tensor] = {}   # positive text -> frozen embedding
        self.positive_ids: dict[str, set[str]] = {}        # query text -> positive doc ids
        self.loss_fn: LambdaRankLoss | None = None
        self.last_negative_ids: list[list[str]] = []
        self._retrieved_rank_sum = 0.0
        self._steps = 0

    # ------------------------------------------------------------------ setup
    def prepare(self, trainer: Any) -> None:
        scale = self.options.scale or 1.0 / trainer.config.training.temperature
        self.loss_fn = LambdaRankLoss(scale=scale, cutoff=self.options.cutoff, mode=self.options.mode)
        corpus = Corpus(corpus_path(trainer, self.options.corpus))
        self.setup(trainer.model, corpus, trainer.train_examples, Path(trainer.output_dir) / "adore-index")

    def setup(self, model, corpus: Corpus, examples, folder: Path) -> None:
        freeze_document_tower(model)
        dense, store = build_index(model, corpus, folder, batch_size=self.options.encode_batch_size,
                                   bf16=False)
        self.index = dense
        self.doc_ids = [str(i) for i in dense.ids]
        self.doc_emb = torch.from_numpy(np.asarray(store.load_all(), dtype=np.float32))
        row = {d: i for i, d in enumerate(self.doc_ids)}
        missing: list[str] = []
        for ex in examples:
            self.positive_ids[ex.query] = set(ex.positive_ids)
            by_id = dict(zip(ex.positives, ex.positive_ids)) if len(ex.positives) == len(ex.positive_ids) else {}
            for text in ex.positives:
                if text in self.positive_emb:
                    continue
                if text in by_id and by_id[text] in row:
                    self.positive_emb[text] = self.doc_emb[row[by_id[text]]]
                else:
                    missing.append(text)
        if missing:  # positives given as text only: embed them once with the frozen document tower
            missing = sorted(set(missing))
            emb = model.encode(missing, kind="document", batch_size=self.options.encode_batch_size, bf16=False)
            self.positive_emb.update({t: torch.from_numpy(e) for t, e in zip(missing, emb)})

    # ------------------------------------------------------------------ step
    def retrieve(self, query_emb: np.ndarray, queries: list[str]) -> np.ndarray:
        """Rows of the top-k documents per query under the current query encoder, positives removed."""
        k = self.options.k
        depth = k + max((len(self.positive_ids.get(q, ())) for q in queries), default=0)
        _, rows = self.index.search(np.ascontiguousarray(query_emb, dtype=np.float32), depth)
        out = np.empty((len(queries), k), dtype=np.int64)
        for i, q in enumerate(queries):
            positives = self.positive_ids.get(q, set())
            kept = [r for r in rows[i] if r >= 0 and self.doc_ids[r] not in positives][:k]
            if len(kept) < k:
                raise ValueError(f"the index holds too few documents to retrieve {k} negatives; lower negatives.options.k")
            out[i] = kept
        return out

    def micro_step(self, trainer: Any, batch, scale: float) -> float:
        model = trainer.model
        with autocast(model.device, trainer.bf16):
            q = model.embed(model.tokenize(batch.queries, "query"), "query").float()
        rows = self.retrieve(q.detach().cpu().numpy(), batch.queries)
        self.last_negative_ids = [[self.doc_ids[r] for r in row] for row in rows]
        neg = self.doc_emb[torch.from_numpy(rows)].to(q.device)                     # [B, k, d], no grad
        pos_texts = [batch.global_documents[int(t)] for t in batch.targets]
        pos = torch.stack([self.positive_emb[t] for t in pos_texts]).to(q.device)   # [B, d], no grad
        pos_scores = (q * pos).sum(-1)
        neg_scores = torch.einsum("bd,bkd->bk", q, neg)
        loss = self.loss_fn(pos_scores, neg_scores)
        (loss * scale).backward()
        with torch.no_grad():
            self._retrieved_rank_sum += float((neg_scores > pos_scores[:, None]).sum(1).float().add(1).reciprocal().mean())
            self._steps += 1
        return float(loss.detach())

    def log_metrics(self) -> dict:
        mrr = self._retrieved_rank_sum / self._steps if self._steps else 0.0
        self._retrieved_rank_sum, self._steps = 0.0, 0
        return {"adore_train_mrr": round(mrr, 5)}


def freeze_document_tower(model) -> None:
    """Give a shared model its own document tower (a copy) and freeze it; a two-tower model's document
    tower is frozen in place. The optimizer then never changes it (its gradients stay ``None``)."""
    if model.doc_model is None:
        model.doc_model = copy.deepcopy(model.query_model)
    for p in model.doc_model.parameters():
        p.requires_grad_(False)
    model.doc_model.eval()
