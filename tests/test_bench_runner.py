"""bench/run_benchmarks.py (`make bench`) with fake benches: small scripts that write JSON shaped like the real ones."""

import dataclasses
import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))

import run_benchmarks as rb  # noqa: E402

INDEX = {"rows": [{"factory": "Flat", "build_seconds": 0.01, "qps": 1234.0, "recall_at_10": 1.0, "index_mb": 3.8}]}
SERVICE = {"answered": 2000, "failed": 0, "answered_during_refresh": 1500, "versions_in_answers": [1, 2],
           "all_versions_valid": True, "p50_ms": 82.7, "p99_ms": 141.0, "requests_per_second": 48.2,
           "refresh_seconds": 35.8}
DOC = "# Benchmarks\n\nHand-written text that must survive.\n"


def fake_bench(tmp_path: Path, name: str, payload: dict | None) -> Path:
    """A script that writes ``payload`` to the path after its last flag, or fails loudly when payload is None."""
    script = tmp_path / f"fake_{name}.py"
    body = (f"import sys; sys.exit('{name} exploded')" if payload is None else
            f"import json, sys; open(sys.argv[-1], 'w').write(json.dumps({payload!r}))")
    script.write_text(body + "\n")
    return script


@pytest.fixture
def runner(tmp_path, monkeypatch):
    """run(tag, index=payload, service=payload) -> exit status; the docs file and results live in tmp_path."""
    docs = tmp_path / "benchmarks.md"
    docs.write_text(DOC)
    monkeypatch.setattr(rb, "gemm_limits", lambda threads: {"fp32": 100.0})  # no 2048² matmuls in a unit test
    real = {b.name: b for b in rb.BENCHES}

    def run(tag: str, *extra: str, **payloads) -> int:
        benches = [dataclasses.replace(real[name], script=str(fake_bench(tmp_path, name, p)), args=lambda t, d: [])
                   for name, p in payloads.items()]
        monkeypatch.setattr(rb, "BENCHES", benches)
        return rb.main(["--docs", str(docs), "--results", str(tmp_path / "results"), "--tag", tag, "--threads", "1",
                        *extra])

    return run, docs


def test_writes_marked_sections_replaces_its_own_and_keeps_another_machines(runner):
    run, docs = runner
    assert run("machine-a", index=INDEX, service=SERVICE) == 0
    text = docs.read_text()
    assert text.startswith(DOC)
    section = rb.get_block(text, "machine-a")
    assert "(`machine-a`), last run" in rb.get_block(section, "machine-a:head")
    index_table = rb.get_block(section, "machine-a:index")
    assert "| Flat | 0.01 | 1234 | 1.000 | 3.8 |" in index_table
    assert "flags" in index_table and "GEMM limit fp32 100 GFLOP/s" in index_table  # machine, flags, date per table
    assert "| 2,000 | 0 | 1,500 | 1, 2 (all valid) | 82.7 ms | 141.0 ms |" in rb.get_block(section, "machine-a:service")

    assert run("machine-b", index={"rows": [dict(INDEX["rows"][0], qps=999.0)]}) == 0
    before_b = rb.get_block(docs.read_text(), "machine-b")
    assert "| Flat | 0.01 | 999 |" in before_b

    assert run("machine-a", index={"rows": [dict(INDEX["rows"][0], qps=4321.0)]}) == 0
    text = docs.read_text()
    assert text.count("<!-- bench:machine-a:begin -->") == 1 and text.count("<!-- bench:machine-a:index:begin -->") == 1
    assert "| Flat | 0.01 | 4321 |" in rb.get_block(text, "machine-a:index")
    assert "1234" not in text
    assert "82.7 ms" in rb.get_block(text, "machine-a:service")  # not re-run: its table stays
    assert rb.get_block(text, "machine-b") == before_b  # another machine's section, byte for byte
    machine = next((docs.parent / "results").glob("machine-a-*/machine.json"))
    assert json.loads(machine.read_text())["tag"] == "machine-a"


def test_a_failing_bench_is_named_and_wipes_nothing(runner, capsys):
    run, docs = runner
    assert run("machine-a", index=INDEX, service=SERVICE) == 0
    assert run("machine-a", index=None, service=dict(SERVICE, p50_ms=70.1)) == 1
    err = capsys.readouterr().err
    assert "FAILED index: exit 1" in err and "service" not in err
    text = docs.read_text()
    assert "| Flat | 0.01 | 1234 |" in rb.get_block(text, "machine-a:index")  # the last good table is kept
    assert "70.1 ms" in rb.get_block(text, "machine-a:service")
    folder = next((docs.parent / "results").glob("machine-a-*"))
    assert "index exploded" in (folder / "index.log").read_text()
    assert json.loads((folder / "service.json").read_text())["p50_ms"] == 70.1


