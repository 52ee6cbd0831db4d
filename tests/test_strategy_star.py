"""STAR: static hard negatives + random corpus negatives, shared by the batch; positives never negatives."""

import json

import numpy as np
import pytest

from retriever.config import TrainConfig
from retriever.data import Corpus, load_beir, training_examples_from_qrels, write_jsonl_atomic
from retriever.negatives.corpus_index import text_key
from retriever.negatives.star import STARNegatives
from retriever.train_data import BatchCollator
from strategy_data import shared_mini, tiny_config


@pytest.fixture(scope="module")
def mini(scifact):
    return shared_mini(scifact)


def _mined_file(folder, path, examples, rng):
    """A FlagEmbedding JSONL with 5 negative ids per query, one of them deliberately a positive."""
    corpus = Corpus(folder / "corpus.jsonl")
    rows = []
    for ex in examples:
        others = [d for d in corpus.ids if d not in ex.positive_ids]
        negs = list(rng.choice(others, size=4, replace=False)) + [ex.positive_ids[0]]
        rows.append({"query": ex.query, "pos": ex.positive_ids, "neg": [str(n) for n in negs]})
    write_jsonl_atomic(path, rows)
    return path


def test_star_batches_mix_hard_and_random_and_never_use_positives(mini, tmp_path):
    folder, _ = mini
    ds = load_beir(folder, "train")
    examples = training_examples_from_qrels(ds.queries, ds.qrels, ds.corpus)
    mined = _mined_file(folder, tmp_path / "mined.jsonl", examples, np.random.default_rng(0))
    strategy = STARNegatives({"hard_per_query": 2, "random_per_query": 2, "mined": str(mined)})
    strategy.corpus = ds.corpus
    strategy.setup(examples, model=None, work_dir=tmp_path)
    collate = BatchCollator(strategy, seed=0)
    n_hard = n_random = 0
    for epoch in range(3):
        for start in range(0, 24, 8):
            batch = collate(examples[start:start + 8], list(range(start, start + 8)), epoch)
            b = len(batch.queries)
            negs = batch.documents[b:]
            assert len(negs) == b * 4
            for i, ex in enumerate(examples[start:start + 8]):
                mine = negs[i * 4:(i + 1) * 4]
                hard_pool = set(strategy.hard_texts(ex.query))
                assert all(t in hard_pool for t in mine[:2])
                n_hard += 2
                n_random += sum(t not in hard_pool for t in mine[2:])
                positives = set(ex.positives)
                # no positive of this query is a negative, and every copy of it in the batch is masked
                assert not positives & set(mine)
                for j, doc in enumerate(batch.global_documents):
                    if doc in positives and j != batch.targets[i]:
                        assert batch.exclude[i, j]
    assert n_hard == 3 * 24 * 2 and n_random > 0.9 * 3 * 24 * 2


def test_star_trains_through_trainer(mini, tmp_path):
    folder, model = mini
    from retriever.trainer import Trainer

    ds = load_beir(folder, "train")
    examples = training_examples_from_qrels(ds.queries, ds.qrels, ds.corpus)
    mined = _mined_file(folder, tmp_path / "mined.jsonl", examples, np.random.default_rng(1))
    cfg = TrainConfig.model_validate(tiny_config(folder, model, "star", {"mined": str(mined)}))
    final = Trainer(cfg, tmp_path / "run").run()
    rows = [json.loads(line) for line in (tmp_path / "run" / "train_log.jsonl").read_text().splitlines()]
    assert len(rows) == 4 and (final / "modules.json").exists()


def test_star_mines_up_front_with_the_warmup_model(mini, tmp_path):
    from retriever.modeling import BiEncoder

    folder, model = mini
    ds = load_beir(folder, "train")
    examples = training_examples_from_qrels(ds.queries, ds.qrels, ds.corpus)
    strategy = STARNegatives({"range_min": 0, "range_max": 30, "mine_pool": 10})
    strategy.corpus = ds.corpus
    warmup = BiEncoder.from_pretrained(model)
    strategy.setup(examples, warmup, tmp_path)
    assert strategy.mined_up_front == len(examples)
    q = warmup.encode([ex.query for ex in examples], kind="query")
    d = warmup.encode([doc.full_text for doc in ds.corpus], kind="document")
    for i, ex in enumerate(examples):
        pool = strategy.hard_texts(ex.query)
        assert len(pool) == 10 and not set(pool) & set(ex.positives)
        # the pool is the warm-up model's top of the ranking (positives removed)
        top = [ds.corpus[r].full_text for r in np.argsort(-(d @ q[i]))[:40] if ds.corpus[r].id not in ex.positive_ids]
        assert len(set(pool) & set(top[:15])) >= 8


