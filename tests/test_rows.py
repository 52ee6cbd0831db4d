"""``data.rows``: one training row per query with a positive drawn each epoch (the default), or one per
(query, positive) pair (sentence-transformers' layout; issue #12: the gap to its MNRL trainer); and
``data.sampler: no_duplicates``, sentence-transformers' NO_DUPLICATES batch sampler."""

from __future__ import annotations

import json
from collections import Counter

import numpy as np
import pytest
import torch

from retriever.config import DataConfig, TrainConfig
from retriever.data import TrainingExample
from retriever.negatives import HardNegatives, NegativeStrategy
from retriever.train_data import (BatchCollator, epoch_order, load_examples, no_duplicates_order, pair_rows,
                                  row_keys)
from retriever.trainer import Trainer

# 4 queries with 1, 2, 3 and 3 positives: 9 pairs
EXAMPLES = [{"query": f"query {q}", "pos": [f"passage {q}.{p}" for p in range(n)], "neg": [f"negative {q}.{k}" for k in range(2)]}
            for q, n in enumerate([1, 2, 3, 3])]


@pytest.fixture(autouse=True)
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def jsonl(tmp_path):
    path = tmp_path / "train.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in EXAMPLES))
    return path


def config(model, data, strategy="inbatch", options=None, **data_keys) -> dict:
    return {"model": {"name": str(model), "query_max_length": 16, "doc_max_length": 16},
            "data": {"jsonl": str(data), **data_keys},
            "negatives": {"strategy": strategy, "options": options or {}},
            "training": {"batch_size": 3, "epochs": 2, "learning_rate": 1e-3, "num_threads": 1, "bf16": False, "seed": 3}}


def epoch_pairs(trainer: Trainer, epoch: int) -> Counter:
    """(query, positive text) of every row the trainer's batches hold in one epoch."""
    seen = Counter()
    for step in range(epoch * trainer.steps_per_epoch, (epoch + 1) * trainer.steps_per_epoch):
        for batch in trainer._batches(step):
            docs = batch.global_documents
            seen.update((q, docs[int(t)]) for q, t in zip(batch.queries, batch.targets))
    return seen


def test_pair_rows_list_every_positive_of_every_example():
    examples = [TrainingExample("a", ["1"]), TrainingExample("b", ["1", "2", "3"]), TrainingExample("c", ["1", "2"])]
    assert pair_rows(examples).tolist() == [[0, 0], [1, 0], [1, 1], [1, 2], [2, 0], [2, 1]]
    assert pair_rows([]).shape == (0, 2)


def test_positive_counts_read_the_table_not_the_passages(jsonl, tmp_path):
    from retriever.config import DataConfig
    from retriever.train_data import load_examples, positive_counts, split_dev

    table = load_examples(DataConfig(jsonl=str(jsonl)))
    assert positive_counts(table).tolist() == [1, 2, 3, 3]
    train, _ = split_dev(table, 0.25, 0)
    assert positive_counts(train).tolist() == [len(ex.positives) for ex in train]
    assert pair_rows(train).tolist() == [[i, p] for i, ex in enumerate(train) for p in range(len(ex.positives))]


def test_per_pair_epoch_trains_each_pair_once(tiny_model_dir, jsonl, tmp_path):
    """The old trainer made one row per query (4 rows: 1 step of 3 an epoch, one random positive each); per
    pair, an epoch is 9 rows = 3 steps and every (query, positive) pair is trained exactly once."""
    trainer = Trainer(TrainConfig.model_validate(config(tiny_model_dir, jsonl, rows="per_pair")), tmp_path / "run")
    assert (trainer.num_rows, trainer.steps_per_epoch, trainer.total_steps) == (9, 3, 6)
    every_pair = Counter((row["query"], p) for row in EXAMPLES for p in row["pos"])
    assert epoch_pairs(trainer, 0) == every_pair
    assert epoch_pairs(trainer, 1) == every_pair
    assert not np.array_equal(trainer.step_rows(0), trainer.step_rows(3))  # each epoch reshuffles the pairs


