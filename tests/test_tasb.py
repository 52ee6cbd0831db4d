"""TAS-B sampling: one cluster per batch, balanced margin bins."""

import numpy as np
import pytest

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


# ---------------------------------------------------------------------------------------------- issue 12
def _tasb_trainer(scifact, out, resume=False, **training):
    from retriever.config import TrainConfig
    from retriever.trainer import Trainer
    from strategy_data import shared_mini, tiny_config

    folder, model = shared_mini(scifact)
    cfg = TrainConfig.model_validate(tiny_config(folder, model, "tasb", {"n_clusters": 3}, **training))
    return Trainer(cfg, out, resume=resume)


def test_tasb_resume_restores_the_saved_clusters_instead_of_reclustering(scifact, tmp_path, monkeypatch):
    import retriever.negatives.tasb as tasb_module

    first = _tasb_trainer(scifact, tmp_path / "run", max_steps=4, save_every=2, keep_last=5, learning_rate=5e-2)
    first.run()
    clusters = first.strategy.clusters.copy()
    order = first.strategy.epoch_order(len(first.train_examples), 0, 1)
    import shutil

    shutil.rmtree(tmp_path / "run" / "checkpoints" / "step-0000004")
    calls = []
    monkeypatch.setattr(tasb_module, "cluster_queries", lambda *a, **k: calls.append(1) or np.zeros(0))
    resumed = _tasb_trainer(scifact, tmp_path / "run", resume=True, max_steps=4, save_every=2, keep_last=5,
                            learning_rate=5e-2)
    resumed._start()
    assert not calls, "resume must not re-cluster with the trained model"
    assert np.array_equal(resumed.strategy.clusters, clusters)
    assert np.array_equal(resumed.strategy.epoch_order(len(resumed.train_examples), 0, 1), order)


def test_tasb_builds_each_epoch_order_once(scifact, tmp_path):
    trainer = _tasb_trainer(scifact, tmp_path / "run", max_steps=12)
    trainer._start()
    calls = []
    build = trainer.strategy.sampler.full_batches_order
    trainer.strategy.sampler.full_batches_order = lambda: calls.append(trainer.strategy.sampler.epoch) or build()
    for step in range(12):  # 6 steps per epoch
        list(trainer._batches(step))
    assert calls == [0, 1]


def _scored_example(query, pos, neg):
    from retriever.data import TrainingExample

    return TrainingExample(query=query, positives=[p for p, _ in pos], positive_scores=[s for _, s in pos],
                           negatives=[n for n, _ in neg], negative_scores=[s for _, s in neg])


def test_tasb_balanced_margin_uses_the_drawn_positive():
    """Positives A (teacher 10) and B (0); with B drawn, margins are B's (1, 2, -9), not A's (11, 12, 1)."""
    from retriever.negatives.tasb import TASBStrategy

    ex = _scored_example("q", [("A", 10.0), ("B", 0.0)], [("n1", -1.0), ("n2", -2.0), ("n3", 9.0)])
    strategy = TASBStrategy({"hard_per_query": 1, "margin_bins": 2})
    strategy.setup([ex, ex], np.eye(2, 4, dtype=np.float32), 1, 2, seed=0)
    assert strategy.margin_bounds == (-9.0, 12.0)  # over every positive's margins
    picks = [strategy.negatives_given_positive(ex, 1, np.random.default_rng(s))[0] for s in range(2000)]
    # B's margins fall in bins (0, 1, 0): n2 alone in its bin is drawn half the time (A's rule: a quarter)
    assert 0.45 < np.mean([p == "n2" for p in picks]) < 0.55


class _FakeTrainer:
    def __init__(self, model, temperature=0.05):
        from retriever.distributed import DistContext

        self.model, self.bf16, self.dist = model, False, DistContext()
        self.config = type("C", (), {"training": type("T", (), {"temperature": temperature})()})()


def _tasb_batch(model_dir, inbatch_weight, loss="margin_mse"):
    import torch

    from retriever.modeling import BiEncoder
    from retriever.negatives.tasb import TASBStrategy
    from retriever.train_data import BatchCollator

    # Query i's hard negative "neg i" is also scored for query (i+1) % 4: an in-batch teacher score.
    examples = [_scored_example(f"query {i}", [(f"pos {i}", 9.0), (f"alt pos {i}", 1.0)],
                                [(f"neg {i}", float(i)), (f"neg {(i - 1) % 4}", 5.0 - i)]) for i in range(4)]
    strategy = TASBStrategy({"hard_per_query": 1, "loss": loss, "balanced_margins": False,
                             "inbatch_weight": inbatch_weight})
    strategy.setup(examples, np.eye(4, 8, dtype=np.float32), 1, 4, seed=0)
    torch.manual_seed(0)
    model = BiEncoder.from_pretrained(model_dir)
    model.eval()
    trainer = _FakeTrainer(model)
    strategy.student_scale = 1.0 / trainer.config.training.temperature
    batch = BatchCollator(strategy, seed=0)(examples, list(range(4)), 0)
    return strategy, trainer, batch, examples


def _grads(model):
    return {k: p.grad.clone() for k, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("loss", ["margin_mse", "distill_kl"])
def test_tasb_inbatch_teacher_term_changes_the_gradient(tiny_model_dir, loss):
    import torch

    grads, losses = {}, {}
    for weight in (0.0, 1.0):
        strategy, trainer, batch, _ = _tasb_batch(tiny_model_dir, weight, loss)
        losses[weight] = strategy.micro_step(trainer, batch, 1.0)
        grads[weight] = _grads(trainer.model)
    assert strategy.last_inbatch_pairs > 0
    assert losses[1.0] > losses[0.0]
    assert all(torch.isfinite(g).all() for g in grads[1.0].values())
    assert any(not torch.allclose(grads[0.0][k], grads[1.0][k]) for k in grads[0.0])


def test_tasb_pairwise_margin_uses_the_drawn_positive(tiny_model_dir):
    """The MarginMSE target of query i is t(q, drawn positive) - t(q, its negative), recomputed here."""
    import torch
    from torch.nn import functional as F

    strategy, trainer, batch, examples = _tasb_batch(tiny_model_dir, 0.0)
    loss = strategy.micro_step(trainer, batch, 1.0)
    model, b = trainer.model, len(batch.queries)
    assert any(doc.startswith("alt pos") for doc in batch.documents[:b])  # some query drew its low positive
    with torch.no_grad():
        q = model.embed(model.tokenize(batch.queries, "query"), "query")
        d = model.embed(model.tokenize(batch.documents, "document"), "document")
    scores = {(ex.query, t): s for ex in examples for t, s in zip(ex.positives + ex.negatives,
                                                                   ex.positive_scores + ex.negative_scores)}
    student, teacher = [], []
    for i in range(b):
        pos, neg = batch.documents[i], batch.documents[b + i]
        student.append(20.0 * (q[i] @ d[i] - q[i] @ d[b + i]))
        teacher.append(scores[(batch.queries[i], pos)] - scores[(batch.queries[i], neg)])
    assert loss == pytest.approx(float(F.mse_loss(torch.stack(student), torch.tensor(teacher))), rel=1e-4)
