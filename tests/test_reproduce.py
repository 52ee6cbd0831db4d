"""Reproduction tables (configs/reproductions/*.yaml) and `negatron reproduce`. The real rows run in
tests/test_eval_beir.py (integration: MiniLM and BM25 on SciFact); here a tiny model on toy data."""

import json

import pytest
from typer.testing import CliRunner

from _eval_data import write_toy_beir


def _write_table(path, rows):
    import yaml

    path.write_text(yaml.safe_dump({"rows": rows}, sort_keys=False))
    return path


def _row(model, published, **extra):
    return {"dataset": "beir/toy", "split": "test", "retriever": "dense", "model": str(model), "metric": "ndcg@10",
            "published": published, "tolerance": 0.002, "source": "measured by hand", **extra}


@pytest.fixture(scope="module")
def data_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("shared")
    write_toy_beir(root / "beir" / "toy")
    return root


@pytest.fixture(scope="module")
def toy_ndcg(tiny_model_dir, data_root):
    from eval.beir import evaluate_beir

    return evaluate_beir(str(tiny_model_dir), data_root / "beir" / "toy")["metrics"]["ndcg@10"]


def test_shipped_tables_load_and_name_their_sources():
    from eval.reproduce import default_tables, load_tables

    names = {p.name for p in default_tables()}
    assert {"beir-minilm.yaml", "beir-bm25.yaml"} <= names
    rows = load_tables()
    by_retriever = {(r.retriever, r.dataset, r.metric): r for r in rows}
    minilm = by_retriever[("dense", "beir/scifact", "ndcg@10")]
    assert minilm.model == "sentence-transformers/all-MiniLM-L6-v2" and minilm.published == 0.645
    bm25 = by_retriever[("bm25", "beir/scifact", "ndcg@10")]
    assert bm25.published == 0.679 and bm25.params == {"fields": "flat", "k1": 0.9, "b": 0.4}
    assert all(r.source and r.tolerance > 0 for r in rows)


@pytest.mark.parametrize("bad, message", [
    ({"dataset": "beir/toy"}, "row 1 lacks retriever, metric, published, tolerance, source"),
    ({**_row("m", 0.5), "retriever": "splade"}, "unknown retriever 'splade'"),
    ({**_row("m", 0.5), "metric": "ndcg10"}, "unknown metric"),
    ({**_row("m", 0.5), "publishd": 0.5}, "unknown keys publishd"),
    ({**_row("", 0.5)}, "a dense row needs a model"),
])
def test_malformed_rows_are_clear_errors(tmp_path, bad, message):
    from eval.reproduce import load_table
    from retriever.data import DataError

    table = _write_table(tmp_path / "t.yaml", [bad])
    with pytest.raises(DataError, match=message) as err:
        load_table(table)
    assert str(table) in str(err.value)


def test_rows_pass_fail_and_skip(tiny_model_dir, data_root, toy_ndcg, tmp_path):
    from eval.reproduce import load_table, reproduce

    table = _write_table(tmp_path / "t.yaml", [
        _row(tiny_model_dir, round(toy_ndcg, 4)),
        _row(tiny_model_dir, round(toy_ndcg + 0.01, 4)),
        {**_row(tiny_model_dir, 0.5), "metric": "recall@100"},
        {**_row(tiny_model_dir, 0.5), "dataset": "beir/absent"},
    ])
    outcomes = reproduce(load_table(table), data_root, output_dir=tmp_path / "out")
    assert [o.status for o in outcomes[:2]] + [outcomes[3].status] == ["ok", "fail", "skipped"]
    assert outcomes[2].measured == outcomes[0].result["metrics"]["recall@100"]
    assert outcomes[0].measured == pytest.approx(toy_ndcg) and outcomes[1].delta == pytest.approx(-0.01, abs=1e-4)
    assert outcomes[0].result is outcomes[1].result is outcomes[2].result  # one evaluation for the three rows
    assert "beir/absent" in outcomes[3].detail
    metrics = tmp_path / "out" / tiny_model_dir.name / "test" / "toy" / "metrics.json"
    assert json.loads(metrics.read_text())["metrics"]["ndcg@10"] == pytest.approx(toy_ndcg)


def test_cli_prints_measured_vs_published_with_marks(tiny_model_dir, data_root, toy_ndcg, tmp_path):
    from retriever.cli import _register_all, app

    _register_all()
    good = _write_table(tmp_path / "good.yaml", [_row(tiny_model_dir, round(toy_ndcg, 4))])
    result = CliRunner().invoke(app, ["reproduce", str(good), "--data-root", str(data_root),
                                      "--output", str(tmp_path / "out")])
    assert result.exit_code == 0, result.output
    assert "✓" in result.output and f"{toy_ndcg:.4f}" in result.output and "1 reproduced, 0 not, 0 skipped" in result.output
    bad = _write_table(tmp_path / "bad.yaml", [_row(tiny_model_dir, round(toy_ndcg + 0.05, 4))])
    result = CliRunner().invoke(app, ["reproduce", str(bad), "--data-root", str(data_root),
                                      "--output", str(tmp_path / "out")])
    assert result.exit_code == 1 and "✗" in result.output and "-0.0500" in result.output
