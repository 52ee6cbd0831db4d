"""GISTEmbed strategy: the guide masks exactly the in-batch candidates it scores above the positive."""

import json

import numpy as np
import pytest
import torch

from retriever.config import TrainConfig
from retriever.data import load_beir, training_examples_from_qrels
from retriever.modeling import BiEncoder
from retriever.negatives.gist import GISTNegatives
from retriever.testing import build_tiny_model
from retriever.train_data import BatchCollator
from strategy_data import corpus_texts, shared_mini, tiny_config


@pytest.fixture(scope="module")
def mini(scifact, tmp_path_factory):
    folder, model = shared_mini(scifact)
    guide = build_tiny_model(tmp_path_factory.mktemp("guide"), corpus_texts(folder), seed=7)
    return folder, model, guide


def test_gist_masks_exactly_candidates_guide_scores_above_positive(mini):
    folder, _, guide_dir = mini
    ds = load_beir(folder, "train")
    examples = training_examples_from_qrels(ds.queries, ds.qrels, ds.corpus)
    strategy = GISTNegatives({"guide": str(guide_dir), "guide_bf16": False})
    strategy.load_guide("cpu")
    strategy.cache_examples(examples)
    batch = BatchCollator(strategy, seed=0)(examples[:12], list(range(12)), 0)
    mask = strategy.exclude_mask(batch, torch.zeros(12, 4), torch.zeros(len(batch.global_documents), 4))

    guide = BiEncoder.from_pretrained(guide_dir)
    gq = guide.encode(batch.queries, kind="query", bf16=False)
    gd = guide.encode(batch.global_documents, kind="document", bf16=False)
    scores = gq @ gd.T
    checked = 0
    for i, t in enumerate(batch.targets.tolist()):
        for j in range(len(batch.global_documents)):
            if j == t:
                assert not mask[i, j]
            elif abs(scores[i, j] - scores[i, t]) > 1e-5:
                assert bool(mask[i, j]) == bool(scores[i, j] > scores[i, t]), (i, j)
                checked += 1
    assert checked > 100 and mask.any() and not mask.all()


def test_gist_cached_equals_per_step_and_trains(mini, tmp_path):
    folder, model, guide = mini
    from retriever.trainer import Trainer

    cfg = TrainConfig.model_validate(tiny_config(folder, model, "gist", {"guide": str(guide), "guide_bf16": False}))
    trainer = Trainer(cfg, tmp_path / "run")
    final = trainer.run()
    assert (final / "modules.json").exists()
    rows = [json.loads(line) for line in (tmp_path / "run" / "train_log.jsonl").read_text().splitlines()]
    assert len(rows) == 4 and all(0.0 <= r["gist_masked_fraction"] < 1.0 for r in rows)
    # The cache holds every training text, so the per-step path gives the same masks.
    strategy = trainer.strategy
    per_step = GISTNegatives({"guide": str(guide), "guide_bf16": False, "cache": False})
    per_step.guide = strategy.guide
    batch = next(iter(trainer._batches(0)))
    dummy = torch.zeros(1)
    assert torch.equal(strategy.exclude_mask(batch, dummy, dummy), per_step.exclude_mask(batch, dummy, dummy))
    assert len(strategy._rows) == len({e.query for e in trainer.train_examples}) + len(
        {t for e in trainer.train_examples for t in e.positives})
    assert np.isfinite(rows[-1]["loss"])
