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
