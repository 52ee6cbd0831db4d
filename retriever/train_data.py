"""Training examples from a config's data source, the dev carve-out, the epoch order and the collator.

Batch layout for one micro-step, global over ``world_size`` processes: each process holds
``batch_size`` queries; its documents are its queries' positives followed by their hard negatives
(``per_query`` each, query-major). Gathered across processes, rank 0's documents come first. Every
process sees the whole dataset and derives the same global order from the seed, so sharding needs no
communication and a resumed run rebuilds the exact same batches.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from retriever.config import DataConfig
from retriever.data import Corpus, TrainingExample, load_beir, load_hf_dataset, read_qrels, read_queries, write_jsonl_atomic
from retriever.example_table import (ExampleTable, ExampleView, HFExamples, TriplesFile, table_from_jsonl,
                                     table_from_qrels)
from retriever.hard_negative_files import is_st_hard_negatives, table_from_st_hard_negatives
from retriever.negatives import NegativeStrategy


def load_examples(cfg: DataConfig) -> Sequence[TrainingExample]:
    """The examples of the configured source (the first ``max_examples`` when set), as a read-only sequence.

    Nothing holds passage texts: qrels/BEIR/JSONL become an :class:`~retriever.example_table.ExampleTable`
    of corpus rows (texts are read from the corpus offset index when ``[i]`` is collated), triples a
    memory-mapped line index over the TSV, a Hugging Face dataset stays in Arrow. ``[i]`` returns a
    :class:`TrainingExample` as before, so the trainer and strategies index it like the list it replaces.
    """
    source, limit = cfg.source, cfg.max_examples
    if source == "beir":
        ds = load_beir(cfg.beir, cfg.split)
        examples = table_from_qrels(ds.queries, ds.qrels, ds.corpus, limit=limit)
    elif source == "qrels":
        examples = table_from_qrels(read_queries(cfg.queries), read_qrels(cfg.qrels), Corpus(cfg.collection), limit=limit)
    elif source == "jsonl" and is_st_hard_negatives(cfg.jsonl):  # sentence-transformers' msmarco-hard-negatives
        if not (cfg.corpus and cfg.queries):
            raise ValueError(f"{cfg.jsonl} holds passage and query ids (sentence-transformers layout): also set "
                             "data.corpus (collection.tsv) and data.queries (queries.train.tsv)")
        examples = table_from_st_hard_negatives(cfg.jsonl, read_queries(cfg.queries), Corpus(cfg.corpus), max_examples=limit)
    elif source == "jsonl":
        examples = table_from_jsonl(cfg.jsonl, Corpus(cfg.corpus) if cfg.corpus else None, limit=limit)
    elif source == "triples":
        examples = TriplesFile(cfg.triples)
    else:
        examples = HFExamples(load_hf_dataset(cfg.hf, cfg.hf_split, cfg.columns))
    if limit is not None and len(examples) > limit:
        examples = ExampleView(examples, np.arange(limit))
    if not len(examples):
        raise ValueError(f"the {cfg.source} data source yielded no training examples")
    return examples


def split_dev(examples: Sequence[TrainingExample], fraction: float, seed: int
              ) -> tuple[Sequence[TrainingExample], Sequence[TrainingExample]]:
    """Hold out ``fraction`` of the examples (a seeded random subset) for tuning, so nobody tunes on test.

    Returns two row views (file order kept), not copies: the split costs 8 bytes an example.
    """
    n_dev = int(round(len(examples) * fraction))
    order = np.random.default_rng(seed).permutation(len(examples))
    is_dev = np.zeros(len(examples), dtype=bool)
    is_dev[order[:n_dev]] = True
    return ExampleView(examples, np.flatnonzero(~is_dev)), ExampleView(examples, np.flatnonzero(is_dev))


def write_examples(path: str | Path, examples: Sequence[TrainingExample]) -> Path:
    """FlagEmbedding-layout JSONL (readable by :func:`retriever.data.iter_training_jsonl`)."""
    rows = ({"query": e.query, "pos": e.positives, "neg": e.negatives, "query_id": e.query_id,
             "pos_ids": e.positive_ids} for e in examples)
    return write_jsonl_atomic(path, rows)


def epoch_order(num_examples: int, seed: int, epoch: int) -> np.ndarray:
    """The shuffled example order of one epoch: a pure function of (seed, epoch)."""
    return np.random.default_rng([seed, epoch]).permutation(num_examples)


def positive_counts(examples: Sequence[TrainingExample]) -> np.ndarray:
    """Each example's number of positives, int64, without reading passage texts where the layout tells
    (an example table's CSR pointers, one positive per triple); otherwise one pass over the examples."""
    if isinstance(examples, ExampleView):
        return positive_counts(examples.base)[examples.rows]
    if isinstance(examples, ExampleTable):
        return np.diff(examples.pos_ptr).astype(np.int64)
    if isinstance(examples, TriplesFile):
        return np.ones(len(examples), dtype=np.int64)
    return np.fromiter((len(ex.positives) for ex in examples), dtype=np.int64, count=len(examples))


def pair_rows(examples: Sequence[TrainingExample]) -> np.ndarray:
    """``data.rows: per_pair``: one row per (query, positive) pair, as ``[n_pairs, 2]`` int64 of (example
    index, positive index), example-major. A query with k positives is k rows of an epoch, each training
    one of them (sentence-transformers' one row per pair), instead of one row whose positive is drawn at
    random. 16 bytes a pair."""
    counts = positive_counts(examples)
    example = np.repeat(np.arange(len(examples), dtype=np.int64), counts)
    starts = np.repeat(np.cumsum(counts) - counts, counts)
    return np.stack([example, np.arange(len(example), dtype=np.int64) - starts], axis=1)


def _stable_key(kind: str, value: str) -> int:
    # a stable 63-bit hash: every process (and a resumed run) must derive the same order
    return int.from_bytes(hashlib.blake2b(f"{kind}\0{value}".encode(), digest_size=8).digest(), "little") >> 1


def row_keys(examples: Sequence[TrainingExample], pairs: np.ndarray | None) -> tuple[np.ndarray, np.ndarray]:
    """What must not repeat within a batch under ``data.sampler: no_duplicates``, per training row, as CSR
    arrays ``(ptr, keys)``: the row's query text and its positive passage (per_pair: the pair's one positive;
    per_query: every positive the row may draw). A passage is keyed by its document id, or its text where
    it has none. Computed once per run as int64 arrays (16 bytes a row per_pair); id-based tables are read
    without passage texts."""
    base, rows = (examples.base, examples.rows) if isinstance(examples, ExampleView) else (examples, None)
    table = base if isinstance(base, ExampleTable) else None

    def keys_of(i: int) -> tuple[int, list[int]]:
        j = int(rows[i]) if rows is not None else i
        if table is not None:
            refs = table.pos_rows[table.pos_ptr[j]:table.pos_ptr[j + 1]].tolist()
            passages = [_stable_key("row", str(v)) if v >= 0 else
                        _stable_key("id", table.text_ids[-v - 1]) if table.text_ids[-v - 1] else
                        _stable_key("text", table.texts[-v - 1]) for v in refs]
            return _stable_key("query", table.queries[j]), passages
        ex = base[j]
        ids = ex.positive_ids if len(ex.positive_ids) == len(ex.positives) else [None] * len(ex.positives)
        return _stable_key("query", ex.query), [_stable_key("id", d) if d else _stable_key("text", t)
                                                for d, t in zip(ids, ex.positives)]

    if pairs is None:
        counts = 1 + positive_counts(examples)
        keys = np.empty(int(counts.sum()), dtype=np.int64)
        at = 0
        for i in range(len(examples)):
            query, passages = keys_of(i)
            keys[at:at + 1 + len(passages)] = [query, *passages]
            at += 1 + len(passages)
    else:
        keys = np.empty(2 * len(pairs), dtype=np.int64)
        cached = (-1, None)
        for n, (i, p) in enumerate(pairs.tolist()):
            if cached[0] != i:  # pairs are example-major: one read per example
                cached = (i, keys_of(i))
            keys[2 * n:2 * n + 2] = cached[1][0], cached[1][1][p]
        counts = np.full(len(pairs), 2, dtype=np.int64)
    return np.concatenate([[0], np.cumsum(counts)]).astype(np.int64), keys


def no_duplicates_order(order: np.ndarray, keys: tuple[np.ndarray, np.ndarray], batch_size: int) -> np.ndarray:
    """``order`` regrouped so that no batch of ``batch_size`` consecutive rows holds a key twice, as
    sentence-transformers' ``NoDuplicatesBatchSampler``: each batch takes the earliest remaining rows that do
    not collide with it, later rows wait for a later batch. Once the remaining rows cannot fill a batch
    without a repeat (the epoch's tail), they follow in order and the trainer's duplicate mask handles them;
    a partial batch there is dropped like any last partial batch."""
    ptr, flat = keys
    remaining = dict.fromkeys(order.tolist())
    out: list[int] = []
    while remaining:
        seen: set[int] = set()
        batch: list[int] = []
        for r in remaining:
            row = flat[ptr[r]:ptr[r + 1]].tolist()
            if seen.isdisjoint(row):
                batch.append(r)
                if len(batch) == batch_size:
                    break
                seen.update(row)
        if len(batch) < batch_size:  # the tail: no full batch without a repeat is left
            out += list(remaining)
            break
        for r in batch:
            del remaining[r]
        out += batch
    return np.asarray(out, dtype=np.int64)


@dataclass
class Batch:
    """One process's share of a global micro-batch."""

    queries: list[str]
    documents: list[str]           # this process's documents: its positives, then its hard negatives
    targets: torch.Tensor          # [Q] long: each query's positive row among the GLOBAL documents
    exclude: torch.Tensor          # [Q, D_global] bool: copies of the query's own positives
    global_documents: list[str]    # every process's documents, rank-major (what doc_emb rows mean)


class BatchCollator:
    """Turns the global micro-batch's examples into this process's :class:`Batch`.

    The positive of each example and its hard negatives are drawn with an RNG seeded by
    (seed, epoch, row index), so they do not depend on the process count or on a resume. ``indices`` are
    the rows' indices (the examples' under ``data.rows: per_query``); ``positive_index``, when given (per_pair),
    fixes each row's positive (an index into its ``positives``) instead of the draw.
    """

    def __init__(self, strategy: NegativeStrategy, seed: int, rank: int = 0, world_size: int = 1):
        self.strategy, self.seed, self.rank, self.world_size = strategy, seed, rank, world_size

    def __call__(self, examples: Sequence[TrainingExample], indices: Sequence[int], epoch: int,
                 positive_index: Sequence[int] | None = None) -> Batch:
        if len(examples) % self.world_size:
            raise ValueError(f"a global batch of {len(examples)} does not split over {self.world_size} processes")
        per_rank = len(examples) // self.world_size
        shards = []
        for r in range(self.world_size):
            rows = range(r * per_rank, (r + 1) * per_rank)
            positives, negatives = [], []
            for i in rows:
                rng = np.random.default_rng([self.seed, epoch, int(indices[i])])
                ex = examples[i]
                pick = int(rng.integers(len(ex.positives)))  # drawn either way: the same stream for the negatives
                if positive_index is not None:
                    pick = int(positive_index[i])
                positives.append(ex.positives[pick])
                negatives.extend(self.strategy.negatives_given_positive(ex, pick, rng))
            shards.append((rows, positives + negatives))
        global_docs = [d for _, docs in shards for d in docs]
        offset = sum(len(docs) for _, docs in shards[:self.rank])
        rows, local_docs = shards[self.rank]
        mine = [examples[i] for i in rows]
        doc_ids = {}
        doc_index = torch.tensor([doc_ids.setdefault(d, len(doc_ids)) for d in global_docs])
        exclude = torch.zeros(len(mine), len(global_docs), dtype=torch.bool)
        for q, ex in enumerate(mine):
            own = [doc_ids[p] for p in ex.positives if p in doc_ids]
            if own:
                exclude[q] = torch.isin(doc_index, torch.tensor(own))
        targets = torch.arange(len(mine)) + offset
        return Batch(queries=[ex.query for ex in mine], documents=local_docs, targets=targets,
                     exclude=exclude, global_documents=global_docs)
