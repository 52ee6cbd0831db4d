"""Retrieval metrics through pytrec_eval, with BEIR's conventions.

Metric names are lower-case ``<measure>@<k>``: ``ndcg@10``, ``recall@100``, ``map@100``, ``p@10``,
``mrr@10``. nDCG, recall, MAP and precision come from pytrec_eval (trec_eval's ``ndcg_cut``,
``recall``, ``map_cut``, ``P``); MRR@k is computed the way BEIR's ``custom_metrics.mrr`` does
(first relevant hit among the top k by score). See docs/evaluation.md.
"""

from __future__ import annotations

import re
from typing import Iterable, Mapping

DEFAULT_METRICS = ("ndcg@1", "ndcg@3", "ndcg@5", "ndcg@10", "ndcg@100", "mrr@10",
                   "recall@10", "recall@100", "recall@1000", "map@100")
_TREC_MEASURE = {"ndcg": "ndcg_cut", "recall": "recall", "map": "map_cut", "p": "P"}
_NAME = re.compile(r"^(ndcg|recall|map|p|mrr)@(\d+)$")

Qrels = Mapping[str, Mapping[str, int]]
Run = Mapping[str, Mapping[str, float]]


def parse_metric(name: str) -> tuple[str, int]:
    match = _NAME.match(name.strip().lower())
    if not match:
        raise ValueError(f"unknown metric {name!r}; use ndcg@k, recall@k, map@k, p@k or mrr@k")
    return match.group(1), int(match.group(2))


def drop_identical_ids(run: Run) -> dict[str, dict[str, float]]:
    """MTEB/BEIR ``ignore_identical_ids``: a document whose id equals the query id is not a hit
    (on datasets such as Quora and ArguAna the query itself is in the corpus)."""
    return {qid: {d: s for d, s in docs.items() if d != qid} for qid, docs in run.items()}


def _reciprocal_rank(judged: Mapping[str, int], ranked: Mapping[str, float], k: int, level: int) -> float:
    relevant = {d for d, g in judged.items() if g >= level}
    # Python's sort is stable, so ties keep run order, as in BEIR.
    top = sorted(ranked.items(), key=lambda item: item[1], reverse=True)[:k]
    for rank, (doc_id, _) in enumerate(top, start=1):
        if doc_id in relevant:
            return 1.0 / rank
    return 0.0


def compute_metrics(qrels: Qrels, run: Run, k_values: Iterable[int] | None = None,
                    metrics: Iterable[str] | None = None, relevance_level: int = 1,
                    ignore_identical_ids: bool = True) -> tuple[dict[str, float], dict[str, dict[str, float]]]:
    """(mean over judged queries, per-query values) for ``run`` = {qid: {docid: score}}.

    ``k_values`` (e.g. ``[1, 10, 100]``) asks for nDCG/recall/MAP/MRR at each k; otherwise
    ``metrics`` names them (default :data:`DEFAULT_METRICS`). ``relevance_level`` is the lowest
    grade counted as relevant for recall, MAP, precision and MRR (nDCG always uses the graded
    gains): 1 for BEIR and MS MARCO dev, 2 for TREC DL passage ranking.

    Every query in ``qrels`` counts in the mean; one with no retrieved documents scores 0
    (BEIR would drop it from all but MRR; with a full top-k run the two agree).
    """
    import pytrec_eval

    if k_values is not None:
        ks = sorted(set(int(k) for k in k_values))
        names = [f"{m}@{k}" for m in ("ndcg", "map", "recall", "mrr") for k in ks]
    else:
        names = list(metrics or DEFAULT_METRICS)
    parsed = {name.lower(): parse_metric(name) for name in names}
    if ignore_identical_ids:
        run = drop_identical_ids(run)
    qrels = {str(q): {str(d): int(g) for d, g in docs.items()} for q, docs in qrels.items()}
    run = {str(q): {str(d): float(s) for d, s in docs.items()} for q, docs in run.items() if q in qrels}

    trec: dict[str, set[int]] = {}
    for measure, k in parsed.values():
        if measure != "mrr":
            trec.setdefault(_TREC_MEASURE[measure], set()).add(k)
    measures = {f"{m}." + ",".join(str(k) for k in sorted(ks)) for m, ks in trec.items()}
    scored = {}
    if measures:
        evaluator = pytrec_eval.RelevanceEvaluator(qrels, measures, relevance_level=relevance_level)
        scored = evaluator.evaluate({q: docs for q, docs in run.items() if docs})

    per_query: dict[str, dict[str, float]] = {}
    for qid, judged in qrels.items():
        values = {}
        for name, (measure, k) in parsed.items():
            if measure == "mrr":
                values[name] = _reciprocal_rank(judged, run.get(qid, {}), k, relevance_level)
            else:
                values[name] = float(scored.get(qid, {}).get(f"{_TREC_MEASURE[measure]}_{k}", 0.0))
        per_query[qid] = values
    n = max(len(per_query), 1)
    aggregate = {name: sum(v[name] for v in per_query.values()) / n for name in parsed}
    return aggregate, per_query


def run_from_arrays(query_ids: list[str], doc_ids: list[str], scores, rows) -> dict[str, dict[str, float]]:
    """{qid: {docid: score}} from search output (``rows`` < 0 are empty slots and are skipped)."""
    run: dict[str, dict[str, float]] = {}
    for i, qid in enumerate(query_ids):
        run[qid] = {doc_ids[int(r)]: float(s) for s, r in zip(scores[i], rows[i]) if r >= 0}
    return run


def trec_line(qid: str, doc_id: str, rank: int, score: float, tag: str) -> str:
    """One TREC run line. The score is written exactly (shortest round-trip repr), because trec_eval
    re-sorts by score: rounding to 6 decimals turns near-ties into ties broken by doc id, and the
    file then scores differently from the in-memory run."""
    return f"{qid} Q0 {doc_id} {rank} {float(score)!r} {tag}\n"


def write_trec_run(path, run: Run, tag: str = "negatron") -> None:
    """TREC run format ``qid Q0 docid rank score tag``, ranks from 1 in score order."""
    from retriever.io import atomic_write

    with atomic_write(path, "w") as fh:
        for qid, docs in run.items():
            ranked = sorted(docs.items(), key=lambda item: item[1], reverse=True)
            for rank, (doc_id, score) in enumerate(ranked, start=1):
                fh.write(trec_line(qid, doc_id, rank, score, tag))


def read_trec_run(path) -> dict[str, dict[str, float]]:
    from retriever.data import DataError

    run: dict[str, dict[str, float]] = {}
    with open(path, encoding="utf-8") as fh:
        for lineno, line in enumerate(fh, start=1):
            parts = line.split()
            if not parts:
                continue
            if len(parts) != 6:
                raise DataError(path, lineno, f"expected 6 columns, found {len(parts)}", "write `qid Q0 docid rank score tag`")
            try:
                run.setdefault(parts[0], {})[parts[2]] = float(parts[4])
            except ValueError:
                raise DataError(path, lineno, f"score {parts[4]!r} is not a number", "column 5 must be the score") from None
    return run
