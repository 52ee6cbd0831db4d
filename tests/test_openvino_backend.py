"""The OpenVINO inference backend: same embeddings as torch, converted once per weights, cached on disk,
and a fallback to torch when it cannot be used."""

import logging
import os

import numpy as np
import pytest
import torch

from index import openvino_backend as ovb
from retriever.modeling import BiEncoder

pytest.importorskip("openvino")

TEXTS = ["dense retrieval with hard negatives", "bm25 is a bag of words ranking function",
         "a short one", "faiss indexes vectors for fast inner product search over large corpora " * 3]


@pytest.fixture()
def model(tiny_model_dir):
    return BiEncoder.from_pretrained(tiny_model_dir)


@pytest.fixture()
def conversions(monkeypatch):
    """Counts calls of openvino.convert_model."""
    import openvino as ov

    calls = []
    real = ov.convert_model

    def counting(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(ov, "convert_model", counting)
    return calls


def test_resolve_backend(monkeypatch):
    monkeypatch.delenv("NEGATRON_ENCODE_BACKEND", raising=False)
    assert ovb.resolve_backend("auto", "cpu", bf16=True) == "openvino"
    assert ovb.resolve_backend(None, "cpu", bf16=False) == "torch"  # fp32 requests: the torch reference
    assert ovb.resolve_backend("torch", "cpu", bf16=True) == "torch"
    assert ovb.resolve_backend("openvino", "cpu", bf16=False) == "openvino"
    assert ovb.resolve_backend("auto", "meta", bf16=True) == "torch"  # not a CPU
    # bulk fp32: OpenVINO only where fp32 is the machine's default (no native bf16), never for small requests
    for native in (True, False):
        monkeypatch.setattr(ovb, "_cpu_without_native_bf16", lambda native=native: not native)
        assert ovb.resolve_backend("auto", "cpu", bf16=False, bulk=True) == ("torch" if native else "openvino")
        assert ovb.resolve_backend("auto", "cpu", bf16=False, bulk=False) == "torch"
        assert ovb.resolve_backend("torch", "cpu", bf16=False, bulk=True) == "torch"
    monkeypatch.setenv("NEGATRON_ENCODE_BACKEND", "torch")
    assert ovb.resolve_backend(None, "cpu", bf16=True) == "torch"
    with pytest.raises(ValueError, match="unknown encode backend 'onnx'"):
        ovb.resolve_backend("onnx", "cpu", bf16=True)
    with pytest.raises(ValueError, match="runs on the CPU"):
        ovb.resolve_backend("openvino", "meta", bf16=True)
    monkeypatch.setattr(ovb, "openvino_available", lambda: False)
    assert ovb.resolve_backend("auto", "cpu", bf16=True) == "torch"
    with pytest.raises(ImportError, match=r"negatron\[openvino\]"):
        ovb.resolve_backend("openvino", "cpu", bf16=True)


def test_fp32_openvino_matches_torch(model, tmp_path, monkeypatch):
    monkeypatch.setenv("NEGATRON_CACHE_DIR", str(tmp_path))
    for kind in ("query", "document"):
        ref = model.encode(TEXTS, kind=kind, bf16=False, backend="torch", batch_size=3)
        got = model.encode(TEXTS, kind=kind, bf16=False, backend="openvino", batch_size=3)
        np.testing.assert_allclose(got, ref, atol=2e-5)


def test_bf16_openvino_stays_close_to_fp32(model, tmp_path, monkeypatch):
    monkeypatch.setenv("NEGATRON_CACHE_DIR", str(tmp_path))
    ref = model.encode(TEXTS, bf16=False, backend="torch")
    got = model.encode(TEXTS, bf16=True, backend="openvino")
    assert (got * ref).sum(1).min() > 0.99


def test_converted_once_per_weights_and_again_after_an_update(model, tmp_path, monkeypatch, conversions):
    monkeypatch.setenv("NEGATRON_CACHE_DIR", str(tmp_path))
    first = model.encode(TEXTS, bf16=False, backend="openvino")
    model.encode(TEXTS[:2], bf16=False, backend="openvino")
    assert len(conversions) == 1
    with torch.no_grad():  # an optimizer step changes the weights in place
        for p in model.tower("document").parameters():
            p.mul_(1.1)
    updated = model.encode(TEXTS, bf16=False, backend="openvino")
    assert len(conversions) == 2
    assert not np.allclose(updated, first, atol=1e-4)
    np.testing.assert_allclose(updated, model.encode(TEXTS, bf16=False, backend="torch"), atol=2e-5)


def test_disk_cache_skips_conversion_and_survives_damage(tiny_model_dir, tmp_path, monkeypatch, conversions):
    monkeypatch.setenv("NEGATRON_CACHE_DIR", str(tmp_path))
    first = BiEncoder.from_pretrained(tiny_model_dir).encode(TEXTS, bf16=False, backend="openvino")
    entries = list((tmp_path / "openvino").iterdir())
    assert len(entries) == 1 and (entries[0] / "model.xml").exists() and len(conversions) == 1
    again = BiEncoder.from_pretrained(tiny_model_dir).encode(TEXTS, bf16=False, backend="openvino")  # a new process would
    assert len(conversions) == 1
    np.testing.assert_array_equal(again, first)
    (entries[0] / "model.xml").write_text("<not xml")
    damaged = BiEncoder.from_pretrained(tiny_model_dir).encode(TEXTS, bf16=False, backend="openvino")
    assert len(conversions) == 2
    np.testing.assert_allclose(damaged, first, atol=1e-6)


def test_disk_cache_keeps_the_newest_entries(model, tmp_path, monkeypatch):
    monkeypatch.setenv("NEGATRON_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(ovb, "KEEP_ON_DISK", 2)
    for _ in range(3):
        with torch.no_grad():
            next(model.tower("document").parameters()).add_(0.01)
        model.encode(TEXTS[:1], bf16=False, backend="openvino")
    assert len([p for p in (tmp_path / "openvino").iterdir() if not p.name.startswith(".")]) == 2


def test_unconvertible_tower_falls_back_to_torch(model, tmp_path, monkeypatch, caplog):
    import openvino as ov

    monkeypatch.setenv("NEGATRON_CACHE_DIR", str(tmp_path))

    def broken(*args, **kwargs):
        raise RuntimeError("unsupported operation")

    monkeypatch.setattr(ov, "convert_model", broken)
    with caplog.at_level(logging.WARNING):
        got = model.encode(TEXTS, bf16=False, backend="openvino")
        model.encode(TEXTS, bf16=False, backend="openvino")
    np.testing.assert_allclose(got, model.encode(TEXTS, bf16=False, backend="torch"), atol=1e-6)
    assert sum("encoding with torch instead" in r.message for r in caplog.records) == 1  # warned once


def test_padding_is_honoured_when_the_longest_batch_has_none(model, tmp_path, monkeypatch):
    monkeypatch.setenv("NEGATRON_CACHE_DIR", str(tmp_path))
    same = ["alpha beta gamma delta"] * 3 + ["a", "alpha beta"]  # the first batch of 3 needs no padding
    ref = model.encode(same, bf16=False, backend="torch", batch_size=3)
    np.testing.assert_allclose(model.encode(same, bf16=False, backend="openvino", batch_size=3), ref, atol=2e-5)


def test_encode_backend_block_sets_and_restores_the_default(monkeypatch):
    monkeypatch.setenv("NEGATRON_ENCODE_BACKEND", "openvino")
    with ovb.encode_backend("torch"):
        assert ovb.resolve_backend(None, "cpu", bf16=True) == "torch"
    assert ovb.resolve_backend(None, "cpu", bf16=True) == "openvino"
    monkeypatch.delenv("NEGATRON_ENCODE_BACKEND")
    with pytest.raises(RuntimeError):
        with ovb.encode_backend("torch"):
            raise RuntimeError("a failed command")
    assert "NEGATRON_ENCODE_BACKEND" not in os.environ


def test_bulk_encoding_runs_batches_concurrently_and_puts_each_row_back(model, tmp_path, monkeypatch):
    """Many batches go through a throughput-compiled model with several requests in flight; batches
    finish out of order, and every embedding must still land in its own row."""
    monkeypatch.setenv("NEGATRON_CACHE_DIR", str(tmp_path))
    texts = [f"{w} passage number {i} " * (1 + i % 7) for i, w in enumerate(["dense", "sparse", "hybrid"] * 11)]
    made = []
    real = ovb.openvino_tower

    def recording(tower, example, bf16=True, throughput=False):
        runner = real(tower, example, bf16, throughput)
        if throughput:
            runner.jobs = 3  # more requests than cores: completion order is then up to the scheduler
        made.append((throughput, runner))
        return runner

    monkeypatch.setattr("retriever.modeling.openvino_tower", recording)
    ref = model.encode(texts, bf16=False, backend="torch", batch_size=2)
    bulk = model.encode(texts, bf16=False, backend="openvino", batch_size=2)
    single = model.encode(texts[:2], bf16=False, backend="openvino", batch_size=2)
    assert [mode for mode, _ in made] == [True, False]  # 17 batches: throughput; one batch: latency
    assert made[0][1] is not made[1][1]
    np.testing.assert_allclose(bulk, ref, atol=2e-5)
    np.testing.assert_allclose(single, ref[:2], atol=2e-5)


def test_map_yields_every_key_with_its_own_output(model, tmp_path, monkeypatch):
    monkeypatch.setenv("NEGATRON_CACHE_DIR", str(tmp_path))
    tower = model.tower("document")
    batches = [dict(model.tokenize([t], "document")) for t in TEXTS]
    runner = ovb.openvino_tower(tower, batches[-1], bf16=False, throughput=True)
    runner.jobs = 4
    got = dict(runner.map(enumerate(batches)))
    assert sorted(got) == list(range(len(TEXTS)))
    for key, batch in enumerate(batches):
        np.testing.assert_allclose(got[key].numpy(), runner(**batch)[0].numpy(), atol=1e-6)


def test_release_compiled_drops_every_tower_of_a_model(model, tmp_path, monkeypatch, conversions):
    """What a trainer calls after its strategy's up-front encoding: the compiled models go (the disk cache
    stays, so encoding again reads it instead of converting)."""
    monkeypatch.setenv("NEGATRON_CACHE_DIR", str(tmp_path))
    model.encode(TEXTS, bf16=False, backend="openvino", batch_size=1)  # bulk: the throughput runner
    model.encode(TEXTS[:1], bf16=False, backend="openvino")  # one batch: the latency runner
    assert len(ovb._MEMORY[model.tower("document")][1]) == 2
    assert ovb.release_compiled(model) == 2 and model.tower("document") not in ovb._MEMORY
    assert ovb.release_compiled(model) == 0
    model.encode(TEXTS, bf16=False, backend="openvino")
    assert len(conversions) == 1


def test_bulk_fp32_runs_through_openvino_only_on_a_cpu_without_native_bf16(model, tmp_path, monkeypatch, conversions):
    import retriever.modeling as modeling

    monkeypatch.setenv("NEGATRON_CACHE_DIR", str(tmp_path))
    monkeypatch.delenv("NEGATRON_ENCODE_BACKEND", raising=False)
    ref = model.encode(TEXTS, bf16=False, backend="torch")
    tokens = int(sum(len(model.tokenizer(t)["input_ids"]) for t in TEXTS))
    monkeypatch.setattr(modeling, "BULK_TOKENS", tokens)  # these four texts count as bulk work
    monkeypatch.setattr(ovb, "_cpu_without_native_bf16", lambda: False)
    model.encode(TEXTS, bf16=False)
    assert not conversions  # native bf16 CPU: an fp32 request is a request for the torch reference
    monkeypatch.setattr(ovb, "_cpu_without_native_bf16", lambda: True)
    model.encode(TEXTS[:2], bf16=False)
    assert not conversions  # too little work to repay a conversion
    got = model.encode(TEXTS, bf16=False)
    assert len(conversions) == 1
    np.testing.assert_allclose(got, ref, atol=2e-5)
