"""TAS-B sampling: one cluster per batch, balanced margin bins."""

import numpy as np

from retriever.tasb import TopicAwareBatchSampler, balanced_margin_choice, cluster_queries


def test_every_batch_shares_a_cluster_and_covers_the_data():
    rng = np.random.default_rng(0)
    centers = np.eye(4, 16) * 10
    emb = np.concatenate([c + rng.normal(size=(30, 16)) for c in centers]).astype(np.float32)
    clusters = cluster_queries(emb, n_clusters=4, seed=0)
    assert len(np.unique(clusters)) == 4
    # k-means recovers the planted topics
    for t in range(4):
        assert len(np.unique(clusters[t * 30:(t + 1) * 30])) == 1
    sampler = TopicAwareBatchSampler(clusters, batch_size=8, seed=1)
    batches = list(sampler)
    assert all(len(np.unique(clusters[b])) == 1 for b in batches)
    seen = sorted(i for b in batches for i in b)
    assert seen == list(range(120))
    sampler.set_epoch(1)
    assert list(sampler) != batches


def test_balanced_margin_choice_is_uniform_over_bins():
    rng = np.random.default_rng(0)
    margins = [0.05] * 98 + [0.95, 0.96]  # dense low-margin mass, two high-margin negatives
    picks = [balanced_margin_choice(margins, 10, rng) for _ in range(2000)]
    high = np.mean([p >= 98 for p in picks])
    assert 0.4 < high < 0.6


def test_tasb_strategy_gives_the_trainer_single_cluster_batches(scifact, tmp_path):
    from retriever.config import TrainConfig
    from retriever.trainer import Trainer
    from strategy_data import shared_mini, tiny_config

    folder, model = shared_mini(scifact)
    cfg = TrainConfig.model_validate(tiny_config(folder, model, "tasb", {"n_clusters": 3}, max_steps=3))
    trainer = Trainer(cfg, tmp_path / "run")
    trainer.run()
    clusters = trainer.strategy.clusters
    by_query = {ex.query: c for ex, c in zip(trainer.train_examples, clusters)}
    assert len(set(clusters.tolist())) >= 2
    for step in range(trainer.steps_per_epoch):
        for batch in trainer._batches(step):
            assert len(batch.queries) == 4
            assert len({by_query[q] for q in batch.queries}) == 1


def test_tasb_margin_mse_distils_teacher_scores(tmp_path):
    import json

    import torch

    from retriever.config import TrainConfig
    from retriever.testing import build_tiny_model
    from retriever.trainer import Trainer

    rng = np.random.default_rng(0)
    rows = []
    for i in range(16):
        topic = ["protein folding", "star formation", "river erosion", "tax policy"][i % 4]
        rows.append({"query": f"what drives {topic} case {i}", "pos": [f"{topic} is driven by factor {i}"],
                     "neg": [f"unrelated note {i} {j}" for j in range(3)],
                     "pos_scores": [9.0], "neg_scores": [float(s) for s in rng.uniform(-5, 8, size=3)]})
    data = tmp_path / "teacher.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    model = build_tiny_model(tmp_path / "tiny", [t for r in rows for t in [r["query"], *r["pos"], *r["neg"]]])
    cfg = TrainConfig.model_validate({
        "model": {"name": str(model)}, "data": {"jsonl": str(data)},
        "negatives": {"strategy": "tasb", "options": {"n_clusters": 2, "hard_per_query": 1, "loss": "margin_mse",
                                                      "student_scale": 10.0}},
        "training": {"batch_size": 4, "max_steps": 12, "learning_rate": 3e-3, "warmup_ratio": 0.0, "log_every": 1,
                     "num_threads": 1}})
    trainer = Trainer(cfg, tmp_path / "run")
    trainer.run()
    losses = [json.loads(line)["loss"] for line in (tmp_path / "run" / "train_log.jsonl").read_text().splitlines()]
    assert np.mean(losses[-3:]) < np.mean(losses[:3])
    assert torch.isfinite(torch.tensor(losses)).all()
