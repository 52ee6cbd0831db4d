"""Training data as ids, not texts (issue #13): the tables behind ``load_examples`` and the triples line index."""

import json

import numpy as np
import pytest

from retriever.config import DataConfig
from retriever.data import (Corpus, DataError, iter_training_jsonl, iter_triples, read_qrels, read_queries,
                            training_examples_from_hf, training_examples_from_qrels, load_hf_dataset)
from retriever.example_table import ExampleTable, ExampleView, HFExamples, TriplesFile, table_from_jsonl, table_from_qrels
from retriever.train_data import load_examples, split_dev


def _write(path, rows):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


@pytest.fixture
def corpus(tmp_path):
    return Corpus(_write(tmp_path / "corpus.jsonl", [{"_id": str(i), "title": f"T{i}" if i % 2 else "", "text": f"passage {i}"}
                                                    for i in range(40)]))


def test_jsonl_with_corpus_ids_is_stored_as_rows_and_matches_the_text_reader(tmp_path, corpus):
    rows = [{"query": "q0", "qid": "a", "pos": ["3"], "neg": ["5", 7, "an inline negative"], "neg_scores": [0.5, 0.25, 0.125]},
            {"query": "q1", "pos": ["11"], "neg": []},
            {"query_id": "c", "query": "q2", "positive_passages": [{"docid": "20", "title": "", "text": "passage 20"}],
             "negative_passages": [{"docid": "x9", "title": "t", "text": "not in the corpus"}]}]
    path = _write(tmp_path / "train.jsonl", rows)
    table = table_from_jsonl(path, corpus)
    assert isinstance(table, ExampleTable) and len(table) == 3
    # ids stay ids: four corpus rows, and only the two passages absent from the corpus are kept as text
    assert table.pos_rows.tolist() == [3, 11, 20] and table.neg_rows.tolist()[:2] == [5, 7]
    assert list(table.texts) == ["an inline negative", "t not in the corpus"]
    assert table.positive_rows(0).tolist() == [3] and table.negative_rows(0).tolist() == [5, 7]
    assert list(table) == list(iter_training_jsonl(path, corpus))
    assert table[0].negative_scores == [0.5, 0.25, 0.125] and table[1].negative_scores is None
    assert table[2].negative_ids == ["x9"] and table[0].query_id == "a"
    with pytest.raises(DataError, match=r"bad\.jsonl:1: neg id '99' is not in the corpus"):
        table_from_jsonl(_write(tmp_path / "bad.jsonl", [{"query": "q", "pos": ["1"], "neg": ["99"]}]), corpus)


def test_qrels_table_matches_the_text_examples(tmp_path, corpus):
    queries = read_queries(_write(tmp_path / "q.tsv", ["a\tfirst query", "b\tsecond query", "c\tunjudged"]))
    qrels = read_qrels(_write(tmp_path / "qrels.tsv", ["a\t0\t4\t1", "a\t0\t9\t1", "b\t0\t1\t1", "b\t0\t2\t0"]))
    table = table_from_qrels(queries, qrels, corpus)
    assert table.pos_rows.tolist() == [4, 9, 1] and len(table.texts) == 0
    assert list(table) == training_examples_from_qrels(queries, qrels, corpus)
    assert len(table_from_qrels(queries, qrels, corpus, limit=1)) == 1


def test_triples_are_read_by_line_without_materialising(tmp_path, monkeypatch):
    path = tmp_path / "triples.tsv"
    path.write_bytes(b"q1\tp1\tn1\r\n\nq2\tp2\tn2\n   \nq3\tp3\tn3")  # CRLF, blank lines, no final newline
    triples = TriplesFile(path)
    assert isinstance(triples.offsets, np.memmap) and len(triples) == 3
    assert list(triples) == list(iter_triples(path))
    assert triples[-1].negatives == ["n3"] and [e.query for e in triples[1:]] == ["q2", "q3"]
    import retriever.example_table as et

    monkeypatch.setattr(np, "flatnonzero", lambda *_: pytest.fail("the triples file was rescanned"))
    assert len(et.TriplesFile(path)) == 3
    monkeypatch.undo()
    import pickle

    again = pickle.loads(pickle.dumps(triples))
    assert again[1].positives == ["p2"] and len(pickle.dumps(triples)) < 1000
    bad = _write(tmp_path / "bad.tsv", ["q\tp\tn", "", "q\tp"])
    with pytest.raises(DataError, match=r"bad\.tsv:3: expected 3 tab-separated columns, found 2"):
        TriplesFile(bad)[1]


def test_hf_rows_keep_their_ids(tmp_path):
    path = _write(tmp_path / "hf.jsonl", [{"qid": "q7", "question": "q", "answer": ["p"], "wrong": ["n"],
                                           "pos_ids": ["d1"], "neg_ids": ["d2"]}])
    ds = load_hf_dataset(str(path), columns={"query": "question", "pos": "answer", "neg": "wrong", "query_id": "qid"})
    ex = HFExamples(ds)[0]
    assert (ex.query_id, ex.positive_ids, ex.negative_ids, ex.positives, ex.negatives) == ("q7", ["d1"], ["d2"], ["p"], ["n"])
    assert list(training_examples_from_hf(ds)) == [ex]


def test_load_examples_and_split_dev_are_views(tmp_path, corpus):
    rows = [{"query": f"q{i}", "pos": [str(i)], "neg": [str((i + 1) % 40)]} for i in range(30)]
    cfg = DataConfig(jsonl=str(_write(tmp_path / "t.jsonl", rows)), corpus=str(corpus.path), max_examples=25)
    examples = load_examples(cfg)
    assert len(examples) == 25 and examples[24].query == "q24" and examples[3].positives == ["T3 passage 3"]
    train, dev = split_dev(examples, 0.2, seed=1)
    assert isinstance(train, ExampleView) and isinstance(dev, ExampleView)
    # the same split the list version made: dev = a seeded permutation's first 20 %, both in file order
    order = np.random.default_rng(1).permutation(25)
    dev_rows = sorted(order[:5].tolist())
    assert [e.query for e in dev] == [f"q{i}" for i in dev_rows]
    assert [e.query for e in train] == [f"q{i}" for i in range(25) if i not in dev_rows]
    assert dev[1:][0].query == f"q{dev_rows[1]}"


def test_a_table_of_ids_is_small(tmp_path):
    """1 positive and 20 negatives an example cost ~200 bytes (21 int64 rows + pointers + the query), ~1/35 of
    the texts a list of TrainingExample held (MS MARCO: 503k queries -> ~100 MB instead of ~3.7 GB)."""
    n = 5_000
    corpus = Corpus(_write(tmp_path / "c.tsv", [f"{i}\t{'word ' * 70}{i}" for i in range(n)]))
    rng = np.random.default_rng(0)
    rows = [{"query": f"query {i}", "pos": [str(i)], "neg": [str(int(x)) for x in rng.integers(0, n, 20)]} for i in range(n)]
    table = table_from_jsonl(_write(tmp_path / "t.jsonl", rows), corpus)
    text_bytes = sum(len(corpus[i].full_text) for i in range(n)) * 21
    assert table.nbytes() < 250 * n and table.nbytes() * 30 < text_bytes
    assert table[n - 1].positives == [corpus[n - 1].full_text]
