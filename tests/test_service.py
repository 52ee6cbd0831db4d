"""The mining service: answers, request validation, checkpoint-driven refresh with an atomic swap,
and the HTTP server + client under concurrent load while a refresh runs."""

import contextlib
import threading
import time
from pathlib import Path

import pytest

from mining.service import MiningRequestError, MiningService, find_newest_checkpoint
from test_mining import _write_dataset


@pytest.fixture(scope="module")
def env(tmp_path_factory, tiny_model_dir):
    from index.encode import encode_corpus
    from index.faiss_index import DenseIndex
    from retriever.modeling import BiEncoder

    root = tmp_path_factory.mktemp("service")
    data = _write_dataset(root / "beir", n_docs=80, n_queries=12)
    store = encode_corpus(BiEncoder.from_pretrained(str(tiny_model_dir)), data, root / "emb", show_progress=False)
    DenseIndex.build(store, root / "index", factory="Flat", metric="ip")
    # a "newer checkpoint": same architecture, other weights, saved as the trainer does
    from retriever.testing import build_tiny_model

    other = BiEncoder.from_pretrained(str(build_tiny_model(root / "other-hf", seed=1)))
    other.save(root / "run" / "checkpoints" / "step-100" / "model")
    (root / "run" / "checkpoints" / "step-200").mkdir()  # incomplete: no modules.json, must be ignored
    return dict(root=root, data=data, index=root / "index", model=str(tiny_model_dir))


@pytest.fixture
def service(env, tmp_path):
    svc = MiningService(env["index"], env["model"], corpus=env["data"], work_dir=tmp_path / "versions")
    yield svc
    svc.close()


def test_mine_texts_and_ids(service):
    [r] = service.mine(["dense retrieval vectors"], k=30, range_min=3, range_max=20, exclude_ids=["doc5"])
    assert r.version == 1 and r.texts is None
    assert [n.rank for n in r.negatives] == sorted(n.rank for n in r.negatives)
    assert all(3 <= n.rank < 20 for n in r.negatives) and "doc5" not in {n.doc_id for n in r.negatives}
    assert [n.score for n in r.negatives] == sorted((n.score for n in r.negatives), reverse=True)
    results = service.mine(query_ids=["q0", "q3"], k=40, num_negatives=5, with_texts=True, relative_margin=0.05)
    for res in results:
        assert len(res.negatives) <= 5 and len(res.texts) == len(res.negatives)
        positives = {"q0": {"doc0", "doc1"}, "q3": {"doc9", "doc10"}}[res.query_id]
        assert not positives & {n.doc_id for n in res.negatives}  # qrels positives excluded
        assert res.positive_score is not None
        assert all(n.score <= res.positive_score - abs(res.positive_score) * 0.05 + 1e-6 for n in res.negatives)


@pytest.mark.parametrize("kwargs, message", [
    (dict(queries=["a"], query_ids=["q0"]), "exactly one"),
    (dict(queries=[]), "empty"),
    (dict(queries=["  "]), "empty"),
    (dict(queries=["a"], k=10, range_max=20), "range_max"),
    (dict(queries=["a"], range_min=50, range_max=20, k=60), "range_min"),
    (dict(queries=["a"], relative_margin=1.5), "relative_margin"),
    (dict(queries=["a"], bogus=1), "bogus"),
    (dict(queries=["a", "b"], positive_ids=[["doc1"]]), "positive_ids"),
])
def test_bad_requests(service, kwargs, message):
    with pytest.raises(ValueError, match=message):
        service.mine(**kwargs)


def test_unknown_ids_and_margin_without_positives(service):
    with pytest.raises(MiningRequestError, match="unknown query ids") as err:
        service.mine(query_ids=["nope"])
    assert err.value.status_code == 404
    with pytest.raises(MiningRequestError, match="positives"):
        service.mine(["a query"], relative_margin=0.1)


