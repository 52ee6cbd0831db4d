import json
from pathlib import Path

import numpy as np
import pytest

from index.encode import encode_corpus, encode_texts, model_fingerprint
from index.store import EmbeddingStore, shard_name
from retriever.data import Corpus, DataError
from retriever.modeling import BiEncoder

TEXTS = [
    "dense retrieval maps queries and documents to vectors",
    "hard negatives look relevant but are not",
    "the quick brown fox jumps over the lazy dog and keeps running far away",
    "faiss searches vectors",
    "bm25 scores documents by term frequency",
    "a cross encoder reads the query and the document together, slowly but well",
    "python functions return values",
]


@pytest.fixture()
def corpus_file(tmp_path):
    path = tmp_path / "corpus.jsonl"
    with open(path, "w") as fh:
        for i, t in enumerate(TEXTS * 3):
            fh.write(json.dumps({"_id": f"d{i}", "title": f"title {i % 4}", "text": t}) + "\n")
    return path


def test_encode_corpus_matches_biencoder_and_keeps_order(tiny_model_dir, corpus_file, tmp_path):
    store = encode_corpus(str(tiny_model_dir), corpus_file, tmp_path / "emb", shard_size=8, bf16=False,
                          dtype="float32", show_progress=False)
    corpus = Corpus(corpus_file)
    assert store.ids == corpus.ids and store.count == len(corpus) == 21
    assert [len(ids) for ids, _ in store.iter_shards()] == [8, 8, 5]
    model = BiEncoder.from_pretrained(tiny_model_dir)
    ref = model.encode(corpus.texts(range(len(corpus))), kind="document", bf16=False)
    np.testing.assert_allclose(store.load_all(), ref, atol=1e-5)
    m = store.manifest
    assert m["complete"] and m["dim"] == model.dim and m["checkpoint_hash"] == model_fingerprint(model)
    assert m["model"] == str(tiny_model_dir) and m["normalize"] is True and m["dtype"] == "float32"
    # shards are plain .npy files a reader can memory-map
    assert np.load(tmp_path / "emb" / shard_name(0), mmap_mode="r").shape == (8, model.dim)


def test_float16_shards_and_bf16_stay_close(tiny_model_dir, corpus_file, tmp_path):
    ref = encode_corpus(str(tiny_model_dir), corpus_file, tmp_path / "a", bf16=False, dtype="float32", show_progress=False).load_all()
    half = encode_corpus(str(tiny_model_dir), corpus_file, tmp_path / "b", bf16=True, dtype="float16", show_progress=False)
    assert np.load(tmp_path / "b" / shard_name(0)).dtype == np.float16
    cos = np.sum(half.load_all() * ref, axis=1) / np.linalg.norm(half.load_all(), axis=1)
    assert cos.min() > 0.99


def test_encode_texts_query_and_document(tiny_model_dir):
    model = BiEncoder.from_pretrained(tiny_model_dir, query_prefix="query: ")
    q = encode_texts(model, TEXTS, kind="query", bf16=False, batch_size=3)
    assert q.dtype == np.float32 and q.shape == (len(TEXTS), model.dim)
    np.testing.assert_allclose(q, model.encode(TEXTS, kind="query", bf16=False), atol=1e-5)
    d = encode_texts(model, TEXTS, kind="document", bf16=False)
    assert not np.allclose(q, d)  # the prefix applies to queries only
    assert encode_texts(model, [], kind="query").shape == (0, model.dim)
    with pytest.raises(ValueError, match="kind"):
        encode_texts(model, TEXTS, kind="passage")


def test_resume_skips_finished_shards_and_gives_identical_output(tiny_model_dir, corpus_file, tmp_path, monkeypatch):
    import index.encode as enc

    out = tmp_path / "emb"
    full = encode_corpus(str(tiny_model_dir), corpus_file, tmp_path / "ref", shard_size=5, show_progress=False).load_all()

    real = enc._encode
    calls = []

    def dying(*args, **kwargs):
        if len(calls) == 2:
            raise KeyboardInterrupt  # killed while encoding the third shard
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(enc, "_encode", dying)
    with pytest.raises(KeyboardInterrupt):
        encode_corpus(str(tiny_model_dir), corpus_file, out, shard_size=5, show_progress=False)
    assert sorted(p.name for p in out.glob("shard-*.npy")) == [shard_name(0), shard_name(1)]
    assert not list(out.glob(".*tmp"))  # no half-written shard left behind
    with pytest.raises(DataError, match="unfinished"):
        EmbeddingStore.open(out)
    done_before = {n: (out / n).stat().st_mtime_ns for n in (shard_name(0), shard_name(1))}

    calls.clear()
    monkeypatch.setattr(enc, "_encode", lambda *a, **k: (calls.append(1), real(*a, **k))[1])
    store = encode_corpus(str(tiny_model_dir), corpus_file, out, shard_size=5, show_progress=False)
    assert len(calls) == 3  # shards 2, 3, 4 only
    assert {n: (out / n).stat().st_mtime_ns for n in done_before} == done_before
    np.testing.assert_array_equal(store.load_all(), full)


