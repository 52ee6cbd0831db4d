"""FAISS build time, search QPS, recall@10 vs Flat and size for Flat / HNSW32 / IVF on random unit vectors.

Random vectors have no cluster structure, so ANN recall here is a pessimistic floor; speed is representative.

    python bench/index_speed.py --count 5183 --dim 384 --queries 300
"""

from __future__ import annotations

import argparse
import json
import resource
import tempfile
import time
from pathlib import Path

import numpy as np


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--count", type=int, default=5183)
    ap.add_argument("--dim", type=int, default=384)
    ap.add_argument("--queries", type=int, default=300)
    ap.add_argument("--k", type=int, default=100)
    ap.add_argument("--factory", action="append", help='FAISS factory to time (repeatable; default Flat, HNSW32, IVF128,Flat)')
    ap.add_argument("--json", type=Path, help="also write the figures here")
    args = ap.parse_args()
    import faiss

    from index.faiss_index import DenseIndex
    from index.store import EmbeddingStore

    rng = np.random.default_rng(0)
    docs = rng.standard_normal((args.count, args.dim)).astype(np.float32)
    docs /= np.linalg.norm(docs, axis=1, keepdims=True)
    queries = docs[rng.choice(args.count, args.queries, replace=False)] + 0.05 * rng.standard_normal((args.queries, args.dim)).astype(np.float32)
    factories = args.factory or ["Flat", "HNSW32", "IVF128,Flat"]
    if factories[0] != "Flat":
        factories.insert(0, "Flat")  # the exact reference for recall
    print(f"{args.count} x {args.dim} vectors, {args.queries} queries, k={args.k}, faiss threads {faiss.omp_get_max_threads()}")
    print("| factory | build s | search QPS | recall@10 vs Flat | index MB |")
    print("|---|---|---|---|---|")
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "emb"
        folder.mkdir()
        np.save(folder / "shard-00000.npy", docs.astype(np.float16))
        (folder / "ids.txt").write_text("".join(f"d{i}\n" for i in range(args.count)))
        (folder / "manifest.json").write_text(json.dumps({"model": "random", "checkpoint_hash": "-", "dim": args.dim, "count": args.count,
                                                           "dtype": "float16", "shard_size": args.count, "num_shards": 1, "complete": True}))
        store = EmbeddingStore.open(folder)
        exact, rows_out = None, []
        for factory in factories:
            index = DenseIndex.build(store, Path(tmp) / factory.replace(",", "_"), factory=factory)
            index.search(queries[:10], args.k)
            t = time.perf_counter()
            _, rows = index.search(queries, args.k)
            qps = len(queries) / (time.perf_counter() - t)
            exact = rows if exact is None else exact
            recall = np.mean([len(set(a[:10]) & set(b[:10])) / 10 for a, b in zip(rows, exact)])
            mb = index.manifest["index_bytes"] / 2**20
            print(f"| {index.manifest['factory']} | {index.manifest['build_seconds']:.2f} | {qps:.0f} | {recall:.3f} | {mb:.1f} |", flush=True)
            rows_out.append({"factory": index.manifest["factory"], "build_seconds": index.manifest["build_seconds"],
                             "qps": qps, "recall_at_10": float(recall), "index_mb": mb})
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"peak RSS {peak:.0f} MB")
    if args.json:
        args.json.write_text(json.dumps({
            "date": time.strftime("%Y-%m-%d"), "count": args.count, "dim": args.dim, "queries": args.queries, "k": args.k,
            "faiss_threads": faiss.omp_get_max_threads(), "peak_rss_mb": peak, "rows": rows_out}, indent=2) + "\n")


if __name__ == "__main__":
    main()
