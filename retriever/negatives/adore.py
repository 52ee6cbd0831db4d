"""ADORE: train the query encoder against negatives it retrieves itself, live, from a frozen index.

Zhan et al., "Optimizing Dense Retrieval Model Training with Hard Negatives", SIGIR 2021. The document
encoder is frozen and the corpus is encoded into a FAISS index once. At every step the current query
encoder embeds the batch's queries, retrieves their top-k (200) from that index and is trained with the
ΔMRR-weighted LambdaLoss over the retrieved list plus any positive it missed: every positive of the
query is ranked among all the candidates, and positives (by id, and exact-text duplicates under other
ids) are never negatives; each query's loss is normalised by its number of pairs, as DRhard's
``adore/train.py`` (:class:`retriever.losses.lambda_rank.LambdaRankLoss`). Document embeddings are gathered per step from the
index's memory-mapped float16 store (only the candidates' rows: never the whole matrix, 27 GB float32 at
MS MARCO), never recomputed, so a step costs one query forward pass and one ANN search; and because the
negatives are what the *current* model retrieves, training optimises exactly the ranking it will serve.

The index is built with ``options.index`` (:class:`retriever.negatives.corpus_index.IndexOptions`: exact
``Flat`` below 1M documents, ``IVF…,SQfp16`` above by default). Ids are the index's memory-mapped ids;
positives are compact int64 rows per query-text hash.

A single-tower model is split: the query tower keeps training, a frozen copy becomes the document
tower, and the saved model has separate ``query/`` and ``document/`` towers. Usually run after STAR
(``configs/scifact-star-adore.yaml``).
"""

from __future__ import annotations

import copy
import logging
from array import array
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from pydantic import Field

from retriever.data import Corpus
from retriever.losses.lambda_rank import LambdaRankLoss, candidate_ranks
from retriever.modeling import autocast
from retriever.negatives.base import NegativeStrategy, StrategyOptions, register_strategy
from retriever.negatives.corpus_index import (IndexOptions, KeyedRows, build_index, corpus_path, example_positives,
                                              example_queries, text_key)

logger = logging.getLogger(__name__)


class ADOREOptions(StrategyOptions):
    k: int = Field(200, gt=0, description="documents retrieved live per query, positives included (the paper: 200)")
    cutoff: int | None = Field(10, gt=0, description="MRR cutoff of the ΔMRR weights (None: full MRR)")
    mode: Literal["lambda", "listwise"] = "lambda"
    scale: float | None = Field(None, gt=0, description="score multiplier of the loss (default 1 / "
                                "training.temperature; the paper's raw dot products: 1)")
    corpus: str | None = Field(None, description="corpus to index (default: the data's)")
    encode_batch_size: int = Field(64, gt=0)
    index: IndexOptions = Field(default_factory=IndexOptions, description="FAISS settings of the frozen index "
                                "(factory, nprobe, ef_search, train_sample, gpu; default factory auto)")


