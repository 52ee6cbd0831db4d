"""`negatron mine` end to end: BEIR folder, MS MARCO queries TSV + qrels + collection, training JSONL,
triples, scorer filters, and clear errors for bad input."""

import json
import os

import pytest
from typer.testing import CliRunner

from retriever.cli import _register_all, app
from test_mining import _write_dataset

_register_all()
runner = CliRunner()


def _mine(*args):
    return runner.invoke(app, ["mine", *map(str, args)])


@pytest.fixture(scope="module")
def beir(tmp_path_factory):
    return _write_dataset(tmp_path_factory.mktemp("cli") / "beir", n_docs=60, n_queries=10)


def _rows(path):
    return [json.loads(line) for line in open(path)]


def test_mine_beir_builds_then_reuses_index(beir, tiny_model_dir, tmp_path):
    common = ["--queries", beir, "--index", tmp_path / "idx", "--model", tiny_model_dir, "--k", 40, "--range-min", 2,
              "--range-max", 30, "--num-negatives", 4]
    first = _mine(*common, "--output", tmp_path / "a.jsonl", "--backend", "torch")
    assert first.exit_code == 0, first.output
    assert "NEGATRON_ENCODE_BACKEND" not in os.environ  # the command's backend does not outlive it
    assert (tmp_path / "idx").is_dir() and "negatives written" in first.output
    second = _mine(*common, "--output", tmp_path / "b.jsonl")  # index exists now: loaded, not rebuilt
    assert second.exit_code == 0, second.output
    a, b = _rows(tmp_path / "a.jsonl"), _rows(tmp_path / "b.jsonl")
    assert [r["neg_ids"] for r in a] == [r["neg_ids"] for r in b]
    assert len(a) == 10
    for row in a:
        assert not set(row["neg_ids"]) & set(row["pos_ids"])
        assert all(2 <= r < 30 for r in row["neg_ranks"]) and len(row["neg"]) == 4
    stats = json.loads((tmp_path / "a.stats.json").read_text())
    assert stats["queries"] == 10 and stats["negatives"] == sum(len(r["neg"]) for r in a)
    assert set(stats["dropped"]) == {"excluded", "rank_window", "margin", "scorer"}
    assert "rank_histogram" in stats and "short_queries" in stats


def test_msmarco_queries_tsv_qrels_collection(tiny_model_dir, tmp_path, shared_data):
    samples = shared_data / "msmarco" / "samples"
    (tmp_path / "queries.tsv").write_text("q1\twhat was the impact of the manhattan project\nq2\tscientific minds communication\n")
    (tmp_path / "qrels.tsv").write_text("q1 0 0 1\nq2 0 1 1\nq9 0 3 1\n")  # q9 has no query: ignored
    result = _mine("--queries", tmp_path / "queries.tsv", "--qrels", tmp_path / "qrels.tsv",
                   "--corpus", samples / "collection.head89.tsv", "--index", tmp_path / "idx", "--model", tiny_model_dir,
                   "--k", 30, "--range-min", 0, "--range-max", 30, "--num-negatives", 3, "--sampling", "random",
                   "--seed", 1, "--output", tmp_path / "out.jsonl")
    assert result.exit_code == 0, result.output
    rows = _rows(tmp_path / "out.jsonl")
    assert [r["query_id"] for r in rows] == ["q1", "q2"]
    assert "0" not in rows[0]["neg_ids"] and "1" not in rows[1]["neg_ids"] and all(len(r["neg"]) == 3 for r in rows)


