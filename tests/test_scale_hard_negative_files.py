"""Readers for sentence-transformers' msmarco-hard-negatives (+ cross-encoder scores) and Tevatron /
FlagEmbedding JSONL with ids (issue #13), on small files written here in the published layouts."""

import gzip
import json
import pickle

import pytest

from retriever.config import DataConfig
from retriever.data import Corpus, DataError
from retriever.example_table import table_from_jsonl
from retriever.hard_negative_files import (is_st_hard_negatives, iter_st_hard_negatives, load_cross_encoder_scores,
                                           table_from_st_hard_negatives)
from retriever.train_data import load_examples


@pytest.fixture
def msmarco(tmp_path):
    (tmp_path / "collection.tsv").write_text("".join(f"{pid}\tpassage number {pid}\n" for pid in range(20)))
    (tmp_path / "queries.train.tsv").write_text("100\twhat is one\n101\twhat is two\n")
    rows = [{"qid": 100, "pos": [1], "neg": {"bm25": [5, 1, 6, 7], "msmarco-distilbert-base-v3": [6, 8, 99]}},
            {"qid": 101, "pos": [2, 3], "neg": {"bm25": [9], "msmarco-distilbert-base-v3": [10, 11]}},
            {"qid": 555, "pos": [4], "neg": {"bm25": [12]}}]  # not in queries.train.tsv: skipped
    with gzip.open(tmp_path / "msmarco-hard-negatives.jsonl.gz", "wt") as fh:
        fh.writelines(json.dumps(r) + "\n" for r in rows)
    ce = {100: {1: 9.0, 5: 1.0, 6: 7.5, 7: -2.0, 8: 0.5, 99: 0.0}, 101: {2: 8.0, 3: 6.0, 9: 2.0, 10: 4.0, 11: -1.0}}
    with gzip.open(tmp_path / "cross-encoder-ms-marco-MiniLM-L-6-v2-scores.pkl.gz", "wb") as fh:
        pickle.dump(ce, fh)
    return tmp_path


def test_st_hard_negatives_stream_and_merge_systems(msmarco):
    path = msmarco / "msmarco-hard-negatives.jsonl.gz"
    assert is_st_hard_negatives(path)
    first = next(iter_st_hard_negatives(path))
    assert (first.qid, first.pos, first.neg["bm25"]) == ("100", ["1"], ["5", "1", "6", "7"])
    from retriever.data import read_queries

    corpus = Corpus(msmarco / "collection.tsv")
    table = table_from_st_hard_negatives(path, read_queries(msmarco / "queries.train.tsv"), corpus)
    assert len(table) == 2 and table.query_ids[0] == "100"
    # merged in file order, the positive and repeats dropped, pid 99 (not in the collection) skipped
    assert table[0].negative_ids == ["5", "6", "7", "8"] and table[0].positives == ["passage number 1"]
    assert table.negative_rows(1).tolist() == [9, 10, 11] and len(table.texts) == 0  # ids, no texts
    only_bm25 = table_from_st_hard_negatives(path, read_queries(msmarco / "queries.train.tsv"), corpus, systems=["bm25"])
    assert only_bm25[1].negative_ids == ["9"]
    with pytest.raises(DataError, match="none of the systems"):
        table_from_st_hard_negatives(path, read_queries(msmarco / "queries.train.tsv"), corpus, systems=["colbert"])


def test_cross_encoder_scores_filter_false_negatives(msmarco):
    from retriever.data import read_queries

    scores = load_cross_encoder_scores(msmarco / "cross-encoder-ms-marco-MiniLM-L-6-v2-scores.pkl.gz")
    corpus = Corpus(msmarco / "collection.tsv")
    table = table_from_st_hard_negatives(msmarco / "msmarco-hard-negatives.jsonl.gz", read_queries(msmarco / "queries.train.tsv"),
                                         corpus, ce_scores=scores, ce_score_margin=3.0)
    # query 100: min positive 9.0 -> keep negatives scoring <= 6.0 (6 at 7.5 is a likely false negative)
    assert table[0].negative_ids == ["5", "7", "8"] and table[0].negative_scores == [1.0, -2.0, 0.5]
    # query 101: min positive 6.0 -> keep <= 3.0
    assert table[1].negative_ids == ["9", "11"] and table[1].positive_scores == [8.0, 6.0]
    keep_all = table_from_st_hard_negatives(msmarco / "msmarco-hard-negatives.jsonl.gz",
                                            read_queries(msmarco / "queries.train.tsv"), corpus, ce_scores=scores,
                                            ce_score_margin=None, max_negatives=2)
    assert keep_all[0].negative_ids == ["5", "6"]
    bad = msmarco / "bad.pkl.gz"
    bad.write_bytes(b"not a pickle")
    with pytest.raises(DataError, match=r"bad\.pkl\.gz: cannot unpickle"):
        load_cross_encoder_scores(bad)


def test_training_config_reads_the_st_file(msmarco):
    cfg = DataConfig(jsonl=str(msmarco / "msmarco-hard-negatives.jsonl.gz"), corpus=str(msmarco / "collection.tsv"),
                     queries=str(msmarco / "queries.train.tsv"))
    examples = load_examples(cfg)
    assert [e.query for e in examples] == ["what is one", "what is two"] and examples[1].positive_ids == ["2", "3"]
    with pytest.raises(ValueError, match="also set data.corpus"):
        load_examples(DataConfig(jsonl=str(msmarco / "msmarco-hard-negatives.jsonl.gz")))


def test_tevatron_aug_and_flagembedding_ids_gz(msmarco):
    corpus = Corpus(msmarco / "collection.tsv")
    tevatron = {"query_id": "100", "query": "what is one",
                "positive_passages": [{"docid": "1", "title": "", "text": "passage number 1"}],
                "negative_passages": [{"docid": str(p), "title": "", "text": f"passage number {p}"} for p in (5, 6)]}
    flag = {"query": "what is two", "pos": ["2"], "neg": ["9", "10"]}
    path = msmarco / "train.jsonl.gz"
    with gzip.open(path, "wt") as fh:
        fh.write(json.dumps(tevatron) + "\n" + json.dumps(flag) + "\n")
    assert not is_st_hard_negatives(path)
    table = table_from_jsonl(path, corpus)
    assert table.pos_rows.tolist() == [1, 2] and table.neg_rows.tolist() == [5, 6, 9, 10] and len(table.texts) == 0
    assert table[0].negatives == ["passage number 5", "passage number 6"] and table[0].query_id == "100"
    assert table[1].negative_ids == ["9", "10"]


def test_tevatron_rows_from_a_hugging_face_dataset(tmp_path):
    from retriever.data import load_hf_dataset
    from retriever.example_table import HFExamples

    row = {"query_id": "100", "query": "what is one",
           "positive_passages": [{"docid": "1", "title": "T", "text": "passage number 1"}],
           "negative_passages": [{"docid": "5", "title": "", "text": "passage number 5"}]}
    path = tmp_path / "aug.jsonl"
    path.write_text(json.dumps(row) + "\n")
    ex = HFExamples(load_hf_dataset(str(path)))[0]
    assert (ex.query_id, ex.positives, ex.positive_ids, ex.negatives, ex.negative_ids) == \
        ("100", ["T passage number 1"], ["1"], ["passage number 5"], ["5"])