def test_star_mining_honours_range_min_and_samples_the_whole_window(mini, tmp_path):
    """No mined negative ranks above range_min under the warm-up model; the default pool is the whole
    window (DRhard samples the top 200 at random), and batches mix hard and random negatives."""
    from retriever.modeling import BiEncoder

    folder, model = mini
    ds = load_beir(folder, "train")
    examples = training_examples_from_qrels(ds.queries, ds.qrels, ds.corpus)
    strategy = STARNegatives({"range_min": 5, "range_max": 40, "hard_per_query": 1, "random_per_query": 1})
    strategy.corpus = ds.corpus
    warmup = BiEncoder.from_pretrained(model)
    strategy.setup(examples, warmup, tmp_path)
    from index.store import EmbeddingStore
    from mining.miner import encode_texts

    # rank as the warm-up index does: its stored (float16) document vectors, the miner's query encoding
    store = EmbeddingStore.open(tmp_path / "star-warmup-index" / "embeddings")
    d = np.asarray(store.load_all(), dtype=np.float32)
    q = encode_texts(warmup, [ex.query for ex in examples], kind="query", batch_size=None, bf16=None)
    texts = [ds.corpus.get(i).full_text for i in store.ids]
    for i, ex in enumerate(examples):
        ranking = [texts[r] for r in np.argsort(-(d @ q[i]), kind="stable")]
        pool = strategy.hard_texts(ex.query)
        window = [t for t in ranking[5:40] if t not in ex.positives]
        assert not set(pool) & set(ranking[:5]), "a negative ranked above range_min was mined"
        assert len(set(pool) & set(window)) >= len(window) - 2  # the whole window (ties at the edges aside)
    collate = BatchCollator(strategy, seed=0)
    outside = total = 0
    for epoch in range(3):
        for start in range(0, 24, 8):
            batch = collate(examples[start:start + 8], list(range(start, start + 8)), epoch)
            negs = batch.documents[len(batch.queries):]
            for i, ex in enumerate(examples[start:start + 8]):
                hard, random = negs[2 * i], negs[2 * i + 1]
                assert hard in strategy.hard_texts(ex.query)  # the hard slot comes from the mined pool
                outside += random not in strategy.hard_texts(ex.query)
                total += 1
    # random corpus negatives: the pool is ~30 % of this corpus, so most random picks fall outside it
    assert outside > 0.4 * total


def test_star_pairwise_loss_is_drhards_and_trains(mini, tmp_path):
    import torch

    from retriever.losses.pairwise import PairwiseLoss
    from retriever.trainer import Trainer

    q = torch.nn.functional.normalize(torch.randn(3, 8), dim=-1)
    d = torch.nn.functional.normalize(torch.randn(7, 8), dim=-1)
    targets = torch.tensor([0, 1, 2])
    exclude = torch.zeros(3, 7, dtype=torch.bool)
    exclude[0, 4] = True
    s = q @ d.T / 0.05
    pairs = [(i, j) for i in range(3) for j in range(7) if j != targets[i] and not exclude[i, j]]
    expected = torch.stack([-torch.log_softmax(torch.stack([s[i, targets[i]], s[i, j]]), 0)[0] for i, j in pairs]).mean()
    assert torch.allclose(PairwiseLoss(0.05)(q, d, targets, exclude), expected)

    folder, model = mini
    cfg = TrainConfig.model_validate(tiny_config(folder, model, "star", {"loss": "pairwise", "range_max": 30}))
    trainer = Trainer(cfg, tmp_path / "run")
    seen = []
    pairwise_forward = PairwiseLoss.forward

    def spy(self, *args, **kwargs):
        seen.append(1)
        return pairwise_forward(self, *args, **kwargs)

    PairwiseLoss.forward = spy
    try:
        trainer.run()
    finally:
        PairwiseLoss.forward = pairwise_forward
    assert len(seen) == 4
    with pytest.raises(ValueError, match="no effect"):
        TrainConfig.model_validate(tiny_config(folder, model, "star", {"loss": "pairwise"}, loss="decoupled"))


