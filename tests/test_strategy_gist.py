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


class _RecordingLoss(torch.nn.Module):
    """An InfoNCE that records the similarity matrix and the exclusion mask the trainer step gives it."""

    def __init__(self):
        super().__init__()
        from retriever.losses import ContrastiveLoss

        self.inner, self.seen = ContrastiveLoss(0.05), {}

    def forward(self, q, d, targets, exclude=None):
        return self.from_similarities(q @ d.T, targets, exclude)

    def from_similarities(self, sims, targets, exclude=None):
        self.seen = {"sims": sims.detach().clone(), "exclude": exclude.clone(), "targets": targets.clone()}
        return self.inner.from_similarities(sims, targets, exclude)


def test_trainer_step_masks_qd_qq_and_dd_candidates_as_sentence_transformers_does(tiny_model_dir):
    """GISTEmbedLoss (sentence-transformers) contrasts each query with the batch's documents (qd), the other
    queries (qq) and, seen from its positive, the other positives (dd); the guide masks every block
    against the guide's query–positive score, each text's own copy is dropped, and copies of the query's
    own positives are dropped as everywhere else. Checked element by element against a direct loop."""
    from retriever.data import TrainingExample
    from retriever.step import plain_step

    rng = np.random.default_rng(0)
    shared = "a positive shared by queries 0 and 1"
    examples = [TrainingExample(query=f"query {i}", positives=[shared if i < 2 else f"positive {i}"],
                                negatives=[f"negative {i}"]) for i in range(6)]
    texts = {("query", e.query) for e in examples} | {("document", t) for e in examples for t in e.positives + e.negatives}
    table = {k: torch.nn.functional.normalize(torch.from_numpy(rng.normal(size=3)).float(), dim=0) for k in sorted(texts)}
    strategy = GISTNegatives({"guide": "unused", "hard_per_query": 1, "guide_bf16": False})
    strategy.guide_embeddings = lambda ts, kind: torch.stack([table[(kind, t)] for t in ts])
    batch = BatchCollator(strategy, seed=0)(examples, list(range(6)), 0)
    model = BiEncoder.from_pretrained(tiny_model_dir)
    model.eval()  # no dropout: the recorded similarities can be recomputed below
    loss_fn = _RecordingLoss()
    plain_step(model, batch, loss_fn, strategy, bf16=False)

    b, docs = len(batch.queries), batch.global_documents
    pos_cols = batch.targets.tolist()
    positives = [docs[c] for c in pos_cols]
    sims, exclude = loss_fn.seen["sims"], loss_fn.seen["exclude"]
    assert sims.shape == exclude.shape == (b, len(docs) + b + b)  # [qd | qq | dd]
    with torch.no_grad():
        q = model.embed(model.tokenize(batch.queries, "query"), "query")
        d = model.embed(model.tokenize(docs, "document"), "document")
    pos = d[pos_cols]
    assert torch.allclose(sims, torch.cat([q @ d.T, q @ q.T, pos @ pos.T], dim=1), atol=1e-5)
    g = lambda kind, t: table[(kind, t)]  # noqa: E731
    blocks = {"qd": [], "qq": [], "dd": []}
    for i in range(b):
        threshold = float(g("query", batch.queries[i]) @ g("document", positives[i]))
        own = set(examples[i].positives)
        for j, doc in enumerate(docs):
            # (the target column carries the collator's own-positive flag; the losses always keep the target)
            expected = doc in own or (j != pos_cols[i] and float(g("query", batch.queries[i]) @ g("document", doc)) > threshold)
            assert bool(exclude[i, j]) == expected, ("qd", i, j)
            blocks["qd"].append(expected)
        for j in range(b):
            expected = j == i or float(g("query", batch.queries[i]) @ g("query", batch.queries[j])) > threshold
            assert bool(exclude[i, len(docs) + j]) == expected, ("qq", i, j)
            blocks["qq"].append(expected)
        for j in range(b):
            expected = j == i or positives[j] in own or float(g("document", positives[i]) @ g("document", positives[j])) > threshold
            assert bool(exclude[i, len(docs) + b + j]) == expected, ("dd", i, j)
            blocks["dd"].append(expected)
    for name, values in blocks.items():  # every block has masked and kept candidates: the test can fail
        assert any(values) and not all(values), name
    assert exclude[0, len(docs) + b + 1] and exclude[1, len(docs) + b + 0]  # the shared positive, in dd


def test_hard_per_query_without_negatives_in_the_data_is_an_error(caplog):
    from retriever.data import TrainingExample

    strategy = GISTNegatives({"guide": "unused", "hard_per_query": 2})
    bare = [TrainingExample(query=f"q{i}", positives=[f"p{i}"]) for i in range(3)]
    with pytest.raises(ValueError, match="hard_per_query.*no hard negatives"):
        strategy.check_examples(bare)
    some = bare[:2] + [TrainingExample(query="q9", positives=["p9"], negatives=["n9"])]
    with caplog.at_level("WARNING"):
        strategy.check_examples(some)
    assert "2 of 3 training queries have no hard negatives" in caplog.text
