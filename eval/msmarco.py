"""MS MARCO passage dev and TREC Deep Learning 2019/2020 evaluation from the official files.

Presets fix the metrics and the relevance threshold the official evaluations use:

* ``dev``: MRR@10 and Recall@1000 on binary qrels (``qrels.dev.small.tsv``), grade ≥ 1;
* ``dl19`` / ``dl20``: nDCG@10 with graded gains (0–3), and Recall@1000, MAP@1000 and MRR@10 at
  the TREC passage-ranking threshold, grade ≥ 2 (``trec_eval -l 2``).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from eval.beir import evaluate_corpus


@dataclass(frozen=True)
class Preset:
    name: str
    metrics: tuple[str, ...]
    relevance_level: int


PRESETS = {
    "dev": Preset("msmarco-dev", ("mrr@10", "recall@1000", "ndcg@10"), 1),
    "dl19": Preset("trec-dl-2019", ("ndcg@10", "recall@1000", "map@1000", "mrr@10"), 2),
    "dl20": Preset("trec-dl-2020", ("ndcg@10", "recall@1000", "map@1000", "mrr@10"), 2),
}


def evaluate_msmarco(model, *, collection=None, queries=None, qrels=None, data_dir=None, preset: str = "dev",
                     output_dir=None, k: int = 1000, batch_size: int | None = None, bf16: bool | None = None,
                     index_dir=None, name: str | None = None, strict_qrels: bool = False, progress=None) -> dict:
    """Evaluate on ``collection`` (``pid<TAB>passage`` TSV or corpus.jsonl) + ``queries`` (TSV) +
    ``qrels`` (TREC or MS MARCO TSV), or on a BEIR-layout ``data_dir`` (test split).

    Only judged queries are searched. ``name`` (default: the preset's) names the output folder.
    Judgements of passages absent from a BEIR-layout folder's corpus are scored as relevant and
    never retrieved (``eval.beir.check_qrels``; ``strict_qrels`` makes them an error).
    """
    from eval.beir import check_qrels
    from retriever.data import Corpus, DataError, load_beir, read_qrels, read_queries

    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; choose one of {', '.join(PRESETS)}")
    spec = PRESETS[preset]
    if data_dir is not None:
        data = load_beir(data_dir, "test", check_ids=False)
        corpus, query_map, qrel_map = data.corpus, data.queries, data.qrels
        check_qrels(Path(data_dir) / "qrels" / "test.tsv", qrel_map, query_map, corpus, strict=strict_qrels)
    else:
        if collection is None or queries is None or qrels is None:
            raise ValueError("give --collection, --queries and --qrels (or --data for a BEIR-layout folder)")
        corpus, query_map, qrel_map = Corpus(collection), read_queries(queries), read_qrels(qrels)
        unknown = [q for q in qrel_map if q not in query_map]
        if len(unknown) == len(qrel_map):
            raise DataError(qrels, None, f"none of its {len(qrel_map)} query ids is in {queries}",
                            "pass the queries file that matches these qrels")
        qrel_map = {q: docs for q, docs in qrel_map.items() if q in query_map}
    result = evaluate_corpus(model, name or spec.name, corpus, query_map, qrel_map, split=preset,
                             output_dir=output_dir, k=k, batch_size=batch_size, bf16=bf16,
                             index_dir=index_dir, metrics=spec.metrics, relevance_level=spec.relevance_level,
                             progress=progress)
    return result

