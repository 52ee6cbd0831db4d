"""BEIR/MTEB conventions checked against independent references: dangling qrels scored as
pytrec_eval scores them, and query lengths as sentence-transformers encodes them."""

import json
import logging

import numpy as np
import pytest
from typer.testing import CliRunner

from _eval_data import QRELS, write_toy_beir

# q1 and q4 each judge one document that is not in the corpus (as five official ArguAna qrels do)
DANGLING = {**QRELS, "q1": {**QRELS["q1"], "ghost-1": 1}, "q4": {**QRELS["q4"], "ghost-2": 2}}


@pytest.fixture(scope="module")
def dangling_toy(tmp_path_factory):
    return write_toy_beir(tmp_path_factory.mktemp("dangling") / "toy", qrels=DANGLING)


@pytest.fixture(scope="module")
def tiny(tiny_model_dir):
    from retriever.modeling import BiEncoder

    return BiEncoder.from_pretrained(tiny_model_dir)


def test_dangling_qrels_are_scored_as_pytrec_eval_scores_them(tiny, dangling_toy, tmp_path, caplog):
    """Relevant and never retrieved: negatron's means equal pytrec_eval's on the same qrels and run."""
    import pytrec_eval

    from eval.metrics import read_trec_run

    with caplog.at_level(logging.WARNING, logger="eval.beir"):
        result = evaluate(tiny, dangling_toy, tmp_path)
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1, warnings
    assert "2 judgement(s) name documents absent from the corpus" in warnings[0]
    assert "'q1' -> 'ghost-1'" in warnings[0] and str(dangling_toy / "qrels" / "test.tsv") in warnings[0]
    assert result["dangling_qrels"] == 2

    run = read_trec_run(tmp_path / "toy" / "run.trec")  # identical ids already removed, as scored
    qrels = {q: {d: int(g) for d, g in docs.items()} for q, docs in DANGLING.items()}
    reference = pytrec_eval.RelevanceEvaluator(qrels, {"ndcg_cut.10", "recall.100", "map_cut.100"}).evaluate(run)
    for ours, theirs in (("ndcg@10", "ndcg_cut_10"), ("recall@100", "recall_100"), ("map@100", "map_cut_100")):
        expected = np.mean([reference[q][theirs] for q in qrels])
        assert result["metrics"][ours] == pytest.approx(expected, abs=1e-9), ours
    # ... and not as if the dangling lines were dropped: recall@100 of q1 and q4 is capped at 1/2 and 1/1
    per_query = {r["query_id"]: r for r in map(json.loads, (tmp_path / "toy" / "per_query.jsonl").read_text().splitlines())}
    assert per_query["q1"]["recall@100"] == pytest.approx(2 / 3)
    assert per_query["q4"]["recall@100"] == pytest.approx(1 / 2)


def evaluate(model, folder, out, **kwargs):
    from eval.beir import evaluate_beir

    return evaluate_beir(model, folder, output_dir=out, k=20, bf16=False, **kwargs)


def test_strict_qrels_makes_dangling_judgements_an_error_naming_the_line(tiny, dangling_toy, tmp_path):
    from retriever.data import DataError

    with pytest.raises(DataError) as err:
        evaluate(tiny, dangling_toy, tmp_path, strict_qrels=True)
    lines = (dangling_toy / "qrels" / "test.tsv").read_text().splitlines()
    assert err.value.line is not None and lines[err.value.line - 1].split() == ["q1", "ghost-1", "1"]
    assert "2 judgement(s)" in str(err.value) and "--strict-qrels" in err.value.fix


def test_judged_query_missing_from_queries_stays_an_error(tiny, tmp_path):
    from retriever.data import DataError

    folder = write_toy_beir(tmp_path / "toy", qrels={**QRELS, "q-missing": {"d1": 1}})
    with pytest.raises(DataError, match="query id 'q-missing' is judged but not in the queries file") as err:
        evaluate(tiny, folder, tmp_path / "out")
    assert err.value.line == len(folder.joinpath("qrels", "test.tsv").read_text().splitlines())


def test_cli_strict_qrels_flag(tiny_model_dir, dangling_toy, tmp_path):
    from retriever.cli import _register_all, app

    _register_all()
    args = ["eval", "beir", "--model", str(tiny_model_dir), "--data", str(dangling_toy), "--output", str(tmp_path),
            "--k", "10", "--fp32"]
    assert CliRunner().invoke(app, args).exit_code == 0
    strict = CliRunner().invoke(app, args + ["--strict-qrels"])
    assert strict.exit_code == 2 and "absent from the corpus" in " ".join(strict.output.replace("│", " ").split())


# ---------------------------------------------------------------- query length = sentence-transformers'
def _long_queries(n_words: int = 100) -> list[str]:
    """Queries well past 64 tokens (what negatron used to truncate at), past 128 too, each different."""
    base = ("dense retrieval maps queries and documents to vectors and hard negatives are documents that look "
            "relevant but are not while faiss searches millions of vectors by inner product").split()
    return [" ".join([word] * 3 + (base * 4)[:n_words] + [word] * 20) for word in ("fox", "python", "bm25", "encoder")]


