"""Rerank throughput: negatron's ``Ranker.score`` against sentence-transformers ``CrossEncoder.predict`` on
the same (query, document) pairs, in one run.

Pairs: the first ``--pairs`` (query, document) pairs of a first-stage TREC run over a BEIR folder (by
default bench/ranker_scifact.py's SciFact test top 100). Arms, each after a short warm-up:
negatron bf16 (token-length-sorted batches; its default backend, OpenVINO on a CPU where installed), the same
through torch's bf16 autocast, negatron fp32, ST ``predict`` in its
default fp32, and ST ``predict`` under ``torch.autocast(bfloat16)``. |Δscore| is measured against ST fp32
(and negatron bf16 against ST bf16). Batch size 32 for every arm (ST's default).

    .venv/bin/python bench/rerank_speed.py --ranker runs/ranker-bench/ranker/final
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
SCIFACT = ROOT.parent / "shared" / "data" / "beir" / "scifact"


def load_pairs(run_path: Path, data: Path, n: int) -> list[tuple[str, str]]:
    from eval.metrics import read_trec_run
    from retriever.data import Corpus, read_queries

    run = read_trec_run(run_path)
    queries = read_queries(data / "queries.jsonl")
    corpus = Corpus(data / "corpus.jsonl")
    pairs = []
    for qid, docs in run.items():
        for d in sorted(docs, key=docs.get, reverse=True):
            pairs.append((queries[qid], corpus.get(d).full_text))
            if len(pairs) == n:
                return pairs
    return pairs


def timed(fn, pairs, warmup):
    fn(pairs[:warmup])
    t0 = time.perf_counter()
    out = np.asarray(fn(pairs), dtype=np.float32)
    return out, time.perf_counter() - t0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ranker", required=True)
    parser.add_argument("--run", type=Path, default=ROOT / "runs" / "ranker-bench" / "dev-first-stage.trec")
    parser.add_argument("--data", type=Path, default=SCIFACT)
    parser.add_argument("--pairs", type=int, default=1024)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=2, help="alternating-order rounds; best time per arm")
    parser.add_argument("--output", type=Path, default=ROOT / "bench" / "results" / "rerank_speed.json")
    args = parser.parse_args()

    from sentence_transformers import CrossEncoder

    from ranker_scifact import machine  # bench/ is the script folder, first on sys.path
    from retriever.ranker import Ranker

    pairs = load_pairs(args.run, args.data, args.pairs)
    ours = Ranker.load(args.ranker, device="cpu")
    st = CrossEncoder(str(args.ranker), device="cpu")
    bs, warm = args.batch_size, 2 * args.batch_size

    def st_bf16(p):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return st.predict(p, batch_size=bs, show_progress_bar=False)

    arms = {
        "negatron bf16": lambda p: ours.score(p, batch_size=bs, bf16=True),  # backend auto: OpenVINO on a CPU
        "negatron bf16, torch backend": lambda p: ours.score(p, batch_size=bs, bf16=True, backend="torch"),
        "negatron fp32": lambda p: ours.score(p, batch_size=bs, bf16=False),
        "sentence-transformers fp32 (default)": lambda p: st.predict(p, batch_size=bs, show_progress_bar=False),
        "sentence-transformers bf16 autocast": st_bf16,
    }
    # rounds alternate the arm order and the best time per arm is kept: on a shared machine the load
    # changes from one arm to the next, and a fixed order would hand the quiet moments to one arm
    scores, seconds = {}, {}
    names = list(arms)
    for r in range(args.rounds):
        for name in (names if r % 2 == 0 else names[::-1]):
            scores[name], took = timed(arms[name], pairs, warm)
            seconds[name] = min(took, seconds.get(name, float("inf")))
            print(f"round {r}: {name}: {len(pairs) / took:.1f} pairs/s", flush=True)
    ref, ref_bf16 = scores["sentence-transformers fp32 (default)"], scores["sentence-transformers bf16 autocast"]
    rate = {k: len(pairs) / v for k, v in seconds.items()}
    result = {
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "machine": machine(), "ranker": str(args.ranker),
        "pairs": len(pairs), "batch_size": bs, "rounds": args.rounds, "torch_threads": torch.get_num_threads(),
        "pairs_per_s": {k: round(v, 1) for k, v in rate.items()},
        "speedup_vs_st_fp32": {k: round(v / rate["sentence-transformers fp32 (default)"], 2) for k, v in rate.items()},
        "speedup_vs_st_bf16": {k: round(v / rate["sentence-transformers bf16 autocast"], 2) for k, v in rate.items()},
        "max_abs_delta_vs_st_fp32": {k: float(np.abs(v - ref).max()) for k, v in scores.items()},
        "max_abs_delta_negatron_bf16_vs_st_bf16": float(np.abs(scores["negatron bf16"] - ref_bf16).max()),
        "score_range_st_fp32": [float(ref.min()), float(ref.max())],
    }
    args.output.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
