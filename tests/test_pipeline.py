"""Pipelines never reuse a stage trained from another config or another input model."""

import pytest
import yaml

from retriever.config import ConfigError
from retriever.pipeline import run_pipeline


def _stage(model, data, lr=1e-3):
    return {"model": {"name": str(model), "query_max_length": 16, "doc_max_length": 32},
            "data": {"triples": str(data)},
            "training": {"batch_size": 2, "max_steps": 2, "learning_rate": lr, "num_threads": 1, "bf16": False,
                         "log_every": 1}}


@pytest.fixture
def pipeline_file(tiny_model_dir, tmp_path):
    data = tmp_path / "triples.tsv"
    data.write_text("".join(f"query {i}\tpositive {i}\tnegative {i}\n" for i in range(4)))

    def write(first_lr=1e-3, second_lr=1e-3):
        path = tmp_path / "pipeline.yaml"
        path.write_text(yaml.safe_dump({"pipeline": [
            {"name": "first", "config": _stage(tiny_model_dir, data, first_lr)},
            {"name": "second", "config": _stage(tiny_model_dir, data, second_lr)}]}))
        return path

    return write


def test_rerun_with_unchanged_config_reuses_the_stages(pipeline_file, tmp_path, monkeypatch):
    out = tmp_path / "out"
    final = run_pipeline(pipeline_file(), out)
    stamp = (final / "model.safetensors").stat().st_mtime_ns

    import retriever.trainer

    monkeypatch.setattr(retriever.trainer, "train", lambda *a, **k: pytest.fail("an unchanged stage was retrained"))
    assert run_pipeline(pipeline_file(), out) == final
    assert (final / "model.safetensors").stat().st_mtime_ns == stamp


def test_edited_stage_config_is_refused_not_silently_reused(pipeline_file, tmp_path):
    out = tmp_path / "out"
    run_pipeline(pipeline_file(), out)
    with pytest.raises(ConfigError, match=r"stage 'second'.*different config.*training\.learning_rate.*delete"):
        run_pipeline(pipeline_file(second_lr=5e-3), out)


def test_changed_input_model_is_refused(pipeline_file, tmp_path):
    """Retraining the first stage with another config changes the second stage's input model."""
    import shutil

    out = tmp_path / "out"
    run_pipeline(pipeline_file(), out)
    shutil.rmtree(out / "first")
    with pytest.raises(ConfigError, match=r"stage 'second'.*input model"):
        run_pipeline(pipeline_file(first_lr=5e-3), out)