def cosines(a, b):
    a = a / np.linalg.norm(a, axis=1, keepdims=True)
    b = b / np.linalg.norm(b, axis=1, keepdims=True)
    return (a * b).sum(1)


@pytest.fixture(scope="module")
def st_folder(tiny_model_dir, tmp_path_factory):
    """A sentence-transformers folder (no negatron.json) with max_seq_length 128 and a query prompt."""
    from sentence_transformers import SentenceTransformer, models

    folder = tmp_path_factory.mktemp("st-only") / "model"
    modules = [models.Transformer(str(tiny_model_dir), max_seq_length=128), models.Pooling(32, pooling_mode="mean"),
               models.Normalize()]
    SentenceTransformer(modules=modules, device="cpu", prompts={"query": "query: ", "document": ""}).save(str(folder))
    return folder


def test_model_without_negatron_settings_encodes_queries_as_sentence_transformers(st_folder):
    from sentence_transformers import SentenceTransformer

    from retriever.modeling import BiEncoder

    texts = _long_queries()
    model = BiEncoder.from_pretrained(st_folder)
    st = SentenceTransformer(str(st_folder), device="cpu")
    assert len(st.tokenize(texts)["input_ids"][0]) == 128  # long enough to be truncated by ST itself
    assert min(len(ids) for ids in st.tokenizer(texts)["input_ids"]) > 128
    assert (model.query_max_length, model.doc_max_length, model.query_prefix) == (128, 128, "query: ")
    ours_q = model.encode(texts, "query", bf16=False)
    assert cosines(ours_q, st.encode_query(texts)).min() >= 0.99999
    assert cosines(model.encode(texts, "document", bf16=False), st.encode_document(texts)).min() >= 0.99999
    # truncating queries at 64 tokens, the old default, gives other embeddings: the check can fail
    short = BiEncoder.from_pretrained(st_folder, query_max_length=64).encode(texts, "query", bf16=False)
    assert cosines(short, st.encode_query(texts)).max() < 0.999


def test_model_trained_with_short_queries_agrees_with_sentence_transformers_once_saved(tiny_model_dir, tmp_path):
    """Training may truncate queries at 32 tokens; the saved folder encodes alike in ST and negatron."""
    from sentence_transformers import SentenceTransformer

    from retriever.modeling import BiEncoder

    texts = _long_queries()
    trained = BiEncoder.from_pretrained(tiny_model_dir, query_max_length=32, doc_max_length=96, query_prefix="q: ")
    saved = trained.save(tmp_path / "m")
    assert json.loads((saved / "negatron.json").read_text())["train_query_max_length"] == 32
    st = SentenceTransformer(str(saved), device="cpu")
    again = BiEncoder.from_pretrained(saved)
    assert (again.query_max_length, again.doc_max_length, st.max_seq_length) == (96, 96, 96)
    assert cosines(again.encode(texts, "query", bf16=False), st.encode_query(texts)).min() >= 0.99999
    assert cosines(again.encode(texts, "document", bf16=False), st.encode_document(texts)).min() >= 0.99999
    # the trainer's setting still applies where it is asked for
    assert BiEncoder.from_pretrained(saved, query_max_length=32).query_max_length == 32


def test_plain_hf_model_gets_the_length_sentence_transformers_gives_it(tiny_model_dir):
    from sentence_transformers import SentenceTransformer

    from retriever.modeling import BiEncoder

    model = BiEncoder.from_pretrained(tiny_model_dir)
    st = SentenceTransformer(str(tiny_model_dir), device="cpu")
    assert model.query_max_length == model.doc_max_length == st.max_seq_length == 256


@pytest.mark.integration
def test_minilm_long_queries_equal_sentence_transformers(minilm_path, scifact):
    """SciFact abstracts as queries (> 64 tokens): negatron == SentenceTransformer(path).encode."""
    from sentence_transformers import SentenceTransformer

    from retriever.data import Corpus
    from retriever.modeling import BiEncoder

    texts = [doc.text for doc, _ in zip(Corpus(scifact / "corpus.jsonl"), range(8))]
    st = SentenceTransformer(minilm_path, device="cpu")
    lengths = [len(ids) for ids in st.tokenizer(texts)["input_ids"]]
    assert min(lengths) > 64 and st.max_seq_length == 256
    model = BiEncoder.from_pretrained(minilm_path)
    assert model.query_max_length == 256
    assert cosines(model.encode(texts, "query", bf16=False), st.encode(texts)).min() >= 0.9999
    old = BiEncoder.from_pretrained(minilm_path, query_max_length=64).encode(texts, "query", bf16=False)
    assert cosines(old, st.encode(texts)).min() < 0.99
