"""ANCE-style refresh: negatives come from the mining service and carry the index version they came from."""

import json
from pathlib import Path

import pytest

from retriever.config import TrainConfig
from strategy_data import shared_mini, tiny_config


@pytest.fixture(scope="module")
def mini(scifact):
    return shared_mini(scifact)


def test_refreshed_negatives_carry_the_index_version(mini, tmp_path):
    from retriever.trainer import Trainer

    folder, model = mini
    options = {"k": 20, "pool": 5, "range_min": 0, "refresh_every": 2, "wait_for_refresh": True}
    cfg = TrainConfig.model_validate(tiny_config(folder, model, "ance", options, max_steps=5))
    trainer = Trainer(cfg, tmp_path / "run")
    trainer.run()
    rows = [json.loads(line) for line in (tmp_path / "run" / "negatives_log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5]
    # blocking refreshes after steps 2 and 4: steps 3-4 use version 2 (built at step 2), step 5 version 3
    assert [r["index_version"] for r in rows] == [1, 1, 2, 2, 3]
    assert [r["index_step"] for r in rows] == [0, 0, 2, 2, 4]
    assert [r["index_age_steps"] for r in rows] == [0, 1, 0, 1, 0]
    service = trainer.strategy.service
    assert service.versions_seen == {1, 2, 3}
    versions = {v for v, _ in trainer.strategy.cache.values()}
    assert 3 in versions and versions <= {1, 2, 3}
    train_log = [json.loads(line) for line in (tmp_path / "run" / "train_log.jsonl").read_text().splitlines()]
    assert train_log[-1]["index_version"] == 3


def test_asynchronous_refresh_keeps_training_on_the_old_index(mini, tmp_path):
    from retriever.trainer import Trainer

    folder, model = mini
    options = {"k": 20, "pool": 5, "range_min": 0, "refresh_every": 1}
    cfg = TrainConfig.model_validate(tiny_config(folder, model, "ance", options, max_steps=3))
    trainer = Trainer(cfg, tmp_path / "run")
    trainer.run()
    rows = [json.loads(line) for line in (tmp_path / "run" / "negatives_log.jsonl").read_text().splitlines()]
    assert len(rows) == 3
    assert all(r["index_age_steps"] >= 0 for r in rows)
    assert max(trainer.strategy.service.versions_seen) >= 2  # the service refreshed in the background


def _run_dir_rows(path):
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def test_served_negatives_are_the_exact_top_k_of_the_snapshot_that_tags_them(mini, tmp_path):
    """Every answer's version names the snapshot whose exact top-k (positives removed) it is."""
    import numpy as np

    from retriever.data import load_beir
    from retriever.modeling import BiEncoder
    from retriever.trainer import Trainer

    folder, model = mini
    options = {"k": 10, "refresh_every": 2, "wait_for_refresh": True}
    cfg = TrainConfig.model_validate(tiny_config(folder, model, "ance", options, max_steps=5, learning_rate=5e-3))
    trainer = Trainer(cfg, tmp_path / "run")
    strategy = trainer.strategy
    served = []
    mine = strategy.mine

    def refuse(*args, **kwargs):
        raise AssertionError("the in-process service answers with rows: no id -> row lookup is needed")

    def recording_mine(examples):
        strategy.corpus.rows = refuse
        answer = mine(examples)
        served.extend((q, version, strategy.corpus.texts(rows)) for q, (version, rows) in answer.items())
        return answer

    strategy.mine = recording_mine
    strategy._prune_snapshots = lambda: None  # keep every snapshot to check against
    trainer.run()
    assert strategy.service.device == str(trainer.device)  # the service encodes on the trainer's device
    ds = load_beir(folder, "train")
    docs = [d.full_text for d in ds.corpus]
    positives = {ex.query: (set(ex.positive_ids), {t.strip() for t in ex.positives}) for ex in trainer.train_examples}
    versions = {}

    def exact_top_k(step, query):
        if step not in versions:
            snap = BiEncoder.from_pretrained(tmp_path / "run" / "ance" / "snapshots" / f"step-{step}")
            d = snap.encode(docs, kind="document", bf16=False).astype(np.float16).astype(np.float32)  # as stored
            versions[step] = (snap, d)
        snap, d = versions[step]
        q = snap.encode([query], kind="query", bf16=False)[0]
        top = np.argsort(-(d @ q), kind="stable")[:10]
        pos_ids, pos_texts = positives[query]
        return {docs[r] for r in top if ds.corpus[int(r)].id not in pos_ids and docs[r].strip() not in pos_texts}

    stale = 0
    for query, version, texts in served:
        step = strategy.service.checkpoint_step_of(version)
        assert set(texts) == exact_top_k(step, query), (query, version)
        stale += step > 0 and set(texts) != exact_top_k(0, query)
    assert set(versions) == {0, 2, 4}  # snapshots of steps 0, 2 and 4 all served
    assert stale > 0, "the refreshed indexes must serve other negatives than the first (else this proves nothing)"


def test_a_refresh_due_while_one_runs_is_caught_up(mini, tmp_path):
    """The service builds the newest snapshot asked for during a running build, not nothing."""
    import threading

    from mining.service import MiningService
    from retriever.data import Corpus
    from retriever.modeling import BiEncoder
    from retriever.negatives.corpus_index import build_index

    folder, model = mini
    bi = BiEncoder.from_pretrained(model)
    build_index(bi, Corpus(folder / "corpus.jsonl"), tmp_path / "start", bf16=False)
    snaps = {}
    for step in (0, 3, 6):
        snaps[step] = tmp_path / "snapshots" / f"step-{step}"
        bi.save(snaps[step])
    service = MiningService(tmp_path / "start" / "index", str(snaps[0]), corpus=folder / "corpus.jsonl",
                            work_dir=tmp_path / "versions", bf16=False)
    gate = threading.Event()
    rebuild = service._rebuild

    def slow_rebuild(path):
        gate.wait(timeout=60)
        rebuild(path)

    service._rebuild = slow_rebuild
    assert service.refresh(snaps[3], catch_up=True) is True
    assert service.refresh(snaps[6], catch_up=True) is False  # falls due while step 3 builds: queued
    gate.set()
    service.close(wait=True)
    assert service.versions_seen == {1, 2, 3}
    assert service.checkpoint_step_of(service.version) == 6
    assert [service.checkpoint_step_of(v) for v in (1, 2, 3)] == [0, 3, 6]


def test_resume_serves_the_checkpoints_index_and_matches_an_uninterrupted_run(mini, tmp_path, monkeypatch):
    """The resumed run serves the index of the snapshot the checkpoint's index came from (not of the resumed
    weights), so its negatives, logs and final weights equal the uninterrupted run's."""
    import shutil

    import torch

    from retriever.modeling import BiEncoder
    from retriever.trainer import Trainer

    folder, model = mini
    options = {"k": 10, "refresh_every": 3, "wait_for_refresh": True}
    cfg = TrainConfig.model_validate(tiny_config(folder, model, "ance", options, max_steps=5, save_every=2,
                                                 learning_rate=5e-3))
    full = tmp_path / "full"
    Trainer(cfg, full).run()
    cut = tmp_path / "cut"
    shutil.copytree(full, cut)
    shutil.rmtree(cut / "final")
    for ckpt in sorted((cut / "checkpoints").iterdir())[1:]:  # keep step 2 only: "killed" after step 2
        shutil.rmtree(ckpt)
    assert (cut / "ance" / "snapshots" / "step-0").exists()  # the checkpoint's index snapshot survived pruning
    import index.encode as encode_module

    documents_encoded, real = [], encode_module._encode
    monkeypatch.setattr(encode_module, "_encode", lambda model, texts, kind, *a, **k: (
        documents_encoded.append(len(texts)) if kind == "document" else None) or real(model, texts, kind, *a, **k))
    Trainer(cfg, cut, resume=True).run()
    # the folders the killed run built hold the same weights' vectors: reused, not encoded again (at 8.8M
    # passages each re-encode is hours on a CPU)
    assert documents_encoded == []
    assert _run_dir_rows(cut / "negatives_log.jsonl") == _run_dir_rows(full / "negatives_log.jsonl")
    a, b = BiEncoder.from_pretrained(full / "final"), BiEncoder.from_pretrained(cut / "final")
    sa, sb = a.query_model.state_dict(), b.query_model.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    drop = ("elapsed", "pairs_per_s")
    strip = lambda rows: [{k: v for k, v in r.items() if k not in drop} for r in rows]  # noqa: E731
    assert strip(_run_dir_rows(cut / "train_log.jsonl")) == strip(_run_dir_rows(full / "train_log.jsonl"))


def _ance_rank(rank, port, folder, model, out_dir):
    import os

    import torch

    from retriever.trainer import Trainer

    os.environ.update({"WORLD_SIZE": "2", "RANK": str(rank), "LOCAL_RANK": str(rank), "MASTER_ADDR": "127.0.0.1",
                       "MASTER_PORT": str(port)})
    torch.set_num_threads(1)
    options = {"k": 10, "refresh_every": 2, "wait_for_refresh": True}
    cfg = TrainConfig.model_validate(tiny_config(folder, model, "ance", options, max_steps=3, batch_size=2))
    trainer = Trainer(cfg, out_dir)
    drawn = []
    negatives_for = trainer.strategy.negatives_for

    def recording(example, rng):
        picks = negatives_for(example, rng)
        drawn.append((example.query, picks))
        return picks

    trainer.strategy.negatives_for = recording
    trainer.run()
    (Path(out_dir) / f"drawn-{rank}.json").write_text(json.dumps(drawn))
    torch.distributed.destroy_process_group()


def test_under_two_processes_one_service_serves_both_ranks(mini, tmp_path):
    """Only the main process runs a service; the other rank builds the same global batches from the
    negatives it broadcasts."""
    import socket

    import torch.multiprocessing as mp

    folder, model = mini
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    mp.spawn(_ance_rank, args=(port, folder, model, str(tmp_path / "run")), nprocs=2, join=True)
    rank0 = json.loads((tmp_path / "run" / "drawn-0.json").read_text())
    rank1 = json.loads((tmp_path / "run" / "drawn-1.json").read_text())
    assert rank0 == rank1 and len(rank0) == 3 * 4
    rows = [json.loads(line) for line in (tmp_path / "run" / "negatives_log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3]  # written once, by the main process


def test_ance_takes_the_margin_filter_of_negatron_mine(mini):
    """relative_margin / absolute_margin are ANCE options (the shared MarginFilter) and reach the service."""
    from retriever.negatives.ance import ANCENegatives, ANCEOptions
    from retriever.data import TrainingExample

    options = ANCEOptions(relative_margin=0.05, absolute_margin=0.1, k=20)
    with pytest.raises(ValueError):
        ANCEOptions(relative_margin=1.0)
    strategy = ANCENegatives(options)
    calls = []

    class Service:
        def mine(self, queries, **kwargs):
            calls.append(kwargs)
            return []

    strategy.service = Service()
    strategy.mine([TrainingExample("q", ["p"], positive_ids=["d1"])])
    assert calls[0]["relative_margin"] == 0.05 and calls[0]["absolute_margin"] == 0.1
    assert calls[0]["positive_ids"] == [["d1"]] and calls[0]["exclude_texts"] == [["p"]]
