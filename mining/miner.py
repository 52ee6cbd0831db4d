"""Offline hard-negative mining: retrieve top-k per training query (dense FAISS index or BM25),
drop positives and likely false negatives, sample n negatives, write FlagEmbedding training JSONL.

Memory is bounded by ``query_batch_size``: queries are encoded and searched a chunk at a time, so
there is never a full query x corpus score matrix; corpus texts are read from disk only for the
negatives that are written (and for the scorer's candidates).
"""

from __future__ import annotations

import json
import logging
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Iterator, Literal, Protocol, Sequence

import numpy as np

from mining.filters import filter_candidates, sample_negatives
from mining.stats import MiningStats
from retriever.data import Corpus, DataError, iter_training_jsonl, iter_triples, load_beir, read_qrels, read_queries
from retriever.io import atomic_write
from retriever.offset_index import text_key

logger = logging.getLogger(__name__)


@dataclass
class MiningConfig:
    k: int = 200
    range_min: int = 10
    range_max: int = 200
    num_negatives: int = 5
    sampling: Literal["top", "random"] = "top"
    relative_margin: float | None = None
    absolute_margin: float | None = None
    scorer_threshold: float | None = None
    seed: int = 42
    query_batch_size: int = 256
    # the positives' scores (for margins and the rows' pos_scores); a caller that uses neither (STAR's pool)
    # skips encoding or gathering them
    score_positives: bool = True

    def validate(self) -> "MiningConfig":
        if self.k < 1:
            raise ValueError(f"k must be >= 1, got {self.k}")
        if not 0 <= self.range_min < self.range_max:
            raise ValueError(f"need 0 <= range_min < range_max, got {self.range_min} and {self.range_max}")
        if self.range_max > self.k:
            raise ValueError(f"range_max ({self.range_max}) cannot exceed k ({self.k}): raise k or lower range_max")
        if self.num_negatives < 1:
            raise ValueError(f"num_negatives must be >= 1, got {self.num_negatives}")
        if self.sampling not in ("top", "random"):
            raise ValueError(f"sampling must be top or random, got {self.sampling!r}")
        if self.relative_margin is not None and not 0 <= self.relative_margin < 1:
            raise ValueError(f"relative_margin must be in [0, 1), got {self.relative_margin}")
        if self.absolute_margin is not None and self.absolute_margin < 0:
            raise ValueError(f"absolute_margin must be >= 0, got {self.absolute_margin}")
        if self.seed < 0:
            raise ValueError(f"seed must be >= 0, got {self.seed}")
        if not self.score_positives and (self.relative_margin is not None or self.absolute_margin is not None):
            raise ValueError("a margin filter compares candidates with the positive's score: keep score_positives")
        return self


# --------------------------------------------------------------------------- training queries
@dataclass(slots=True)
class TrainingQuery:
    """A query to mine for: positives by corpus id (qrels) and/or by text (training files).

    ``positive_texts=None`` means "the texts of ``positive_ids`` in the corpus": :func:`mine` reads them
    one chunk of queries at a time (:func:`with_positive_texts`), so 503k MS MARCO train queries do not
    each hold their positive passages in memory for the whole run.

    ``positive_rows``: the positives' corpus rows, when the caller holds them (a training table stores rows).
    ``positive_ids=None`` then means "the ids of those rows". Dense mining over an index of the same corpus
    then compares rows and cached text keys: it reads no id, no text and no id -> row map. At 8.8M passages
    those pages were ~0.5 GB of STAR's resident memory.
    """

    query_id: str
    text: str
    positive_ids: list[str] | None = field(default_factory=list)
    positive_texts: list[str] | None = field(default_factory=list)
    positive_rows: np.ndarray | None = None


def with_positive_texts(query: TrainingQuery, corpus: Corpus) -> TrainingQuery:
    """``query`` with its positives' ids and texts, read from ``corpus`` when they were left to it (None)."""
    if query.positive_texts is not None and query.positive_ids is not None:
        return query
    rows = query.positive_rows
    ids = query.positive_ids if query.positive_ids is not None else corpus.ids.take(rows)
    texts = query.positive_texts
    if texts is None:
        texts = corpus.texts(rows if rows is not None else (corpus.row(d) for d in ids))
    return TrainingQuery(query.query_id, query.text, list(ids), texts, rows)