@pytest.mark.integration
def test_msmarco_samples_with_minilm(minilm_path, shared_data, tmp_path):
    """The FlagEmbedding sample (positives as texts) and the official triples through `mine` with MiniLM."""
    samples = shared_data / "msmarco" / "samples"
    index = tmp_path / "idx"
    result = _mine("--queries", samples / "flagembedding_msmarco_example.jsonl", "--corpus", samples / "collection.head89.tsv",
                   "--index", index, "--model", minilm_path, "--k", 50, "--range-min", 0, "--range-max", 50,
                   "--num-negatives", 5, "--relative-margin", 0.05, "--output", tmp_path / "fe.jsonl")
    assert result.exit_code == 0, result.output
    rows = _rows(tmp_path / "fe.jsonl")
    source = _rows(samples / "flagembedding_msmarco_example.jsonl")
    assert 1 <= len(rows) <= 10
    for row in rows:
        match = next(s for s in source if s["query"] == row["query"])
        assert row["pos"] == match["pos"] and not set(row["neg"]) & set(row["pos"])
        assert max(row["neg_scores"]) <= min(row["pos_scores"]) * 0.95 + 1e-6
    head = tmp_path / "triples.head20.tsv"  # 20 of the 100 official triples keep the test short
    head.write_text("".join(open(samples / "triples.train.small.head100.tsv", encoding="utf-8").readlines()[:20]))
    triples = _mine("--queries", head, "--corpus", samples / "collection.head89.tsv",
                    "--index", index, "--model", minilm_path, "--k", 20, "--range-min", 0, "--range-max", 20,
                    "--num-negatives", 2, "--output", tmp_path / "tr.jsonl")
    assert triples.exit_code == 0, triples.output
    rows = _rows(tmp_path / "tr.jsonl")
    assert len(rows) == 20 and all(len(r["neg"]) == 2 and len(r["pos"]) == 1 for r in rows)


