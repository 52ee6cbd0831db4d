"""Peak memory of eval.search.exact_search against the size of the embedding matrix.

Usage: python bench/eval_search_memory.py [--docs 200000] [--dim 384] [--queries 2000] [--k 1000]
Prints the matrix size, the extra peak RSS while searching it (matrix input and block-iterator
input), and what a query × corpus score matrix would have needed.
"""

from __future__ import annotations

import argparse
import json
import resource
import time

import numpy as np


def _rss_mb() -> float:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def _peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--docs", type=int, default=200_000)
    parser.add_argument("--dim", type=int, default=384)
    parser.add_argument("--queries", type=int, default=2_000)
    parser.add_argument("--k", type=int, default=1_000)
    parser.add_argument("--mode", choices=["matrix", "blocks"], default="matrix")
    args = parser.parse_args()

    from eval.search import exact_search

    rng = np.random.default_rng(0)
    docs = rng.standard_normal((args.docs, args.dim), dtype=np.float32)
    queries = rng.standard_normal((args.queries, args.dim), dtype=np.float32)
    exact_search(queries[:2], docs[:10], 5)  # load faiss before measuring
    before, peak_before = _rss_mb(), _peak_mb()
    start = time.perf_counter()
    if args.mode == "matrix":
        exact_search(queries, docs, args.k)
    else:
        exact_search(queries, (docs[i:i + 16_384] for i in range(0, args.docs, 16_384)), args.k)
    seconds = time.perf_counter() - start
    matrix_mb = docs.nbytes / 2**20
    extra = max(0.0, _peak_mb() - max(before, peak_before))
    print(json.dumps({
        "mode": args.mode, "docs": args.docs, "dim": args.dim, "queries": args.queries, "k": args.k,
        "embedding_matrix_mb": round(matrix_mb, 1), "rss_before_search_mb": round(before, 1),
        "extra_peak_rss_mb": round(extra, 1), "peak_over_matrix": round((matrix_mb + extra) / matrix_mb, 3),
        "score_matrix_would_be_mb": round(args.queries * args.docs * 4 / 2**20, 1), "search_s": round(seconds, 2)}))


if __name__ == "__main__":
    main()