def load_training_queries(data: str | os.PathLike, *, split: str = "train", qrels: str | os.PathLike | None = None,
                          corpus: str | os.PathLike | None = None, min_relevance: int = 1
                          ) -> tuple[list[TrainingQuery], Corpus]:
    """Queries with their positives, and the corpus to mine from.

    ``data`` is a BEIR folder (queries, ``qrels/<split>.tsv`` and corpus from it; ``corpus`` overrides),
    a queries file (``queries.jsonl`` / MS MARCO ``qid<TAB>query``) with ``qrels`` and ``corpus``,
    a training JSONL (FlagEmbedding/Tevatron: positives as texts, or ids of ``corpus``),
    or an MS MARCO triples TSV (``query<TAB>positive<TAB>negative``).
    """
    data = Path(data)
    if data.is_dir():
        beir = load_beir(data, split)
        docs = Corpus(corpus) if corpus else beir.corpus
        out = []
        for qid, judged in beir.qrels.items():
            pos = [d for d, g in judged.items() if g >= min_relevance]
            if pos and qid in beir.queries:
                # texts read per mined chunk (with_positive_texts); from the corpus the index was built over
                texts = None if docs is beir.corpus else [beir.corpus.get(d).full_text for d in pos]
                out.append(TrainingQuery(qid, beir.queries[qid], pos, texts))
        return out, docs
    if corpus is None:
        raise DataError(data, None, "no corpus to mine from", "pass --corpus (a corpus.jsonl or collection.tsv)")
    docs = Corpus(corpus)
    name = data.name.lower()
    if name.endswith((".jsonl", ".json")) and _looks_like_training_jsonl(data):
        out = []
        for i, ex in enumerate(iter_training_jsonl(data, corpus=docs)):
            qid = str(ex.query_id) if ex.query_id is not None else str(i)
            out.append(TrainingQuery(qid, ex.query, list(ex.positive_ids), list(ex.positives)))
        return _merge_duplicate_queries(out), docs
    if qrels is None and name.endswith(".tsv") and _looks_like_triples(data):
        out = [TrainingQuery(str(i), ex.query, [], list(ex.positives)) for i, ex in enumerate(iter_triples(data))]
        return _merge_duplicate_queries(out), docs
    if qrels is None:
        raise DataError(data, None, "queries given without relevance judgements",
                        "pass --qrels (BEIR qrels tsv, TREC or MS MARCO qrels) or a BEIR folder")
    queries = read_queries(data)
    judgements = read_qrels(qrels)
    out = []
    for qid, judged in judgements.items():
        if qid not in queries:
            continue  # MS MARCO qrels cover more queries than a queries slice; mine only the given ones
        pos = [d for d, g in judged.items() if g >= min_relevance]
        missing = [d for d in pos if d not in docs]
        if missing:
            raise DataError(qrels, None, f"query {qid!r} judges document ids {missing[:3]} that are not in {docs.path}",
                            "pass the corpus these qrels refer to")
        if pos:
            out.append(TrainingQuery(qid, queries[qid], pos, None))  # texts read per mined chunk
    if not out:
        raise DataError(qrels, None, f"no judged query of {data} has a positive", "check that the qrels and queries files match")
    return out, docs


def _looks_like_training_jsonl(path: Path) -> bool:
    with open(path, encoding="utf-8") as fh:
        for line in fh:
            if line.strip():
                try:
                    obj = json.loads(line)
                except json.JSONDecodeError:
                    return True  # let iter_training_jsonl report the line
                return isinstance(obj, dict) and "query" in obj and ("pos" in obj or "positive_passages" in obj)
    return False


def _looks_like_triples(path: Path) -> bool:
    with open(path, encoding="utf-8", errors="replace") as fh:
        for line in fh:
            if line.strip():
                return line.count("\t") == 2
    return False