def test_find_newest_checkpoint(env, tmp_path):
    assert find_newest_checkpoint(env["root"] / "run") == (100, env["root"] / "run" / "checkpoints" / "step-100" / "model")
    assert find_newest_checkpoint(tmp_path) is None


def test_watch_refresh_swaps_while_answering(env, tmp_path):
    """The watcher sees step-100, rebuilds in the background; two threads keep mining meanwhile."""
    svc = MiningService(env["index"], env["model"], corpus=env["data"], watch_dir=env["root"] / "run",
                        work_dir=tmp_path / "versions", poll_seconds=0.1)
    failures, versions, stop = [], [], threading.Event()

    def hammer():
        while not stop.is_set():
            try:
                versions.extend(r.version for r in svc.mine(["faiss index negatives"], k=20, num_negatives=3))
            except Exception as exc:  # noqa: BLE001 - any failure fails the test
                failures.append(exc)

    threads = [threading.Thread(target=hammer) for _ in range(2)]
    for t in threads:
        t.start()
    try:
        deadline = time.monotonic() + 180
        while svc.version < 2 and time.monotonic() < deadline:
            time.sleep(0.05)
        time.sleep(0.3)
    finally:
        stop.set()
        for t in threads:
            t.join()
    status = svc.status()
    assert not failures
    assert status["version"] == 2 and status["checkpoint_step"] == 100 and status["last_refresh"]
    assert set(versions) <= svc.versions_seen == {1, 2} and 1 in versions
    # a manual refresh builds v3 and deletes v2's files; the user's index folder stays
    assert svc.refresh(block=True) is True
    assert svc.version == 3 and status["corpus_size"] == 80
    assert sorted(p.name for p in (tmp_path / "versions").iterdir()) == ["v3"]
    assert env["index"].is_dir()
    svc.close()


def test_http_server_and_client_under_load_during_refresh(env, tmp_path):
    from mining.client import MiningClient
    from mining.server import serve_in_thread

    svc = MiningService(env["index"], env["model"], corpus=env["data"], work_dir=tmp_path / "versions")
    failures, versions, latencies = [], [], []
    with serve_in_thread(svc) as url:
        with MiningClient(url) as probe:
            assert probe.health()["ok"] is True
            status = probe.status()
            assert status["version"] == 1 and status["corpus_size"] == 80 and status["refresh_in_progress"] is False
            # 4xx with a message, over HTTP too
            import httpx

            bad = httpx.post(f"{url}/v1/mine", json={"queries": ["a"], "k": 5, "range_max": 9})
            assert bad.status_code == 422 and "range_max" in bad.text
            with pytest.raises(MiningRequestError, match="404"):
                probe.mine(query_ids=["missing"])
            [same] = probe.mine(["dense retrieval vectors"], k=30, range_min=3, range_max=20, exclude_ids=["doc5"])
            [local] = svc.mine(["dense retrieval vectors"], k=30, range_min=3, range_max=20, exclude_ids=["doc5"])
            assert same.negatives == local.negatives or [n.doc_id for n in same.negatives] == [n.doc_id for n in local.negatives]

        def client_loop(n_requests):
            with MiningClient(url) as client:
                for i in range(n_requests):
                    t0 = time.perf_counter()
                    try:
                        [r] = client.mine([f"query number {i} about faiss"], k=20, num_negatives=3)
                        versions.append(r.version)
                        latencies.append(time.perf_counter() - t0)
                    except Exception as exc:  # noqa: BLE001
                        failures.append(exc)

        threads = [threading.Thread(target=client_loop, args=(50,)) for _ in range(4)]
        for t in threads:
            t.start()
        with MiningClient(url) as admin:
            assert admin.refresh(env["root"] / "run" / "checkpoints" / "step-100" / "model") is True
            for t in threads:
                t.join()
            deadline = time.monotonic() + 180
            while admin.status()["refresh_in_progress"] and time.monotonic() < deadline:
                time.sleep(0.1)
            assert admin.status()["version"] == 2
            assert admin.mine(["x y"], k=5)[0].version == 2
    svc.close()
    assert not failures and len(versions) == 200
    assert set(versions) <= svc.versions_seen


