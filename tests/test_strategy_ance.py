"""ANCE-style refresh: negatives come from the mining service and carry the index version they came from."""

import json

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
