"""ANCE against an external `negatron serve` (negatives.options.service_url): the run starts no service of
its own, mines each step's negatives over HTTP, and asks the server to refresh from its snapshots."""

import json
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from retriever.config import TrainConfig
from strategy_data import shared_mini, tiny_config


@pytest.fixture(scope="module")
def mini(scifact):
    return shared_mini(scifact)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def server(mini, tmp_path_factory):
    """`negatron serve` as a subprocess on 127.0.0.1 over an index of the mini corpus (the tiny model's)."""
    import httpx

    from retriever.data import Corpus
    from retriever.modeling import BiEncoder
    from retriever.negatives.corpus_index import build_index

    folder, model = mini
    root = tmp_path_factory.mktemp("ance-server")
    build_index(BiEncoder.from_pretrained(model), Corpus(folder / "corpus.jsonl"), root / "start", distributed=False)
    port = _free_port()
    log = open(root / "server.log", "w")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    proc = subprocess.Popen([sys.executable, "-m", "retriever.cli", "serve", "--index", str(root / "start" / "index"),
                             "--model", str(model), "--corpus", str(folder), "--port", str(port), "--device", "cpu",
                             "--work-dir", str(root / "versions")], stdout=log, stderr=subprocess.STDOUT, env=env)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 180
        while True:
            assert proc.poll() is None, (root / "server.log").read_text()
            try:
                if httpx.get(url + "/v1/health", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, "negatron serve did not start in 180 s"
            time.sleep(0.5)
        yield url, model
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)
        log.close()


def _rows(path):
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


def test_negatives_come_from_the_external_server_and_refreshes_advance_it(mini, server, tmp_path):
    from index.encode import encode_texts
    from mining.client import MiningClient
    from retriever.data import load_beir
    from retriever.modeling import BiEncoder
    from retriever.negatives.ance import RemoteService
    from retriever.trainer import Trainer

    folder, model = mini
    url, _ = server
    with MiningClient(url) as client:
        start = client.status()
    assert str(start["model"]) == str(model)  # fresh server: this run's starting model, no step-0 rebuild
    options = {"k": 10, "refresh_every": 2, "wait_for_refresh": True, "service_url": url}
    cfg = TrainConfig.model_validate(tiny_config(folder, model, "ance", options, max_steps=5, learning_rate=5e-3))
    trainer = Trainer(cfg, tmp_path / "run")
    strategy = trainer.strategy
    served = []
    mine = strategy.mine

    def recording_mine(examples):
        answer = mine(examples)
        served.extend((q, version, strategy.corpus.texts(rows)) for q, (version, rows) in answer.items())
        return answer

    strategy.mine = recording_mine
    strategy._prune_snapshots = lambda: None  # keep every snapshot to check against
    trainer.run()

    assert (tmp_path / "run" / "final").is_dir()  # training completed
    assert isinstance(strategy.service, RemoteService)
    assert not list((tmp_path / "run" / "ance").glob("index-v*"))  # no in-process index was built
    v0 = int(start["version"])
    rows = _rows(tmp_path / "run" / "negatives_log.jsonl")
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5]
    # blocking refreshes after steps 2 and 4: the server's versions advance by one each
    assert [r["index_version"] for r in rows] == [v0, v0, v0 + 1, v0 + 1, v0 + 2]
    assert [r["index_step"] for r in rows] == [0, 0, 2, 2, 4]
    assert [r["index_age_steps"] for r in rows] == [0, 1, 0, 1, 0]
    assert _rows(tmp_path / "run" / "train_log.jsonl")[-1]["index_version"] == v0 + 2
    with MiningClient(url) as client:
        status = client.status()
    assert status["version"] == v0 + 2
    assert status["model"] == str((tmp_path / "run" / "ance" / "snapshots" / "step-4").resolve())
    assert {v for _, v, _ in served} == {v0, v0 + 1, v0 + 2}

    # every answer is the exact top-k (positives removed) of the model its version was built from, encoded
    # as the server encodes (its default precision; the index stores float16)
    ds = load_beir(folder, "train")
    docs = [d.full_text for d in ds.corpus]
    positives = {ex.query: (set(ex.positive_ids), {t.strip() for t in ex.positives}) for ex in trainer.train_examples}
    models = {v0: Path(model), v0 + 1: tmp_path / "run" / "ance" / "snapshots" / "step-2",
              v0 + 2: tmp_path / "run" / "ance" / "snapshots" / "step-4"}
    encoded = {}

    def exact_top_k(version, query):
        if version not in encoded:
            bi = BiEncoder.from_pretrained(models[version])
            d = encode_texts(bi, docs, kind="document").astype(np.float16).astype(np.float32)
            encoded[version] = (bi, d)
        bi, d = encoded[version]
        q = encode_texts(bi, [query], kind="query")[0]
        top = np.argsort(-(d @ q), kind="stable")[:10]
        pos_ids, pos_texts = positives[query]
        return {docs[r] for r in top if ds.corpus[int(r)].id not in pos_ids and docs[r].strip() not in pos_texts}

    stale = 0
    for query, version, texts in served:
        assert set(texts) == exact_top_k(version, query), (query, version)
        stale += version > v0 and set(texts) != exact_top_k(v0, query)
    assert stale > 0, "the refreshed indexes must serve other negatives than the first (else this proves nothing)"