def test_duplicates_of_a_positive_under_another_id_are_never_negatives(env, tmp_path, monkeypatch):
    """An exact copy of a positive's text under another id is excluded like the positive (by text),
    for every query; exclude_texts drops texts given per query. An index of the service's own corpus is
    filtered by row and text key (no candidate text read), with the answers of the by-id path."""
    import json
    import shutil

    from index.encode import encode_corpus
    from index.faiss_index import DenseIndex
    from retriever.data import Corpus
    from retriever.modeling import BiEncoder

    rows = [json.loads(line) for line in (env["data"] / "corpus.jsonl").read_text().splitlines()]
    copy = dict(next(r for r in rows if r["_id"] == "doc0"), _id="copy-of-doc0")
    other = dict(next(r for r in rows if r["_id"] == "doc7"), _id="copy-of-doc7")
    data = tmp_path / "beir"
    shutil.copytree(env["data"], data)
    (data / "corpus.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows + [copy, other]))
    store = encode_corpus(BiEncoder.from_pretrained(env["model"]), Corpus(data / "corpus.jsonl"), tmp_path / "emb",
                          show_progress=False)
    DenseIndex.build(store, tmp_path / "index", factory="Flat", metric="ip")
    with MiningService(tmp_path / "index", env["model"], corpus=data, work_dir=tmp_path / "versions") as svc:
        text7 = svc.corpus.get("doc7").full_text
        with monkeypatch.context() as m:
            m.setattr(Corpus, "texts", lambda self, rows: pytest.fail("a candidate's text was read"))
            [res] = svc.mine(["anything at all"], k=82, positive_ids=[["doc0"]], exclude_texts=[[text7]],
                             exclude_ids=["doc3"])
        got = {n.doc_id for n in res.negatives}
        assert not got & {"doc0", "copy-of-doc0", "doc7", "copy-of-doc7", "doc3"}
        assert res.dropped["excluded"] == 5 and len(got) == 82 - 5
        with monkeypatch.context() as m:
            m.setattr("mining.service._rows_are_corpus_rows", lambda hits, corpus: False)
            [by_id] = svc.mine(["anything at all"], k=82, positive_ids=[["doc0"]], exclude_texts=[[text7]],
                               exclude_ids=["doc3"])
        assert [(n.doc_id, n.score, n.rank) for n in by_id.negatives] == \
            [(n.doc_id, n.score, n.rank) for n in res.negatives] and by_id.dropped == res.dropped
        with pytest.raises(ValueError, match="exclude_texts"):
            svc.mine(["a"], exclude_texts=[["x"], ["y"]])


# --------------------------------------------------------------------------- issue #13: scale
def test_default_device_is_the_ranks_gpu_when_cuda_is_available(env, tmp_path, monkeypatch):
    """The service's encoder used to stay on the CPU unless --device was given."""
    import torch

    from mining.service import default_device

    monkeypatch.setenv("LOCAL_RANK", "2")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 4)
    assert default_device() == "cuda:2"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert default_device() == "cpu"
    with MiningService(env["index"], env["model"], work_dir=tmp_path / "v") as svc:
        assert svc.device == "cpu" and svc.status()["device"] == "cpu"
        assert str(next(svc._current.model.parameters()).device) == "cpu"


