"""`negatron quickstart` end to end with the tiny model on a slice of the stdlib task."""

import json
import shutil

import pytest
from rich.console import Console
from typer.testing import CliRunner

from retriever.quickstart import QuickstartOptions, run_quickstart
from retriever.quickstart_data import cached_stdlib_dataset

SLICE = {"max_queries": 12, "max_docs": 60}


@pytest.fixture(scope="module")
def slice_cache(tmp_path_factory):
    """A cache holding the sliced stdlib task, built once for this module."""
    cache = tmp_path_factory.mktemp("quickstart-cache")
    cached_stdlib_dataset(cache, SLICE["max_queries"], SLICE["max_docs"])
    return cache


def test_quickstart_end_to_end_tiny(tiny_model_dir, slice_cache, tmp_path):
    opts = QuickstartOptions(output=tmp_path / "run", model=str(tiny_model_dir), max_steps=2, batch_size=4,
                             cache_dir=slice_cache, eval_batch_size=16, **SLICE)
    console = Console(record=True, width=120)
    summary = run_quickstart(opts, console)
    text = console.export_text()
    assert "reused from cache" in text
    for heading in ("1/4  dataset", "2/4  zero-shot evaluation", "3/4  fine-tuning", "4/4  fine-tuned evaluation"):
        assert heading in text
    assert "fine-tuned model" in text and "ndcg@10" in text
    run = tmp_path / "run"
    assert (run / "train" / "final" / "config.json").is_file()
    assert json.loads((run / "quickstart.json").read_text()) == summary
    assert summary["num_docs"] == 60 and summary["num_queries"] == 12
    for stage in ("zero_shot", "fine_tuned"):
        assert 0.0 <= summary[stage]["ndcg@10"] <= 1.0 and 0.0 <= summary[stage]["recall@100"] <= 1.0
    # 60 documents and k=1000: every test positive is retrieved somewhere in the list.
    assert summary["zero_shot"]["recall@100"] == 1.0
    # The weights changed, so the fine-tuned ranking differs from the zero-shot one.
    before = (run / "eval" / "zero-shot").rglob("run.trec")
    after = (run / "train" / "eval").rglob("run.trec")
    assert next(before).read_text() != next(after).read_text()
    # It ends with the before/after report, and says where it is.
    report = run / "report" / "index.html"
    assert summary["report"] == str(report) and "report (tables, plots" in text
    page = report.read_text()
    assert "zero-shot" in page and "fine-tuned" in page and (run / "report" / "plots" / "loss.png").is_file()
    assert summary["dataset_stats"]["documents"] == 60


def test_quickstart_on_beir_folder_without_train_split(tiny_model_dir, slice_cache, tmp_path):
    """--data with only qrels/test.tsv: zero-shot evaluation, no training, and the CLI exits 0."""
    from retriever.cli import _register_all, app

    folder = tmp_path / "beir"
    shutil.copytree(cached_stdlib_dataset(slice_cache, SLICE["max_queries"], SLICE["max_docs"])[0], folder)
    (folder / "qrels" / "train.tsv").unlink()
    _register_all()
    result = CliRunner().invoke(app, ["quickstart", "--data", str(folder), "--output", str(tmp_path / "run"),
                                      "--model", str(tiny_model_dir)])
    assert result.exit_code == 0, result.output
    summary = json.loads((tmp_path / "run" / "quickstart.json").read_text())
    assert summary["fine_tuned"] is None and summary["num_docs"] == 60
    assert "skipping fine-tuning" in result.output


def test_quickstart_rejects_a_folder_that_is_not_beir(tmp_path):
    from retriever.cli import _register_all, app

    _register_all()
    result = CliRunner().invoke(app, ["quickstart", "--data", str(tmp_path), "--output", str(tmp_path / "run")])
    assert result.exit_code == 2
    assert "corpus.jsonl" in result.output and "Traceback" not in result.output


def test_quickstart_trains_with_tasb_batches(tiny_model_dir, slice_cache, tmp_path):
    opts = QuickstartOptions(output=tmp_path / "run", model=str(tiny_model_dir), max_steps=2, batch_size=4,
                             negatives="tasb", cache_dir=slice_cache, eval_batch_size=16, **SLICE)
    console = Console(record=True, width=120)
    summary = run_quickstart(opts, console)
    assert "3/4  fine-tuning (train split, TAS-B topic-aware batches)" in console.export_text()
    assert "strategy: tasb" in (tmp_path / "run" / "train" / "config.yaml").read_text()
    assert summary["options"]["negatives"] == "tasb" and summary["fine_tuned"] is not None


def test_quickstart_rejects_unknown_negatives(tmp_path):
    from retriever.cli import _register_all, app

    _register_all()
    result = CliRunner().invoke(app, ["quickstart", "--negatives", "star", "--output", str(tmp_path / "run")])
    assert result.exit_code == 2
    assert "unknown quickstart negatives 'star'" in result.output and "inbatch, tasb" in result.output