def test_scorer_threshold_cross_encoder_and_guide(beir, tiny_model_dir, tmp_path):
    from transformers import AutoTokenizer, BertConfig, BertForSequenceClassification

    ce = tmp_path / "ce"
    config = BertConfig.from_pretrained(tiny_model_dir, num_labels=1)
    BertForSequenceClassification(config).save_pretrained(ce)
    AutoTokenizer.from_pretrained(tiny_model_dir).save_pretrained(ce)
    common = ["--queries", beir, "--index", tmp_path / "idx", "--model", tiny_model_dir, "--k", 30, "--range-min", 0,
              "--range-max", 30, "--num-negatives", 30]
    base = _mine(*common, "--output", tmp_path / "base.jsonl")
    assert base.exit_code == 0, base.output
    for scorer, kind in ((ce, "cross-encoder"), (tiny_model_dir, "bi-encoder")):
        plain = _mine(*common, "--scorer", scorer, "--scorer-type", kind, "--output", tmp_path / "s.jsonl")
        assert plain.exit_code == 0, plain.output
        scores = [s for r in _rows(tmp_path / "s.jsonl") for s in r["scorer_neg_scores"]]
        threshold = sorted(scores)[len(scores) // 2]  # the median: about half the candidates go
        out = tmp_path / f"{kind}.jsonl"
        res = _mine(*common, "--scorer", scorer, "--scorer-type", kind, "--scorer-threshold", threshold, "--output", out)
        assert res.exit_code == 0, res.output
        rows = _rows(out)
        kept = [s for r in rows for s in r["scorer_neg_scores"]]
        assert kept and max(kept) <= threshold
        stats = json.loads((tmp_path / f"{kind}.stats.json").read_text())
        assert stats["dropped"]["scorer"] == sum(s > threshold for s in scores) > 0


def test_mine_bm25(beir, tmp_path):
    from index.bm25 import build_bm25_index

    build_bm25_index(beir, tmp_path / "bm25")
    result = _mine("--queries", beir, "--bm25", tmp_path / "bm25", "--k", 40, "--range-min", 0, "--range-max", 40,
                   "--num-negatives", 3, "--relative-margin", 0.05, "--output", tmp_path / "bm25.jsonl")
    assert result.exit_code == 0, result.output
    rows = _rows(tmp_path / "bm25.jsonl")
    assert rows
    for row in rows:
        assert not set(row["neg_ids"]) & set(row["pos_ids"])
        if row["pos_scores"]:  # BM25 scores a positive only when it is retrieved
            assert max(row["neg_scores"]) <= min(row["pos_scores"]) * 0.95 + 1e-6
    assert any(row["pos_scores"] for row in rows)


@pytest.mark.parametrize("args, message", [
    (["--bm25", "x", "--index", "y", "--model", "m"], "exactly one retriever"),
    (["--index", "y"], "--model"),
    (["--index", "y", "--model", "m", "--scorer-threshold", "0.5"], "--scorer"),
    (["--index", "y", "--model", "m", "--k", "20", "--range-max", "50"], "range_max"),
])
def test_bad_arguments(beir, tmp_path, args, message):
    result = _mine("--queries", beir, "--output", tmp_path / "o.jsonl", *args)
    assert result.exit_code == 2 and message in result.output
    assert "Traceback" not in result.output


def test_queries_without_qrels_is_a_clear_error(beir, tiny_model_dir, tmp_path):
    result = _mine("--queries", beir / "queries.jsonl", "--corpus", beir / "corpus.jsonl", "--index", tmp_path / "i",
                   "--model", tiny_model_dir, "--output", tmp_path / "o.jsonl")
    assert result.exit_code == 2 and "--qrels" in result.output and "queries.jsonl" in result.output


def test_index_corpus_mismatch_is_rejected(beir, tiny_model_dir, tmp_path, shared_data):
    ok = _mine("--queries", beir, "--index", tmp_path / "idx", "--model", tiny_model_dir, "--k", 40, "--range-max", 30,
               "--output", tmp_path / "o.jsonl")
    assert ok.exit_code == 0, ok.output
    (tmp_path / "q.tsv").write_text("q1\tmanhattan project\n")
    (tmp_path / "r.tsv").write_text("q1 0 0 1\n")
    bad = _mine("--queries", tmp_path / "q.tsv", "--qrels", tmp_path / "r.tsv",
                "--corpus", shared_data / "msmarco" / "samples" / "collection.head89.tsv", "--index", tmp_path / "idx",
                "--model", tiny_model_dir, "--k", 40, "--range-max", 30, "--output", tmp_path / "o2.jsonl")
    assert bad.exit_code == 2 and "corpus" in bad.output


def test_mine_refuses_an_unknown_backend(beir, tiny_model_dir, tmp_path):
    r = _mine("--queries", beir, "--index", tmp_path / "idx", "--model", tiny_model_dir, "--output",
              tmp_path / "a.jsonl", "--backend", "onnx")
    assert r.exit_code == 2 and "unknown encode backend 'onnx'" in r.output
    assert not (tmp_path / "idx").exists()  # refused before any work


def test_mine_killed_midway_continues_where_it_stopped(beir, tiny_model_dir, tmp_path, monkeypatch):
    """A mining job killed after some rows keeps them: the re-run mines only the other queries and writes the
    same file and statistics as an uninterrupted run, random sampling included; other settings start anew."""
    import mining.job as miner
    from retriever.resumable_jsonl import ResumableJsonl

    common = ["--queries", beir, "--index", tmp_path / "idx", "--model", tiny_model_dir, "--k", 40, "--range-min", 2,
              "--range-max", 30, "--num-negatives", 3, "--sampling", "random", "--seed", 7,
              "--query-batch-size", 2, "--backend", "torch"]
    whole = _mine(*common, "--output", tmp_path / "whole.jsonl")
    assert whole.exit_code == 0, whole.output

    monkeypatch.setattr(ResumableJsonl, "SYNC_EVERY_S", 0.0)  # a state after every row
    real_mine, asked = miner.mine, []

    def killed_after(n):
        def mine(queries, *args, **kwargs):
            asked.append(len(queries))
            for i, row in enumerate(real_mine(queries, *args, **kwargs)):
                if i == n:
                    raise RuntimeError("killed")
                yield row
        return mine

    out = tmp_path / "job.jsonl"
    monkeypatch.setattr(miner, "mine", killed_after(4))
    assert _mine(*common, "--output", out).exit_code != 0
    partial = tmp_path / "job.jsonl.partial"
    assert not out.exists() and len(partial.read_text().splitlines()) == 4
    monkeypatch.setattr(miner, "mine", killed_after(10**9))
    again = _mine(*common, "--output", out)
    assert again.exit_code == 0, again.output
    assert "continuing the interrupted run" in again.output and asked[-1] == 10 - 4
    assert out.read_text() == (tmp_path / "whole.jsonl").read_text() and not partial.exists()
    a, b = (json.loads((tmp_path / f"{n}.stats.json").read_text()) for n in ("whole", "job"))
    for key in ("queries", "candidates", "negatives", "dropped", "short_queries", "rank_histogram"):
        assert a[key] == b[key], key
    assert b["settings"]["resumed_after_queries"] == 4

    # another seed is another job: its partial rows are not reused
    monkeypatch.setattr(miner, "mine", killed_after(4))
    assert _mine(*common, "--output", tmp_path / "other.jsonl").exit_code != 0
    monkeypatch.setattr(miner, "mine", killed_after(10**9))
    other = [*common[:-6], "--seed", 8, *common[-4:]]
    assert _mine(*other, "--output", tmp_path / "other.jsonl").exit_code == 0 and asked[-1] == 10


def test_mine_under_torchrun_splits_the_queries_and_writes_the_one_process_file(beir, tiny_model_dir, tmp_path):
    """Two torchrun ranks each mine a block of the queries; rank 0 joins the blocks and the statistics into
    the file and totals one process writes (random sampling included)."""
    import subprocess
    import sys
    from pathlib import Path

    common = ["--queries", beir, "--index", tmp_path / "idx", "--model", tiny_model_dir, "--k", 40, "--range-min", 2,
              "--range-max", 30, "--num-negatives", 3, "--sampling", "random", "--seed", 3,
              "--query-batch-size", 3, "--backend", "torch"]
    one = _mine(*common, "--output", tmp_path / "one.jsonl")
    assert one.exit_code == 0, one.output
    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(root), "CUDA_VISIBLE_DEVICES": ""}
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                          "-m", "retriever.cli", "mine", *map(str, common), "--output", str(tmp_path / "two.jsonl")],
                         env=env, capture_output=True, text=True, timeout=600)
    assert two.returncode == 0, two.stderr[-3000:]
    assert (tmp_path / "two.jsonl").read_text() == (tmp_path / "one.jsonl").read_text()
    a, b = (json.loads((tmp_path / f"{n}.stats.json").read_text()) for n in ("one", "two"))
    for key in ("queries", "candidates", "negatives", "dropped", "short_queries", "rank_histogram"):
        assert a[key] == b[key], key
    assert b["settings"]["ranks"] == 2 and b["settings"]["rows_written"] == a["settings"]["rows_written"]
    assert sorted(p.name for p in tmp_path.glob("two.*")) == ["two.jsonl", "two.stats.json"]


