import json

import pytest

from retriever.data import (Corpus, DataError, iter_corpus, iter_training_jsonl, iter_triples, load_beir,
                            load_hf_dataset, read_qrels, read_queries, training_examples_from_hf,
                            training_examples_from_qrels)


def lines(path, *rows):
    path.write_text("".join(r + "\n" for r in rows))
    return path


# ------------------------------------------------------------------------------ real files
def test_scifact_corpus_queries_qrels(scifact):
    corpus = Corpus(scifact / "corpus.jsonl")
    assert len(corpus) == 5183
    first = corpus[0]
    assert corpus.get(first.id) == first and corpus.row(first.id) == 0 and first.id in corpus
    assert corpus.texts([0]) == [first.full_text] and first.full_text.startswith(first.title)
    assert sum(1 for _ in iter_corpus(scifact / "corpus.jsonl")) == 5183
    assert len(read_queries(scifact / "queries.jsonl")) == 1109
    train = read_qrels(scifact / "qrels" / "train.tsv")
    assert len(train) == 809 and sum(len(d) for d in train.values()) == 919


def test_load_beir_restricts_queries_to_the_split(scifact):
    ds = load_beir(scifact, "test")
    assert len(ds.queries) == 300 and set(ds.queries) == set(ds.qrels)
    examples = training_examples_from_qrels(ds.queries, ds.qrels, ds.corpus)
    assert len(examples) == 300 and all(e.positives and len(e.positives) == len(e.positive_ids) for e in examples)
    with pytest.raises(DataError, match=r"split 'dev' not found.*test.*train"):
        load_beir(scifact, "dev")


def test_msmarco_samples(shared_data):
    samples = shared_data / "msmarco" / "samples"
    collection = Corpus(samples / "collection.head89.tsv")
    assert len(collection) == 89 and collection.ids[0] == "0"
    triples = list(iter_triples(samples / "triples.train.small.head100.tsv"))
    assert len(triples) == 100 and all(len(t.positives) == len(t.negatives) == 1 for t in triples)
    flag = list(iter_training_jsonl(samples / "flagembedding_msmarco_example.jsonl"))
    assert len(flag) == 10 and all(e.query and e.positives and e.negatives for e in flag)


# ------------------------------------------------------------------------------ malformed input
def test_corpus_errors_name_file_and_line(tmp_path):
    bad_json = lines(tmp_path / "c.jsonl", '{"_id": "a", "text": "x"}', '{"_id": "b", "text": ')
    with pytest.raises(DataError, match=r"c\.jsonl:2: malformed JSON"):
        Corpus(bad_json)
    dup = lines(tmp_path / "d.jsonl", '{"_id": "a", "text": "x"}', '{"_id": "b", "text": "y"}', '{"_id": "a", "text": "z"}')
    with pytest.raises(DataError, match=r"d\.jsonl:3: duplicate document id 'a' \(first seen on line 1\)"):
        Corpus(dup)
    empty = lines(tmp_path / "e.jsonl", '{"_id": "a", "text": "  ", "title": ""}')
    with pytest.raises(DataError, match="empty text and title"):
        Corpus(empty)
    no_tab = lines(tmp_path / "c.tsv", "1\tfine", "2 no tab here")
    with pytest.raises(DataError, match=r"c\.tsv:2: expected `id<TAB>text`"):
        Corpus(no_tab)
    with pytest.raises(DataError, match="unknown corpus format"):
        Corpus(lines(tmp_path / "c.csv", "1,x"))
    with pytest.raises(DataError, match="corpus file not found"):
        Corpus(tmp_path / "missing.jsonl")


def test_corpus_reads_are_thread_safe(tmp_path):
    """The mining service re-encodes the corpus in a thread while the trainer reads negatives from the
    same Corpus: interleaved seek + readline on one file handle once returned half a line."""
    from concurrent.futures import ThreadPoolExecutor

    n = 2000
    corpus = Corpus(lines(tmp_path / "c.jsonl", *(json.dumps({"_id": f"d{i}", "text": f"text {i} " * (i % 40 + 1)})
                                                  for i in range(n))))

    def read_all(offset):
        return all(corpus[(i + offset) % n].id == f"d{(i + offset) % n}" for i in range(n))

    with ThreadPoolExecutor(4) as pool:
        assert all(pool.map(read_all, (0, 500, 1000, 1500)))


