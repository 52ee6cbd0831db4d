import json

import numpy as np
import pytest
from typer.testing import CliRunner

from _eval_data import QRELS, write_toy_beir


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    return write_toy_beir(tmp_path_factory.mktemp("toy") / "toy")


@pytest.fixture(scope="module")
def tiny(tiny_model_dir):
    from retriever.modeling import BiEncoder

    return BiEncoder.from_pretrained(tiny_model_dir)


def test_evaluate_beir_outputs(tiny, toy, tmp_path):
    from eval.beir import evaluate_beir

    result = evaluate_beir(tiny, toy, output_dir=tmp_path, k=5)
    out = tmp_path / "toy"
    assert json.loads((out / "metrics.json").read_text()) == result
    assert result["dataset"] == "toy" and result["split"] == "test"
    assert result["num_queries"] == 5 and result["num_docs"] == 11  # q6 has no judgements
    assert set(result["metrics"]) == {"ndcg@1", "ndcg@3", "ndcg@5", "ndcg@10", "ndcg@100", "mrr@10", "recall@10",
                                      "recall@100", "recall@1000", "map@100"}
    per_query = [json.loads(line) for line in (out / "per_query.jsonl").read_text().splitlines()]
    assert sorted(r["query_id"] for r in per_query) == sorted(QRELS)
    assert np.mean([r["ndcg@10"] for r in per_query]) == pytest.approx(result["metrics"]["ndcg@10"])
    lines = [line.split() for line in (out / "run.trec").read_text().splitlines()]
    assert all(len(parts) == 6 and parts[1] == "Q0" for parts in lines)
    assert not any(parts[0] == parts[2] for parts in lines), "the identical id q3 must not be in the run"
    by_query = {}
    for qid, _, doc, rank, score, _ in lines:
        by_query.setdefault(qid, []).append((int(rank), float(score)))
    assert all(len(v) == (4 if q == "q3" else 5) for q, v in by_query.items())  # k=5, q3 lost itself
    for ranked in by_query.values():
        assert [r for r, _ in ranked] == list(range(1, len(ranked) + 1))
        assert [s for _, s in ranked] == sorted((s for _, s in ranked), reverse=True)


def test_keep_identical_ids(tiny, toy, tmp_path):
    from eval.beir import evaluate_beir

    result = evaluate_beir(tiny, toy, output_dir=tmp_path, k=20, ignore_identical_ids=False)
    assert result["ignore_identical_ids"] is False
    lines = [line.split() for line in (tmp_path / "toy" / "run.trec").read_text().splitlines()]
    assert any(parts[0] == parts[2] == "q3" for parts in lines)
    per_query = {r["query_id"]: r for r in map(json.loads, (tmp_path / "toy" / "per_query.jsonl").read_text().splitlines())}
    assert per_query["q3"]["recall@100"] == 1.0  # q3 judged itself relevant; kept, it is found


def test_ranking_equals_brute_force_with_title_plus_text(tiny, toy, tmp_path):
    """The run is the exact top-k of cosine scores over `title + " " + text` embeddings."""
    from eval.beir import evaluate_beir
    from eval.metrics import read_trec_run
    from retriever.data import load_beir

    data = load_beir(toy, "test")
    evaluate_beir(tiny, toy, output_dir=tmp_path, k=3, bf16=False)
    run = read_trec_run(tmp_path / "toy" / "run.trec")
    docs = list(data.corpus)
    d_emb = tiny.encode([(d.title + " " + d.text).strip() for d in docs], "document", bf16=False)
    for qid, text in data.queries.items():
        scores = d_emb @ tiny.encode([text], "query", bf16=False)[0]
        expected = [docs[i].id for i in np.argsort(-scores) if docs[i].id != qid][:3]
        got = sorted(run[qid], key=run[qid].get, reverse=True)
        assert got[:2] == expected[:2]


def test_cli_eval_beir(tiny_model_dir, toy, tmp_path):
    from retriever.cli import _register_all, app

    _register_all()
    result = CliRunner().invoke(app, ["eval", "beir", "--model", str(tiny_model_dir), "--data", str(toy),
                                      "--output", str(tmp_path), "--k", "10", "--fp32"])
    assert result.exit_code == 0, result.output
    assert "ndcg@10" in result.output and "toy" in result.output
    assert json.loads((tmp_path / "toy" / "metrics.json").read_text())["bf16"] is False


