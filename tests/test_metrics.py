import math
import tracemalloc

import numpy as np
import pytest

from eval.metrics import compute_metrics, read_trec_run, write_trec_run
from eval.search import exact_search


def test_hand_computed_values():
    qrels = {"a": {"d1": 1, "d2": 1}, "b": {"d5": 2, "d6": 1}}
    run = {"a": {"d3": 0.9, "d1": 0.8, "d2": 0.7}, "b": {"d6": 0.9, "d5": 0.5, "d7": 0.1}}
    agg, per_query = compute_metrics(qrels, run, metrics=["ndcg@3", "mrr@10", "recall@1", "recall@10", "map@100"])
    idcg = 1 + 1 / math.log2(3)
    assert per_query["a"]["ndcg@3"] == pytest.approx((1 / math.log2(3) + 1 / math.log2(4)) / idcg)
    assert per_query["a"]["mrr@10"] == pytest.approx(0.5)
    assert per_query["a"]["recall@1"] == 0.0 and per_query["a"]["recall@10"] == 1.0
    assert per_query["a"]["map@100"] == pytest.approx((1 / 2 + 2 / 3) / 2)
    # graded gains: d5 (grade 2) ranked second
    assert per_query["b"]["ndcg@3"] == pytest.approx((1 + 2 / math.log2(3)) / (2 + 1 / math.log2(3)))
    assert agg["mrr@10"] == pytest.approx((0.5 + 1.0) / 2)


def test_relevance_level_ignored_identical_ids_and_missing_queries():
    qrels = {"q1": {"d1": 1, "d2": 2}, "q2": {"d9": 1}}
    run = {"q1": {"q1": 5.0, "d1": 0.9, "d2": 0.8}}  # q1 retrieves itself first; q2 retrieved nothing
    agg, per_query = compute_metrics(qrels, run, metrics=["mrr@10", "recall@10", "ndcg@10"], relevance_level=2)
    assert per_query["q1"]["mrr@10"] == pytest.approx(0.5)  # the identical id is dropped; d1 is below grade 2
    assert per_query["q1"]["recall@10"] == 1.0
    assert per_query["q2"] == {"mrr@10": 0.0, "recall@10": 0.0, "ndcg@10": 0.0}
    assert agg["recall@10"] == pytest.approx(0.5)
    kept, _ = compute_metrics(qrels, run, metrics=["mrr@10"], relevance_level=2, ignore_identical_ids=False)
    assert kept["mrr@10"] == pytest.approx(1 / 3 / 2)


def test_k_values_and_unknown_metric():
    agg, _ = compute_metrics({"q": {"d": 1}}, {"q": {"d": 1.0}}, k_values=[1, 10])
    assert set(agg) == {f"{m}@{k}" for m in ("ndcg", "map", "recall", "mrr") for k in (1, 10)}
    with pytest.raises(ValueError, match="unknown metric"):
        compute_metrics({"q": {"d": 1}}, {"q": {"d": 1.0}}, metrics=["ndcg10"])


def _random_case(seed=0, n_queries=60, n_docs=300):
    rng = np.random.default_rng(seed)
    docs = [f"doc{i}" for i in range(n_docs)]
    qrels = {f"q{i}": {docs[j]: int(rng.integers(0, 4)) for j in rng.choice(n_docs, rng.integers(1, 6), replace=False)}
             for i in range(n_queries)}
    run = {q: {docs[j]: float(s) for j, s in zip(rng.choice(n_docs, 120, replace=False), rng.random(120))} for q in qrels}
    run["q0"]["q0"] = 2.0  # an identical id, ignored by both
    return qrels, run