def test_star_keeps_hard_negatives_as_int_rows_and_reads_texts_at_collate(mini, tmp_path):
    """Pools are int32 corpus rows in CSR arrays (no text per query is held); a mined file's passage that is
    not in the corpus is packed once; the texts of a batch's picks are read from the corpus when collated."""
    from retriever.data import TrainingExample

    folder, _ = mini
    ds = load_beir(folder, "train")
    examples = training_examples_from_qrels(ds.queries, ds.qrels, ds.corpus)
    mined = _mined_file(folder, tmp_path / "mined.jsonl", examples[:-1], np.random.default_rng(0))
    extra = {"query": examples[-1].query, "pos": examples[-1].positive_ids, "neg": ["a passage not in the corpus"]}
    with open(mined, "a") as fh:
        fh.write(json.dumps(extra) + "\n")
    strategy = STARNegatives({"hard_per_query": 1, "random_per_query": 0, "mined": str(mined)})
    strategy.corpus = ds.corpus
    strategy.setup(examples, model=None, work_dir=tmp_path)
    assert strategy.pool.values.dtype == np.int32 and len(strategy.pool) == len(examples)
    assert all(isinstance(v, (int, np.integer)) for v in strategy.pool.values)
    for ex in examples[:-1]:  # 5 ids in the file, the positive among them dropped when the pool was built
        refs = strategy.pool.get(text_key(ex.query))
        assert len(refs) == 4 and (refs >= 0).all()
        assert not set(ds.corpus[int(r)].id for r in refs) & set(ex.positive_ids)
    assert strategy.hard_texts(examples[-1].query) == ["a passage not in the corpus"]
    reads = []
    read = ds.corpus._read
    ds.corpus._read = lambda row: reads.append(row) or read(row)
    try:
        negs = strategy.negatives_for(examples[0], np.random.default_rng(0))
    finally:
        del ds.corpus._read
    assert len(negs) == 1 and len(reads) == 1  # one pick, one corpus read: not the whole pool
    # an example that carries its own negatives uses them as they are
    own = TrainingExample(query="a query of its own", positives=["p"], negatives=["n1", "n2"])
    assert strategy.negatives_for(own, np.random.default_rng(0))[0] in {"n1", "n2"}


def _mined_up_front(options, ds, examples, warmup, work):
    """A STAR strategy whose pool ``setup`` mined up front with ``warmup`` into ``work``."""
    strategy = STARNegatives(options)
    strategy.corpus = ds.corpus
    strategy.setup(examples, warmup, work)
    return strategy


def test_star_mining_killed_midway_keeps_its_rows_and_mines_only_the_rest(mini, tmp_path, monkeypatch):
    """A run killed while mining up front leaves its rows in ``star-hard-negatives.jsonl.partial``; the next
    run of the folder keeps its whole chunks of queries (a torn last line and a part chunk cut off), searches
    the same warm-up index, mines only the other queries, and ends with the pool and file of an uninterrupted
    run. Other options start anew."""
    import mining.miner as miner
    from index.faiss_index import DenseIndex
    from retriever.modeling import BiEncoder
    from retriever.negatives.star import POOL_FILE

    folder, model = mini
    _small_mining_chunks(monkeypatch)
    ds = load_beir(folder, "train")
    examples = training_examples_from_qrels(ds.queries, ds.qrels, ds.corpus)
    options = {"range_min": 0, "range_max": 30, "mine_pool": 10}
    warmup = BiEncoder.from_pretrained(model)

    def star(work):
        return _mined_up_front(options, ds, examples, warmup, work)

    whole = star(tmp_path / "whole")
    expected = (tmp_path / "whole" / POOL_FILE).read_text()

    real_mine, mined_queries, builds = miner.mine, [], []
    real_build = DenseIndex.build.__func__

    def counting_build(cls, *args, **kwargs):
        builds.append(1)
        return real_build(cls, *args, **kwargs)

    def killed_after(n):
        def mine(queries, *args, **kwargs):
            for i, row in enumerate(real_mine(queries, *args, **kwargs)):
                if i == n:
                    raise KeyboardInterrupt  # as a kill would, between two rows
                mined_queries.append(row.query.text)
                yield row
        return mine

    monkeypatch.setattr(DenseIndex, "build", classmethod(counting_build))
    monkeypatch.setattr(miner, "mine", killed_after(7))
    work = tmp_path / "killed"
    with pytest.raises(KeyboardInterrupt):
        star(work)
    partial = work / (POOL_FILE + ".partial")
    assert not (work / POOL_FILE).exists() and len(partial.read_text().splitlines()) == 7 and builds == [1]
    with open(partial, "a", encoding="utf-8") as fh:
        fh.write('{"query": "torn by the ki')  # the kill landed mid-line

    mined_queries.clear()
    monkeypatch.setattr(miner, "mine", killed_after(10**9))
    resumed = star(work)
    assert builds == [1], "the warm-up index was rebuilt instead of reused"
    assert len(mined_queries) == len({ex.query for ex in examples}) - 4  # the whole first chunk of 4 kept
    assert resumed.mined_up_front == whole.mined_up_front
    assert (work / POOL_FILE).read_text() == expected and not partial.exists()
    for ex in examples:
        assert resumed.hard_texts(ex.query) == whole.hard_texts(ex.query)

    # a partial file of other options is not mixed in: the job starts anew
    monkeypatch.setattr(miner, "mine", killed_after(3))
    with pytest.raises(KeyboardInterrupt):
        star(tmp_path / "changed")
    options["mine_pool"] = 12
    mined_queries.clear()
    monkeypatch.setattr(miner, "mine", killed_after(10**9))
    star(tmp_path / "changed")
    assert len(mined_queries) == len({ex.query for ex in examples})


