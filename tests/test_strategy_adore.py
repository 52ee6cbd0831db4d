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


def _recording(trainer):
    """Wrap the strategy's micro_step: per step (queries, query-tower weights, RNG state, negative ids)."""
    import copy

    strategy = trainer.strategy
    micro_step = strategy.micro_step
    steps = []

    def recording(tr, batch, scale):
        weights = copy.deepcopy(tr.model.query_model.state_dict())
        rng = torch.get_rng_state()
        loss = micro_step(tr, batch, scale)
        steps.append((list(batch.queries), weights, rng, [list(n) for n in strategy.last_negative_ids]))
        return loss

    strategy.micro_step = recording
    return steps


def _exact_top_k(trainer, k=20):
    """A brute-force top-k (positives removed) over the stored embeddings under given query weights."""
    import copy

    strategy = trainer.strategy
    doc_emb = np.asarray(strategy.store.load_all(), dtype=np.float32)  # the test may; the strategy never does
    replica = copy.deepcopy(trainer.model)
    replica.train()

    def exact(queries, weights, rng):
        replica.query_model.load_state_dict(weights)
        torch.set_rng_state(rng)  # same dropout masks as the step itself
        with torch.no_grad():
            q = replica.embed(replica.tokenize(queries, "query"), "query").float().numpy()
        out = []
        for i, query in enumerate(queries):
            top = np.argsort(-(doc_emb @ q[i]), kind="stable")[:k]
            out.append({strategy.doc_ids[r] for r in top if r not in strategy.positives_of(query)})
        return out

    return exact


def test_adore_negatives_of_each_step_are_the_exact_top_k_of_that_steps_query_encoder(mini, tmp_path):
    """``last_negative_ids`` of every step equal a brute-force top-k (positives removed) with the query
    encoder's weights (and dropout masks) of that step, and they change as the encoder trains."""
    folder, model = mini
    trainer = _trainer(folder, model, tmp_path / "run", max_steps=4)
    strategy = trainer.strategy
    steps = _recording(trainer)
    trainer.run()
    assert len(steps) == 4
    assert strategy.index.manifest["factory"] == "Flat"  # factory auto below the threshold: exact search
    exact = _exact_top_k(trainer)
    for queries, weights, rng, recorded in steps:
        assert [set(r) for r in recorded] == exact(queries, weights, rng)
        for query, negs in zip(queries, recorded):
            positives = {strategy.doc_ids[r] for r in strategy.positives_of(query)}
            assert not positives & set(negs)
    # the same queries under the final weights retrieve other negatives: they follow the encoder
    queries, _, rng, recorded = steps[0]
    assert [set(r) for r in recorded] != exact(queries, trainer.model.query_model.state_dict(), rng)


def test_adore_never_loads_the_whole_embedding_matrix(mini, tmp_path, monkeypatch):
    """Candidates' embeddings are gathered per step from the float16 memmap; ``load_all`` (27 GB float32 at
    MS MARCO) is never called, ids stay the index's memory-mapped ids and positives compact arrays."""
    from index.store import EmbeddingStore

    def refuse(self):
        raise AssertionError("ADORE must not call EmbeddingStore.load_all")

    monkeypatch.setattr(EmbeddingStore, "load_all", refuse)
    gathered = []
    gather = EmbeddingStore.gather

    def counting(self, rows, dtype=np.float32):
        gathered.append(len(rows))
        return gather(self, rows, dtype)

    monkeypatch.setattr(EmbeddingStore, "gather", counting)
    folder, model = mini
    trainer = _trainer(folder, model, tmp_path / "run", max_steps=2)
    trainer.run()
    strategy = trainer.strategy
    assert len(gathered) == 2 and all(0 < n <= 4 * 20 + 20 for n in gathered)  # one gather a step, <= B x (k + pos)
    assert not isinstance(strategy.doc_ids, list)
    assert not hasattr(strategy, "doc_emb") and not hasattr(strategy, "positive_rows")
    assert isinstance(strategy.positives.values, np.ndarray) and strategy.positives.values.dtype == np.int64