def _merge_duplicate_queries(items: list[TrainingQuery]) -> list[TrainingQuery]:
    """Triples and training files repeat a query once per positive; mine each query once."""
    by_text: dict[str, TrainingQuery] = {}
    for item in items:
        seen = by_text.get(item.text)
        if seen is None:
            by_text[item.text] = item
            continue
        seen.positive_ids += [d for d in item.positive_ids if d not in seen.positive_ids]
        seen.positive_texts += [t for t in item.positive_texts if t not in seen.positive_texts]
    return list(by_text.values())


# --------------------------------------------------------------------------- retrievers
class Retriever(Protocol):
    name: str

    def search(self, queries: Sequence[TrainingQuery], k: int) -> list[tuple[list[str], np.ndarray]]: ...

    def positive_scores(self, queries: Sequence[TrainingQuery], hits: list[tuple[list[str], np.ndarray]]) -> list[list[float]]: ...


class RowIds(Sequence):
    """A query's retrieved index rows, read as document ids on demand: most candidates are only filtered
    (by row and text) and never need their id string (100 id reads a query were a third of mining time)."""

    def __init__(self, rows: np.ndarray, source: Sequence[str]):
        self.rows, self.source = np.asarray(rows, dtype=np.int64), source

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i):
        if isinstance(i, slice):
            return RowIds(self.rows[i], self.source)
        return self.source[int(self.rows[i])]

    def __iter__(self):
        take = getattr(self.source, "take", None)  # one gather, not one lookup per row
        return iter(take(self.rows) if take is not None else [self.source[int(r)] for r in self.rows])

    def __eq__(self, other) -> bool:
        return isinstance(other, Sequence) and not isinstance(other, str) and list(self) == list(other)

    def __repr__(self) -> str:
        return f"RowIds({list(self)!r})"


_ALIGNED: dict[tuple[int, int], tuple] = {}


def _rows_are_corpus_rows(hits: Sequence[str], corpus: Corpus) -> bool:
    """Whether ``hits`` carries index rows that are ``corpus`` rows (the index was encoded from this corpus,
    in its order): same size and the same ids at 64 spread rows. Checked once per (ids, corpus) pair of live
    objects (weak references: a freed object's address reused by another is not mistaken for it)."""
    import weakref

    source = getattr(hits, "source", None)
    if source is None:
        return False
    key = (id(source), id(corpus))
    cached = _ALIGNED.get(key)
    if cached is not None and cached[0]() is source and cached[1]() is corpus:
        return cached[2]
    n = len(corpus)
    rows = sorted({int(r) for r in np.linspace(0, n - 1, 64)}) if n else []
    aligned = len(source) == n and all(str(source[r]) == str(corpus.ids[r]) for r in rows)
    for ids in (source, corpus.ids):  # 64 spot reads map ~2 MiB each: most of both id maps at 8.8M
        release = getattr(ids, "release_pages", None)
        if release is not None:
            release()
    try:
        _ALIGNED[key] = (weakref.ref(source), weakref.ref(corpus), aligned)
    except TypeError:  # an object without weak references (a plain list): check it each time
        pass
    return aligned


