"""Offline mining: positives never come back as negatives, ranks stay in the window, the margin is
honoured against the positives' own scores, scores match the embeddings, sampling is seeded."""

import json
import random

import numpy as np
import pytest

from mining.miner import (DenseRetriever, DocEmbeddingLookup, MiningConfig, TrainingQuery, load_training_queries,
                          mine, write_training_jsonl)
from mining.stats import MiningStats
from retriever.data import Corpus, iter_training_jsonl

WORDS = ("dense retrieval vectors faiss index negatives positives contrastive query document bm25 ranking "
         "cross encoder python fox dog learning search score model train batch token").split()


def _write_dataset(folder, n_docs=60, n_queries=12, seed=0):
    """A small BEIR folder: random word documents, queries built from their positive's words."""
    rng = random.Random(seed)
    folder.mkdir(parents=True, exist_ok=True)
    docs = {f"doc{i}": " ".join(rng.choice(WORDS) for _ in range(rng.randint(6, 30))) for i in range(n_docs)}
    with open(folder / "corpus.jsonl", "w") as fh:
        for did, text in docs.items():
            fh.write(json.dumps({"_id": did, "title": "", "text": text}) + "\n")
    (folder / "qrels").mkdir(exist_ok=True)
    with open(folder / "queries.jsonl", "w") as qf, open(folder / "qrels" / "train.tsv", "w") as rf:
        rf.write("query-id\tcorpus-id\tscore\n")
        for q in range(n_queries):
            pos = [f"doc{q * 3}"] + ([f"doc{q * 3 + 1}"] if q % 3 == 0 else [])
            qf.write(json.dumps({"_id": f"q{q}", "text": " ".join(docs[pos[0]].split()[:5])}) + "\n")
            for d in pos:
                rf.write(f"q{q}\t{d}\t1\n")
    return folder


def build_dense(model, corpus, folder):
    """(DenseIndex, EmbeddingStore) through the index package."""
    from index.encode import encode_corpus
    from index.faiss_index import DenseIndex

    store = encode_corpus(model, corpus, folder / "emb", show_progress=False)
    DenseIndex.build(store, folder / "index", factory="Flat", metric="ip")
    return DenseIndex.load(folder / "index"), store


@pytest.fixture(scope="module")
def setup(tmp_path_factory, tiny_model_dir):
    from retriever.modeling import BiEncoder

    root = tmp_path_factory.mktemp("mine")
    data = _write_dataset(root / "beir")
    model = BiEncoder.from_pretrained(str(tiny_model_dir))
    queries, corpus = load_training_queries(data, split="train")
    index, store = build_dense(model, corpus, root)
    lookup = DocEmbeddingLookup.from_store(store, [d for q in queries for d in q.positive_ids])
    return dict(root=root, data=data, model=model, queries=queries, corpus=corpus, index=index, store=store, lookup=lookup)


def _run(setup, **overrides):
    config = MiningConfig(**{**dict(k=40, range_min=2, range_max=30, num_negatives=4), **overrides})
    retriever = DenseRetriever(setup["index"], setup["model"], bf16=False, doc_lookup=setup["lookup"])
    stats = MiningStats(num_negatives=config.num_negatives)
    return list(mine(setup["queries"], setup["corpus"], retriever, config, stats=stats)), stats, config