def test_cli_bad_split_is_a_clear_error(tiny_model_dir, toy, tmp_path):
    from retriever.cli import _register_all, app

    _register_all()
    result = CliRunner().invoke(app, ["eval", "beir", "--model", str(tiny_model_dir), "--data", str(toy),
                                      "--output", str(tmp_path), "--split", "dev"])
    assert result.exit_code == 2
    flat = " ".join(result.output.replace("│", " ").split())  # rich wraps the error box
    assert "qrels/dev.tsv: split 'dev' not found" in flat and "choose one of ['test']" in flat


def test_prebuilt_index(tiny, toy, tmp_path):
    """--index: a prebuilt exact index gives the same metrics as the streaming search."""
    faiss_index = pytest.importorskip("index.faiss_index", reason="index/faiss_index.py is not there yet")
    encode = pytest.importorskip("index.encode", reason="index/encode.py is not there yet")
    from eval.beir import evaluate_beir

    store = encode.encode_corpus(tiny, toy / "corpus.jsonl", tmp_path / "emb", dtype="float32", bf16=False,
                                 show_progress=False)
    faiss_index.DenseIndex.build(store, tmp_path / "index", factory="Flat", use_gpu=False)
    exact = evaluate_beir(tiny, toy, k=10, bf16=False)
    indexed = evaluate_beir(tiny, toy, k=10, bf16=False, index_dir=tmp_path / "index")
    assert indexed["num_docs"] == exact["num_docs"] == 11
    for name, value in exact["metrics"].items():
        assert indexed["metrics"][name] == pytest.approx(value, abs=1e-6), name


def test_prebuilt_index_ids_are_never_copied_whole(tiny, toy, tmp_path, monkeypatch):
    """dense_search used to return list(index.ids): ~0.6 GB of str at MS MARCO's 8.8M passages. The index's
    memory-mapped ids are handed on and only the retrieved rows are decoded."""
    from index.encode import encode_corpus
    from index.faiss_index import DenseIndex

    from eval.beir import evaluate_beir

    class NoCopyIds:
        def __init__(self, ids):
            self._ids = ids

        def __len__(self):
            return len(self._ids)

        def __getitem__(self, row):
            assert not isinstance(row, slice), "slice of the whole id sequence"
            return self._ids[row]

        def __iter__(self):
            raise AssertionError("the index's ids were copied into a list")

    store = encode_corpus(tiny, toy / "corpus.jsonl", tmp_path / "emb", dtype="float32", bf16=False, show_progress=False)
    DenseIndex.build(store, tmp_path / "index", factory="Flat", use_gpu=False)
    load = DenseIndex.load.__func__

    def guarded(cls, *args, **kwargs):
        index = load(cls, *args, **kwargs)
        index.ids = NoCopyIds(index.ids)
        return index

    monkeypatch.setattr(DenseIndex, "load", classmethod(guarded))
    indexed = evaluate_beir(tiny, toy, k=10, bf16=False, index_dir=tmp_path / "index")
    exact = evaluate_beir(tiny, toy, k=10, bf16=False)
    assert indexed["num_docs"] == 11
    for name, value in exact["metrics"].items():
        assert indexed["metrics"][name] == pytest.approx(value, abs=1e-6), name


# ---------------------------------------------------------------- real model, real data
def _reproduce_row(table: str, scifact, out):
    """The shipped reproduction row for SciFact in ``configs/reproductions/<table>``, measured once."""
    from eval.reproduce import TABLE_DIR, load_table, reproduce

    rows = [r for r in load_table(TABLE_DIR / table) if r.dataset == "beir/scifact"]
    assert len({r.run_key for r in rows}) == 1
    return reproduce(rows, scifact.parents[1], output_dir=out, batch_size=32)