def test_equals_beir_evaluate_retrieval(tmp_path):
    """Same numbers as BEIR's EvaluateRetrieval.evaluate / evaluate_custom("mrr") on the same TREC run file."""
    beir_eval = pytest.importorskip("beir.retrieval.evaluation", reason="beir is not installed (pip install beir)")
    qrels, run = _random_case()
    write_trec_run(tmp_path / "run.trec", run)
    run = read_trec_run(tmp_path / "run.trec")
    ks = [1, 3, 5, 10, 100]
    ours, _ = compute_metrics(qrels, run, k_values=ks)
    results = {q: dict(d) for q, d in run.items()}
    ndcg, _map, recall, _ = beir_eval.EvaluateRetrieval.evaluate(qrels, results, ks)  # drops identical ids in place
    mrr = beir_eval.EvaluateRetrieval.evaluate_custom(qrels, results, ks, "mrr")
    for k in ks:  # BEIR rounds to 5 decimals
        assert round(ours[f"ndcg@{k}"], 5) == pytest.approx(ndcg[f"NDCG@{k}"], abs=1e-6)
        assert round(ours[f"map@{k}"], 5) == pytest.approx(_map[f"MAP@{k}"], abs=1e-6)
        assert round(ours[f"recall@{k}"], 5) == pytest.approx(recall[f"Recall@{k}"], abs=1e-6)
        assert round(ours[f"mrr@{k}"], 5) == pytest.approx(mrr[f"MRR@{k}"], abs=1e-6)


def test_run_file_scores_like_the_run_it_was_written_from(tmp_path):
    """Near-ties (float32 scores 1e-8 apart) survive the TREC file: trec_eval re-sorts by score and
    breaks exact ties by doc id, so a rounded file would rank 'a-rel' first here and score 1.0."""
    scores = np.float32([0.93750006, 0.93750000])  # adjacent float32 values
    run = {"q": {"z-other": float(scores[0]), "a-rel": float(scores[1])}}
    qrels = {"q": {"a-rel": 1}}
    write_trec_run(tmp_path / "run.trec", run)
    assert read_trec_run(tmp_path / "run.trec") == run
    in_memory, _ = compute_metrics(qrels, run, metrics=["ndcg@10"])
    from_file, _ = compute_metrics(qrels, read_trec_run(tmp_path / "run.trec"), metrics=["ndcg@10"])
    assert in_memory == from_file and in_memory["ndcg@10"] < 1.0


def test_exact_search_matches_brute_force_and_streams_blocks():
    rng = np.random.default_rng(1)
    q = rng.standard_normal((40, 24)).astype(np.float32)
    d = rng.standard_normal((2_000, 24)).astype(np.float32)
    full = q @ d.T
    ref = np.argsort(-full, axis=1, kind="stable")[:, :50]
    for docs in (d, iter(np.array_split(d, 7))):
        scores, rows = exact_search(q, docs, 50, block_size=333)
        np.testing.assert_array_equal(rows, ref)
        np.testing.assert_allclose(scores, np.take_along_axis(full, ref, 1), rtol=1e-5, atol=1e-5)


def test_exact_search_short_corpus_pads_with_minus_one():
    q = np.eye(3, dtype=np.float32)
    scores, rows = exact_search(q, np.eye(3, dtype=np.float32)[:2], 4)
    assert rows.shape == (3, 4) and (rows[:, 2:] == -1).all()
    assert rows[0, 0] == 0 and rows[1, 0] == 1


def test_exact_search_memory_is_bounded():
    """Peak Python/numpy allocation while searching stays far below the embedding matrix itself:
    no query × corpus score matrix is ever built (that one would be 16× the matrix here)."""
    rng = np.random.default_rng(2)
    docs = rng.standard_normal((200_000, 32)).astype(np.float32)  # 25.6 MB
    queries = rng.standard_normal((2_000, 32)).astype(np.float32)  # scores would be 1.6 GB
    tracemalloc.start()
    exact_search(queries, docs, 100, block_size=20_000)
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert peak < 0.5 * docs.nbytes, f"peak {peak / 1e6:.1f} MB for a {docs.nbytes / 1e6:.1f} MB matrix"