@register_strategy("adore")
class ADORENegatives(NegativeStrategy):
    Options = ADOREOptions
    supports_loss_options = False  # trains with its own LambdaLoss in micro_step

    def __init__(self, options=None):
        super().__init__(options)
        self.index = None
        self.store = None                                    # fp16 memory-mapped embeddings (never loaded whole)
        self.positives: KeyedRows = KeyedRows()              # query-text key -> sorted corpus rows of its positives
        self.extra_positive_emb: dict[int, torch.Tensor] = {}  # query-text key -> [n, d] positives not in the corpus
        self.loss_fn: LambdaRankLoss | None = None
        self.last_negative_rows: list[list[int]] = []          # the last step's negatives, as index rows
        self._retrieved_rank_sum = 0.0
        self._steps = 0

    @property
    def last_negative_ids(self) -> list[list[str]]:
        """The last step's negatives per query, as ids: read on demand (a step reading 6,400 ids scattered over
        the index's ids file kept most of it resident at 8.8M)."""
        return [self.doc_ids.take(negs) if hasattr(self.doc_ids, "take") else [self.doc_ids[r] for r in negs]
                for negs in self.last_negative_rows]

    @property
    def doc_ids(self):
        """Row -> document id: the index's memory-mapped ``ids.txt`` (no list of 8.8M strings)."""
        return self.index.ids

    # ------------------------------------------------------------------ setup
    def prepare(self, trainer: Any) -> None:
        scale = self.options.scale or 1.0 / trainer.config.training.temperature
        self.loss_fn = LambdaRankLoss(scale=scale, cutoff=self.options.cutoff, mode=self.options.mode)
        corpus = Corpus(corpus_path(trainer, self.options.corpus))
        self.setup(trainer.model, corpus, trainer.train_examples, Path(trainer.output_dir) / "adore-index")

    def setup(self, model, corpus: Corpus, examples, folder: Path) -> None:
        freeze_document_tower(model)
        self.index, self.store = build_index(model, corpus, folder, batch_size=self.options.encode_batch_size,
                                             bf16=False, options=self.options.index)
        if len(self.index.ids) != len(corpus):
            raise ValueError(f"the ADORE index holds {len(self.index.ids)} documents, the corpus {len(corpus)}")
        self._collect_positives(model, corpus, examples)

    def _collect_positives(self, model, corpus: Corpus, examples) -> None:
        """Every training query's positive rows: by id, and by text (an exact copy of a positive under another
        id, MS MARCO has many, is relevant too, never a negative). One pass over the examples records each
        query's positive rows and the text keys of positives given only as text; two sequential scans of the
        corpus's cached text keys (:meth:`~retriever.data.Corpus.iter_text_keys`) then give the positives'
        keys and every row carrying one of them. A training table of the corpus is read from its arrays, so
        no passage text, id or id -> row map is read (at 8.8M those pages stayed resident beside the index).
        Queries sharing a text share the union of their positives."""
        by_row, by_text = KeyedRows(), KeyedRows()   # query key -> rows; query key -> text keys of inline texts
        all_queries = array("q")
        for query, rows, texts in example_positives(examples, corpus):
            qkey = text_key(query)
            all_queries.append(qkey)
            by_row.add(qkey, rows)
            by_text.add(qkey, (text_key(t.strip()) for t in texts))
        by_row.freeze(unique=True)
        by_text.freeze(unique=True)
        corpus.release_pages()  # examples that are not a table looked their positives up by id
        rows = np.unique(by_row.values)                   # every positive row, sorted
        row_keys = np.empty(len(rows), np.int64)          # their text keys
        for lo, keys in corpus.iter_text_keys():
            a, b = np.searchsorted(rows, [lo, lo + len(keys)])
            row_keys[a:b] = keys[rows[a:b] - lo]
        wanted = np.unique(np.concatenate([row_keys, by_text.values]))
        found_keys, found_rows = [], []                   # (text key, corpus row) of every corpus copy
        if len(wanted):
            for lo, keys in corpus.iter_text_keys():
                pos = np.minimum(np.searchsorted(wanted, keys), len(wanted) - 1)
                hit = np.flatnonzero(wanted[pos] == keys)
                found_keys.append(keys[hit])
                found_rows.append(hit + lo)
        text_rows = KeyedRows()
        if found_keys:
            text_rows.add_many(np.concatenate(found_keys), np.concatenate(found_rows))
        text_rows.freeze(unique=True)
        self.positives = KeyedRows()
        missing: dict[int, list[int]] = {}                  # query key -> text keys absent from the corpus
        for i, qkey in enumerate(by_row.keys.tolist()):
            own = by_row.values[by_row.ptr[i]:by_row.ptr[i + 1]]
            parts = [own]
            tkeys = row_keys[np.searchsorted(rows, own)].tolist()
            inline = by_text.get(qkey)
            for tkey in tkeys + (inline.tolist() if inline is not None else []):
                copies = text_rows.get(tkey)
                if copies is not None:
                    parts.append(copies)
                else:
                    missing.setdefault(qkey, []).append(tkey)
            self.positives.add(qkey, np.concatenate(parts))
        self.positives.freeze(unique=True)
        if missing:  # positives given as text only, absent from the corpus: embed them once (frozen tower)
            self._embed_missing(model, examples, missing)
        empty = [k for k in np.unique(np.frombuffer(all_queries, dtype=np.int64)).tolist()
                 if not len(self.positives.get(k)) and k not in self.extra_positive_emb]
        if empty:
            first = next(query for query, _ in example_queries(examples) if text_key(query) == empty[0])
            raise ValueError(f"{len(empty)} training queries have no positive, e.g. {first[:60]!r}")
        logger.info("ADORE: positives of %d queries in %.1f MiB (%d rows, %d text-only)", len(self.positives),
                    self.positives.nbytes / 2**20, len(self.positives.values), len(self.extra_positive_emb))

    def _embed_missing(self, model, examples, missing: dict[int, list[int]]) -> None:
        texts: dict[int, str] = {}
        for ex in examples:  # a second pass, only when some positive is absent from the corpus
            keys = missing.get(text_key(ex.query))
            if keys:
                for t in ex.positives:
                    tkey = text_key(t.strip())
                    if tkey in keys and tkey not in texts:
                        texts[tkey] = t
        order = sorted(texts, key=lambda k: texts[k])
        emb = dict(zip(order, model.encode([texts[k] for k in order], kind="document",
                                           batch_size=self.options.encode_batch_size, bf16=False)))
        for qkey, tkeys in missing.items():
            seen = list(dict.fromkeys(k for k in tkeys if k in emb))
            if seen:
                self.extra_positive_emb[qkey] = torch.from_numpy(np.stack([emb[k] for k in seen]))

    def positives_of(self, query: str) -> np.ndarray:
        """Sorted corpus rows of ``query``'s positives (by id and exact-text copies)."""
        rows = self.positives.get(text_key(query))
        return rows if rows is not None else np.empty(0, np.int64)

    # ------------------------------------------------------------------ step
    def retrieve(self, query_emb: np.ndarray) -> np.ndarray:
        """Rows of the top-k documents per query under the current query encoder (positives included,
        in rank order; -1 pads when the corpus has fewer than k documents)."""
        _, rows = self.index.search(np.ascontiguousarray(query_emb, dtype=np.float32), self.options.k)
        return rows

    def candidates(self, queries: list[str], rows: np.ndarray):
        """Per query: every retrieved document plus the positives it missed (all of them: ADORE ranks
        each positive among all candidates). Returns the candidate embeddings ``[B, N, d]``, the
        ``relevant`` and ``valid`` masks ``[B, N]`` and the non-relevant retrieved rows per query.
        Embeddings are gathered from the memory-mapped float16 store, once per distinct row."""
        lists, negatives = [], []
        for i, q in enumerate(queries):
            positives = self.positives_of(q)
            retrieved = np.asarray(rows[i], dtype=np.int64)
            retrieved = retrieved[retrieved >= 0]
            is_pos = np.isin(retrieved, positives)
            missed = np.setdiff1d(positives, retrieved)                          # sorted
            cand = np.concatenate([retrieved, missed])
            rel = np.concatenate([is_pos, np.ones(len(missed), dtype=bool)])
            lists.append((cand, rel, self.extra_positive_emb.get(text_key(q))))
            negatives.append(retrieved[~is_pos].tolist())
        dim = self.store.dim
        flat = np.concatenate([c for c, _, _ in lists]) if lists else np.empty(0, np.int64)
        unique, inverse = np.unique(flat, return_inverse=True)
        gathered = torch.from_numpy(self.store.gather(unique))[torch.from_numpy(inverse.reshape(-1))]
        n = max(len(rel) + (0 if extra is None else len(extra)) for _, rel, extra in lists)
        emb = torch.zeros(len(queries), n, dim)
        relevant = torch.zeros(len(queries), n, dtype=torch.bool)
        valid = torch.zeros(len(queries), n, dtype=torch.bool)
        at = 0
        for i, (cand, rel, extra) in enumerate(lists):
            m = len(cand)
            emb[i, :m] = gathered[at:at + m]
            relevant[i, :m] = torch.from_numpy(rel)
            at += m
            if extra is not None:
                emb[i, m:m + len(extra)] = extra
                relevant[i, m:m + len(extra)] = True
                m += len(extra)
            valid[i, :m] = True
        return emb, relevant, valid, negatives

    def micro_step(self, trainer: Any, batch, scale: float) -> float:
        model = trainer.model
        with autocast(model.device, trainer.bf16):
            q = model.embed(model.tokenize(batch.queries, "query"), "query").float()
        rows = self.retrieve(q.detach().cpu().numpy())
        emb, relevant, valid, negatives = self.candidates(batch.queries, rows)
        self.last_negative_rows = negatives
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