def test_positives_excluded_ranks_in_window_scores_exact(setup):
    mined, stats, config = _run(setup)
    emb = setup["store"].load_all()
    row = {d: i for i, d in enumerate(setup["store"].ids)}
    from index.encode import encode_texts

    q_emb = encode_texts(setup["model"], [m.query.text for m in mined], kind="query", bf16=False)
    assert len(mined) == len(setup["queries"]) == 12
    for m, qe in zip(mined, q_emb):
        assert not set(m.negative_ids) & set(m.query.positive_ids)
        assert len(m.negative_ids) == len(set(m.negative_ids)) == 4
        # the index was encoded from this corpus: the rows come along, equal to the ids' rows
        assert m.negative_rows.tolist() == setup["corpus"].rows(m.negative_ids).tolist()
        assert all(config.range_min <= r < config.range_max for r in m.negative_ranks)
        assert m.negative_ranks == sorted(m.negative_ranks)
        # scores are the index's inner products, positives scored the same way (fp16 store)
        np.testing.assert_allclose(m.negative_scores, [emb[row[d]] @ qe for d in m.negative_ids], atol=2e-3)
        np.testing.assert_allclose(m.positive_scores, [emb[row[d]] @ qe for d in m.query.positive_ids], atol=2e-3)
    assert stats.negatives == 48 and stats.dropped["excluded"] > 0
    assert stats.queries == 12 and not stats.short_queries


def test_relative_margin_against_lowest_positive(setup):
    plain, _, _ = _run(setup, range_min=0, num_negatives=30)
    mined, stats, _ = _run(setup, range_min=0, num_negatives=30, relative_margin=0.05)
    dropped_somewhere = 0
    for before, after in zip(plain, mined):
        pos = min(after.positive_scores)
        limit = pos - abs(pos) * 0.05
        assert all(s <= limit + 1e-6 for s in after.negative_scores)
        # exactly the candidates above the limit disappear, nothing else
        expected = [d for d, s in zip(before.negative_ids, before.negative_scores) if s <= limit]
        assert after.negative_ids == expected[:30]
        dropped_somewhere += len(before.negative_ids) - len(after.negative_ids)
    assert stats.dropped["margin"] == dropped_somewhere > 0


def test_random_sampling_is_seeded(setup):
    a, _, _ = _run(setup, sampling="random", seed=3)
    b, _, _ = _run(setup, sampling="random", seed=3)
    c, _, _ = _run(setup, sampling="random", seed=4)
    top, _, _ = _run(setup)
    assert [m.negative_ids for m in a] == [m.negative_ids for m in b]
    assert [m.negative_ids for m in a] != [m.negative_ids for m in c]
    assert [m.negative_ids for m in a] != [m.negative_ids for m in top]


def test_memory_bounded_chunks_give_same_result(setup):
    whole, _, _ = _run(setup, query_batch_size=256)
    chunked, _, _ = _run(setup, query_batch_size=5)
    assert [m.negative_ids for m in whole] == [m.negative_ids for m in chunked]


def test_written_file_is_flagembedding_layout(setup, tmp_path):
    mined, stats, _ = _run(setup)
    out, stats_path = write_training_jsonl(tmp_path / "mined.jsonl", iter(mined), setup["corpus"], stats)
    rows = [json.loads(line) for line in open(out)]
    assert len(rows) == 12
    assert set(rows[0]) >= {"query", "pos", "neg", "pos_scores", "neg_scores", "query_id", "pos_ids", "neg_ids"}
    examples = list(iter_training_jsonl(out))
    assert len(examples) == 12 and all(len(e.negatives) == 4 for e in examples)
    corpus = setup["corpus"]
    for row in rows:
        assert row["neg"] == [corpus.get(d).full_text for d in row["neg_ids"]]
        assert not set(row["neg"]) & set(row["pos"])
    saved = json.loads(stats_path.read_text())
    assert saved["negatives"] == 48 and saved["settings"]["rows_written"] == 12
    assert sum(saved["rank_histogram"].values()) == 48
    assert not list(tmp_path.glob(".*.tmp"))


def test_text_positives_excluded_by_text(setup, tmp_path):
    """Training files give positives as texts: a corpus document with the same text is never a negative."""
    corpus = setup["corpus"]
    q = TrainingQuery("t0", setup["queries"][0].text, [], [corpus.get("doc0").full_text])
    retriever = DenseRetriever(setup["index"], setup["model"], bf16=False)
    [m] = list(mine([q], corpus, retriever, MiningConfig(k=60, range_min=0, range_max=60, num_negatives=60)))
    assert "doc0" not in m.negative_ids and len(m.negative_ids) == 59
    assert len(m.positive_scores) == 1  # encoded from text