def test_resume_refuses_a_different_model(tiny_model_dir, corpus_file, tmp_path):
    from retriever.testing import build_tiny_model

    encode_corpus(str(tiny_model_dir), corpus_file, tmp_path / "emb", show_progress=False)
    other = build_tiny_model(tmp_path / "other", seed=1)
    with pytest.raises(DataError, match="different run.*checkpoint_hash"):
        encode_corpus(str(other), corpus_file, tmp_path / "emb", show_progress=False)
    store = encode_corpus(str(other), corpus_file, tmp_path / "emb", show_progress=False, overwrite=True)
    assert store.manifest["model"] == str(other)


def test_sharding_across_ranks(tiny_model_dir, corpus_file, tmp_path, monkeypatch):
    ref = encode_corpus(str(tiny_model_dir), corpus_file, tmp_path / "ref", shard_size=4, show_progress=False).load_all()
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    assert encode_corpus(str(tiny_model_dir), corpus_file, tmp_path / "emb", shard_size=4, show_progress=False) is None
    assert sorted(p.name for p in (tmp_path / "emb").glob("shard-*")) == [shard_name(1), shard_name(3), shard_name(5)]
    monkeypatch.setenv("RANK", "0")
    store = encode_corpus(str(tiny_model_dir), corpus_file, tmp_path / "emb", shard_size=4, show_progress=False)
    np.testing.assert_array_equal(store.load_all(), ref)


def test_default_shard_size_gives_every_rank_a_shard(tiny_model_dir, corpus_file, tmp_path, monkeypatch):
    from index.encode import default_shard_size

    assert default_shard_size(5183, 2) == 2592 and default_shard_size(5183, 1) == 5183
    assert default_shard_size(8_841_823, 8) == 100_000 and default_shard_size(1, 4) == 1
    ref = encode_corpus(str(tiny_model_dir), corpus_file, tmp_path / "ref", show_progress=False).load_all()
    monkeypatch.setenv("WORLD_SIZE", "2")  # 21 documents on 2 ranks: shards of 11 and 10
    monkeypatch.setenv("RANK", "1")
    assert encode_corpus(str(tiny_model_dir), corpus_file, tmp_path / "rank1", show_progress=False) is None
    assert [p.name for p in (tmp_path / "rank1").glob("shard-*")] == [shard_name(1)]
    monkeypatch.setenv("RANK", "0")
    assert encode_corpus(str(tiny_model_dir), corpus_file, tmp_path / "emb", show_progress=False) is None
    assert [p.name for p in (tmp_path / "emb").glob("shard-*")] == [shard_name(0)]
    monkeypatch.setenv("WORLD_SIZE", "1")  # resumed by one process: it adopts the folder's shard size
    store = encode_corpus(str(tiny_model_dir), corpus_file, tmp_path / "emb", show_progress=False)
    assert store.manifest["shard_size"] == 11 and store.manifest["num_shards"] == 2
    np.testing.assert_allclose(store.load_all(), ref, atol=1e-3)  # other batches: float16 rounding only


def test_not_distributed_encodes_everything_under_torchrun(tiny_model_dir, corpus_file, tmp_path, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    store = encode_corpus(str(tiny_model_dir), corpus_file, tmp_path / "emb", show_progress=False, distributed=False)
    assert store.count == len(TEXTS) * 3 and store.manifest["num_shards"] == 1


def test_store_rejects_truncated_shard(tiny_model_dir, corpus_file, tmp_path):
    encode_corpus(str(tiny_model_dir), corpus_file, tmp_path / "emb", shard_size=8, show_progress=False)
    shard = tmp_path / "emb" / shard_name(1)
    shard.write_bytes(shard.read_bytes()[:100])
    with pytest.raises(DataError, match=shard_name(1)):
        EmbeddingStore.open(tmp_path / "emb")


@pytest.mark.integration
def test_minilm_on_scifact_slice_matches_sentence_transformers(minilm_path, scifact):
    from sentence_transformers import SentenceTransformer

    corpus = Corpus(scifact / "corpus.jsonl")
    texts = corpus.texts(range(0, 24))
    st = SentenceTransformer(minilm_path, device="cpu")
    ref = st.encode(texts, normalize_embeddings=True)
    ours = encode_texts(minilm_path, texts, kind="document", bf16=False)
    assert np.sum(ours * ref, axis=1).min() > 0.9999
    fast = encode_texts(minilm_path, texts[:4], kind="document", bf16=True)  # slow on CPUs without native bf16
    assert np.sum(fast * ref[:4], axis=1).min() > 0.995


def _refresh_on_rank0(rank, init_file, model_dir, corpus, out, result):
    """Rank 0 re-encodes alone (as the service's refresh thread does) while rank 1 only reaches the
    final barrier: encode_corpus must not enter a collective of its own, or rank 0 would time out."""
    from datetime import timedelta

    import torch

    torch.set_num_threads(1)
    torch.distributed.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2,
                                         timeout=timedelta(seconds=60))
    if rank == 0:
        store = encode_corpus(model_dir, corpus, out, show_progress=False, distributed=False)
        Path(result).write_text(f"{store.count} {store.manifest['num_shards']}")
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()


