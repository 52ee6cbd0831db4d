"""False-negative filters and sampling on hand-built candidate lists."""

import numpy as np
import pytest

from mining.filters import filter_candidates, margin_threshold, sample_negatives
from mining.stats import MiningStats

IDS = [f"d{i}" for i in range(10)]
SCORES = np.array([0.95, 0.90, 0.85, 0.80, 0.75, 0.70, 0.65, 0.60, 0.55, 0.50], dtype=np.float32)


def test_margin_threshold_relative_absolute_and_sign():
    assert margin_threshold(0.8, relative_margin=0.05) == pytest.approx(0.76)
    assert margin_threshold(0.8, absolute_margin=0.1) == pytest.approx(0.7)
    # both: the stricter one wins
    assert margin_threshold(0.8, relative_margin=0.05, absolute_margin=0.1) == pytest.approx(0.7)
    # a negative positive score must still give a threshold *below* it
    assert margin_threshold(-2.0, relative_margin=0.1) == pytest.approx(-2.2)
    assert margin_threshold(None, relative_margin=0.1) is None
    assert margin_threshold(0.8) is None


def test_relative_margin_drops_exactly_the_candidates_above_threshold():
    # pos 0.80, 5% -> threshold 0.76: d0..d3 (0.95, 0.90, 0.85, 0.80) go, d4 (0.75) stays
    result = filter_candidates(IDS, SCORES, pos_score=0.80, relative_margin=0.05)
    assert result.dropped["margin"] == 4
    assert [IDS[p] for p in result.kept] == IDS[4:]


def test_absolute_margin_boundary_is_strict():
    # threshold 0.85 - 0.10 = 0.75: a candidate *at* the threshold is kept, above it is dropped
    result = filter_candidates(IDS, SCORES, pos_score=0.85, absolute_margin=0.10)
    kept = [IDS[p] for p in result.kept]
    assert "d4" in kept and "d3" not in kept
    assert result.dropped["margin"] == 4


def test_positives_window_and_margin_each_counted_once():
    result = filter_candidates(IDS, SCORES, exclude_ids={"d1", "d6"}, range_min=2, range_max=8,
                               pos_score=0.80, relative_margin=0.05)
    # excluded: d1, d6; window: d0 (rank 0), d8, d9 (ranks >= 8); margin: d2, d3 (0.85, 0.80 > 0.76)
    assert result.dropped == {"excluded": 2, "rank_window": 3, "margin": 2, "scorer": 0}
    assert [IDS[p] for p in result.kept] == ["d4", "d5", "d7"]
    assert all(2 <= p < 8 for p in result.kept)
    assert sum(result.dropped.values()) + len(result.kept) == len(IDS)


def test_positive_texts_are_excluded_too():
    texts = [f"text {i}" for i in range(10)]
    result = filter_candidates(IDS, SCORES, exclude_texts={"text 3"}, texts=texts)
    assert 3 not in result.kept.tolist() and result.dropped["excluded"] == 1


def test_scorer_only_sees_survivors_and_vetoes_above_threshold():
    seen = []

    def scorer(positions):
        seen.extend(positions.tolist())
        return np.where(positions % 2 == 0, 0.9, 0.1)  # even ranks look relevant to the scorer

    result = filter_candidates(IDS, SCORES, exclude_ids={"d0"}, range_max=6, scorer=scorer, scorer_threshold=0.5)
    assert seen == [1, 2, 3, 4, 5]
    assert result.kept.tolist() == [1, 3, 5]
    assert result.dropped["scorer"] == 2
    assert result.scorer_scores[1] == pytest.approx(0.1)


def test_sampling_top_random_seeded():
    kept = np.array([3, 4, 7, 8, 9, 12])
    assert sample_negatives(kept, 3, "top").tolist() == [3, 4, 7]
    a = sample_negatives(kept, 3, "random", np.random.default_rng(7))
    b = sample_negatives(kept, 3, "random", np.random.default_rng(7))
    assert a.tolist() == b.tolist() and len(set(a.tolist())) == 3 and set(a.tolist()) <= set(kept.tolist())
    assert a.tolist() == sorted(a.tolist())
    draws = {tuple(sample_negatives(kept, 3, "random", np.random.default_rng(s)).tolist()) for s in range(20)}
    assert len(draws) > 1
    assert sample_negatives(kept[:2], 5, "random").tolist() == [3, 4]