def test_k_over_the_index_max_k_is_a_400(env, tmp_path, monkeypatch):
    """A GPU FAISS index returns at most 2,048 hits a query while requests accept k up to 10,000: refuse
    with a 400 naming the limit, in process and over HTTP."""
    import httpx

    from index.faiss_index import DenseIndex
    from mining.server import serve_in_thread

    monkeypatch.setattr(DenseIndex, "max_k", property(lambda self: 50))  # what a GPU index reports (2,048)
    svc = MiningService(env["index"], env["model"], corpus=env["data"], work_dir=tmp_path / "v")
    assert svc.status()["max_k"] == 50
    with pytest.raises(MiningRequestError, match=r"max_k=50.*k <= 50") as err:
        svc.mine(["dense retrieval"], k=60)
    assert err.value.status_code == 400
    assert svc.mine(["dense retrieval"], k=50)[0].version == 1
    with serve_in_thread(svc) as url:
        bad = httpx.post(f"{url}/v1/mine", json={"queries": ["a"], "k": 5000})
        assert bad.status_code == 400 and "k <= 50" in bad.json()["detail"]
    svc.close()


def _resident_kib(path: str) -> int:
    """KiB of this process's resident pages mapped from ``path`` (Linux smaps; 0 elsewhere)."""
    import re

    total, current = 0, ""
    with contextlib.suppress(OSError), open("/proc/self/smaps") as fh:
        for line in fh:
            head = re.match(r"^[0-9a-f]+-[0-9a-f]+ \S+ \S+ \S+ \d+\s*(.*)$", line)
            if head:
                current = head.group(1).strip()
            elif line.startswith("Rss:") and current == path:
                total += int(line.split()[1])
    return total


def test_refresh_holds_one_full_index_in_private_memory(env, tmp_path, monkeypatch):
    """While the next version is built, the serving version is the same index memory-mapped from its
    file (its private copy released, same answers); the built index is served as built, not re-read."""
    import gc
    import weakref

    from index.faiss_index import INDEX_FILE, DenseIndex
    from retriever.memory import file_mappings

    svc = MiningService(env["index"], env["model"], corpus=env["data"], work_dir=tmp_path / "versions")
    before = svc.mine(["faiss index negatives"], k=30)[0].negatives
    in_ram = weakref.ref(svc._current.index)
    seen = {}
    build = DenseIndex.build.__func__

    def watched_build(cls, *args, **kwargs):
        gc.collect()
        seen["old_released"] = in_ram() is None
        seen["mapped"] = getattr(svc._current.index, "memory_mapped", False)
        [res] = svc.mine(["faiss index negatives"], k=30)
        seen["answer"] = (res.version, res.negatives)
        mapped_file = str(Path(svc._current.index.folder).resolve() / INDEX_FILE)
        seen["ranges"] = file_mappings(mapped_file)
        seen["resident_kib"] = _resident_kib(mapped_file)
        return build(cls, *args, **kwargs)

    def no_reload(*args, **kwargs):
        raise AssertionError("the refresh read the index it had just built back from disk")

    monkeypatch.setattr(DenseIndex, "build", classmethod(watched_build))
    monkeypatch.setattr(DenseIndex, "load", classmethod(no_reload))
    assert svc.refresh(env["root"] / "run" / "checkpoints" / "step-100" / "model", block=True) is True
    assert seen["old_released"] and seen["mapped"]
    assert seen["ranges"] and seen["resident_kib"] == 0  # the search's pages of the old file were unmapped
    assert seen["answer"][0] == 1 and [n.doc_id for n in seen["answer"][1]] == [n.doc_id for n in before]
    assert [n.score for n in seen["answer"][1]] == pytest.approx([n.score for n in before], abs=1e-6)
    assert svc.version == 2 and not getattr(svc._current.index, "memory_mapped", False)
    assert svc.mine(["faiss index negatives"], k=30)[0].version == 2
    svc.close()


def test_refresh_rebuilds_with_the_served_index_settings(env, tmp_path):
    """A refresh builds the new version with the factory, metric, nprobe and train sample the served index
    was built with (an IVF index must not come back as Flat, nor lose its nprobe)."""
    from index.faiss_index import DenseIndex
    from index.store import EmbeddingStore

    DenseIndex.build(EmbeddingStore.open(env["root"] / "emb"), tmp_path / "ivf", factory="IVF2,Flat", metric="cosine",
                     nprobe=2, train_sample=60)
    svc = MiningService(tmp_path / "ivf", env["model"], corpus=env["data"], work_dir=tmp_path / "versions")
    try:
        assert svc.refresh(block=True)
        built = svc._current.index.manifest
    finally:
        svc.close()
    assert svc.version == 2
    assert (built["factory"], built["metric"], built["nprobe"], built["train_sample"]) == ("IVF2,Flat", "cosine", 2, 60)