class DenseRetriever:
    """A FAISS index (``index.faiss_index.DenseIndex`` or anything with ``search(emb, k)`` and ``ids``)
    plus the bi-encoder that built it.

    Positive scores are the dot product of the query embedding and the positive's document
    embedding, exactly what the index would score: read from ``doc_embeddings`` (an id -> row map and a
    matrix, e.g. the EmbeddingStore the index was built from) when given, else encoded from text.
    """

    name = "dense"

    def __init__(self, index, model, *, batch_size: int | None = None, bf16: bool | None = None,
                 doc_lookup: "DocEmbeddingLookup | None" = None):
        self.index, self.model, self.batch_size, self.bf16 = index, model, batch_size, bf16
        self.doc_lookup = doc_lookup
        # index.ids stays the index's memory-mapped sequence: only the returned rows become strings (a list
        # of MS MARCO's 8.8M ids would cost ~0.6 GB)
        self._query_emb: np.ndarray | None = None
        # a cosine index normalises at search time: score positives the same way
        self._cosine = (getattr(index, "manifest", None) or {}).get("metric") == "cosine"

    def search(self, queries, k):
        texts = [q.text for q in queries]
        self._query_emb = encode_texts(self.model, texts, kind="query", batch_size=self.batch_size, bf16=self.bf16)
        if self._cosine:
            self._query_emb = _unit(self._query_emb)
        scores, rows = self.index.search(self._query_emb, k)
        ids = self.index.ids
        out = []
        for srow, rrow in zip(scores, rows):
            valid = rrow >= 0  # FAISS pads with -1 when the index has fewer than k vectors
            out.append((RowIds(rrow[valid], ids), np.asarray(srow[valid], dtype=np.float32)))
        return out

    def positive_scores(self, queries, hits):
        q_emb = self._query_emb
        assert q_emb is not None and len(q_emb) == len(queries), "search() must run on the same chunk first"
        result: list[list[float]] = []
        need_text: list[tuple[int, str]] = []
        for i, q in enumerate(queries):
            lookup = self.doc_lookup
            if lookup is not None and q.positive_ids and len(q.positive_ids) == len(q.positive_texts) \
                    and all(d in lookup for d in q.positive_ids):
                docs = lookup.get(q.positive_ids)
                result.append([float(v) for v in (_unit(docs) if self._cosine else docs) @ q_emb[i]])
            else:  # text-only positives, or no stored embeddings: encode them with the same model
                result.append([])
                need_text += [(i, t) for t in q.positive_texts]
        if need_text:
            emb = encode_texts(self.model, [t for _, t in need_text], kind="document", batch_size=self.batch_size, bf16=self.bf16)
            emb = _unit(emb) if self._cosine else emb
            for (i, _), e in zip(need_text, emb):
                result[i].append(float(e @ q_emb[i]))
        return result


def _unit(x: np.ndarray) -> np.ndarray:
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


class StoreEmbeddingLookup:
    """Document embeddings by id read on demand from an ``index.store.EmbeddingStore`` (memory-mapped
    shards) through the corpus's id -> row map: nothing is gathered up front, so memory does not grow
    with the number of training queries (gathering every positive of MS MARCO's 503k queries as float32
    costs ~1.6 GB at 768-d). The store must hold the corpus's rows in corpus order, as
    ``index.encode.encode_corpus`` writes them; each lookup checks the stored id."""

    def __init__(self, store, corpus: Corpus):
        if store.count != len(corpus):
            raise ValueError(f"the embeddings hold {store.count:,} rows but the corpus {corpus.path} has {len(corpus):,}")
        self.store, self.corpus = store, corpus

    def _row(self, doc_id: str) -> int | None:
        try:
            row = self.corpus.row(doc_id)
        except KeyError:
            return None
        return row if self.store.ids[row] == doc_id else None

    def __contains__(self, doc_id: str) -> bool:
        return self._row(doc_id) is not None

    def get(self, doc_ids: Sequence[str]) -> np.ndarray:
        rows = [self._row(d) for d in doc_ids]
        if any(r is None for r in rows):
            raise KeyError(f"document ids {[d for d, r in zip(doc_ids, rows) if r is None][:3]} are not in the embeddings")
        return self.store.gather(rows, dtype=np.float32)


class DocEmbeddingLookup:
    """Document embeddings by id, for positive scores, held in memory (small sets; for a whole training
    set use :class:`StoreEmbeddingLookup`, which reads rows on demand)."""

    def __init__(self, ids: Sequence[str], embeddings: np.ndarray):
        self._row = {d: i for i, d in enumerate(ids)}
        self._emb = embeddings

    @classmethod
    def from_store(cls, store, wanted: Sequence[str]) -> "DocEmbeddingLookup":
        """Gather just the ``wanted`` rows from an ``index.store.EmbeddingStore``, one shard at a time
        (memory: one shard plus the wanted rows, whatever the corpus size)."""
        wanted = set(wanted)
        ids, rows = [], []
        for shard_ids, emb in store.iter_shards():
            take = [i for i, d in enumerate(shard_ids) if d in wanted]
            if take:
                ids += [shard_ids[i] for i in take]
                rows.append(np.asarray(emb[take], dtype=np.float32))
        dim = int(store.dim)
        return cls(ids, np.concatenate(rows) if rows else np.zeros((0, dim), dtype=np.float32))

    def __contains__(self, doc_id: str) -> bool:
        return doc_id in self._row

    def get(self, doc_ids: Sequence[str]) -> np.ndarray:
        return np.asarray(self._emb[[self._row[d] for d in doc_ids]], dtype=np.float32)


