"""Shared plumbing for the index-backed strategies (STAR, ADORE, ANCE, AR2): find the training corpus,
turn training examples into mining queries, and encode a corpus into a FAISS index with ``index/``."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

from retriever.data import Corpus, TrainingExample


def corpus_path(trainer: Any, override: str | None) -> Path:
    """The corpus the training data's ids refer to: ``override``, else the data source's own corpus."""
    if override:
        return Path(override)
    data = trainer.config.data
    if data.beir:
        return Path(data.beir) / "corpus.jsonl"
    if data.corpus:
        return Path(data.corpus)
    if data.collection:
        return Path(data.collection)
    raise ValueError(f"negatives.strategy {trainer.config.negatives.strategy!r} retrieves from a corpus, but the "
                     f"{data.source} data source names none: set negatives.options.corpus (corpus.jsonl or "
                     "collection.tsv) or use a beir / jsonl+corpus / qrels data source")


def training_queries(examples: Sequence[TrainingExample]):
    """Training examples as :class:`mining.miner.TrainingQuery` (ids are the example's position)."""
    from mining.miner import TrainingQuery

    return [TrainingQuery(str(i), ex.query, list(ex.positive_ids), list(ex.positives))
            for i, ex in enumerate(examples)]


def build_index(model, corpus: Corpus, folder: Path, batch_size: int | None = None, bf16: bool | None = None,
                distributed: bool = True):
    """Encode ``corpus`` with ``model``'s document tower and build a flat inner-product FAISS index.

    Returns ``(DenseIndex, EmbeddingStore)``; files go to ``folder/embeddings`` and ``folder/index``.
    ``distributed=False`` encodes on this process alone (a caller that runs only on the main process).
    """
    from index.encode import encode_corpus
    from index.faiss_index import DenseIndex

    store = encode_corpus(model, corpus, folder / "embeddings", batch_size=batch_size, bf16=bf16, show_progress=False,
                          distributed=distributed)
    DenseIndex.build(store, folder / "index", factory="Flat", metric="ip", distributed=distributed)
    return DenseIndex.load(folder / "index"), store