def _small_mining_chunks(monkeypatch=None, size=4):
    """Mine in chunks of ``size`` queries (the default 256 exceeds the test data): resume points and torchrun
    blocks fall on chunk boundaries."""
    import mining.miner as miner

    made = miner.MiningConfig

    def config(**kw):
        return made(**{**kw, "query_batch_size": size})
    if monkeypatch is None:
        miner.MiningConfig = config
    else:
        monkeypatch.setattr(miner, "MiningConfig", config)


def _star_rank(rank, port, folder, model, work, out):
    import os

    import torch

    from retriever.modeling import BiEncoder

    _small_mining_chunks()

    os.environ.update({"WORLD_SIZE": "2", "RANK": str(rank), "LOCAL_RANK": str(rank), "MASTER_ADDR": "127.0.0.1",
                       "MASTER_PORT": str(port)})
    torch.set_num_threads(1)
    torch.distributed.init_process_group("gloo", rank=rank, world_size=2)
    ds = load_beir(folder, "train")
    examples = training_examples_from_qrels(ds.queries, ds.qrels, ds.corpus)
    strategy = STARNegatives({"range_min": 0, "range_max": 30, "mine_pool": 10})
    strategy.corpus = ds.corpus
    strategy.setup(examples, BiEncoder.from_pretrained(model), work)
    with open(f"{out}-{rank}.json", "w") as fh:
        json.dump({"pools": {ex.query: strategy.hard_texts(ex.query) for ex in examples},
                   "mined": strategy.mined_up_front}, fh)
    torch.distributed.destroy_process_group()


def test_under_torchrun_each_rank_mines_a_block_and_every_rank_gets_the_whole_pool(mini, tmp_path, monkeypatch):
    """Two ranks split the up-front mining; both end with the single process's pool, and rank 0 writes its
    pool file."""
    import socket

    import torch.multiprocessing as mp

    from retriever.modeling import BiEncoder
    from retriever.negatives.star import POOL_FILE

    folder, model = mini
    _small_mining_chunks(monkeypatch)
    ds = load_beir(folder, "train")
    examples = training_examples_from_qrels(ds.queries, ds.qrels, ds.corpus)
    single = STARNegatives({"range_min": 0, "range_max": 30, "mine_pool": 10})
    single.corpus = ds.corpus
    single.setup(examples, BiEncoder.from_pretrained(model), tmp_path / "one")
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    mp.spawn(_star_rank, args=(port, folder, model, str(tmp_path / "two"), str(tmp_path / "rank")), nprocs=2,
             join=True)
    expected = {ex.query: single.hard_texts(ex.query) for ex in examples}
    for rank in (0, 1):
        got = json.loads((tmp_path / f"rank-{rank}.json").read_text())
        assert got["pools"] == expected and got["mined"] == single.mined_up_front
    assert (tmp_path / "two" / POOL_FILE).read_text() == (tmp_path / "one" / POOL_FILE).read_text()
    assert sorted(p.name for p in (tmp_path / "two").iterdir() if p.is_file()) == [POOL_FILE, POOL_FILE + ".done.json"]


def test_a_finished_pool_of_the_same_job_is_read_not_mined_again(mini, tmp_path, monkeypatch):
    """A run killed after its mining (during training) is re-run fresh: the pool file of the same warm-up
    weights, corpus, options and queries (its done marker says so) is read back; other options mine anew."""
    import mining.miner as miner
    from retriever.modeling import BiEncoder
    from retriever.negatives.star import POOL_FILE

    folder, model = mini
    ds = load_beir(folder, "train")
    examples = training_examples_from_qrels(ds.queries, ds.qrels, ds.corpus)
    warmup = BiEncoder.from_pretrained(model)

    def star(options):
        return _mined_up_front(options, ds, examples, warmup, tmp_path)

    first = star({"range_min": 0, "range_max": 30, "mine_pool": 10})
    assert (tmp_path / (POOL_FILE + ".done.json")).exists()
    real = miner.mine
    monkeypatch.setattr(miner, "mine", lambda *a, **k: pytest.fail("mined again"))
    again = star({"range_min": 0, "range_max": 30, "mine_pool": 10})
    assert again.mined_up_front == first.mined_up_front
    assert all(again.hard_texts(ex.query) == first.hard_texts(ex.query) for ex in examples)
    calls = []
    monkeypatch.setattr(miner, "mine", lambda *a, **k: calls.append(1) or real(*a, **k))
    star({"range_min": 0, "range_max": 30, "mine_pool": 12})
    assert calls