@pytest.fixture(scope="session")
def scifact_minilm(scifact, minilm_path, tmp_path_factory):
    """The all-MiniLM-L6-v2 SciFact row of the reproduction table: one bf16 MiniLM pass over SciFact
    test, shared by every test that needs it (~2-3 min)."""
    from retriever.modeling import BiEncoder

    model = BiEncoder.from_pretrained(minilm_path)
    assert model.doc_max_length == model.query_max_length == 256  # the model's saved max_seq_length, as in MTEB
    out = tmp_path_factory.mktemp("scifact-minilm")
    outcomes = _reproduce_row("beir-minilm.yaml", scifact, out)
    return outcomes, out / "all-MiniLM-L6-v2" / "test" / "scifact"


@pytest.mark.integration
def test_minilm_scifact_reproduces_mteb(scifact_minilm):
    outcomes, _ = scifact_minilm
    result = outcomes[0].result
    print("minilm scifact", json.dumps(result["metrics"]))
    assert result["num_queries"] == 300 and result["num_docs"] == 5183 and result["dangling_qrels"] == 0
    for outcome in outcomes:  # measured within the row's tolerance of the published figure
        assert outcome.status == "ok", (outcome.row, outcome.measured)


def _assert_equal_to_beir(ours: dict, qrels, run) -> None:
    """negatron's values, rounded as BEIR rounds (5 decimals), equal BEIR's to 1e-6."""
    beir_eval = pytest.importorskip("beir.retrieval.evaluation", reason="beir is not installed (pip install beir)")
    ndcg, _map, recall, _ = beir_eval.EvaluateRetrieval.evaluate(qrels, run, [1, 3, 5, 10, 100, 1000])
    mrr = beir_eval.EvaluateRetrieval.evaluate_custom(qrels, run, [10], "mrr")
    for k in (1, 3, 5, 10, 100):
        assert round(ours[f"ndcg@{k}"], 5) == pytest.approx(ndcg[f"NDCG@{k}"], abs=1e-6)
    for k in (10, 100, 1000):
        assert round(ours[f"recall@{k}"], 5) == pytest.approx(recall[f"Recall@{k}"], abs=1e-6)
    assert round(ours["map@100"], 5) == pytest.approx(_map["MAP@100"], abs=1e-6)
    assert round(ours["mrr@10"], 5) == pytest.approx(mrr["MRR@10"], abs=1e-6)


@pytest.mark.integration
def test_metrics_equal_beir_on_scifact_minilm_run(scifact_minilm, scifact):
    from eval.metrics import read_trec_run
    from retriever.data import read_qrels

    outcomes, out = scifact_minilm
    _assert_equal_to_beir(outcomes[0].result["metrics"], read_qrels(scifact / "qrels" / "test.tsv"),
                          read_trec_run(out / "run.trec"))


@pytest.fixture(scope="module")
def scifact_bm25(scifact, tmp_path_factory):
    """The BM25 flat SciFact row of the reproduction table: pyserini BM25 (k1 0.9, b 0.4, title + text)
    over SciFact test, scored by negatron."""
    pytest.importorskip("pyserini", reason="pyserini is not installed")
    out = tmp_path_factory.mktemp("scifact-bm25")
    outcomes = _reproduce_row("beir-bm25.yaml", scifact, out)
    if outcomes[0].status == "skipped":
        pytest.skip(outcomes[0].detail)
    return outcomes, out / "bm25-flat-k1=0.9-b=0.4" / "test" / "scifact"


@pytest.mark.integration
def test_bm25_scifact_reproduces_pyserini_regression(scifact_bm25):
    outcomes, _ = scifact_bm25
    print("bm25 scifact", json.dumps(outcomes[0].result["metrics"]))
    assert outcomes[0].result["num_queries"] == 300
    for outcome in outcomes:
        assert outcome.status == "ok", (outcome.row, outcome.measured)


@pytest.mark.integration
def test_metrics_equal_beir_on_scifact_bm25_run(scifact_bm25, scifact):
    """BEIR's EvaluateRetrieval on the written run.trec gives negatron's numbers (real run, real qrels)."""
    from eval.metrics import read_trec_run
    from retriever.data import read_qrels

    outcomes, out = scifact_bm25
    _assert_equal_to_beir(outcomes[0].result["metrics"], read_qrels(scifact / "qrels" / "test.tsv"),
                          read_trec_run(out / "run.trec"))
