import json

import numpy as np
import pytest

from _eval_data import write_toy_beir


@pytest.fixture(scope="module")
def dev_set(tmp_path_factory):
    return write_toy_beir(tmp_path_factory.mktemp("dev") / "toy-dev", split="dev")


@pytest.fixture(scope="module")
def two_models(tmp_path_factory, dev_set):
    """Two random tiny models, ordered (better, worse) by their dev nDCG@10."""
    from eval.beir import evaluate_beir
    from retriever.modeling import BiEncoder
    from retriever.testing import build_tiny_model

    models = []
    for seed in (0, 1, 2):
        model = BiEncoder.from_pretrained(build_tiny_model(tmp_path_factory.mktemp(f"tiny{seed}"), seed=seed))
        models.append((evaluate_beir(model, dev_set, "dev", k=100)["metrics"]["ndcg@10"], seed, model))
    models.sort(key=lambda m: -m[0])
    assert models[0][0] > models[-1][0], "the random models should differ"
    return models[0], models[-1]


def test_keeps_best_and_stops_early(two_models, dev_set, tmp_path):
    from eval.checkpoint_scoring import CheckpointScorer
    from retriever.modeling import BiEncoder

    (best_score, _, best), (worse_score, _, worse) = two_models
    scorer = CheckpointScorer([{"name": "toy", "path": str(dev_set), "split": "dev"}], metric="ndcg@10",
                              every_steps=10, early_stopping_patience=2)
    assert scorer.due(20) and not scorer.due(15) and not scorer.due(0)
    first = scorer.score(worse, 10, tmp_path)
    assert first["improved"] and first["score"] == pytest.approx(worse_score)
    second = scorer.score(best, 20, tmp_path)
    assert second["improved"] and scorer.best_step == 20
    assert not scorer.score(worse, 30, tmp_path)["improved"] and not scorer.should_stop
    assert not scorer.score(worse, 40, tmp_path)["improved"] and scorer.should_stop

    saved = json.loads((tmp_path / "best" / "best.json").read_text())
    assert saved["step"] == 20 and saved["score"] == pytest.approx(best_score)
    reloaded = BiEncoder.from_pretrained(tmp_path / "best")
    texts = ["dense retrieval with hard negatives"]
    np.testing.assert_allclose(reloaded.encode(texts, bf16=False), best.encode(texts, bf16=False), atol=1e-5)
    lines = [json.loads(line) for line in (tmp_path / "checkpoint_eval.jsonl").read_text().splitlines()]
    assert [line["step"] for line in lines] == [10, 20, 30, 40]
    assert lines[0]["eval"]["toy"]["ndcg@10"] == pytest.approx(worse_score)
    assert (tmp_path / "eval" / "step-20" / "toy-dev" / "metrics.json").exists()
    assert not list(tmp_path.glob(".best*")), "no temp folders left behind"


def test_resume_keeps_earlier_best(two_models, dev_set, tmp_path):
    from eval.checkpoint_scoring import CheckpointScorer

    (_, _, best), (_, _, worse) = two_models
    dev = [{"name": "toy", "path": str(dev_set), "split": "dev"}]
    CheckpointScorer(dev, every_steps=5).score(best, 5, tmp_path)
    resumed = CheckpointScorer(dev, every_steps=5)
    assert not resumed.score(worse, 10, tmp_path)["improved"]
    assert json.loads((tmp_path / "best" / "best.json").read_text())["step"] == 5


def test_rejects_bad_settings(dev_set):
    from eval.checkpoint_scoring import CheckpointScorer

    with pytest.raises(ValueError, match="unknown metric"):
        CheckpointScorer([{"path": str(dev_set)}], metric="ndcg")
    with pytest.raises(ValueError, match="at least one dev set"):
        CheckpointScorer([])
    with pytest.raises(ValueError, match="every_steps"):
        CheckpointScorer([{"path": str(dev_set)}], every_steps=0)