def test_resume_against_the_server_matches_an_uninterrupted_run(mini, server, tmp_path):
    """With wait_for_refresh the resumed run asks the server for the checkpoint's index again: its weights and
    index steps equal the uninterrupted run's; the server's version numbers go on counting."""
    import torch

    from retriever.modeling import BiEncoder
    from retriever.trainer import Trainer

    folder, model = mini
    url, _ = server
    options = {"k": 10, "refresh_every": 3, "wait_for_refresh": True, "service_url": url}
    # 4 steps, a checkpoint every 2: the last one is saved after the strategy closed its connection
    cfg = TrainConfig.model_validate(tiny_config(folder, model, "ance", options, max_steps=4, save_every=2,
                                                 learning_rate=5e-3))
    full = tmp_path / "full"
    Trainer(cfg, full).run()  # the server now serves another run's index: this run first rebuilds step 0's
    cut = tmp_path / "cut"
    shutil.copytree(full, cut)
    shutil.rmtree(cut / "final")
    for ckpt in sorted((cut / "checkpoints").iterdir())[1:]:  # keep step 2 only: "killed" after step 2
        shutil.rmtree(ckpt)
    Trainer(cfg, cut, resume=True).run()  # the server serves step 3's index: the resume rebuilds step 0's
    a, b = BiEncoder.from_pretrained(full / "final"), BiEncoder.from_pretrained(cut / "final")
    sa, sb = a.query_model.state_dict(), b.query_model.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    steps = lambda rows: [(r["step"], r["index_step"], r["index_age_steps"]) for r in rows]  # noqa: E731
    full_rows, cut_rows = _rows(full / "negatives_log.jsonl"), _rows(cut / "negatives_log.jsonl")
    assert steps(cut_rows) == steps(full_rows) == [(1, 0, 0), (2, 0, 1), (3, 0, 2), (4, 3, 0)]
    assert [p.name for p in sorted((cut / "checkpoints").iterdir())] == ["step-0000002", "step-0000004"]
    assert cut_rows[-1]["index_version"] > full_rows[-1]["index_version"]  # the server's numbering continued


def test_service_url_refusals(tmp_path):
    from retriever.negatives.ance import ANCEOptions, RemoteService

    with pytest.raises(ValueError, match="http"):
        ANCEOptions(service_url="localhost:8765")
    with pytest.raises(ValueError, match=r"options\.index cannot be combined with options\.service_url"):
        ANCEOptions(service_url="http://127.0.0.1:8765", index={"factory": "Flat"})
    with pytest.raises(ValueError, match="options.encode_batch_size"):
        ANCEOptions(service_url="http://127.0.0.1:8765", encode_batch_size=8)
    ANCEOptions.model_validate(ANCEOptions(service_url="http://127.0.0.1:8765").model_dump())  # config round trip
    with pytest.raises(ConnectionError, match="service_url"):
        RemoteService(f"http://127.0.0.1:{_free_port()}", connect_wait=0.5)