def test_per_query_keeps_one_row_per_query_and_the_old_order(tiny_model_dir, jsonl, tmp_path):
    trainer = Trainer(TrainConfig.model_validate(config(tiny_model_dir, jsonl)), tmp_path / "run")
    assert trainer.config.data.rows == "per_query"  # the default (it measured better on the SciFact dev carve-out)
    assert (trainer.num_rows, trainer.steps_per_epoch) == (4, 1)
    for step in range(2):  # the order before data.rows existed: a seeded permutation of the examples
        assert np.array_equal(trainer.step_rows(step), epoch_order(4, 3, step)[:3])
        assert [e.query for e in trainer.step_examples(step)] == [EXAMPLES[i]["query"] for i in epoch_order(4, 3, step)[:3]]
    assert sum(epoch_pairs(trainer, 0).values()) == 3


def test_a_row_masks_its_query_other_positives_in_the_batch():
    """Per pair, a batch may hold a query twice (two of its positives): neither row's positive is a
    negative of the other row, so each masks the other's column."""
    ex = TrainingExample("q", ["p0", "p1"])
    other = TrainingExample("r", ["p2"])
    batch = BatchCollator(NegativeStrategy(), seed=0)([ex, ex, other], [0, 1, 2], 0, positive_index=[0, 1, 0])
    assert batch.documents == ["p0", "p1", "p2"] and batch.targets.tolist() == [0, 1, 2]
    # exclude marks copies of a query's own positives; the loss keeps each row's target column
    negatives = batch.exclude & ~torch.nn.functional.one_hot(batch.targets, 3).bool()
    assert negatives.tolist() == [[False, True, False], [True, False, False], [False, False, False]]


def test_fixed_positive_keeps_the_negatives_random_stream():
    """A query with one positive gets the same hard negatives per pair as per query (same RNG draws)."""
    examples = [TrainingExample(f"q{i}", [f"p{i}"], negatives=[f"n{i}.{k}" for k in range(5)]) for i in range(4)]
    collate = BatchCollator(HardNegatives({"per_query": 2}), seed=1)
    drawn = collate(examples, [0, 1, 2, 3], epoch=2)
    fixed = collate(examples, [0, 1, 2, 3], epoch=2, positive_index=[0, 0, 0, 0])
    assert fixed.documents == drawn.documents


def test_per_pair_refused_where_the_strategy_orders_queries_and_round_trips(tiny_model_dir, jsonl):
    tasb = TrainConfig.model_validate(config(tiny_model_dir, jsonl, "tasb", {"n_clusters": 2}))
    assert tasb.data.rows == "per_query"  # TAS-B builds topic batches from queries
    with pytest.raises(ValueError, match="per_pair does not apply"):
        TrainConfig.model_validate(config(tiny_model_dir, jsonl, "tasb", {"n_clusters": 2}, rows="per_pair"))
    with pytest.raises(ValueError):
        TrainConfig.model_validate(config(tiny_model_dir, jsonl, rows="per_positive"))
    import yaml

    resolved = TrainConfig.model_validate(config(tiny_model_dir, jsonl, rows="per_pair"))
    assert TrainConfig.model_validate(yaml.safe_load(resolved.to_yaml())).data.rows == "per_pair"


def test_ranker_refuses_data_rows(jsonl):
    from retriever.ranker_train import RankerConfig

    with pytest.raises(ValueError, match="data.rows"):
        RankerConfig.model_validate({"data": {"jsonl": str(jsonl), "rows": "per_pair"}})
    assert RankerConfig.model_validate({"data": {"jsonl": str(jsonl)}}).data.rows == "per_query"


