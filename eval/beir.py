"""Dense retrieval evaluation on BEIR folders: encode, search exactly, score with pytrec_eval.

Writes ``<output>/<dataset>/metrics.json``, ``run.trec`` and ``per_query.jsonl``.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np

from eval.metrics import DEFAULT_METRICS, compute_metrics, drop_identical_ids, run_from_arrays, write_trec_run
from index.encode import encode_texts

logger = logging.getLogger(__name__)
ENCODE_BLOCK = 16_384  # documents encoded and searched per step; bounds memory on big corpora


def load_model(model, **overrides):
    """A BiEncoder from a BiEncoder, a path or a model name."""
    from retriever.modeling import BiEncoder

    if isinstance(model, BiEncoder):
        return model
    return BiEncoder.from_pretrained(str(model), **{k: v for k, v in overrides.items() if v is not None})


def dense_search(model, corpus, query_texts: Sequence[str], k: int, batch_size: int | None = None, bf16: bool | None = None,
                 index_dir=None, timings: dict | None = None, progress=None) -> tuple[np.ndarray, np.ndarray, Sequence[str]]:
    """(scores, rows, doc_ids) of the exact top-``k`` for each query.

    ``doc_ids`` is the row -> id sequence of the corpus or index (memory-mapped, never a Python list of
    every id: ~0.6 GB at MS MARCO's 8.8M passages); index it with the returned rows.

    Without ``index_dir`` the corpus is encoded ``ENCODE_BLOCK`` documents at a time and each block
    is merged into a running top-k, so only one block of embeddings is ever held. With it, a
    prebuilt ``index.faiss_index.DenseIndex`` is searched instead. ``progress`` (a
    :class:`retriever.progress.ProgressDisplay`) shows one bar for the queries and one for the corpus.
    """
    from eval.search import TopK
    from retriever.progress import NO_PROGRESS

    progress = progress or NO_PROGRESS
    timings = {} if timings is None else timings
    start = time.perf_counter()
    with progress.stage("encode queries", len(query_texts), "queries") as bar:
        q_emb = encode_texts(model, query_texts, "query", batch_size, bf16, progress=bar)
    timings["encode_queries_s"] = time.perf_counter() - start
    if index_dir is not None:
        from index.faiss_index import DenseIndex

        start = time.perf_counter()
        index = DenseIndex.load(index_dir, expect_dim=model.dim, expect_model=model)
        scores, rows = index.search(q_emb, k)
        timings["search_s"] = time.perf_counter() - start
        return np.asarray(scores), np.asarray(rows), index.ids  # memory-mapped: only returned rows are decoded
    top = TopK(q_emb, k)
    encode_s = search_s = 0.0
    with progress.stage("encode + search corpus", len(corpus), "docs") as bar:
        for begin in range(0, len(corpus), ENCODE_BLOCK):
            rows = range(begin, min(begin + ENCODE_BLOCK, len(corpus)))
            start = time.perf_counter()
            block = encode_texts(model, corpus.texts(rows), "document", batch_size, bf16, progress=bar)
            encode_s += time.perf_counter() - start
            start = time.perf_counter()
            top.add(block)
            search_s += time.perf_counter() - start
            logger.info("searched %d/%d documents", rows.stop, len(corpus))
    timings["encode_corpus_s"], timings["search_s"] = encode_s, search_s
    scores, rows = top.result()
    return scores, rows, corpus.ids


def evaluate_run(name: str, split: str, model_name: str, queries: Mapping[str, str], qrels, run, *,
                 num_docs: int, seconds: float, output_dir=None, metrics: Sequence[str] = DEFAULT_METRICS,
                 relevance_level: int = 1, extra: dict | None = None, ignore_identical_ids: bool = True) -> dict:
    """Score ``run`` and write ``metrics.json``, ``run.trec``, ``per_query.jsonl`` under
    ``output_dir/name``. Returns the metrics.json dict."""
    from retriever.data import write_jsonl_atomic
    from retriever.io import write_text_atomic

    aggregate, per_query = compute_metrics(qrels, run, metrics=metrics, relevance_level=relevance_level,
                                           ignore_identical_ids=ignore_identical_ids)
    result = {
        "dataset": name,
        "split": split,
        "model": model_name,
        "metrics": aggregate,
        "num_queries": len(per_query),
        "num_docs": num_docs,
        "seconds": round(seconds, 3),
        "relevance_level": relevance_level,
        "ignore_identical_ids": ignore_identical_ids,
        **(extra or {}),
    }
    if output_dir is not None:
        out = Path(output_dir) / name
        out.mkdir(parents=True, exist_ok=True)
        # identical ids dropped here too, so trec_eval on run.trec reproduces metrics.json
        ranked = {q: run.get(q, {}) for q in queries}
        write_trec_run(out / "run.trec", drop_identical_ids(ranked) if ignore_identical_ids else ranked)
        write_jsonl_atomic(out / "per_query.jsonl", ({"query_id": q, **v} for q, v in per_query.items()))
        write_text_atomic(out / "metrics.json", json.dumps(result, indent=2) + "\n")
    return result


def evaluate_corpus(model, name: str, corpus, queries: Mapping[str, str], qrels, *, split: str = "test",
                    output_dir=None, k: int = 1000, batch_size: int | None = None, bf16: bool | None = None,
                    index_dir=None, metrics: Sequence[str] = DEFAULT_METRICS, relevance_level: int = 1,
                    ignore_identical_ids: bool = True, progress=None, extra: dict | None = None) -> dict:
    """Encode, search and score one corpus/queries/qrels triple (queries without judgements are skipped)."""
    start = time.perf_counter()
    model = load_model(model)
    judged = {qid: text for qid, text in queries.items() if qid in qrels}
    query_ids = list(judged)
    timings: dict = {}
    scores, rows, doc_ids = dense_search(model, corpus, [judged[q] for q in query_ids], k, batch_size, bf16,
                                         index_dir=index_dir, timings=timings, progress=progress)
    run = run_from_arrays(query_ids, doc_ids, scores, rows)
    return evaluate_run(name, split, str(model.name or "model"), judged, {q: qrels[q] for q in query_ids}, run,
                        num_docs=len(doc_ids), seconds=time.perf_counter() - start, output_dir=output_dir,
                        metrics=metrics, relevance_level=relevance_level, ignore_identical_ids=ignore_identical_ids,
                        extra={"k": k, "bf16": bf16 is not False, **(extra or {}),
                               "timings": {key: round(v, 3) for key, v in timings.items()}})


def check_qrels(qrels_path, qrels, queries: Mapping[str, str], corpus, strict: bool = False) -> int:
    """Validate ``qrels`` against ``queries`` and ``corpus``; return the number of dangling judgements.

    A judged query id missing from the queries file is an error (nothing could be searched for it).
    A judged document missing from the corpus (five official ArguAna qrels name one) is, as in
    BEIR, MTEB and pytrec_eval, kept: relevant, never retrieved. It is counted and reported in one
    warning line with an example; ``strict`` makes it an error naming the qrels line.
    """
    from retriever.data import DataError

    for qid in qrels:
        if qid not in queries:
            raise DataError(qrels_path, _line_of(qrels_path, qid), f"query id {qid!r} is judged but not in the queries file",
                            "fix the qrels or the queries file")
    dangling = [(qid, doc) for qid, docs in qrels.items() for doc in docs if doc not in corpus]
    if dangling and strict:
        qid, doc = dangling[0]
        raise DataError(qrels_path, _line_of(qrels_path, qid, doc),
                        f"{len(dangling)} judgement(s) name documents absent from the corpus, e.g. query {qid!r} -> {doc!r}",
                        "drop --strict-qrels to score them as BEIR does (relevant, never retrieved), or fix the qrels")
    if dangling:
        qid, doc = dangling[0]
        logger.warning("%s: %d judgement(s) name documents absent from the corpus (e.g. query %r -> %r); scored as "
                       "BEIR/pytrec_eval score them: relevant, never retrieved", qrels_path, len(dangling), qid, doc)
    return len(dangling)


def _line_of(path, qid: str, doc: str | None = None) -> int | None:
    """The first line of the qrels file ``path`` judging ``qid`` (and ``doc``), for error messages."""
    with open(path, encoding="utf-8") as fh:
        for lineno, line in enumerate(fh, start=1):
            parts = line.split()
            if parts and parts[0] == qid and (doc is None or doc in parts[1:-1] or parts[1:] == [doc]):
                return lineno
    return None


def evaluate_beir(model, data_dir, split: str = "test", output_dir=None, k: int = 1000, batch_size: int | None = None,
                  bf16: bool | None = None, index_dir=None, metrics: Sequence[str] = DEFAULT_METRICS,
                  ignore_identical_ids: bool = True, strict_qrels: bool = False, progress=None) -> dict:
    """Evaluate ``model`` (BiEncoder, path or name) on the BEIR folder ``data_dir``.

    Document text is ``title + " " + text``; a retrieved document whose id equals the query id is
    ignored (``ignore_identical_ids``, BEIR's default); only queries judged in ``qrels/<split>.tsv``
    are scored; judgements of documents absent from the corpus count as relevant and never
    retrieved (see :func:`check_qrels`; ``strict_qrels`` makes them an error). Returns the
    metrics.json dict, whose ``dangling_qrels`` counts them.
    """
    from retriever.data import load_beir

    data = load_beir(data_dir, split, check_ids=False)
    qrels_path = Path(data_dir) / "qrels" / f"{split}.tsv"
    dangling = check_qrels(qrels_path, data.qrels, data.queries, data.corpus, strict=strict_qrels)
    return evaluate_corpus(model, data.name, data.corpus, data.queries, data.qrels, split=split,
                           output_dir=output_dir, k=k, batch_size=batch_size, bf16=bf16, index_dir=index_dir,
                           metrics=metrics, ignore_identical_ids=ignore_identical_ids, progress=progress,
                           extra={"dangling_qrels": dangling})
