"""The ranker from the command line: train-ranker (dense negatives), rerank, eval beir --rerank,
mine --scorer ranker:R (teacher scores, batched across queries)."""

import json

import numpy as np
import pytest
import torch
import yaml
from typer.testing import CliRunner

from _eval_data import write_toy_beir
from eval.metrics import read_trec_run
from retriever.cli import _register_all, app
from retriever.ranker import Ranker
from test_mining import _write_dataset

_register_all()
runner = CliRunner()


def _run(*args):
    return runner.invoke(app, [*map(str, args)])


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    return write_toy_beir(tmp_path_factory.mktemp("toy") / "toy")


@pytest.fixture(scope="module")
def ranker_dir(tiny_model_dir, tmp_path_factory):
    folder = tmp_path_factory.mktemp("ranker") / "ranker"
    Ranker.load(tiny_model_dir, max_length=64, seed=5).save(folder)
    return folder


@pytest.fixture(autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_train_ranker_with_dense_negatives(tiny_model_dir, tmp_path):
    data = _write_dataset(tmp_path / "beir", n_docs=40, n_queries=12)
    config = tmp_path / "ranker.yaml"
    config.write_text(yaml.safe_dump({
        "model": {"name": str(tiny_model_dir), "max_length": 48},
        "data": {"beir": str(data), "split": "train", "dev_fraction": 0.25},
        "negatives": {"source": "dense", "model": str(tiny_model_dir), "k": 10, "range_min": 0, "per_query": 3},
        "training": {"batch_size": 3, "max_steps": 4, "log_every": 2, "bf16": False, "num_threads": 1},
        "evaluation": {"every_steps": 2},
    }))
    result = _run("train-ranker", "--config", config, "--output", tmp_path / "run")
    assert result.exit_code == 0, result.output
    final = tmp_path / "run" / "final"
    assert (final / "modules.json").exists() and "final ranker" in result.output
    qrels = {}
    for line in (data / "qrels" / "train.tsv").read_text().splitlines()[1:]:
        q, d, _ = line.split("\t")
        qrels.setdefault(q, set()).add(d)
    mined = [json.loads(line) for line in (tmp_path / "run" / "ranker_negatives.jsonl").read_text().splitlines()]
    assert len(mined) == 12 and all(row["neg_ids"] and not set(row["neg_ids"]) & qrels[row["query_id"]] for row in mined)
    assert len((tmp_path / "run" / "dev_eval.jsonl").read_text().splitlines()) == 2


def test_train_ranker_bad_config_is_a_clear_error(tmp_path):
    config = tmp_path / "bad.yaml"
    config.write_text(yaml.safe_dump({"data": {"jsonl": "x.jsonl"}, "negatives": {"source": "bm25"}}))
    result = _run("train-ranker", "--config", config, "--output", tmp_path / "run")
    assert result.exit_code == 2 and "negatives.index" in result.output


def test_rerank_and_eval_beir_rerank_agree(tiny_model_dir, ranker_dir, toy, tmp_path):
    first = _run("eval", "beir", "--model", tiny_model_dir, "--data", toy, "--output", tmp_path / "e", "--k", 8,
                 "--rerank", ranker_dir, "--rerank-depth", 5, "--fp32")
    assert first.exit_code == 0, first.output
    base = tmp_path / "e" / "toy"
    reranked = tmp_path / "e" / "toy-reranked"
    assert (reranked / "metrics.json").exists() and "toy-reranked" in first.output
    alone = _run("rerank", "--ranker", ranker_dir, "--run", base / "run.trec", "--data", toy, "--top-k", 5,
                 "--output", tmp_path / "r", "--fp32")
    assert alone.exit_code == 0, alone.output
    a = json.loads((reranked / "metrics.json").read_text())["metrics"]
    b = json.loads((tmp_path / "r" / "toy" / "metrics.json").read_text())["metrics"]
    assert a == b

    # the head is ordered by the ranker's own scores, the tail keeps the first stage's order below it
    ranker = Ranker.load(ranker_dir)
    stage1 = read_trec_run(base / "run.trec")
    stage2 = read_trec_run(tmp_path / "r" / "toy" / "run.trec")
    queries = {json.loads(line)["_id"]: json.loads(line)["text"] for line in (toy / "queries.jsonl").read_text().splitlines()}
    docs = {}
    for line in (toy / "corpus.jsonl").read_text().splitlines():
        row = json.loads(line)
        docs[row["_id"]] = f"{row['title']} {row['text']}".strip() if row["title"] else row["text"]
    for qid, run in stage1.items():
        order1 = sorted(run, key=run.get, reverse=True)
        order2 = sorted(stage2[qid], key=stage2[qid].get, reverse=True)
        head = order1[:5]
        expected = ranker.score([(queries[qid], docs[d]) for d in head], bf16=False)
        assert order2[:5] == [head[i] for i in np.argsort(-expected, kind="stable")]
        assert order2[5:] == order1[5:]


def test_rerank_unknown_queries_is_a_clear_error(ranker_dir, toy, tmp_path):
    run = tmp_path / "run.trec"
    run.write_text("nope Q0 d1 1 1.0 x\n")
    result = _run("rerank", "--ranker", ranker_dir, "--run", run, "--data", toy, "--output", tmp_path / "o")
    assert result.exit_code == 2 and "queries.jsonl" in result.output


def test_mine_with_ranker_scorer_keeps_teacher_scores(tiny_model_dir, ranker_dir, tmp_path):
    from mining.filters import CrossEncoderScorer

    data = _write_dataset(tmp_path / "beir", n_docs=40, n_queries=8)
    common = ["mine", "--queries", data, "--index", tmp_path / "idx", "--model", tiny_model_dir, "--k", 20,
              "--range-min", 0, "--range-max", 20, "--num-negatives", 4, "--backend", "torch", "--fp32"]
    result = _run(*common, "--scorer", f"ranker:{ranker_dir}", "--output", tmp_path / "t.jsonl")
    assert result.exit_code == 0, result.output
    plain = _run(*common, "--output", tmp_path / "p.jsonl")
    assert plain.exit_code == 0, plain.output
    rows = [json.loads(line) for line in open(tmp_path / "t.jsonl")]
    plain_rows = [json.loads(line) for line in open(tmp_path / "p.jsonl")]
    scorer = CrossEncoderScorer(str(ranker_dir), device="cpu")
    for row, ref in zip(rows, plain_rows):
        assert row["neg_ids"] == ref["neg_ids"]  # no threshold: the same negatives
        assert np.allclose(row["retriever_neg_scores"], ref["neg_scores"]) and row["retriever_pos_scores"] == ref["pos_scores"]
        one_query = scorer.score(row["query"], row["pos"] + row["neg"])  # per-query scoring = the batched pass
        assert np.allclose(row["pos_scores"] + row["neg_scores"], one_query, atol=1e-2)
        assert row["pos_scores"] == row["scorer_pos_scores"] and row["neg_scores"] == row["scorer_neg_scores"]
    threshold = float(np.median([s for r in rows for s in r["neg_scores"]]))
    vetoed = _run(*common, "--scorer", f"ranker:{ranker_dir}", "--scorer-threshold", threshold,
                  "--output", tmp_path / "v.jsonl")
    assert vetoed.exit_code == 0, vetoed.output
    kept = [s for line in open(tmp_path / "v.jsonl") for s in json.loads(line)["neg_scores"]]
    assert kept and max(kept) <= threshold