def test_corpus_changed_after_indexing_names_the_line(tmp_path):
    path = lines(tmp_path / "c.jsonl", '{"_id": "a", "text": "x"}', '{"_id": "b", "text": "y"}')
    corpus = Corpus(path)
    path.write_text('{"_id": "a", "text": "x"}\n{"_id": "b", "te\n')
    with pytest.raises(DataError, match=r"c\.jsonl:2: malformed JSON.*changed since it was opened"):
        corpus[1]


def test_queries_and_qrels_errors(tmp_path):
    with pytest.raises(DataError, match=r"q\.tsv:2: duplicate query id '1'"):
        read_queries(lines(tmp_path / "q.tsv", "1\tfirst", "1\tsecond"))
    with pytest.raises(DataError, match="query '2' is empty"):
        read_queries(lines(tmp_path / "q2.tsv", "1\tfirst", "2\t  "))
    with pytest.raises(DataError, match=r"r\.tsv:2: expected 2, 3 or 4 columns"):
        read_qrels(lines(tmp_path / "r.tsv", "query-id\tcorpus-id\tscore", "1 2 3 4 5"))
    with pytest.raises(DataError, match="relevance 'high' is not a number"):
        read_qrels(lines(tmp_path / "r2.tsv", "1\t0\t7\thigh"))
    assert read_qrels(lines(tmp_path / "trec.txt", "1 Q0 7 2", "1 Q0 8 0")) == {"1": {"7": 2, "8": 0}}
    assert read_qrels(lines(tmp_path / "pairs.tsv", "1\t7")) == {"1": {"7": 1}}


def test_triples_and_training_jsonl_errors(tmp_path):
    with pytest.raises(DataError, match=r"t\.tsv:1: expected 3 tab-separated columns, found 2"):
        list(iter_triples(lines(tmp_path / "t.tsv", "q\tp")))
    with pytest.raises(DataError, match="empty negative"):
        list(iter_triples(lines(tmp_path / "t2.tsv", "q\tp\t ")))
    with pytest.raises(DataError, match=r'j\.jsonl:1: missing "pos"'):
        list(iter_training_jsonl(lines(tmp_path / "j.jsonl", '{"query": "q", "neg": ["n"]}')))
    with pytest.raises(DataError, match="1 neg_scores for 2 negatives"):
        list(iter_training_jsonl(lines(tmp_path / "j2.jsonl", '{"query": "q", "pos": ["p"], "neg": ["a", "b"], "neg_scores": [1]}')))
    with pytest.raises(DataError, match="2 pos_scores for 1 positives"):
        list(iter_training_jsonl(lines(tmp_path / "j3.jsonl", '{"query": "q", "pos": ["p"], "pos_scores": [1, 2]}')))


def test_training_jsonl_ids_resolve_through_a_corpus(tmp_path):
    corpus = Corpus(lines(tmp_path / "c.jsonl", '{"_id": "7", "title": "T", "text": "seven"}', '{"_id": "8", "text": "eight"}'))
    ex = next(iter_training_jsonl(lines(tmp_path / "j.jsonl", '{"query": "q", "pos": ["7"], "neg": [8]}'), corpus))
    assert ex.positives == ["T seven"] and ex.negatives == ["eight"] and ex.positive_ids == ["7"]
    with pytest.raises(DataError, match="neg id '9' is not in the corpus"):
        list(iter_training_jsonl(lines(tmp_path / "k.jsonl", '{"query": "q", "pos": ["7"], "neg": ["9"]}'), corpus))


def test_tevatron_layout(tmp_path):
    row = {"query_id": "3", "query": "q", "positive_passages": [{"docid": "1", "title": "T", "text": "p"}],
           "negative_passages": [{"docid": "2", "title": "", "text": "n"}]}
    ex = next(iter_training_jsonl(lines(tmp_path / "tev.jsonl", json.dumps(row))))
    assert (ex.query_id, ex.positives, ex.negatives, ex.negative_ids) == ("3", ["T p"], ["n"], ["2"])


def test_hf_dataset_with_column_mapping(tmp_path):
    path = lines(tmp_path / "hf.jsonl", json.dumps({"question": "q1", "answer": "p1", "wrong": ["n1"]}),
                 json.dumps({"question": "q2", "answer": "p2", "wrong": ["n2"]}))
    ds = load_hf_dataset(str(path), columns={"query": "question", "pos": "answer", "neg": "wrong"})
    examples = list(training_examples_from_hf(ds))
    assert [(e.query, e.positives, e.negatives) for e in examples] == [("q1", ["p1"], ["n1"]), ("q2", ["p2"], ["n2"])]
    with pytest.raises(DataError, match=r"columns \['missing'\] not in dataset"):
        load_hf_dataset(str(path), columns={"query": "missing"})
