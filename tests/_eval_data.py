"""A small BEIR folder written on the fly for the evaluation tests (real sentences, hand-made qrels)."""

from __future__ import annotations

import json
from pathlib import Path

DOCS = {
    "d1": ("Dense retrieval", "Dense retrievers encode queries and documents into vectors and rank by inner product."),
    "d2": ("BM25", "BM25 ranks documents by term frequency, inverse document frequency and length normalisation."),
    "d3": ("Hard negatives", "Hard negatives are documents that look relevant to a query but do not answer it."),
    "d4": ("FAISS", "FAISS searches millions of vectors exactly or approximately on CPUs and GPUs."),
    "d5": ("Cross-encoders", "A cross-encoder reads the query and the document together and outputs one score."),
    "d6": ("Contrastive loss", "InfoNCE pulls a query towards its positive and away from in-batch negatives."),
    "d7": ("", "The quick brown fox jumps over the lazy dog near the river bank."),
    "d8": ("Python", "Python functions return values and raise exceptions when something goes wrong."),
    "d9": ("Tokenizers", "WordPiece splits rare words into frequent sub-word units."),
    "d10": ("Evaluation", "nDCG rewards relevant documents near the top of the ranking with graded gains."),
    "q3": ("Duplicate of a query", "What makes a negative hard for a dense retriever?"),
}
QUERIES = {
    "q1": "how do dense retrievers rank documents",
    "q2": "what is bm25",
    "q3": "What makes a negative hard for a dense retriever?",
    "q4": "exact vector search library",
    "q5": "how is ranking quality measured",
    "q6": "a query without judgements",
}
QRELS = {  # q6 has no judgements and must be skipped; q3's identical id must be ignored
    "q1": {"d1": 2, "d4": 1},
    "q2": {"d2": 1},
    "q3": {"d3": 2, "q3": 1},
    "q4": {"d4": 1, "d1": 0},
    "q5": {"d10": 3, "d2": 1},
}


def write_toy_beir(folder: Path, split: str = "test", qrels: dict | None = None) -> Path:
    folder = Path(folder)
    (folder / "qrels").mkdir(parents=True, exist_ok=True)
    with open(folder / "corpus.jsonl", "w") as fh:
        for doc_id, (title, text) in DOCS.items():
            fh.write(json.dumps({"_id": doc_id, "title": title, "text": text, "metadata": {}}) + "\n")
    with open(folder / "queries.jsonl", "w") as fh:
        for qid, text in QUERIES.items():
            fh.write(json.dumps({"_id": qid, "text": text}) + "\n")
    with open(folder / "qrels" / f"{split}.tsv", "w") as fh:
        fh.write("query-id\tcorpus-id\tscore\n")
        for qid, docs in (qrels or QRELS).items():
            for doc_id, grade in docs.items():
                fh.write(f"{qid}\t{doc_id}\t{grade}\n")
    return folder