class BM25Retriever:
    """``index.bm25.BM25Searcher``. A positive's BM25 score is known only when it is retrieved in the
    top k; queries whose positives all fall outside it get no margin filter (counted in the stats)."""

    name = "bm25"

    def __init__(self, searcher):
        self.searcher = searcher

    def search(self, queries, k):
        results = self.searcher.search({q.query_id: q.text for q in queries}, k=k)
        out = []
        for q in queries:
            pairs = results.get(q.query_id, [])
            out.append(([str(d) for d, _ in pairs], np.asarray([s for _, s in pairs], dtype=np.float32)))
        return out

    def positive_scores(self, queries, hits):
        out = []
        for q, (ids, scores) in zip(queries, hits):
            where = {d: i for i, d in enumerate(ids)}
            out.append([float(scores[where[d]]) for d in q.positive_ids if d in where])
        return out


# --------------------------------------------------------------------------- mining
@dataclass
class MinedQuery:
    query: TrainingQuery
    positive_scores: list[float]
    negative_ids: list[str]
    negative_scores: list[float]
    negative_ranks: list[int]
    scorer_positive_scores: list[float] | None = None
    scorer_negative_scores: list[float] | None = None
    teacher: bool = False  # the scorer's scores are the row's pos_scores/neg_scores (`--scorer ranker:R`)
    # the negatives' corpus rows when the index's rows are the corpus's (dense hits): STAR keeps rows, and
    # turning the ids back into rows cost as much as the search at 8.8M
    negative_rows: np.ndarray | None = None

    def to_row(self, corpus: Corpus) -> dict:
        q = with_positive_texts(self.query, corpus)
        row = {
            "query": q.text,
            "pos": list(q.positive_texts),
            "neg": [corpus.get(d).full_text for d in self.negative_ids],
            "pos_scores": [float(s) for s in self.positive_scores],
            "neg_scores": [float(s) for s in self.negative_scores],
            "query_id": q.query_id,
            "pos_ids": list(q.positive_ids),
            "neg_ids": list(self.negative_ids),
            "neg_ranks": list(self.negative_ranks),
        }
        if self.scorer_negative_scores is not None:
            row["scorer_pos_scores"] = [float(s) for s in self.scorer_positive_scores or []]
            row["scorer_neg_scores"] = [float(s) for s in self.scorer_negative_scores]
            if self.teacher:  # distillation reads pos_scores/neg_scores: give it the ranker's
                row["retriever_pos_scores"], row["retriever_neg_scores"] = row["pos_scores"], row["neg_scores"]
                row["pos_scores"], row["neg_scores"] = row["scorer_pos_scores"], row["scorer_neg_scores"]
        return row


def encode_texts(model, texts, kind, batch_size, bf16):
    from index.encode import encode_texts as _encode_texts

    return _encode_texts(model, texts, kind=kind, batch_size=batch_size, bf16=bf16)


