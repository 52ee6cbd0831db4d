"""BM25 through pyserini (Anserini/Lucene), "flat" indexing as in pyserini's BEIR regressions:
one ``contents`` field holding ``title + " " + text``, Lucene's default English analyzer
(Porter stemming, stopwords), positions, doc vectors and raw text stored."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Mapping, Sequence

from retriever.data import Corpus, DataError
from retriever.io import atomic_dir, write_text_atomic

from index.java import ensure_java

MANIFEST = "negatron-bm25.json"


def resolve_corpus_path(corpus: str | os.PathLike) -> Path:
    """A BEIR folder (its ``corpus.jsonl``), a ``corpus.jsonl`` or an MS MARCO ``collection.tsv``."""
    path = Path(corpus)
    if path.is_dir():
        if (path / "corpus.jsonl").is_file():
            return path / "corpus.jsonl"
        raise DataError(path, None, "folder has no corpus.jsonl", "point at a BEIR folder, a corpus.jsonl or an `id<TAB>text` .tsv")
    if not path.exists():
        raise DataError(path, None, "corpus not found", "check the path (a BEIR folder, a corpus.jsonl or a collection .tsv)")
    return path


def _write_json_collection(corpus: Corpus, folder: Path, docs_per_file: int = 500_000) -> int:
    """Anserini JsonCollection files: ``{"id", "contents"}`` per line, contents = title + " " + text."""
    count, part, out = 0, 0, None
    try:
        for doc in corpus:
            if count % docs_per_file == 0:
                if out:
                    out.close()
                out = open(folder / f"docs{part:04d}.jsonl", "w", encoding="utf-8")
                part += 1
            contents = f"{doc.title} {doc.text}" if doc.title else doc.text
            out.write(json.dumps({"id": doc.id, "contents": contents}, ensure_ascii=False) + "\n")
            count += 1
    finally:
        if out:
            out.close()
    return count


def build_bm25_index(corpus: str | os.PathLike | Corpus, output_dir: str | os.PathLike, threads: int = 2) -> Path:
    """Index ``corpus`` with Lucene into ``output_dir`` (written atomically) and return its path."""
    corpus = corpus if isinstance(corpus, Corpus) else Corpus(resolve_corpus_path(corpus))
    ensure_java()
    from jnius import autoclass

    output_dir = Path(output_dir)
    output_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".bm25-input.", dir=output_dir.parent))
    try:
        count = _write_json_collection(corpus, staging)
        with atomic_dir(output_dir) as tmp:
            args = ["-collection", "JsonCollection", "-input", str(staging), "-index", str(tmp),
                    "-generator", "DefaultLuceneDocumentGenerator", "-threads", str(int(threads)),
                    "-storePositions", "-storeDocvectors", "-storeRaw", "-quiet"]
            autoclass("io.anserini.index.IndexCollection").main(args)
            indexed = autoclass("io.anserini.index.IndexReaderUtils").getIndexStats(
                autoclass("io.anserini.index.IndexReaderUtils").getReader(str(tmp))).get("documents")
            if int(indexed) != count:
                raise RuntimeError(f"Lucene indexed {indexed} of {count} documents from {corpus.path}; see the log above")
            write_text_atomic(tmp / MANIFEST, json.dumps({
                "corpus": str(Path(corpus.path).resolve()), "count": count, "fields": "contents = title + ' ' + text",
                "analyzer": "Lucene default English (Porter stemmer)"}, indent=2) + "\n")
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return output_dir


class BM25Searcher:
    """Search a Lucene index built by :func:`build_bm25_index` (or any pyserini index) with BM25."""

    def __init__(self, index_dir: str | os.PathLike, k1: float = 0.9, b: float = 0.4):
        index_dir = Path(index_dir)
        if not (index_dir / "segments_1").exists() and not any(index_dir.glob("segments_*")):
            raise DataError(index_dir, None, "not a Lucene index (no segments_* file)",
                            "build one with `negatron index bm25 --corpus DATA --output DIR`")
        ensure_java()
        from pyserini.search.lucene import LuceneSearcher

        self.index_dir = index_dir
        self.k1, self.b = k1, b
        self._searcher = LuceneSearcher(str(index_dir))
        self._searcher.set_bm25(float(k1), float(b))

    @property
    def count(self) -> int:
        return int(self._searcher.num_docs)

    def search(self, queries: Mapping[str, str] | Sequence[str], k: int = 1000,
               threads: int = 2) -> dict[str, list[tuple[str, float]]]:
        """Top-``k`` ``(docid, score)`` per query, best first. A list of queries is keyed "0", "1", ..."""
        if not isinstance(queries, Mapping):
            queries = {str(i): q for i, q in enumerate(queries)}
        qids = list(queries)
        texts = [queries[q] for q in qids]
        hits = self._searcher.batch_search(texts, qids, k=int(k), threads=int(threads))
        return {qid: [(h.docid, float(h.score)) for h in hits.get(qid, [])] for qid in qids}
