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


# --------------------------------------------------------------------------- issue #13: sub-collection scoring
def _big_dev_set(folder, n_docs=400, seed=0):
    """A dev set whose corpus is mostly random filler around the toy dev set's documents."""
    import random

    from _eval_data import write_toy_beir

    folder = write_toy_beir(folder, split="dev")
    rng = random.Random(seed)
    words = "alpha beta gamma delta vectors index search ranking model query passage token river fox".split()
    with open(folder / "corpus.jsonl", "a") as fh:
        for i in range(n_docs):
            fh.write(json.dumps({"_id": f"filler{i}", "title": "", "text": " ".join(rng.choices(words, k=12))}) + "\n")
    return folder


def test_sub_collection_scores_positives_plus_a_fixed_seeded_sample(two_models, tmp_path, monkeypatch):
    """evaluation.sub_collection: each evaluation encodes the dev queries' judged documents plus the same
    seeded sample of the corpus (not the whole corpus), and says so in the log line and metrics.json."""
    import eval.beir as beir
    from eval.checkpoint_scoring import CheckpointScorer, sub_collection_rows
    from retriever.data import load_beir

    dev = _big_dev_set(tmp_path / "dev")
    data = load_beir(dev, "dev", check_ids=False)
    rows = sub_collection_rows(data.corpus, data.qrels, 50, seed=0)
    np.testing.assert_array_equal(rows, sub_collection_rows(data.corpus, data.qrels, 50, seed=0))
    assert not np.array_equal(rows, sub_collection_rows(data.corpus, data.qrels, 50, seed=1))
    judged = {d for docs in data.qrels.values() for d in docs if d in data.corpus}
    assert judged <= {data.corpus.ids[int(r)] for r in rows} and 50 <= len(rows) <= 50 + len(judged)

    encoded = []
    real = beir.encode_texts
    monkeypatch.setattr(beir, "encode_texts", lambda m, texts, kind, *a, **kw: (
        encoded.append((kind, len(texts))), real(m, texts, kind, *a, **kw))[1])
    (_, _, best), (_, _, worse) = two_models
    scorer = CheckpointScorer([{"name": "big", "path": str(dev), "split": "dev"}], every_steps=10, sub_collection=50)
    first = scorer.score(best, 10, tmp_path / "run")
    second = scorer.score(worse, 20, tmp_path / "run")
    docs = sum(n for kind, n in encoded if kind == "document")
    assert docs == 2 * len(rows) < 2 * len(data.corpus)  # never the whole corpus
    for line in (first, second):
        assert line["collection"] == "sub-collection"
        info = line["sub_collection"]["big"]
        assert info["docs"] == len(rows) and info["corpus_docs"] == len(data.corpus) and info["sample"] == 50
    saved = json.loads((tmp_path / "run" / "eval" / "step-10" / dev.name / "metrics.json").read_text())
    assert saved["collection"] == "sub-collection" and saved["num_docs"] == len(rows) and saved["seed"] == 0
    logged = [json.loads(line) for line in (tmp_path / "run" / "checkpoint_eval.jsonl").read_text().splitlines()]
    assert [entry["collection"] for entry in logged] == ["sub-collection"] * 2


def test_sub_collection_covering_the_corpus_equals_full_scoring(two_models, dev_set, tmp_path):
    """A sample as large as the corpus is the corpus: the same metrics as the full evaluation."""
    from eval.checkpoint_scoring import CheckpointScorer

    (_, _, best), _ = two_models
    full = CheckpointScorer([{"name": "toy", "path": str(dev_set), "split": "dev"}]).score(best, 10, tmp_path / "a")
    sub = CheckpointScorer([{"name": "toy", "path": str(dev_set), "split": "dev"}],
                           sub_collection=10_000).score(best, 10, tmp_path / "b")
    assert full["collection"] == "full" and sub["collection"] == "sub-collection"
    for name, value in full["eval"]["toy"].items():
        assert sub["eval"]["toy"][name] == pytest.approx(value, abs=1e-6), name


def test_sub_collection_config_key():
    from retriever.config import EvaluationConfig

    ev = EvaluationConfig(dev_sets=[{"path": "x"}], sub_collection=100_000)
    assert ev.sub_collection == 100_000 and EvaluationConfig(dev_sets=[{"path": "x"}]).sub_collection is None
    with pytest.raises(ValueError):
        EvaluationConfig(dev_sets=[{"path": "x"}], sub_collection=0)


def test_sub_corpus_is_a_corpus_over_its_rows(dev_set):
    """The sub-collection is a Corpus view (so index.encode.encode_corpus can shard it): slices, ids and
    id lookups stay within its rows."""
    from eval.checkpoint_scoring import SubCorpus
    from retriever.data import Corpus, load_beir

    corpus = load_beir(dev_set, "dev", check_ids=False).corpus
    rows = np.array([1, 4, 7])
    sub = SubCorpus(corpus, rows)
    assert isinstance(sub, Corpus) and len(sub) == 3 and sub.path == corpus.path
    assert [d.id for d in sub[0:3]] == list(sub.ids) == [corpus.ids[int(r)] for r in rows]
    assert [d.id for d in sub] == list(sub.ids) and sub[1].id == corpus.ids[4]
    assert sub.texts([2]) == [corpus[7].full_text]
    inside, outside = corpus.ids[4], corpus.ids[0]
    assert inside in sub and outside not in sub and "no-such-id" not in sub
    assert sub.row(inside) == 1 and sub.get(inside).id == inside
    with pytest.raises(KeyError):
        sub.row(outside)