@pytest.mark.parametrize("sampler", ["random", "no_duplicates"])
def test_per_pair_resume_from_a_mid_epoch_checkpoint_matches_the_uninterrupted_run(tiny_model_dir, jsonl, tmp_path, sampler):
    """Exact resume under per_pair (with either sampler): the step-2 checkpoint (mid epoch 0, 3 steps an
    epoch) of a finished run, resumed with its later checkpoints and final model removed, ends with the same
    weights."""
    import shutil

    from retriever.checkpoint import list_checkpoints
    from retriever.modeling import BiEncoder
    from retriever.trainer import train

    cfg = config(tiny_model_dir, jsonl, rows="per_pair", sampler=sampler)
    cfg["training"].update(save_every=2, keep_last=5, log_every=1)
    threads = torch.get_num_threads()
    reference = train(TrainConfig.model_validate(cfg), tmp_path / "reference")
    shutil.copytree(tmp_path / "reference", tmp_path / "resumed")
    for folder in list_checkpoints(tmp_path / "resumed")[1:]:
        shutil.rmtree(folder)
    shutil.rmtree(tmp_path / "resumed" / "final")
    assert [p.name for p in list_checkpoints(tmp_path / "resumed")] == ["step-0000002"]
    resumed = train(TrainConfig.model_validate(cfg), tmp_path / "resumed", resume=True)
    torch.set_num_threads(threads)
    a, b = BiEncoder.from_pretrained(resumed).state_dict(), BiEncoder.from_pretrained(reference).state_dict()
    assert max((a[k].float() - b[k].float()).abs().max().item() for k in a) <= 1e-6
    rows = lambda run: [{k: v for k, v in json.loads(line).items() if k not in {"pairs_per_s", "elapsed"}}  # noqa: E731
                        for line in (run / "train_log.jsonl").read_text().splitlines()]
    assert rows(tmp_path / "resumed") == rows(tmp_path / "reference") and len(rows(tmp_path / "reference")) == 6


# ---------------------------------------------------------------- data.sampler: no_duplicates

# 12 queries with 2 positives each (24 pairs); queries 10 and 11 share a positive passage
SHARED_EXAMPLES = [{"query": f"query {q}", "pos": [f"passage {q}.{p}" for p in range(2)]} for q in range(10)]
SHARED_EXAMPLES += [{"query": "query 10", "pos": ["shared passage", "passage 10.1"]},
                    {"query": "query 11", "pos": ["shared passage", "passage 11.1"]}]


def keys(rows: list[set[str]]) -> tuple[np.ndarray, np.ndarray]:
    ptr, flat, ids = [0], [], {}
    for row in rows:
        flat += [ids.setdefault(k, len(ids)) for k in sorted(row)]
        ptr.append(len(flat))
    return np.array(ptr), np.array(flat, dtype=np.int64)


def test_each_batch_takes_the_earliest_rows_that_do_not_collide():
    """Worked by hand from sentence-transformers' NoDuplicatesBatchSampler: row 1 repeats row 0's key, so it
    waits for the second batch; row 4 repeats row 2's and waits for the third."""
    rows = [{"a"}, {"a"}, {"b"}, {"c"}, {"b"}, {"d"}]
    assert no_duplicates_order(np.arange(6), keys(rows), 2).tolist() == [0, 2, 1, 3, 4, 5]
    assert no_duplicates_order(np.array([5, 4, 3, 2, 1, 0]), keys(rows), 2).tolist() == [5, 4, 3, 2, 1, 0]


def test_the_tail_that_cannot_fill_a_batch_follows_in_order():
    rows = [{"a"}, {"b"}, {"a"}, {"a"}, {"a"}]
    assert no_duplicates_order(np.arange(5), keys(rows), 2).tolist() == [0, 1, 2, 3, 4]
    rows = [{"a", "x"}, {"a"}, {"b"}, {"c", "x"}]
    assert no_duplicates_order(np.arange(4), keys(rows), 2).tolist() == [0, 2, 1, 3]


