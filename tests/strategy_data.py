"""Small real problems for the negative-strategy tests: a slice of SciFact in BEIR layout and a tiny
BERT whose tokenizer is trained on that slice."""

from __future__ import annotations

import json
from pathlib import Path

from retriever.data import load_beir, read_qrels, read_queries

_SHARED: dict[str, tuple[Path, Path]] = {}


def shared_mini(scifact: Path) -> tuple[Path, Path]:
    """(mini BEIR folder, tiny model trained on its texts), built once per test process."""
    import atexit
    import shutil
    import tempfile

    from retriever.testing import build_tiny_model

    if "mini" not in _SHARED:
        root = Path(tempfile.mkdtemp(prefix="negatron-strategies-"))
        atexit.register(shutil.rmtree, root, True)
        folder = mini_beir(scifact, root / "mini")
        _SHARED["mini"] = (folder, build_tiny_model(root / "tiny", corpus_texts(folder)))
    return _SHARED["mini"]


def mini_beir(scifact: Path, out: Path, n_queries: int = 24, n_docs: int = 120) -> Path:
    """The first ``n_queries`` judged SciFact train queries, their positives and other documents up to
    ``n_docs``, written as a BEIR folder under ``out``."""
    if (out / "corpus.jsonl").exists():
        return out
    qrels = read_qrels(scifact / "qrels" / "train.tsv")
    queries = read_queries(scifact / "queries.jsonl")
    chosen = [q for q in qrels if q in queries][:n_queries]
    wanted = {d for q in chosen for d in qrels[q]}
    docs = []
    with open(scifact / "corpus.jsonl", encoding="utf-8") as fh:
        for line in fh:
            doc = json.loads(line)
            if doc["_id"] in wanted or len(docs) < n_docs - len(wanted):
                docs.append(doc)
    (out / "qrels").mkdir(parents=True, exist_ok=True)
    (out / "corpus.jsonl").write_text("".join(json.dumps(d) + "\n" for d in docs))
    (out / "queries.jsonl").write_text("".join(json.dumps({"_id": q, "text": queries[q]}) + "\n" for q in chosen))
    (out / "qrels" / "train.tsv").write_text("query-id\tcorpus-id\tscore\n" + "".join(
        f"{q}\t{d}\t{g}\n" for q in chosen for d, g in qrels[q].items()))
    return out


def corpus_texts(folder: Path) -> list[str]:
    ds = load_beir(folder, "train")
    return [d.full_text for d in ds.corpus] + list(ds.queries.values())


def tiny_config(folder: Path, model: Path, strategy: str, options: dict, **training) -> dict:
    """A TrainConfig dict for a few fast steps of the tiny model on the mini BEIR folder."""
    base = {"batch_size": 4, "max_steps": 4, "learning_rate": 1e-3, "warmup_ratio": 0.0, "log_every": 1, "seed": 0,
            "num_threads": 1, "bf16": False}
    base.update(training)
    return {"model": {"name": str(model), "query_max_length": 32, "doc_max_length": 64},
            "data": {"beir": str(folder), "split": "train"},
            "negatives": {"strategy": strategy, "options": options},
            "training": base}