def test_bad_config_is_rejected(setup):
    with pytest.raises(ValueError, match="range_max"):
        MiningConfig(k=10, range_min=0, range_max=50).validate()
    with pytest.raises(ValueError, match="range_min"):
        MiningConfig(k=100, range_min=60, range_max=50).validate()
    with pytest.raises(ValueError, match="relative_margin"):
        MiningConfig(relative_margin=1.5).validate()


@pytest.mark.integration
def test_scifact_train_slice_with_minilm(scifact, minilm_path, tmp_path):
    """Real MiniLM on SciFact train queries (first 30) over a 300-document slice holding their positives."""
    from retriever.modeling import BiEncoder

    full, _ = load_training_queries(scifact, split="train")
    queries = full[:30]
    source = Corpus(scifact / "corpus.jsonl")
    keep = {d for q in queries for d in q.positive_ids} | set(source.ids[:300])
    with open(tmp_path / "corpus.jsonl", "w") as fh:
        for d in source:
            if d.id in keep:
                fh.write(json.dumps({"_id": d.id, "title": d.title, "text": d.text}) + "\n")
    corpus = Corpus(tmp_path / "corpus.jsonl")
    model = BiEncoder.from_pretrained(minilm_path)
    index, store = build_dense(model, corpus, tmp_path)
    lookup = DocEmbeddingLookup.from_store(store, [d for q in queries for d in q.positive_ids])
    config = MiningConfig(k=60, range_min=5, range_max=50, num_negatives=5, relative_margin=0.05)
    stats = MiningStats(num_negatives=5)
    mined = list(mine(queries, corpus, DenseRetriever(index, model, doc_lookup=lookup), config, stats=stats))
    assert len(mined) == 30
    found_at_top = 0
    for m in mined:
        assert not set(m.negative_ids) & set(m.query.positive_ids)
        assert all(5 <= r < 50 for r in m.negative_ranks)
        limit = min(m.positive_scores) * 0.95
        assert all(s <= limit + 1e-6 for s in m.negative_scores)
        found_at_top += min(m.positive_scores) > 0.3  # MiniLM scores SciFact positives well above noise
    assert found_at_top >= 25
    assert stats.negatives >= 100 and stats.dropped["margin"] > 0


# --------------------------------------------------------------------------- issue #13: memory at MS MARCO scale
class _NoCopyIds:
    """An index's ids that refuse to be copied whole (``list(ids)``): only row lookups are allowed."""

    def __init__(self, ids):
        self._ids = ids

    def __len__(self):
        return len(self._ids)

    def __getitem__(self, row):
        if isinstance(row, slice):
            raise AssertionError("slice of the whole id sequence")
        return self._ids[row]

    def __iter__(self):
        raise AssertionError("the index's ids were copied into a list")


class _NoCopyIndex:
    def __init__(self, index):
        self._index, self.ids, self.manifest = index, _NoCopyIds(index.ids), index.manifest

    def search(self, emb, k):
        return self._index.search(emb, k)


def test_dense_retriever_maps_only_returned_rows_to_ids(setup):
    """DenseRetriever used to copy every id of the index into a list (~0.6 GB at MS MARCO's 8.8M)."""
    plain, _, config = _run(setup)
    retriever = DenseRetriever(_NoCopyIndex(setup["index"]), setup["model"], bf16=False, doc_lookup=setup["lookup"])
    mined = list(mine(setup["queries"], setup["corpus"], retriever, config))
    assert [m.negative_ids for m in mined] == [m.negative_ids for m in plain]
    assert [m.negative_scores for m in mined] == [m.negative_scores for m in plain]