def test_adore_trains_on_an_ivf_index_with_the_configured_settings(mini, tmp_path):
    """``negatives.options.index`` reaches the built index; with every list probed, IVF's negatives are the
    exact top-k of the step's query encoder (ties at the cut aside)."""
    from retriever.trainer import Trainer

    folder, model = mini
    options = {"k": 20, "index": {"factory": "IVF2,Flat", "nprobe": 2, "train_sample": 100, "gpu": "no"}}
    cfg = TrainConfig.model_validate(tiny_config(folder, model, "adore", options, learning_rate=5e-3, max_steps=3))
    trainer = Trainer(cfg, tmp_path / "run")
    steps = _recording(trainer)
    trainer.run()
    manifest = trainer.strategy.index.manifest
    assert (manifest["factory"], manifest["nprobe"], manifest["train_sample"]) == ("IVF2,Flat", 2, 100)
    assert manifest["gpus_used_for_build"] == 0
    exact = _exact_top_k(trainer)
    same = total = 0
    for queries, weights, rng, recorded in steps:
        for got, want in zip(recorded, exact(queries, weights, rng)):
            same, total = same + len(set(got) & want), total + len(want)
    assert total and same >= 0.95 * total


def test_adore_loss_ranks_every_positive_among_all_candidates_and_normalises_by_pairs():
    from retriever.losses.lambda_rank import LambdaRankLoss

    # one query, candidates in score order: n0, p0, n1, p1 (two positives, both ranked among all four)
    scores = torch.tensor([[0.9, 0.8, 0.5, 0.4]], requires_grad=True)
    relevant = torch.tensor([[False, True, False, True]])
    loss = LambdaRankLoss(scale=1.0, cutoff=None)(scores, relevant)
    gain = 1 / torch.arange(1, 5).float()
    pairs = [(1, 0), (1, 2), (3, 0), (3, 2)]
    expected = sum(abs(gain[i] - gain[j]) * torch.nn.functional.softplus(-(scores[0, i] - scores[0, j]))
                   for i, j in pairs) / len(pairs)
    assert torch.allclose(loss, expected)
    # padding changes nothing; a second query with one pair weighs as much as the first
    padded = torch.cat([scores, torch.tensor([[0.0, 0.0, 0.0, 0.0]])], 0)
    valid = torch.tensor([[True] * 4, [True, True, False, False]])
    rel2 = torch.cat([relevant, torch.tensor([[True, False, False, False]])], 0)
    both = LambdaRankLoss(scale=1.0, cutoff=None)(padded, rel2, valid)
    single = LambdaRankLoss(scale=1.0, cutoff=None)(padded[1:, :2], rel2[1:, :2])
    assert torch.allclose(both, (expected + single) / 2)


@pytest.mark.parametrize("source", ["examples", "table"])
def test_adore_uses_every_positive_and_excludes_duplicates_of_positives_by_text(mini, tmp_path, source, monkeypatch):
    """Positives by id and every copy of them by text, from examples with texts or from a training table of
    rows (which reads no passage: a table at 8.8M must not touch the corpus's id or text pages)."""
    import json
    import shutil

    from retriever.data import Corpus, TrainingExample
    from retriever.example_table import ExampleTableBuilder

    folder, model = mini
    docs = [json.loads(line) for line in (folder / "corpus.jsonl").read_text().splitlines()]
    dup = dict(docs[0], _id="dup-of-0")  # the same passage under another id
    work = tmp_path / "mini"
    shutil.copytree(folder, work)
    (work / "corpus.jsonl").write_text("".join(json.dumps(d) + "\n" for d in docs + [dup]))
    corpus = Corpus(work / "corpus.jsonl")
    ex = TrainingExample(query="which passage?", positives=[corpus.get(docs[0]["_id"]).full_text,
                                                            corpus.get(docs[1]["_id"]).full_text],
                         positive_ids=[docs[0]["_id"], docs[1]["_id"]])
    from retriever.negatives.adore import ADORENegatives

    examples = [ex]
    strategy, encoder = ADORENegatives({"k": 200}), BiEncoder.from_pretrained(model)
    if source == "table":
        from retriever.negatives.adore import freeze_document_tower
        from retriever.negatives.corpus_index import build_index

        b = ExampleTableBuilder(corpus)
        b.add(ex.query, "q1", corpus.rows(ex.positive_ids).tolist(), [])
        examples = b.build()
        freeze_document_tower(encoder)
        build_index(encoder, corpus, tmp_path / "index")  # encodes the corpus: setup then reuses its embeddings
        monkeypatch.setattr(Corpus, "_read", lambda *a: pytest.fail("ADORE read a passage of a table's positives"))
    strategy.setup(encoder, corpus, examples, tmp_path / "index")
    monkeypatch.undo()
    rows = strategy.positives_of(ex.query)
    assert {strategy.doc_ids[r] for r in rows} == {docs[0]["_id"], docs[1]["_id"], "dup-of-0"}
    emb, relevant, valid, negatives = strategy.candidates([ex.query], np.array([[0, 5, 7]]))
    assert relevant[0].sum() == 3  # both positives and the duplicate, retrieved or appended
    assert all(strategy.doc_ids[r] not in {docs[0]["_id"], docs[1]["_id"], "dup-of-0"} for r in negatives[0])