def test_a_killed_refresh_keeps_its_finished_shards_and_replaces_another_models(env, tmp_path, monkeypatch):
    """A refresh killed mid-encode leaves ``v<N>/embeddings`` with some shards; the next build of the same
    weights into that folder encodes only the missing shards (an 8.8M re-encode outlives a session), while a
    leftover of other weights is encoded anew, never served."""
    import numpy as np

    import index.encode as encode_module
    from index.encode import encode_corpus
    from index.store import EmbeddingStore, shard_name
    from retriever.modeling import BiEncoder

    newer = env["root"] / "run" / "checkpoints" / "step-100" / "model"
    folder = tmp_path / "versions" / "v2"
    encode_corpus(BiEncoder.from_pretrained(str(newer)), env["data"], folder / "embeddings", shard_size=20,
                  show_progress=False, distributed=False)
    expected = EmbeddingStore.open(folder / "embeddings").load_all()
    for i in (1, 3):  # the kill came before these two shards were written
        (folder / "embeddings" / shard_name(i)).unlink()
    (folder / ".index.abc.tmp").mkdir()  # and during nothing else: a half-built index folder goes
    encoded = []
    real = encode_module._encode
    monkeypatch.setattr(encode_module, "_encode", lambda model, texts, *a, **k: encoded.append(len(texts)) or real(model, texts, *a, **k))
    svc = MiningService(env["index"], env["model"], corpus=env["data"], work_dir=tmp_path / "versions")
    try:
        assert svc.refresh(newer, block=True) and svc.version == 2
        assert encoded == [20, 20]  # shards 1 and 3 only
        np.testing.assert_array_equal(EmbeddingStore.open(folder / "embeddings").load_all(), expected)
        assert not (folder / ".index.abc.tmp").exists()
        served = svc.mine(["dense retrieval vectors"], k=10, num_negatives=10)[0]

        # the same folder number left by another model's build (the starting model's vectors here)
        other = tmp_path / "versions" / "v3"
        encode_corpus(BiEncoder.from_pretrained(env["model"]), env["data"], other / "embeddings", shard_size=20,
                      show_progress=False, distributed=False)
        encoded.clear()
        assert svc.refresh(newer, block=True) and svc.version == 3
        assert sum(encoded) == 80  # every document encoded again, by the newer weights
        np.testing.assert_array_equal(EmbeddingStore.open(other / "embeddings").load_all(), expected)
        again = svc.mine(["dense retrieval vectors"], k=10, num_negatives=10)[0]
        assert [n.doc_id for n in again.negatives] == [n.doc_id for n in served.negatives]
    finally:
        svc.close()


def test_a_refresh_over_a_bad_corpus_reports_the_corpus_not_a_stale_folder(tmp_path, tiny_model_dir, monkeypatch):
    """``encode_or_resume`` replaces only another run's folder; an error in the corpus itself reaches the
    caller at once (file and line), not after an overwrite and a second try."""
    import index.encode as encode_module
    from retriever.data import DataError

    tries, real = [], encode_module.encode_corpus
    monkeypatch.setattr(encode_module, "encode_corpus", lambda *a, **k: tries.append(k.get("overwrite")) or real(*a, **k))
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"_id": "a", "text": "fine"}\n{"_id": "b", "text": \n')
    with pytest.raises(DataError, match=r"bad\.jsonl:2"):
        encode_module.encode_or_resume(str(tiny_model_dir), bad, tmp_path / "emb", show_progress=False,
                                       distributed=False)
    assert tries == [None]