def test_qrels_queries_read_positive_texts_per_chunk(setup, tmp_path):
    """Queries from qrels keep positive ids only; mine() reads their texts a chunk at a time, and the rows
    (pos texts, text-duplicate exclusion, positive scores) are what eagerly loaded texts gave."""
    from mining.miner import with_positive_texts

    corpus = setup["corpus"]
    queries, _ = load_training_queries(setup["data"], split="train")
    assert all(q.positive_texts is None for q in queries)
    eager = [with_positive_texts(q, corpus) for q in queries]
    assert all(q.positive_texts == [corpus.get(d).full_text for d in q.positive_ids] for q in eager)
    config = MiningConfig(k=40, range_min=2, range_max=30, num_negatives=4, query_batch_size=5)
    retriever = DenseRetriever(setup["index"], setup["model"], bf16=False, doc_lookup=setup["lookup"])
    lazy_rows = [m.to_row(corpus) for m in mine(queries, corpus, retriever, config)]
    eager_rows = [m.to_row(corpus) for m in mine(eager, corpus, retriever, config)]
    assert lazy_rows == eager_rows and all(r["pos"] for r in lazy_rows)


def test_store_lookup_reads_rows_on_demand_with_identical_scores(setup):
    """Positive scores from the memory-mapped store (nothing gathered up front) equal the in-memory lookup's."""
    from mining.miner import StoreEmbeddingLookup

    lookup = StoreEmbeddingLookup(setup["store"], setup["corpus"])
    assert "doc3" in lookup and "nope" not in lookup
    np.testing.assert_array_equal(lookup.get(["doc3", "doc0"]), setup["lookup"].get(["doc3", "doc0"]))
    config = MiningConfig(k=40, range_min=2, range_max=30, num_negatives=4)
    a = list(mine(setup["queries"], setup["corpus"],
                  DenseRetriever(setup["index"], setup["model"], bf16=False, doc_lookup=lookup), config))
    b, _, _ = _run(setup)
    assert [m.positive_scores for m in a] == [m.positive_scores for m in b]


def test_cross_encoder_scorer_batches_across_queries_with_identical_scores(setup, tmp_path):
    """`--scorer ranker:R`: one length-sorted score_many call per chunk of queries (the device stays busy),
    and the scores written are those of scoring each query alone."""
    from transformers import AutoTokenizer, BertConfig, BertForSequenceClassification

    from mining.filters import CrossEncoderScorer
    from retriever.testing import build_tiny_model

    tiny = build_tiny_model(tmp_path / "tiny")
    BertForSequenceClassification(BertConfig.from_pretrained(tiny, num_labels=1)).save_pretrained(tmp_path / "ce")
    AutoTokenizer.from_pretrained(tiny).save_pretrained(tmp_path / "ce")
    scorer = CrossEncoderScorer(str(tmp_path / "ce"), device="cpu", bf16=False, teacher=True)
    calls = []
    many = scorer.score_many

    def counted(requests):
        calls.append(len(requests))
        return many(requests)

    scorer.score_many = counted
    config = MiningConfig(k=40, range_min=2, range_max=30, num_negatives=4, query_batch_size=5, scorer_threshold=1e9)
    retriever = DenseRetriever(setup["index"], setup["model"], bf16=False, doc_lookup=setup["lookup"])
    mined = list(mine(setup["queries"], setup["corpus"], retriever, config, scorer=scorer))
    assert calls == [5, 5, 2]  # one call per chunk, every query of the chunk in it
    corpus = setup["corpus"]
    for m in mined:
        row = m.to_row(corpus)
        alone = scorer.model.score([(row["query"], p) for p in row["neg"] + row["pos"]], bf16=False)
        np.testing.assert_allclose(row["neg_scores"] + row["pos_scores"], alone, rtol=0, atol=1e-5)
        assert row["retriever_neg_scores"] == m.negative_scores  # teacher: the ranker's scores lead
