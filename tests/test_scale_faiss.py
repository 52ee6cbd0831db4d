"""FAISS at MS MARCO scale (issue #13): a capped IVF training sample, one GPU copy, rank 0 alone builds."""

import json

import numpy as np
import pytest
import torch.multiprocessing as mp

import index.faiss_index as fi
from index.faiss_index import DenseIndex, default_train_sample
from index.store import EmbeddingStore


def _store(folder, n=2000, dim=16, shard_size=300, seed=0):
    folder.mkdir(parents=True)
    emb = np.random.default_rng(seed).standard_normal((n, dim)).astype(np.float32)
    emb /= np.linalg.norm(emb, axis=1, keepdims=True)
    for i, start in enumerate(range(0, n, shard_size)):
        np.save(folder / f"shard-{i:05d}.npy", emb[start:start + shard_size].astype(np.float16))
    (folder / "ids.txt").write_text("".join(f"d{i}\n" for i in range(n)))
    (folder / "manifest.json").write_text(json.dumps({
        "model": "m", "checkpoint_hash": "h", "dim": dim, "count": n, "dtype": "float16", "normalize": True,
        "shard_size": shard_size, "num_shards": -(-n // shard_size), "complete": True}))
    return EmbeddingStore.open(folder), emb.astype(np.float16).astype(np.float32)


def test_default_train_sample_is_capped():
    # the old rule, min(count, 256 * nlist), gathered all 8.8M vectors for IVF65536 (27 GB float32 at 768-d)
    assert default_train_sample(65536, 8_841_823) == 2_000_000
    assert default_train_sample(16384, 8_841_823) == 1_048_576
    assert default_train_sample(1024, 8_841_823) == 100_000
    assert default_train_sample(1024, 5_000) == 5_000


def test_train_sample_is_honoured_and_gathered_from_float16(tmp_path, monkeypatch):
    store, emb = _store(tmp_path / "emb")
    seen = []
    real = fi._gather

    def spy(s, rows):
        out = real(s, rows)
        seen.append((len(rows), out.dtype))
        np.testing.assert_array_equal(out, emb[rows])  # exactly the chosen rows
        return out

    monkeypatch.setattr(fi, "_gather", spy)
    index = DenseIndex.build(store, tmp_path / "ix", factory="IVF8,Flat", train_sample=500)
    assert seen == [(500, np.float32)] and index.manifest["train_sample"] == 500
    assert DenseIndex.load(tmp_path / "ix").manifest["train_sample"] == 500
    gathered = store.gather([1999, 0, 0, 301])
    np.testing.assert_array_equal(gathered, emb[[1999, 0, 0, 301]])


def test_cosine_ivf_build_normalises_in_chunks(tmp_path):
    store, emb = _store(tmp_path / "emb")
    index = DenseIndex.build(store, tmp_path / "ix", factory="IVF8,Flat", metric="cosine")
    index.set_search_params(nprobe=8)
    _, rows = index.search(emb[:20] * 3, 1)
    assert rows[:, 0].tolist() == list(range(20))


class _FakeGpuFaiss:
    """faiss with one pretend GPU: counts CPU->GPU copies (a 'GPU index' is the CPU index wrapped)."""

    def __init__(self, faiss):
        self._faiss, self.to_gpu = faiss, 0

    def __getattr__(self, name):
        return getattr(self._faiss, name)

    def get_num_gpus(self):
        return 1

    class GpuMultipleClonerOptions:
        shard = useFloat16 = False

    def index_cpu_to_all_gpus(self, index, co=None, ngpu=-1):
        self.to_gpu += 1
        return index

    def index_gpu_to_cpu(self, index):
        return self._faiss.clone_index(index)


def test_a_gpu_build_makes_one_gpu_copy(tmp_path, monkeypatch):
    import sys

    import faiss

    fake = _FakeGpuFaiss(faiss)
    monkeypatch.setitem(sys.modules, "faiss", fake)
    store, _ = _store(tmp_path / "emb")
    index = DenseIndex.build(store, tmp_path / "ix", factory="Flat")
    assert fake.to_gpu == 1  # was 2: build on the GPUs, copy back, then a second copy onto the GPUs
    assert index.manifest["gpus_used_for_build"] == 1


def test_gpu_indexes_refuse_k_above_2048(tmp_path, monkeypatch):
    store, emb = _store(tmp_path / "emb", n=3000)
    index = DenseIndex.build(store, tmp_path / "ix", factory="Flat", use_gpu=False)
    assert index.max_k is None and index.search(emb[:1], 2500)[1].shape == (1, 2500)
    monkeypatch.setattr(DenseIndex, "_on_gpu", property(lambda self: True))
    assert index.max_k == 2048
    with pytest.raises(ValueError, match=r"k=2500 is more than a GPU FAISS index returns \(2048\)"):
        index.search(emb[:1], 2500)


def _rank_worker(rank, init_file, emb_dir, out_dir, log_dir):
    import torch
    import torch.distributed as dist

    import index.faiss_index as fi_

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    real = fi_.DenseIndex._build.__func__

    def counting(cls, *a, **kw):
        (log_dir / f"built-by-{rank}").write_text("x")
        return real(cls, *a, **kw)

    fi_.DenseIndex._build = classmethod(counting)
    index = fi_.DenseIndex.build(emb_dir, out_dir, factory="Flat")
    (log_dir / f"rank-{rank}.json").write_text(json.dumps({"count": index.count, "created": index.manifest["created"]}))
    dist.destroy_process_group()


def test_under_torchrun_only_rank_0_builds(tmp_path):
    _store(tmp_path / "emb", n=500)
    logs = tmp_path / "logs"
    logs.mkdir()
    mp.spawn(_rank_worker, args=(str(tmp_path / "init"), tmp_path / "emb", tmp_path / "ix", logs), nprocs=2, join=True)
    assert sorted(p.name for p in logs.glob("built-by-*")) == ["built-by-0"]
    r0, r1 = (json.loads((logs / f"rank-{r}.json").read_text()) for r in (0, 1))
    assert r0 == r1 and r0["count"] == 500  # rank 1 loaded the folder rank 0 wrote
