import json

import pytest
from typer.testing import CliRunner

from _eval_data import DOCS, QRELS, QUERIES


@pytest.fixture(scope="module")
def trec_files(tmp_path_factory):
    """MS MARCO-style files: `pid<TAB>passage`, `qid<TAB>query`, TREC qrels `qid 0 pid grade`."""
    folder = tmp_path_factory.mktemp("msmarco")
    (folder / "collection.tsv").write_text("".join(f"{i}\t{text}\n" for i, (_, text) in enumerate(DOCS.values())))
    ids = {doc_id: str(i) for i, doc_id in enumerate(DOCS)}
    qids = {qid: str(100 + i) for i, qid in enumerate(QUERIES)}
    (folder / "queries.tsv").write_text("".join(f"{qids[q]}\t{text}\n" for q, text in QUERIES.items()))
    (folder / "qrels.txt").write_text("".join(f"{qids[q]} 0 {ids[d]} {g}\n" for q, docs in QRELS.items()
                                              for d, g in docs.items()))
    return folder


def test_dl_preset_uses_grade_two_threshold(tiny_model_dir, trec_files, tmp_path):
    from eval.metrics import compute_metrics, read_trec_run
    from eval.msmarco import evaluate_msmarco
    from retriever.data import read_qrels

    result = evaluate_msmarco(str(tiny_model_dir), collection=trec_files / "collection.tsv",
                              queries=trec_files / "queries.tsv", qrels=trec_files / "qrels.txt", preset="dl19",
                              output_dir=tmp_path, k=100)
    assert result["dataset"] == "trec-dl-2019" and result["relevance_level"] == 2
    assert set(result["metrics"]) == {"ndcg@10", "recall@1000", "map@1000", "mrr@10"}
    assert result["num_queries"] == 5 and result["num_docs"] == 11
    # the same run scored at grade ≥ 1 gives a different recall: the threshold really is applied
    run = read_trec_run(tmp_path / "trec-dl-2019" / "run.trec")
    qrels = read_qrels(trec_files / "qrels.txt")
    at2, _ = compute_metrics(qrels, run, metrics=["recall@1000", "ndcg@10"], relevance_level=2)
    at1, _ = compute_metrics(qrels, run, metrics=["recall@1000", "ndcg@10"], relevance_level=1)
    assert result["metrics"]["recall@1000"] == pytest.approx(at2["recall@1000"])
    assert at2["ndcg@10"] == pytest.approx(at1["ndcg@10"])  # nDCG uses graded gains either way
    assert (tmp_path / "trec-dl-2019" / "per_query.jsonl").exists()


def test_cli_msmarco_dev_preset(tiny_model_dir, trec_files, tmp_path):
    from retriever.cli import _register_all, app

    _register_all()
    result = CliRunner().invoke(app, ["eval", "msmarco", "--model", str(tiny_model_dir),
                                      "--collection", str(trec_files / "collection.tsv"),
                                      "--queries", str(trec_files / "queries.tsv"),
                                      "--qrels", str(trec_files / "qrels.txt"), "--output", str(tmp_path)])
    assert result.exit_code == 0, result.output
    metrics = json.loads((tmp_path / "msmarco-dev" / "metrics.json").read_text())
    assert metrics["relevance_level"] == 1 and {"mrr@10", "recall@1000"} <= set(metrics["metrics"])
    assert "mrr@10" in result.output


def test_mismatched_queries_file_is_a_clear_error(tiny_model_dir, trec_files, tmp_path):
    from eval.msmarco import evaluate_msmarco
    from retriever.data import DataError

    (tmp_path / "other.tsv").write_text("1\tunrelated query\n")
    with pytest.raises(DataError, match="none of its 5 query ids"):
        evaluate_msmarco(str(tiny_model_dir), collection=trec_files / "collection.tsv", queries=tmp_path / "other.tsv",
                         qrels=trec_files / "qrels.txt", preset="dl19")


# ---------------------------------------------------------------- real model, real (sub-)collections
@pytest.mark.integration
@pytest.mark.slow
def test_minilm_dl19_mini_beir(shared_data, minilm_path, tmp_path):
    from eval.msmarco import evaluate_msmarco

    folder = shared_data / "msmarco" / "dl19-mini-beir"
    if not folder.is_dir():
        pytest.skip("dl19-mini-beir is absent")
    result = evaluate_msmarco(minilm_path, data_dir=folder, preset="dl19", output_dir=tmp_path, name="dl19-mini")
    print("dl19-mini-beir", json.dumps(result["metrics"]), result["seconds"])
    assert result["num_queries"] == 43 and result["num_docs"] == 5000
    # a 5,000-passage sub-collection holding every judged-relevant passage: far easier than the full one
    assert 0.6 < result["metrics"]["ndcg@10"] <= 1.0
    assert result["metrics"]["recall@1000"] > 0.5


@pytest.mark.integration
@pytest.mark.slow
def test_minilm_trec_dl_2019_positives(shared_data, minilm_path, tmp_path):
    from eval.msmarco import evaluate_msmarco

    folder = shared_data / "msmarco" / "trec-dl-2019"
    if not (folder / "collection.dl19-positives.tsv").exists():
        pytest.skip("trec-dl-2019 is absent")
    result = evaluate_msmarco(minilm_path, collection=folder / "collection.dl19-positives.tsv",
                              queries=folder / "queries.dl19-judged43.tsv", qrels=folder / "2019qrels-pass.txt",
                              preset="dl19", output_dir=tmp_path)
    print("trec-dl-2019 positives", json.dumps(result["metrics"]), result["seconds"])
    assert result["num_queries"] == 43 and result["num_docs"] == 4103
    assert 0.6 < result["metrics"]["ndcg@10"] <= 1.0