def test_dry_run_prints_the_commands_and_writes_nothing(runner, capsys):
    run, docs = runner
    assert run("machine-a", "--dry-run", index=INDEX) == 0
    out = capsys.readouterr().out
    assert "fake_index.py --json " in out and "results/machine-a-" in out
    assert docs.read_text() == DOC and not (docs.parent / "results").exists()


def test_slow_benches_run_only_when_named():
    assert {b.name for b in rb.selected(None)} == {"encode", "mine", "train", "service", "rerank", "index"}
    assert [b.name for b in rb.selected(["scale"])] == ["scale"]


@pytest.mark.parametrize("name, result", [("encode", "encode_speed.json"), ("mine", "mine_speed.json"),
                                          ("service", "service_load.json"), ("rerank", "rerank_speed.json")])
def test_tables_read_the_real_benches_json(name, result):
    """The committed outputs of earlier runs: the table code reads the keys the benches really write."""
    bench = next(b for b in rb.BENCHES if b.name == name)
    rows = bench.rows(json.loads((ROOT / "bench" / "results" / result).read_text()))
    assert rows and all(len(r) == len(bench.columns) for r in rows)


def test_machine_tag_tells_cpus_of_one_model_apart():
    m = {"cpu": "AMD EPYC", "cores": 2, "gpu": None}
    assert rb.machine_tag({**m, "flags": ["avx2"]}) == "amd-epyc-2cpu-avx2"
    assert rb.machine_tag({**m, "flags": ["avx2", "avx512f", "avx512_bf16"]}) == "amd-epyc-2cpu-avx512-bf16"
    assert rb.machine_tag({**m, "flags": [], "gpu": "NVIDIA H100 80GB HBM3"}) == "amd-epyc-2cpu-nvidia-h100-80gb-hbm3"


def test_service_table_has_one_row_per_backend(runner):
    run, docs = runner
    runs = {"runs": [dict(SERVICE, backend="auto", resolved_backend="openvino"),
                     dict(SERVICE, backend="torch", resolved_backend="torch", p50_ms=99.1)]}
    assert run("machine-a", service=runs) == 0
    table = rb.get_block(rb.get_block(docs.read_text(), "machine-a"), "machine-a:service")
    assert "| auto (openvino) | 2,000 | 0 | 1,500 | 1, 2 (all valid) | 82.7 ms | 141.0 ms |" in table
    assert "| torch | 2,000 | 0 | 1,500 | 1, 2 (all valid) | 99.1 ms | 141.0 ms |" in table


def test_encode_table_reads_nativeness_from_the_field_not_the_machine_string():
    """An emulated bf16 peak is no limit: the table shows no bf16 fraction where the bench says not native,
    whatever the free-text machine string says (older results only have the string)."""
    row = {"system": "negatron", "docs_per_s": 10.0, "speedup": 1.2, "min_cos": 0.9999, "mean_cos": 0.99999,
           "gflops": 50.0, "frac_bf16_peak": 0.5, "frac_fp32_peak": 0.4}
    bf16_cell = lambda r: rb.encode_rows(r)[0][6]  # noqa: E731
    assert bf16_cell({"machine": "x86_64, native bf16 True", "native_bf16": False, "rows": [row]}) == "– (not native)"
    assert bf16_cell({"machine": "x86_64", "native_bf16": True, "rows": [row]}) == "50 %"
    assert bf16_cell({"machine": "x86_64, native bf16 False", "rows": [row]}) == "– (not native)"
    assert bf16_cell({"machine": "x86_64, native bf16 True", "rows": [row]}) == "50 %"


def test_encode_table_scales_the_emulated_bf16_sample_by_the_peer_fp32_rate():
    """ST's emulated bf16 is timed on a sample only: its row is that rate scaled by ST fp32's whole-corpus rate
    over ST fp32's rate on the same sample, so the sample's document lengths do not bias the ratio."""
    st = {"system": "st fp32", "docs_per_s": 14.0, "speedup": 1.0, "min_cos": 1.0, "mean_cos": 1.0,
          "gflops": 80.0, "frac_bf16_peak": None, "frac_fp32_peak": 0.6}
    result = {"machine": "x86_64", "native_bf16": False, "rows": [st],
              "st_bf16_emulated": {"stride": 648, "docs": 8, "st_bf16_docs_per_s": 0.05, "st_fp32_docs_per_s": 10.0}}
    rows = rb.encode_rows(result)
    assert len(rows) == 2 and "every 648th doc (8)" in rows[1][0]
    assert rows[1][1] == "0.07" and rows[1][2] == "0.005×"  # 0.05 x 14 / 10 = 0.07 docs/s
    assert len(rb.encode_rows(dict(result, st_bf16_emulated=None))) == 1