def test_star_then_adore_through_the_real_pipeline_cli(mini, tmp_path):
    """`negatron train` on a pipeline YAML: STAR trains, ADORE starts from STAR's final model and ends
    with STAR's document tower unchanged."""
    import yaml
    from typer.testing import CliRunner

    from retriever.cli import _register_all, app

    folder, model = mini
    star = tiny_config(folder, model, "star", {"range_min": 0, "range_max": 30}, max_steps=2)
    adore = tiny_config(folder, model, "adore", {"k": 20}, max_steps=2, learning_rate=5e-3)
    pipeline = tmp_path / "star-adore.yaml"
    pipeline.write_text(yaml.safe_dump({"pipeline": [{"name": "star", "config": star},
                                                     {"name": "adore", "config": adore}]}))
    _register_all()
    result = CliRunner().invoke(app, ["train", "--config", str(pipeline), "--output", str(tmp_path / "out")])
    assert result.exit_code == 0, result.output
    star_final = BiEncoder.from_pretrained(tmp_path / "out" / "star" / "final")
    final = BiEncoder.from_pretrained(tmp_path / "out" / "adore" / "final")
    assert not final.shared
    star_state = star_final.query_model.state_dict()
    assert all(torch.equal(final.doc_model.state_dict()[k], v) for k, v in star_state.items())
    assert any(not torch.equal(final.query_model.state_dict()[k], v) for k, v in star_state.items())
    start = BiEncoder.from_pretrained(model).query_model.state_dict()
    assert any(not torch.equal(star_state[k], v) for k, v in start.items())  # STAR did train


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


def test_adore_embeds_a_positive_given_only_as_text_absent_from_the_corpus(mini, tmp_path):
    """A positive known only by its text and not in the corpus is embedded once by the frozen document tower
    and ranked among the candidates; one that is in the corpus under its text is found by text, not embedded."""
    from retriever.data import Corpus, TrainingExample
    from retriever.negatives.adore import ADORENegatives
    from retriever.negatives.corpus_index import text_key

    folder, model = mini
    corpus = Corpus(folder / "corpus.jsonl")
    in_corpus = corpus[3]
    ex = TrainingExample(query="which passage?", positives=["a positive passage that no corpus holds",
                                                            in_corpus.full_text])
    strategy = ADORENegatives({"k": 20})
    encoder = BiEncoder.from_pretrained(model)
    strategy.setup(encoder, corpus, [ex], tmp_path / "index")
    assert strategy.positives_of(ex.query).tolist() == [3]
    extra = strategy.extra_positive_emb[text_key(ex.query)]
    expected = encoder.encode(["a positive passage that no corpus holds"], kind="document")
    assert extra.shape == (1, expected.shape[1]) and np.allclose(extra.numpy(), expected, atol=1e-5)
    _, relevant, valid, negatives = strategy.candidates([ex.query], np.array([[3, 5, 7]]))
    assert relevant[0].sum() == 2 and 3 not in negatives[0]

