"""Paired significance tests over per-query scores of two systems on the same queries."""

from __future__ import annotations

from typing import Mapping

import numpy as np


def paired_randomization_test(a, b, n_resamples: int = 10_000, seed: int = 0) -> float:
    """Two-sided p-value of a mean difference under random swaps of each query's pair of scores
    (Fisher's randomisation test, as in Smucker et al. 2007), via ``scipy.stats.permutation_test``."""
    from scipy.stats import permutation_test

    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if len(a) < 2 or np.allclose(a, b):
        return 1.0
    result = permutation_test((a, b), lambda x, y, axis: np.mean(x - y, axis=axis), permutation_type="samples",
                              vectorized=True, n_resamples=n_resamples, alternative="two-sided", random_state=seed)
    return float(result.pvalue)


def paired_t_test(a, b) -> float:
    """Two-sided p-value of ``scipy.stats.ttest_rel`` (1.0 when the scores are identical)."""
    from scipy.stats import ttest_rel

    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if len(a) < 2 or np.allclose(a, b):
        return 1.0
    return float(ttest_rel(a, b).pvalue)


def compare_per_query(baseline: Mapping[str, Mapping[str, float]], system: Mapping[str, Mapping[str, float]],
                      metric: str = "ndcg@10", n_resamples: int = 10_000, seed: int = 0) -> dict:
    """Paired tests on the queries both runs scored. Returns means, delta, both p-values and n."""
    shared = sorted(set(baseline) & set(system))
    shared = [q for q in shared if metric in baseline[q] and metric in system[q]]
    a = np.array([baseline[q][metric] for q in shared])
    b = np.array([system[q][metric] for q in shared])
    if not shared:
        return {"metric": metric, "n": 0, "baseline": None, "system": None, "delta": None,
                "p_randomization": None, "p_ttest": None}
    return {
        "metric": metric,
        "n": len(shared),
        "baseline": float(a.mean()),
        "system": float(b.mean()),
        "delta": float(b.mean() - a.mean()),
        "p_randomization": paired_randomization_test(b, a, n_resamples=n_resamples, seed=seed),
        "p_ttest": paired_t_test(b, a),
    }
