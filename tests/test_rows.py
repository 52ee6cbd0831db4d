"""``data.rows``: one training row per query with a positive drawn each epoch (the default), or one per
(query, positive) pair (sentence-transformers' layout; issue #12: the gap to its MNRL trainer)."""

from __future__ import annotations

import json
from collections import Counter

import numpy as np
import pytest
import torch

from retriever.config import TrainConfig
from retriever.data import TrainingExample
from retriever.negatives import HardNegatives, NegativeStrategy
from retriever.train_data import BatchCollator, epoch_order, pair_rows
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


def test_per_pair_resume_from_a_mid_epoch_checkpoint_matches_the_uninterrupted_run(tiny_model_dir, jsonl, tmp_path):
    """Exact resume under per_pair: the step-2 checkpoint (mid epoch 0, 3 steps an epoch) of a finished run,
    resumed with its later checkpoints and final model removed, ends with the same weights."""
    import shutil

    from retriever.checkpoint import list_checkpoints
    from retriever.modeling import BiEncoder
    from retriever.trainer import train

    cfg = config(tiny_model_dir, jsonl, rows="per_pair")
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
