"""Training examples from a config's data source, the dev carve-out, the epoch order and the collator.

Batch layout for one micro-step, global over ``world_size`` processes: each process holds
``batch_size`` queries; its documents are its queries' positives followed by their hard negatives
(``per_query`` each, query-major). Gathered across processes, rank 0's documents come first. Every
process sees the whole dataset and derives the same global order from the seed, so sharding needs no
communication and a resumed run rebuilds the exact same batches.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np
import torch

from retriever.config import DataConfig
from retriever.data import (Corpus, TrainingExample, iter_training_jsonl, iter_triples, load_beir, load_hf_dataset,
                            read_qrels, read_queries, training_examples_from_hf, training_examples_from_qrels,
                            write_jsonl_atomic)
from retriever.negatives import NegativeStrategy


def _iter_source(cfg: DataConfig) -> Iterator[TrainingExample] | list[TrainingExample]:
    source = cfg.source
    if source == "beir":
        ds = load_beir(cfg.beir, cfg.split)
        return training_examples_from_qrels(ds.queries, ds.qrels, ds.corpus)
    if source == "triples":
        return iter_triples(cfg.triples)
    if source == "qrels":
        return training_examples_from_qrels(read_queries(cfg.queries), read_qrels(cfg.qrels), Corpus(cfg.collection))
    if source == "jsonl":
        return iter_training_jsonl(cfg.jsonl, Corpus(cfg.corpus) if cfg.corpus else None)
    return training_examples_from_hf(load_hf_dataset(cfg.hf, cfg.hf_split, cfg.columns))


def load_examples(cfg: DataConfig) -> list[TrainingExample]:
    """All examples of the configured source (the first ``max_examples`` when set)."""
    examples = list(itertools.islice(_iter_source(cfg), cfg.max_examples))
    if not examples:
        raise ValueError(f"the {cfg.source} data source yielded no training examples")
    return examples


def split_dev(examples: Sequence[TrainingExample], fraction: float, seed: int
              ) -> tuple[list[TrainingExample], list[TrainingExample]]:
    """Hold out ``fraction`` of the examples (a seeded random subset) for tuning, so nobody tunes on test."""
    n_dev = int(round(len(examples) * fraction))
    order = np.random.default_rng(seed).permutation(len(examples))
    dev_rows = set(order[:n_dev].tolist())
    train = [e for i, e in enumerate(examples) if i not in dev_rows]
    dev = [e for i, e in enumerate(examples) if i in dev_rows]
    return train, dev


def write_examples(path: str | Path, examples: Sequence[TrainingExample]) -> Path:
    """FlagEmbedding-layout JSONL (readable by :func:`retriever.data.iter_training_jsonl`)."""
    rows = ({"query": e.query, "pos": e.positives, "neg": e.negatives, "query_id": e.query_id,
             "pos_ids": e.positive_ids} for e in examples)
    return write_jsonl_atomic(path, rows)


def epoch_order(num_examples: int, seed: int, epoch: int) -> np.ndarray:
    """The shuffled example order of one epoch: a pure function of (seed, epoch)."""
    return np.random.default_rng([seed, epoch]).permutation(num_examples)


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
    (seed, epoch, example index), so they do not depend on the process count or on a resume.
    """

    def __init__(self, strategy: NegativeStrategy, seed: int, rank: int = 0, world_size: int = 1):
        self.strategy, self.seed, self.rank, self.world_size = strategy, seed, rank, world_size

    def __call__(self, examples: Sequence[TrainingExample], indices: Sequence[int], epoch: int) -> Batch:
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
                positives.append(ex.positives[int(rng.integers(len(ex.positives)))])
                negatives.extend(self.strategy.negatives_for(ex, rng))
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