def test_full_batches_repeat_no_key_on_a_random_problem():
    """Against an independent check: every batch before the tail holds distinct keys, and the order is a
    permutation of the shuffle it regroups."""
    rng = np.random.default_rng(0)
    rows = [{f"q{rng.integers(40)}", f"d{rng.integers(60)}"} for _ in range(300)]
    order = epoch_order(300, 7, 0)
    out = no_duplicates_order(order, keys(rows), 8)
    assert sorted(out.tolist()) == list(range(300))
    clean = 0
    for start in range(0, 300 - 7, 8):
        batch = [k for r in out[start:start + 8] for k in rows[r]]
        if len(set(batch)) < len(batch):
            break
        clean += 1
    assert clean >= 30  # 37 full batches; only the tail may repeat
    random_clean = sum(len({k for r in order[s:s + 8] for k in rows[r]}) == 16 for s in range(0, 296, 8))
    assert random_clean < clean


@pytest.fixture
def shared_jsonl(tmp_path):
    path = tmp_path / "shared.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in SHARED_EXAMPLES))
    return path


def test_row_keys_read_ids_from_a_table_as_from_the_examples(shared_jsonl):
    table = load_examples(DataConfig(jsonl=str(shared_jsonl)))
    examples = list(table)
    for pairs in (None, pair_rows(table)):
        for a, b in zip(row_keys(table, pairs), row_keys(examples, pairs)):
            assert np.array_equal(a, b)
    ptr, flat = row_keys(table, pair_rows(table))
    pairs = [set(flat[ptr[i]:ptr[i + 1]].tolist()) for i in range(len(ptr) - 1)]
    assert len(pairs) == 24 and all(len(p) == 2 for p in pairs)
    assert pairs[0] & pairs[1]  # one query, two positives: the query key is shared
    assert len(pairs[20] & pairs[22]) == 1  # queries 10 and 11 share "shared passage"
    assert not pairs[21] & pairs[23]


def test_trainer_batches_hold_each_query_and_passage_once(tiny_model_dir, shared_jsonl, tmp_path):
    """Per pair with the random sampler, some batch of this seed holds one query twice; with no_duplicates
    every batch of both epochs holds distinct queries and distinct positives, and the order is the same
    for a second trainer (so a resumed run and every process rebuild it)."""
    def batches(trainer):
        out = []
        for step in range(trainer.total_steps):
            rows = trainer.pairs[trainer.step_rows(step)]
            out.append([(SHARED_EXAMPLES[e]["query"], SHARED_EXAMPLES[e]["pos"][p]) for e, p in rows.tolist()])
        return out

    plain = Trainer(TrainConfig.model_validate(config(tiny_model_dir, shared_jsonl, rows="per_pair")), tmp_path / "a")
    assert any(len({q for q, _ in b}) < len(b) for b in batches(plain))
    cfg = TrainConfig.model_validate(config(tiny_model_dir, shared_jsonl, rows="per_pair", sampler="no_duplicates"))
    trainer = Trainer(cfg, tmp_path / "b")
    assert (trainer.num_rows, trainer.steps_per_epoch) == (24, 8)
    got = batches(trainer)
    for b in got:
        assert len({q for q, _ in b}) == len({d for _, d in b}) == len(b) == 3
    for epoch in range(2):
        trained = [pair for b in got[epoch * 8:(epoch + 1) * 8] for pair in b]
        assert sorted(trained) == sorted((row["query"], p) for row in SHARED_EXAMPLES for p in row["pos"])
    assert got == batches(Trainer(cfg, tmp_path / "c"))
    assert got[:8] != got[8:]


def test_no_duplicates_refused_where_it_cannot_apply(tiny_model_dir, jsonl):
    with pytest.raises(ValueError, match="data.sampler: no_duplicates does not apply"):
        TrainConfig.model_validate(config(tiny_model_dir, jsonl, "tasb", {"n_clusters": 2}, sampler="no_duplicates"))
    with pytest.raises(ValueError):
        TrainConfig.model_validate(config(tiny_model_dir, jsonl, sampler="no_dupes"))
    from retriever.ranker_train import RankerConfig

    with pytest.raises(ValueError, match="data.sampler"):
        RankerConfig.model_validate({"data": {"jsonl": str(jsonl), "sampler": "no_duplicates"}})
    assert TrainConfig.model_validate(config(tiny_model_dir, jsonl)).data.sampler == "random"
