"""STAR: static hard negatives + random corpus negatives, shared by the batch; positives never negatives."""

import json

import numpy as np
import pytest

from retriever.config import TrainConfig
from retriever.data import Corpus, load_beir, training_examples_from_qrels, write_jsonl_atomic
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
                hard_pool = set(strategy.hard[ex.query])
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
        pool = strategy.hard[ex.query]
        assert len(pool) == 10 and not set(pool) & set(ex.positives)
        # the pool is the warm-up model's top of the ranking (positives removed)
        top = [ds.corpus[r].full_text for r in np.argsort(-(d @ q[i]))[:40] if ds.corpus[r].id not in ex.positive_ids]
        assert len(set(pool) & set(top[:15])) >= 8
