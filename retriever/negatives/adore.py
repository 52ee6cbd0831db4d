"""ADORE: train the query encoder against negatives it retrieves itself, live, from a frozen index.

Zhan et al., "Optimizing Dense Retrieval Model Training with Hard Negatives", SIGIR 2021. The document
encoder is frozen and the corpus is encoded into a FAISS index once. At every step the current query
encoder embeds the batch's queries, retrieves their top-k (200) from that index and is trained with the
ΔMRR-weighted LambdaLoss over the retrieved list plus any positive it missed: every positive of the
query is ranked among all the candidates, and positives (by id, and exact-text duplicates under other
ids) are never negatives; each query's loss is normalised by its number of pairs, as DRhard's
``adore/train.py`` (:class:`retriever.losses.lambda_rank.LambdaRankLoss`). Document embeddings are read from the index's
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
from retriever.losses.lambda_rank import LambdaRankLoss, candidate_ranks
from retriever.modeling import autocast
from retriever.negatives.base import NegativeStrategy, StrategyOptions, register_strategy
from retriever.negatives.corpus_index import build_index, corpus_path

logger = logging.getLogger(__name__)


class ADOREOptions(StrategyOptions):
    k: int = Field(200, gt=0, description="documents retrieved live per query, positives included (the paper: 200)")
    cutoff: int | None = Field(10, gt=0, description="MRR cutoff of the ΔMRR weights (None: full MRR)")
    mode: Literal["lambda", "listwise"] = "lambda"
    scale: float | None = Field(None, gt=0, description="score multiplier of the loss (default 1 / "
                                "training.temperature; the paper's raw dot products: 1)")
    corpus: str | None = Field(None, description="corpus to index (default: the data's)")
    encode_batch_size: int = Field(64, gt=0)


@register_strategy("adore")
class ADORENegatives(NegativeStrategy):
    Options = ADOREOptions
    supports_loss_options = False  # trains with its own LambdaLoss in micro_step

    def __init__(self, options=None):
        super().__init__(options)
        self.index = None
        self.doc_ids: list[str] = []
        self.doc_emb: torch.Tensor | None = None
        self.positive_rows: dict[str, set[int]] = {}        # query text -> corpus rows of its positives (id or text)
        self.extra_positive_emb: dict[str, torch.Tensor] = {}  # query text -> [n, d] positives not in the corpus
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
        # positives by id, and by text: an exact copy of a positive under another id (MS MARCO has many)
        # is relevant too, never a negative
        wanted = {t.strip() for ex in examples for t in ex.positives}
        by_text: dict[str, list[int]] = {}
        if wanted:
            for doc in corpus:
                text = doc.full_text.strip()
                if text in wanted:
                    by_text.setdefault(text, []).append(row[doc.id])
        missing: dict[str, list[str]] = {}
        for ex in examples:
            rows = self.positive_rows.setdefault(ex.query, set())
            rows.update(row[d] for d in ex.positive_ids if d in row)
            for text in ex.positives:
                found = by_text.get(text.strip())
                if found:
                    rows.update(found)
                elif text not in missing.setdefault(ex.query, []):
                    missing[ex.query].append(text)
        texts = sorted({t for ts in missing.values() for t in ts})
        if texts:  # positives given as text only, absent from the corpus: embed them once (frozen tower)
            emb = dict(zip(texts, model.encode(texts, kind="document", batch_size=self.options.encode_batch_size,
                                               bf16=False)))
            for q, ts in missing.items():
                if ts:
                    self.extra_positive_emb[q] = torch.from_numpy(np.stack([emb[t] for t in ts]))
        empty = [q for q, rows in self.positive_rows.items() if not rows and q not in self.extra_positive_emb]
        if empty:
            raise ValueError(f"{len(empty)} training queries have no positive, e.g. {empty[0][:60]!r}")

    # ------------------------------------------------------------------ step
    def retrieve(self, query_emb: np.ndarray) -> np.ndarray:
        """Rows of the top-k documents per query under the current query encoder (positives included,
        in rank order; -1 pads when the corpus has fewer than k documents)."""
        _, rows = self.index.search(np.ascontiguousarray(query_emb, dtype=np.float32), self.options.k)
        return rows

    def candidates(self, queries: list[str], rows: np.ndarray):
        """Per query: every retrieved document plus the positives it missed (all of them: ADORE ranks
        each positive among all candidates). Returns the candidate embeddings ``[B, N, d]``, the
        ``relevant`` and ``valid`` masks ``[B, N]`` and the non-relevant retrieved rows per query."""
        lists, negatives = [], []
        for i, q in enumerate(queries):
            positives = self.positive_rows.get(q, set())
            retrieved = [int(r) for r in rows[i] if r >= 0]
            missed = sorted(positives - set(retrieved))
            emb = self.doc_emb[torch.tensor(retrieved + missed, dtype=torch.long)]
            rel = [r in positives for r in retrieved] + [True] * len(missed)
            extra = self.extra_positive_emb.get(q)
            if extra is not None:
                emb, rel = torch.cat([emb, extra]), rel + [True] * len(extra)
            lists.append((emb, rel))
            negatives.append([r for r in retrieved if r not in positives])
        n = max(len(rel) for _, rel in lists)
        dim = self.doc_emb.shape[1]
        emb = torch.zeros(len(queries), n, dim)
        relevant = torch.zeros(len(queries), n, dtype=torch.bool)
        valid = torch.zeros(len(queries), n, dtype=torch.bool)
        for i, (e, rel) in enumerate(lists):
            emb[i, :len(rel)] = e
            relevant[i, :len(rel)] = torch.tensor(rel)
            valid[i, :len(rel)] = True
        return emb, relevant, valid, negatives

    def micro_step(self, trainer: Any, batch, scale: float) -> float:
        model = trainer.model
        with autocast(model.device, trainer.bf16):
            q = model.embed(model.tokenize(batch.queries, "query"), "query").float()
        rows = self.retrieve(q.detach().cpu().numpy())
        emb, relevant, valid, negatives = self.candidates(batch.queries, rows)
        self.last_negative_ids = [[self.doc_ids[r] for r in negs] for negs in negatives]
        emb, relevant, valid = emb.to(q.device), relevant.to(q.device), valid.to(q.device)
        scores = torch.einsum("bd,bnd->bn", q, emb)                                   # documents: no grad
        loss = self.loss_fn(scores, relevant, valid)
        (loss * scale).backward()
        with torch.no_grad():
            ranks = candidate_ranks(scores, valid).masked_fill(~relevant, scores.shape[1] + 1)
            self._retrieved_rank_sum += float(ranks.min(dim=1).values.float().reciprocal().mean())
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