def test_mining_a_training_table_reads_no_passage_and_keeps_the_pool_texts_would_give(mini, tmp_path, monkeypatch):
    """A qrels table holds its positives as corpus rows: STAR's mining then filters by rows and cached text
    keys and reads no passage text, no id and no id -> row map (at 8.8M those pages were ~0.5 GB of resident
    memory), its pool file holds rows, and the pool equals the one mined from examples given as texts and
    ids. A copy of a positive under another id is still no negative."""
    import shutil

    import mining.miner as miner
    from retriever.example_table import ExampleTable, table_from_qrels
    from retriever.modeling import BiEncoder
    from retriever.negatives.star import POOL_FILE
    from retriever.offset_index import CorpusIds, OffsetIndex

    folder, model = mini
    warmup = BiEncoder.from_pretrained(model)
    data = tmp_path / "data"
    shutil.copytree(folder, data)
    first = load_beir(folder, "train")
    d = warmup.encode([doc.full_text for doc in first.corpus], kind="document")

    def rank_of_positive(item):
        q = warmup.encode([first.queries[item[0]]], kind="query")[0]
        return int(np.flatnonzero(np.argsort(-(d @ q)) == first.corpus.row(next(iter(item[1]))))[0])

    # the query whose positive the warm-up model ranks best: its copy lands in the pool unless tested by text
    qid, judged = min(((q, j) for q, j in first.qrels.items() if q in first.queries), key=rank_of_positive)
    pos = first.corpus.get(next(iter(judged)))
    with open(data / "corpus.jsonl", "a", encoding="utf-8") as fh:  # the positive again, under another id
        fh.write(json.dumps({"_id": "copy-of-" + pos.id, "title": pos.title, "text": pos.text}) + "\n")
    ds = load_beir(data, "train")
    texts_and_ids = training_examples_from_qrels(ds.queries, ds.qrels, ds.corpus)
    table = table_from_qrels(ds.queries, ds.qrels, ds.corpus)
    assert isinstance(table, ExampleTable) and len(table) == len(texts_and_ids)
    options = {"range_min": 0, "range_max": 30, "mine_pool": 10}
    by_text = _mined_up_front(options, ds, texts_and_ids, warmup, tmp_path / "a")

    mining = {"on": False}
    real_mine = miner.mine

    def watched_mine(*args, **kwargs):
        mining["on"] = True
        try:
            yield from real_mine(*args, **kwargs)
        finally:
            mining["on"] = False

    def refuse(real, what):
        def wrapper(*args, **kwargs):
            if mining["on"]:
                pytest.fail(f"mining read {what}")
            return real(*args, **kwargs)
        return wrapper

    monkeypatch.setattr(miner, "mine", watched_mine)
    monkeypatch.setattr(Corpus, "_read", refuse(Corpus._read, "a passage"))
    monkeypatch.setattr(CorpusIds, "take", refuse(CorpusIds.take, "ids"))
    monkeypatch.setattr(OffsetIndex, "rows", refuse(OffsetIndex.rows, "the id -> row map"))
    monkeypatch.setattr(OffsetIndex, "row", refuse(OffsetIndex.row, "the id -> row map"))
    by_rows = _mined_up_front(options, ds, table, warmup, tmp_path / "b")
    monkeypatch.undo()

    assert by_rows.mined_up_front == by_text.mined_up_front == len(table)
    for ex in texts_and_ids:
        assert by_rows.hard_texts(ex.query) == by_text.hard_texts(ex.query)
    copy = ds.corpus.row("copy-of-" + pos.id)
    q = warmup.encode([ds.queries[qid]], kind="query")[0]
    d = warmup.encode([doc.full_text for doc in ds.corpus], kind="document")
    assert copy in np.argsort(-(d @ q))[:10].tolist()  # in the pool's top 10, unless the text test drops it
    assert copy not in by_rows.pool.get(text_key(ds.queries[qid])).tolist()
    lines = [json.loads(line) for line in (tmp_path / "b" / POOL_FILE).read_text().splitlines()]
    assert len(lines) == len(table) and all("neg_rows" in line and "neg_ids" not in line for line in lines)