def test_mine_killed_with_sigkill_continues_and_writes_the_uninterrupted_file(tiny_model_dir, tmp_path):
    """A real kill (SIGKILL, no cleanup) of `negatron mine` in the middle of its queries: the re-run keeps the
    rows its last saved state covers and ends with the uninterrupted run's file."""
    import signal
    import subprocess
    import sys
    import time
    from pathlib import Path

    from test_mining import _write_dataset

    data = _write_dataset(tmp_path / "beir", n_docs=2400, n_queries=800)
    common = ["--queries", data, "--index", tmp_path / "idx", "--model", tiny_model_dir, "--k", 40, "--range-min", 2,
              "--range-max", 30, "--num-negatives", 3, "--sampling", "random", "--query-batch-size", 8,
              "--backend", "torch"]
    whole = _mine(*common, "--output", tmp_path / "whole.jsonl")
    assert whole.exit_code == 0, whole.output
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path(__file__).resolve().parents[1]),
           "NEGATRON_SYNC_EVERY_S": "0"}
    cmd = [sys.executable, "-m", "retriever.cli", "mine", *map(str, common), "--output", str(tmp_path / "job.jsonl")]
    partial = tmp_path / "job.jsonl.partial"
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and proc.poll() is None:
        if partial.exists() and partial.stat().st_size > 0 and sum(1 for _ in open(partial, "rb")) >= 150:
            break
        time.sleep(0.05)
    assert proc.poll() is None, "the job ended before it could be killed"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    kept = sum(1 for _ in open(partial, "rb"))
    assert 150 <= kept < 800 and not (tmp_path / "job.jsonl").exists()
    again = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "continuing the interrupted run" in again.stderr
    assert (tmp_path / "job.jsonl").read_text() == (tmp_path / "whole.jsonl").read_text()
    a, b = (json.loads((tmp_path / f"{n}.stats.json").read_text()) for n in ("whole", "job"))
    assert all(a[k] == b[k] for k in ("queries", "negatives", "dropped", "short_queries", "rank_histogram"))
