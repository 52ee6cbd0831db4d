import json

import numpy as np
import pytest

from index.faiss_index import CorruptIndexError, DenseIndex
from index.store import EmbeddingStore
from retriever.data import DataError


def _write_store(folder, emb, model="m/one", checkpoint="abc123", shard_size=300):
    """An embeddings folder in the layout index.encode writes (built directly for speed)."""
    folder.mkdir(parents=True)
    n, dim = emb.shape
    for i, start in enumerate(range(0, n, shard_size)):
        np.save(folder / f"shard-{i:05d}.npy", emb[start:start + shard_size].astype(np.float16))
    (folder / "ids.txt").write_text("".join(f"doc{i}\n" for i in range(n)))
    manifest = {"model": model, "checkpoint_hash": checkpoint, "dim": dim, "count": n, "dtype": "float16",
                "normalize": True, "shard_size": shard_size, "num_shards": (n + shard_size - 1) // shard_size, "complete": True}
    (folder / "manifest.json").write_text(json.dumps(manifest))
    return EmbeddingStore.open(folder)


@pytest.fixture()
def store(tmp_path):
    rng = np.random.default_rng(0)
    emb = rng.standard_normal((1000, 16)).astype(np.float32)
    emb /= np.linalg.norm(emb, axis=1, keepdims=True)
    return _write_store(tmp_path / "emb", emb)


def test_flat_is_exact_and_round_trips(store, tmp_path):
    docs = store.load_all()
    queries = docs[:20] + 0.01
    index = DenseIndex.build(store, tmp_path / "ix", factory="Flat")
    scores, rows = index.search(queries, k=5, batch_size=7)
    expected = np.argsort(-(queries @ docs.T), axis=1)[:, :5]
    np.testing.assert_array_equal(rows, expected)
    assert scores.dtype == np.float32 and rows.dtype == np.int64 and scores.shape == (20, 5)
    loaded = DenseIndex.load(tmp_path / "ix", expect_dim=16, expect_model="m/one")
    np.testing.assert_array_equal(loaded.search(queries, 5)[1], rows)
    assert loaded.ids[rows[0, 0]] == "doc0" and loaded.count == 1000 and loaded.dim == 16
    m = loaded.manifest
    assert (m["model"], m["checkpoint_hash"], m["factory"], m["metric"]) == ("m/one", "abc123", "Flat", "ip")
    assert m["build_seconds"] >= 0 and m["format_version"] == 1
    hits = loaded.search_ids(queries[:1], 3)[0]
    assert hits[0][0] == "doc0" and len(hits) == 3


def test_cosine_normalises_queries(store, tmp_path):
    index = DenseIndex.build(store, tmp_path / "ix", metric="cosine")
    s_small, r_small = index.search(store.load_all()[:3] * 0.5, 2)
    s_big, r_big = index.search(store.load_all()[:3] * 7, 2)
    np.testing.assert_array_equal(r_small, r_big)
    np.testing.assert_allclose(s_small, s_big, atol=1e-4)
    assert np.all(s_small[:, 0] <= 1.0001)


@pytest.mark.parametrize("factory,metric", [("Flat", "ip"), ("SQfp16", "ip"), ("Flat", "cosine"), ("PQ4", "ip")])
def test_flat_codes_are_filled_in_place_as_add_would_write_them(store, tmp_path, factory, metric):
    """Flat/SQ/PQ codes are sized once and encoded into place (no growth copies): the same bytes
    FAISS's own ``add`` writes, and the same search results."""
    import faiss

    built = DenseIndex.build(store, tmp_path / "ix", factory=factory, metric=metric)
    reference = faiss.index_factory(16, factory, faiss.METRIC_INNER_PRODUCT)
    docs = store.load_all()
    if metric == "cosine":
        docs = docs / np.linalg.norm(docs, axis=1, keepdims=True)
    if not reference.is_trained:  # PQ: train as the build did (same sample, same seed)
        reference = faiss.deserialize_index(faiss.serialize_index(built.index))
        reference.reset()
    reference.add(docs)
    assert built.index.ntotal == reference.ntotal == 1000
    assert not getattr(built.index, "do_polysemous_training", False)  # FAISS's factory default: ~20 s of waste
    np.testing.assert_array_equal(faiss.vector_to_array(built.index.codes), faiss.vector_to_array(reference.codes))
    loaded = DenseIndex.load(tmp_path / "ix")
    np.testing.assert_array_equal(loaded.search(docs[:30], 10)[1], reference.search(docs[:30], 10)[1])


@pytest.mark.parametrize("factory,metric", [("IVF8,SQfp16", "ip"), ("IVF8,Flat", "cosine"), ("IVF8,PQ4", "ip")])
def test_ivf_lists_are_reserved_then_filled_as_add_would_fill_them(store, tmp_path, factory, metric):
    """IVF builds assign first, reserve each list at its final size and add with those assignments:
    the index is byte for byte the one FAISS's own ``add`` builds from the same trained quantizer."""
    import faiss

    built = DenseIndex.build(store, tmp_path / "ix", factory=factory, metric=metric)
    reference = faiss.deserialize_index(faiss.serialize_index(built.index))
    reference.reset()
    docs = store.load_all()
    if metric == "cosine":
        docs = docs / np.linalg.norm(docs, axis=1, keepdims=True)
    reference.add(docs)
    assert built.index.ntotal == 1000 and not getattr(built.index, "do_polysemous_training", False)
    lists = faiss.downcast_InvertedLists(built.index.invlists)
    assert sum(lists.list_size(i) for i in range(built.index.nlist)) == 1000
    np.testing.assert_array_equal(faiss.serialize_index(built.index), faiss.serialize_index(reference))


@pytest.mark.parametrize("factory", ["HNSW32", "IVF16,Flat"])
def test_approximate_factories_find_the_documents_themselves(store, tmp_path, factory):
    index = DenseIndex.build(store, tmp_path / "ix", factory=factory)
    _, rows = index.search(store.load_all()[:50], 10)
    assert (rows[:, 0] == np.arange(50)).mean() >= 0.9


def test_ivf_nlist_is_clamped_for_small_corpora(store, tmp_path, caplog):
    index = DenseIndex.build(store, tmp_path / "ix", factory="IVF4096,Flat")
    assert index.manifest["factory"] == "IVF25,Flat" and index.manifest["requested_factory"] == "IVF4096,Flat"
    assert "too few" in caplog.text
    index.set_search_params(nprobe=25)  # all lists: exact
    _, rows = index.search(store.load_all()[:10], 1)
    assert rows[:, 0].tolist() == list(range(10))


def test_bad_pq_factory_has_a_clear_error(store, tmp_path):
    with pytest.raises(ValueError, match="PQ"):
        DenseIndex.build(store, tmp_path / "ix", factory="IVF8,PQ5")


def test_refuses_truncated_index(store, tmp_path):
    DenseIndex.build(store, tmp_path / "ix")
    path = tmp_path / "ix" / "index.faiss"
    path.write_bytes(path.read_bytes()[:-1000])
    with pytest.raises(CorruptIndexError, match=r"index\.faiss.*truncated.*negatron index build"):
        DenseIndex.load(tmp_path / "ix")
    # even when the manifest's size check is gone, FAISS's own read error is reported with the file name
    manifest = json.loads((tmp_path / "ix" / "manifest.json").read_text())
    manifest.pop("index_bytes")
    (tmp_path / "ix" / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(CorruptIndexError, match=r"index\.faiss"):
        DenseIndex.load(tmp_path / "ix")


def test_refuses_wrong_dim_and_other_model(store, tmp_path):
    DenseIndex.build(store, tmp_path / "ix")
    with pytest.raises(CorruptIndexError, match="16-d.*384-d"):
        DenseIndex.load(tmp_path / "ix", expect_dim=384)
    with pytest.raises(CorruptIndexError, match="built from model 'm/one'.*not 'm/two'"):
        DenseIndex.load(tmp_path / "ix", expect_model="m/two")
    assert DenseIndex.load(tmp_path / "ix", expect_model="abc123").count == 1000  # the checkpoint hash also matches
    with pytest.raises(ValueError, match="queries are 8-d"):
        DenseIndex.load(tmp_path / "ix").search(np.zeros((1, 8), np.float32), 3)


def test_refuses_missing_or_corrupt_manifest(store, tmp_path):
    with pytest.raises(DataError, match="no manifest"):
        DenseIndex.load(tmp_path)
    DenseIndex.build(store, tmp_path / "ix")
    (tmp_path / "ix" / "manifest.json").write_text("{not json")
    with pytest.raises(CorruptIndexError, match="corrupt manifest"):
        DenseIndex.load(tmp_path / "ix")


def test_refuses_ids_that_do_not_match(store, tmp_path):
    DenseIndex.build(store, tmp_path / "ix")
    ids = tmp_path / "ix" / "ids.txt"
    ids.write_text("".join(ids.read_text().splitlines(keepends=True)[:-5]))
    with pytest.raises(DataError, match="995 ids"):
        DenseIndex.load(tmp_path / "ix")


def test_checks_the_real_model_fingerprint(tiny_model_dir, tmp_path):
    from index.encode import encode_corpus, load_model
    from retriever.testing import build_tiny_model

    corpus = tmp_path / "c.tsv"
    corpus.write_text("".join(f"p{i}\tpassage number {i} about dense retrieval\n" for i in range(30)))
    encode_corpus(str(tiny_model_dir), corpus, tmp_path / "emb", show_progress=False)
    DenseIndex.build(tmp_path / "emb", tmp_path / "ix")
    assert DenseIndex.load(tmp_path / "ix", expect_model=load_model(str(tiny_model_dir))).count == 30
    other = load_model(str(build_tiny_model(tmp_path / "other", seed=3)))
    with pytest.raises(CorruptIndexError, match="built from model"):
        DenseIndex.load(tmp_path / "ix", expect_model=other)
