"""ADORE: the document encoder never changes; negatives are retrieved live by the current query encoder."""

import numpy as np
import pytest
import torch

from retriever.config import TrainConfig
from retriever.modeling import BiEncoder
from strategy_data import shared_mini, tiny_config


@pytest.fixture(scope="module")
def mini(scifact):
    return shared_mini(scifact)


def _trainer(folder, model, out, **training):
    from retriever.trainer import Trainer

    cfg = TrainConfig.model_validate(tiny_config(folder, model, "adore", {"k": 20}, learning_rate=5e-3, **training))
    return Trainer(cfg, out)


def test_adore_leaves_document_encoder_bitwise_unchanged(mini, tmp_path):
    folder, model = mini
    original = {k: v.clone() for k, v in BiEncoder.from_pretrained(model).query_model.state_dict().items()}
    trainer = _trainer(folder, model, tmp_path / "run", max_steps=3)
    final = trainer.run()
    doc_state = trainer.model.doc_model.state_dict()
    assert all(torch.equal(doc_state[k], v) for k, v in original.items())
    q_state = trainer.model.query_model.state_dict()
    assert any(not torch.equal(q_state[k], v) for k, v in original.items())
    saved = BiEncoder.from_pretrained(final)
    assert not saved.shared
    assert all(torch.equal(saved.doc_model.state_dict()[k], v) for k, v in original.items())


def test_adore_negatives_are_live_top_k_of_current_query_encoder(mini, tmp_path):
    folder, model = mini
    trainer = _trainer(folder, model, tmp_path / "run", max_steps=6)
    strategy = trainer.strategy
    strategy.prepare(trainer)
    strategy.prepare = lambda _trainer: None
    queries = [ex.query for ex in trainer.train_examples[:8]]

    def live(expect_exact: bool):
        q = trainer.model.encode(queries, kind="query", bf16=False)
        rows = strategy.retrieve(q, queries)
        brute = q @ strategy.doc_emb.numpy().T
        for i, query in enumerate(queries):
            pos = strategy.positive_ids[query]
            order = [r for r in np.argsort(-brute[i], kind="stable") if strategy.doc_ids[r] not in pos][:20]
            assert not {strategy.doc_ids[r] for r in rows[i]} & pos
            if expect_exact:
                assert set(rows[i].tolist()) == set(order)
        return rows

    before = live(True)
    trainer.run()
    after = live(True)
    assert (before != after).any(), "the retrieved negatives must follow the query encoder"


def test_star_adore_pipeline_config_chains_the_stages(tmp_path, monkeypatch):
    from pathlib import Path

    import retriever.trainer
    from retriever.pipeline import is_pipeline, load_pipeline, run_pipeline

    config = Path(__file__).resolve().parents[1] / "configs" / "scifact-star-adore.yaml"
    assert is_pipeline(config)
    stages = load_pipeline(config)
    assert [(n, c.negatives.strategy, chained) for n, c, chained in stages] == [
        ("star", "star", False), ("adore", "adore", True)]
    seen = []

    def fake_train(cfg, output_dir, resume=False):  # records what each stage would train from
        seen.append((cfg.negatives.strategy, cfg.model.name, Path(output_dir).name))
        (Path(output_dir) / "final").mkdir(parents=True)
        return Path(output_dir) / "final"

    monkeypatch.setattr(retriever.trainer, "train", fake_train)
    final = run_pipeline(config, tmp_path)
    assert final == tmp_path / "adore" / "final"
    assert seen == [("star", stages[0][1].model.name, "star"), ("adore", str(tmp_path / "star" / "final"), "adore")]
