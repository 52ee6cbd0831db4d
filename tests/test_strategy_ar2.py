"""AR2: ranker and retriever alternate, both losses fall, both models are saved."""

import json

import numpy as np
import pytest

from retriever.config import TrainConfig
from strategy_data import shared_mini, tiny_config


@pytest.fixture(scope="module")
def mini(scifact):
    return shared_mini(scifact)


def test_ar2_alternates_and_both_losses_fall(mini, tmp_path):
    from transformers import AutoModelForSequenceClassification

    from retriever.trainer import Trainer

    folder, model = mini
    options = {"ranker": str(model), "k": 20, "pool": 6, "range_min": 0, "per_query": 3, "refresh_every": 8,
               "wait_for_refresh": True, "ranker_steps": 4, "retriever_steps": 4, "ranker_lr": 2e-3,
               "adv_lambda": 0.5}
    cfg = TrainConfig.model_validate(tiny_config(folder, model, "ar2", options, max_steps=24, learning_rate=2e-3))
    trainer = Trainer(cfg, tmp_path / "run")
    final = trainer.run()
    rows = [json.loads(line) for line in (tmp_path / "run" / "ar2_log.jsonl").read_text().splitlines()]
    assert [r["phase"] for r in rows] == (["ranker"] * 4 + ["retriever"] * 4) * 3
    ranker = [np.mean([r["loss"] for r in rows[c * 8:c * 8 + 4]]) for c in range(3)]
    retriever = [np.mean([r["loss"] for r in rows[c * 8 + 4:c * 8 + 8]]) for c in range(3)]
    assert ranker[-1] < ranker[0], ranker
    assert retriever[-1] < retriever[0], retriever
    assert (final / "modules.json").exists()
    AutoModelForSequenceClassification.from_pretrained(tmp_path / "run" / "ranker")
