import json

import pytest
from typer.testing import CliRunner

from _eval_data import write_toy_beir

pytest.importorskip("mteb", reason="mteb is not installed (pip install negatron[mteb])")


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    return write_toy_beir(tmp_path_factory.mktemp("mteb-toy") / "toy")


def test_local_beir_task_through_mteb_matches_negatron(tiny_model_dir, toy, tmp_path):
    from mteb.results import TaskResult

    from eval.beir import evaluate_beir, load_model
    from eval.mteb_runner import run_mteb

    model = load_model(str(tiny_model_dir))
    summary = run_mteb(model, data_dirs=[toy], output_dir=tmp_path, bf16=False)
    assert len(summary) == 1 and summary[0]["task"] == "Localtoy" and summary[0]["split"] == "test"
    path = tmp_path / "Localtoy.json"
    assert summary[0]["path"] == path and path.exists()
    saved = TaskResult.from_disk(path)  # mteb's own result format, readable by mteb
    assert saved.task_name == "Localtoy"
    scores = saved.scores["test"][0]
    assert scores["main_score"] == scores["ndcg_at_10"]
    ours = evaluate_beir(model, toy, bf16=False)["metrics"]
    assert scores["ndcg_at_10"] == pytest.approx(ours["ndcg@10"], abs=1e-5)  # mteb rounds to 5 decimals
    assert scores["recall_at_100"] == pytest.approx(ours["recall@100"], abs=1e-5)
    assert json.loads(path.read_text())["task_name"] == "Localtoy"


def test_wrapper_uses_query_and_document_prefixes(tiny_model_dir):
    from mteb.types import PromptType

    from eval.beir import load_model
    from eval.mteb_runner import mteb_model

    model = load_model(str(tiny_model_dir))
    model.query_prefix, model.doc_prefix = "query: ", "passage: "
    wrapper = mteb_model(model, bf16=False)
    batches = [{"text": ["dense retrieval", "bm25 scores"]}]
    q = wrapper.encode(batches, task_metadata=None, hf_split="test", hf_subset="default", prompt_type=PromptType.query)
    d = wrapper.encode(batches, task_metadata=None, hf_split="test", hf_subset="default", prompt_type=PromptType.document)
    import numpy as np

    np.testing.assert_allclose(q, model.encode(["dense retrieval", "bm25 scores"], "query", bf16=False), atol=1e-6)
    np.testing.assert_allclose(d, model.encode(["dense retrieval", "bm25 scores"], "document", bf16=False), atol=1e-6)
    assert not np.allclose(q, d)


def test_registered_task_without_cached_data_is_a_clear_message(tiny_model_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HOME", str(tmp_path / "empty-hf-home"))
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "empty-hf-home" / "datasets"))
    from retriever.cli import _register_all, app

    _register_all()
    result = CliRunner().invoke(app, ["eval", "mteb", "--model", str(tiny_model_dir), "--tasks", "SciFact",
                                      "--output", str(tmp_path / "out")])
    assert result.exit_code == 2
    assert "not in the local Hugging Face cache" in result.output and "--data" in result.output
    assert "Traceback" not in result.output


def test_unknown_task_name(tiny_model_dir, tmp_path):
    from retriever.cli import _register_all, app

    _register_all()
    result = CliRunner().invoke(app, ["eval", "mteb", "--model", str(tiny_model_dir), "--tasks", "NoSuchTask",
                                      "--output", str(tmp_path)])
    assert result.exit_code == 2 and "unknown mteb task" in " ".join(result.output.replace("│", " ").split())


@pytest.mark.integration
@pytest.mark.slow
def test_minilm_scifact_through_mteb(scifact, minilm_path, tmp_path):
    from eval.mteb_runner import run_mteb

    summary = run_mteb(minilm_path, data_dirs=[scifact], output_dir=tmp_path, batch_size=32)
    print("mteb scifact", summary)
    assert summary[0]["ndcg_at_10"] == pytest.approx(0.645, abs=0.005)