def test_stats_histogram_and_short_queries():
    stats = MiningStats(num_negatives=3)
    stats.add("q1", 10, {"excluded": 1, "rank_window": 2, "margin": 0, "scorer": 0}, [10, 11, 25], True)
    stats.add("q2", 10, {"excluded": 0, "rank_window": 5, "margin": 4, "scorer": 0}, [12], True)
    data = stats.to_dict()
    assert data["short_queries"] == ["q2"] and data["negatives"] == 4
    assert data["rank_histogram"]["10-19"] == 3 and data["rank_histogram"]["20-29"] == 1
    assert data["dropped"]["margin"] == 4


def _duplicate_corpus(tmp_path):
    """d0..d5, where d4 is an exact copy of d1's text under another id (as MS MARCO has)."""
    import json

    from retriever.data import Corpus

    texts = ["alpha beta", "the positive passage", "gamma", "delta", "the positive passage", "epsilon"]
    path = tmp_path / "corpus.jsonl"
    path.write_text("".join(json.dumps({"_id": f"d{i}", "title": "", "text": t}) + "\n" for i, t in enumerate(texts)))
    return Corpus(path)


def test_miner_excludes_a_duplicate_of_the_positive_for_every_query(tmp_path):
    # one positive id and one positive text: the old miner skipped the text test in exactly this case
    from mining.miner import MiningConfig, TrainingQuery, _filter

    corpus = _duplicate_corpus(tmp_path)
    q = TrainingQuery("q1", "query", ["d1"], [corpus.get("d1").full_text])
    ids = ["d4", "d1", "d0", "d2", "d3", "d5"]
    config = MiningConfig(k=6, range_min=0, range_max=6, num_negatives=3).validate()
    kept = [ids[p] for p in _filter(q, ids, np.linspace(1, 0, 6, dtype=np.float32), [], corpus, config, None).kept]
    assert "d4" not in kept and "d1" not in kept and kept == ["d0", "d2", "d3", "d5"]


def test_exclude_texts_without_texts_is_refused():
    with pytest.raises(ValueError, match="texts"):
        filter_candidates(IDS, SCORES, exclude_texts={"text 3"})


def test_keep_negatives_shared_filter_positives_by_text_and_margin():
    from mining.filters import MarginFilter, keep_negatives

    texts = [f"text {i}" for i in range(10)]
    texts[5] = "text 0"  # d5 duplicates the positive d0's text
    result = keep_negatives(IDS, SCORES, texts=texts, positive_ids=["d0"], positive_texts=["text 0 "],
                            pos_score=0.80, margins=MarginFilter(relative_margin=0.05), range_max=9)
    # d0 (id) and d5 (text) excluded; d1-d3 above 0.76; d9 outside the window
    assert [IDS[p] for p in result.kept] == ["d4", "d6", "d7", "d8"]
    assert result.dropped == {"excluded": 2, "rank_window": 1, "margin": 3, "scorer": 0}
    with pytest.raises(ValueError):
        MarginFilter(relative_margin=1.5)
    assert not MarginFilter().has_margin and MarginFilter(absolute_margin=0.1).threshold(0.5) == pytest.approx(0.4)


def test_dense_rows_exclude_a_duplicate_of_the_positive_by_text_key(tmp_path, monkeypatch):
    """Dense hits are corpus rows: the text test compares cached text keys, reads no text, and drops what
    comparing the texts drops."""
    from mining.miner import MiningConfig, RowIds, TrainingQuery, _filter
    from retriever.data import Corpus

    corpus = _duplicate_corpus(tmp_path)
    q = TrainingQuery("q1", "query", ["d1"], [corpus.get("d1").full_text + " "])
    hits = RowIds(np.array([4, 1, 0, 2, 3, 5]), corpus.ids)
    monkeypatch.setattr(Corpus, "texts", lambda self, rows: pytest.fail("a candidate's text was read"))
    config = MiningConfig(k=6, range_min=0, range_max=6, num_negatives=3).validate()
    result = _filter(q, hits, np.linspace(1, 0, 6, dtype=np.float32), [], corpus, config, None)
    assert [hits[p] for p in result.kept] == ["d0", "d2", "d3", "d5"] and result.dropped["excluded"] == 2


def test_corpus_text_keys_are_cached_beside_the_offset_index(tmp_path, monkeypatch):
    from retriever.data import Corpus
    from retriever.offset_index import text_key

    corpus = _duplicate_corpus(tmp_path)
    keys = corpus.text_keys([0, 1, 4, 5])
    assert keys.tolist() == [text_key(corpus[r].full_text.strip()) for r in (0, 1, 4, 5)] and keys[1] == keys[2]
    assert (corpus._index.folder / "text_keys.npy").is_file()
    monkeypatch.setattr(Corpus, "__iter__", lambda self: pytest.fail("the keys were computed again"))
    assert Corpus(corpus.path).text_keys([5]).tolist() == [keys[3]]