def mine(queries: Sequence[TrainingQuery], corpus: Corpus, retriever: Retriever, config: MiningConfig,
         scorer=None, stats: MiningStats | None = None, show_progress: bool = False,
         first_position: int = 0) -> Iterator[MinedQuery]:
    """Yield one :class:`MinedQuery` per training query, a ``config.query_batch_size`` chunk at a time.

    ``--sampling random`` draws query ``i``'s negatives from a generator seeded with ``(config.seed,
    first_position + i)``: a query's draw depends on its position in the whole job only, so a job resumed
    after a kill (``queries[n:]``, ``first_position=n``) or split over torchrun ranks draws what one
    uninterrupted process draws. When a row is yielded, ``stats`` already include its query."""
    config.validate()
    if config.scorer_threshold is not None and scorer is None:
        raise ValueError("scorer_threshold needs a scorer")
    stats = stats if stats is not None else MiningStats(num_negatives=config.num_negatives)
    stats.num_negatives = config.num_negatives
    timing = stats.seconds
    starts = range(0, len(queries), config.query_batch_size)
    if show_progress:
        from tqdm.auto import tqdm

        starts = tqdm(starts, desc="mine", unit="chunk")
    for start in starts:
        chunk = list(queries[start:start + config.query_batch_size])
        t0 = time.perf_counter()
        hits = retriever.search(chunk, config.k)  # reads the queries' texts only
        # positives' ids and texts are read only where rows and text keys cannot stand in for them
        chunk = [q if _rows_suffice(q, found, corpus, config, scorer) else with_positive_texts(q, corpus)
                 for q, (found, _) in zip(chunk, hits)]
        pos_scores = retriever.positive_scores(chunk, hits) if config.score_positives else [[] for _ in chunk]
        timing["retrieve"] = timing.get("retrieve", 0.0) + time.perf_counter() - t0
        chunk_scorer = scorer
        if scorer is not None and hasattr(scorer, "score_many"):
            t0 = time.perf_counter()
            chunk_scorer = _prescore(chunk, hits, pos_scores, corpus, config, scorer)
            timing["score"] = timing.get("score", 0.0) + time.perf_counter() - t0
        t0 = time.perf_counter()
        for i, (q, (ids, scores), q_pos) in enumerate(zip(chunk, hits, pos_scores), first_position + start):
            rng = np.random.default_rng([config.seed, i]) if config.sampling == "random" else None
            yield _select(q, ids, scores, q_pos, corpus, config, chunk_scorer, rng, stats)
        timing["filter"] = timing.get("filter", 0.0) + time.perf_counter() - t0


class _ScoreTable:
    """A batched scorer's answers for one chunk of queries, served back through ``score(query, passages)``."""

    def __init__(self, scorer, table: dict[tuple[str, str], float]):
        self.scorer, self.table = scorer, table
        self.teacher = getattr(scorer, "teacher", False)

    def score(self, query: str, passages) -> np.ndarray:
        return np.asarray([self.table[(query, p)] for p in passages], dtype=np.float32)


def _prescore(chunk, hits, pos_scores, corpus: Corpus, config: MiningConfig, scorer) -> _ScoreTable:
    """Score every query's survivors of filters 1-3 (and its positives) in one ``score_many`` call, so a
    cross-encoder fills its batches across queries instead of running one small batch per query."""
    requests = []
    for q, (ids, scores), q_pos in zip(chunk, hits, pos_scores):
        survivors = _filter(q, ids, scores, q_pos, corpus, config, None).kept
        requests.append((q.text, corpus.texts(corpus.row(ids[p]) for p in survivors) + list(q.positive_texts)))
    table = {}
    for (query, passages), rated in zip(requests, scorer.score_many(requests)):
        table.update({(query, p): float(s) for p, s in zip(passages, rated)})
    return _ScoreTable(scorer, table)


def _rows_suffice(q: TrainingQuery, hits, corpus: Corpus, config: MiningConfig, scorer) -> bool:
    """Whether ``q`` can be filtered by its positives' rows alone (see :class:`TrainingQuery`)."""
    return (q.positive_rows is not None and not config.score_positives and scorer is None
            and _rows_are_corpus_rows(hits, corpus))