def test_not_distributed_inside_a_real_process_group(tiny_model_dir, corpus_file, tmp_path):
    import torch.multiprocessing as mp

    result = tmp_path / "result.txt"
    mp.spawn(_refresh_on_rank0, args=(str(tmp_path / "init"), str(tiny_model_dir), str(corpus_file),
                                      str(tmp_path / "emb"), str(result)), nprocs=2, join=True)
    assert result.read_text() == f"{len(TEXTS) * 3} 1"


def test_a_resumed_folder_keeps_the_backend_it_began_with(tiny_model_dir, corpus_file, tmp_path, monkeypatch):
    import index.encode as enc
    from index import openvino_backend as ovb

    monkeypatch.delenv("NEGATRON_ENCODE_BACKEND", raising=False)
    out = tmp_path / "emb"
    real, backends = enc._encode, []

    def dying(*args, **kwargs):
        if len(backends) == 2:
            raise KeyboardInterrupt  # killed while encoding the third shard
        backends.append(args[6])
        return real(*args, **kwargs)

    monkeypatch.setattr(enc, "_encode", dying)
    with pytest.raises(KeyboardInterrupt):
        encode_corpus(str(tiny_model_dir), corpus_file, out, shard_size=5, show_progress=False, bf16=False,
                      backend="torch")
    # resumed with `auto` where a fresh plan would now choose OpenVINO (bulk fp32 on a CPU without native bf16)
    monkeypatch.setattr(enc, "BULK_TEXTS", 1)
    monkeypatch.setattr(ovb, "_cpu_without_native_bf16", lambda: True)
    monkeypatch.setattr(ovb, "openvino_available", lambda: True)
    assert ovb.resolve_backend(None, "cpu", False, bulk=True) == "openvino"
    backends.clear()
    monkeypatch.setattr(enc, "_encode", lambda *a, **k: (backends.append(a[6]), real(*a, **k))[1])
    encode_corpus(str(tiny_model_dir), corpus_file, out, shard_size=5, show_progress=False, bf16=False)
    assert backends == ["torch"] * 3
    assert json.loads((out / "manifest.json").read_text())["backend"] == "torch"


def test_max_length_matches_a_training_configs_doc_length(tiny_model_dir, corpus_file, tmp_path):
    """``max_length`` (``negatron encode --max-length``) encodes as a model with that ``doc_max_length``
    does: same embeddings, same fingerprint (what ``negatives.options.index.embeddings`` checks)."""
    store = encode_corpus(str(tiny_model_dir), corpus_file, tmp_path / "emb", bf16=False, dtype="float32",
                          show_progress=False, max_length=6)
    model = BiEncoder.from_pretrained(tiny_model_dir)
    full = model.encode(Corpus(corpus_file).texts(range(21)), kind="document", bf16=False)
    default_hash = model_fingerprint(model)
    model.doc_max_length = 6
    short = model.encode(Corpus(corpus_file).texts(range(21)), kind="document", bf16=False)
    assert store.manifest["max_length"] == 6 and store.checkpoint_hash == model_fingerprint(model) != default_hash
    np.testing.assert_allclose(store.load_all(), short, atol=1e-5)
    assert np.abs(short - full).max() > 1e-3  # the corpus has documents longer than 6 tokens
    with pytest.raises(ValueError, match="max_length"):
        encode_corpus(model, corpus_file, tmp_path / "emb2", show_progress=False, max_length=6)


def test_a_folder_of_another_length_names_the_length_and_the_fix(tiny_model_dir, corpus_file, tmp_path):
    encode_corpus(str(tiny_model_dir), corpus_file, tmp_path / "emb", bf16=False, show_progress=False, max_length=6)
    with pytest.raises(DataError, match=r"max_length: 6 vs 5.*--max-length 5"):
        encode_corpus(str(tiny_model_dir), corpus_file, tmp_path / "emb", bf16=False, show_progress=False, max_length=5)