def _filter(q: TrainingQuery, ids: list[str], scores: np.ndarray, q_pos: list[float], corpus: Corpus,
            config: MiningConfig, scorer_fn):
    window = ids[:config.range_max]  # ranks beyond the window can never be kept; skip their bookkeeping
    aligned = _rows_are_corpus_rows(window, corpus)
    if (q.positive_texts is None or q.positive_ids is None) and not (aligned and q.positive_rows is not None):
        q = with_positive_texts(q, corpus)  # left to the corpus, and rows cannot stand in for them here
    # every query: a duplicate of a positive under another id is no negative
    needs_texts = bool(q.positive_texts) or q.positive_rows is not None
    exclude_ids, exclude_mask, exclude_texts = set(q.positive_ids or ()), None, {t.strip() for t in q.positive_texts or ()}
    texts = None
    if aligned:  # dense hits: compare rows and text keys, no id strings or texts
        positive_rows = q.positive_rows if q.positive_rows is not None \
            else [corpus.row(d) for d in q.positive_ids if d in corpus]
        exclude_ids, exclude_mask = set(), np.isin(window.rows, positive_rows)
        if needs_texts:  # 100 text reads a query were half of STAR's up-front mining time
            keys = [text_key(t) for t in exclude_texts]
            if q.positive_rows is not None:  # the corpus's cached keys of the positives' stripped texts
                keys += corpus.text_keys(q.positive_rows).tolist()
            exclude_mask |= np.isin(corpus.text_keys(window.rows), keys)
        exclude_texts = set()
    elif needs_texts:
        texts = corpus.texts(corpus.row(d) for d in window)
    return filter_candidates(
        window, scores[:config.range_max],
        exclude_ids=exclude_ids, exclude_mask=exclude_mask, exclude_texts=exclude_texts,
        texts=texts,
        range_min=config.range_min, range_max=config.range_max,
        pos_score=min(q_pos) if q_pos else None, relative_margin=config.relative_margin,
        absolute_margin=config.absolute_margin, scorer=scorer_fn, scorer_threshold=config.scorer_threshold,
    )


def _select(q: TrainingQuery, ids: list[str], scores: np.ndarray, q_pos: list[float], corpus: Corpus,
            config: MiningConfig, scorer, rng: np.random.Generator, stats: MiningStats) -> MinedQuery:
    pos_score = min(q_pos) if q_pos else None
    scorer_fn = None
    if scorer is not None:
        def scorer_fn(positions: np.ndarray) -> np.ndarray:
            return scorer.score(q.text, corpus.texts(corpus.row(ids[p]) for p in positions))
    result = _filter(q, ids, scores, q_pos, corpus, config, scorer_fn)
    result.dropped["rank_window"] += max(0, len(ids) - config.range_max)
    chosen = sample_negatives(result.kept, config.num_negatives, config.sampling, rng)
    margin_applied = pos_score is not None or (config.relative_margin is None and config.absolute_margin is None)
    stats.add(q.query_id, len(ids), result.dropped, chosen.tolist(), margin_applied)
    rows = ids.rows[np.asarray(chosen, dtype=np.int64)] if isinstance(ids, RowIds) else None
    # read as ids when a consumer asks (a JSONL row does; STAR keeps rows and never reads them)
    names = RowIds(rows, ids.source) if rows is not None else [ids[p] for p in chosen]
    mined = MinedQuery(q, q_pos, names, [float(scores[p]) for p in chosen], [int(p) for p in chosen])
    if rows is not None and _rows_are_corpus_rows(ids, corpus):
        mined.negative_rows = rows
    if scorer is not None:
        mined.scorer_negative_scores = [result.scorer_scores[int(p)] for p in chosen]
        mined.scorer_positive_scores = [float(s) for s in scorer.score(q.text, q.positive_texts)]
        mined.teacher = bool(getattr(scorer, "teacher", False))
    return mined


def write_training_jsonl(path: str | os.PathLike, mined: Iterator[MinedQuery], corpus: Corpus,
                         stats: MiningStats, skip_empty: bool = True) -> tuple[Path, Path]:
    """Stream mined rows into ``path`` atomically; write ``<path>.stats.json`` beside it. (``negatron mine``
    writes through :mod:`mining.job` instead, which survives a kill.)"""
    path = Path(path)
    written = 0
    with atomic_write(path, "w") as fh:
        for m in mined:
            if skip_empty and not m.negative_ids:
                continue
            fh.write(json.dumps(m.to_row(corpus), ensure_ascii=False) + "\n")
            written += 1
    stats.settings["rows_written"] = written
    stats_path = stats.write(stats_path_for(path))
    return path, stats_path


def stats_path_for(path: str | os.PathLike) -> Path:
    path = Path(path)
    stem = path.name[:-len(".jsonl")] if path.name.endswith(".jsonl") else path.name
    return path.with_name(f"{stem}.stats.json")


def config_dict(config: MiningConfig) -> dict:
    return asdict(config)
