"""A negatron-trained cross-encoder reranking zero-shot all-MiniLM-L6-v2's top 100 on SciFact: dev first, test once.

1. Zero-shot MiniLM encodes the 5,183-document corpus once into a Flat index; its top ``--depth`` for the
   held-out dev queries (10 % of SciFact train, ``data.dev_fraction=0.1, dev_seed=0``: the carve-out of
   every bi-encoder config and bench/ablation_scifact.py) and for the test queries is the first stage.
2. ``train_ranker`` trains configs/scifact-ranker.yaml (MiniLM's weights + a fresh one-logit head, listwise
   over the positive + 7 negatives drawn from the same index's top 100 for the training queries) with
   ``--set``-style overrides from the command line; the wall time is recorded.
3. The ranker reranks the dev first stage: nDCG@10 / MRR@10 of the bi-encoder alone and reranked.
   Only with ``--test`` is the test first stage reranked and scored (do that once, after choosing on dev).

    .venv/bin/python bench/ranker_scifact.py --work runs/ranker-bench            # dev only
    .venv/bin/python bench/ranker_scifact.py --work runs/ranker-bench --test     # then test, once

Results go to ``<work>/results.json`` and ``bench/results/ranker_scifact.md``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SCIFACT = ROOT.parent / "shared" / "data" / "beir" / "scifact"
MODEL = "sentence-transformers/all-MiniLM-L6-v2"
METRICS = ("ndcg@10", "mrr@10", "recall@100")


def machine() -> str:
    out = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
    model = next((line.split(":", 1)[1].strip() for line in out.splitlines() if line.startswith("Model name")), "?")
    flags = next((line for line in out.splitlines() if line.startswith("Flags")), "")
    native = [f for f in ("avx512_bf16", "amx_bf16", "avx512f") if f in flags.split()]
    import torch

    return f"{model}, {os.cpu_count()} vCPUs, flags {'+'.join(native) or 'no avx512'}, torch {torch.__version__}"


def first_stage(work: Path, depth: int):
    """(dev queries, dev qrels, test queries, test qrels, dev run, test run, index folder, seconds)."""
    from eval.beir import dense_search, load_model
    from eval.metrics import run_from_arrays
    from index.encode import encode_corpus
    from index.faiss_index import DenseIndex
    from retriever.config import DataConfig
    from retriever.data import load_beir
    from retriever.train_data import load_examples, split_dev

    t0 = time.perf_counter()
    model = load_model(MODEL)
    index = work / "minilm-index"
    test = load_beir(SCIFACT, "test")
    if not index.exists():
        store = encode_corpus(model, test.corpus, work / "minilm-emb", show_progress=False)
        DenseIndex.build(store, index, factory="Flat", metric="ip")
    examples = load_examples(DataConfig(beir=str(SCIFACT), split="train"))
    _, dev = split_dev(examples, 0.1, 0)
    dev = [dev[i] for i in range(len(dev))]
    dev_queries = {e.query_id: e.query for e in dev}
    dev_qrels = {e.query_id: {d: 1 for d in e.positive_ids} for e in dev}
    test_queries = {q: test.queries[q] for q in test.qrels if q in test.queries}
    runs = []
    for queries in (dev_queries, test_queries):
        ids = list(queries)
        scores, rows, doc_ids = dense_search(model, test.corpus, [queries[q] for q in ids], depth, index_dir=index)
        runs.append(run_from_arrays(ids, doc_ids, scores, rows))
    return dev_queries, dev_qrels, test_queries, test.qrels, runs[0], runs[1], index, time.perf_counter() - t0, test.corpus


def scores(qrels, run) -> dict:
    from eval.metrics import compute_metrics

    aggregate, _ = compute_metrics(qrels, run, metrics=METRICS)
    return {m: round(v, 4) for m, v in aggregate.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", type=Path, default=ROOT / "runs" / "ranker-bench")
    parser.add_argument("--depth", type=int, default=100)
    parser.add_argument("--set", dest="overrides", action="append", default=[], help="ranker config override")
    parser.add_argument("--test", action="store_true", help="also rerank and score test (once, after dev)")
    args = parser.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)

    from retriever.ranker import Ranker
    from retriever.ranker_commands import rerank_run
    from retriever.ranker_train import load_ranker_config, train_ranker

    dev_q, dev_qrels, test_q, test_qrels, dev_run, test_run, index, stage1_s, corpus = first_stage(args.work, args.depth)
    print(f"first stage: {stage1_s:.0f}s; dev {len(dev_q)} queries, test {len(test_q)}", flush=True)
    cfg = load_ranker_config(ROOT / "configs" / "scifact-ranker.yaml",
                             [f"negatives.index={index}", "evaluation=null", *args.overrides])
    out = args.work / "ranker"
    t0 = time.perf_counter()
    from retriever.checkpoint import list_checkpoints

    # a time-boxed run killed mid-way continues from its newest checkpoint (same weights as uninterrupted)
    final = out / "final" if (out / "final").exists() else train_ranker(cfg, out, resume=bool(list_checkpoints(out)))
    train_s = time.perf_counter() - t0
    log = [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines() if line.strip()]
    ranker = Ranker.load(final)
    result_path = args.work / "results.json"
    result = json.loads(result_path.read_text()) if result_path.exists() else {}
    result.update({"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "machine": machine(),
                   "config": cfg.model_dump(mode="json"), "depth": args.depth, "first_stage_seconds": round(stage1_s, 1),
                   "train_seconds": round(log[-1]["elapsed"], 1) if log else round(train_s, 1),
                   "train_steps": log[-1]["step"] if log else None,
                   "train_loss_first_last": [log[0]["loss"], log[-1]["loss"]] if log else None})
    t0 = time.perf_counter()
    dev_reranked = rerank_run(ranker, dev_run, dev_q, corpus, args.depth, show_progress=False)
    result["dev"] = {"queries": len(dev_q), "bi-encoder": scores(dev_qrels, dev_run),
                     "reranked": scores(dev_qrels, dev_reranked), "rerank_seconds": round(time.perf_counter() - t0, 1)}
    print("dev", json.dumps(result["dev"]), flush=True)
    from eval.metrics import write_trec_run

    write_trec_run(args.work / "dev-first-stage.trec", dev_run)  # bench/rerank_speed.py's pairs
    if args.test:
        t0 = time.perf_counter()
        test_reranked = rerank_run(ranker, test_run, test_q, corpus, args.depth, show_progress=False)
        result["test"] = {"queries": len(test_q), "bi-encoder": scores(test_qrels, test_run),
                          "reranked": scores(test_qrels, test_reranked),
                          "rerank_seconds": round(time.perf_counter() - t0, 1)}
        print("test", json.dumps(result["test"]), flush=True)
    result_path.write_text(json.dumps(result, indent=2) + "\n")
    write_markdown(result)


def write_markdown(r: dict) -> None:
    rows = []
    for split in ("dev", "test"):
        if split not in r:
            continue
        for name in ("bi-encoder", "reranked"):
            m = r[split][name]
            label = "zero-shot MiniLM" if name == "bi-encoder" else f"+ negatron ranker (top {r['depth']})"
            rows.append(f"| {split} ({r[split]['queries']} q) | {label} | {m['ndcg@10']:.4f} | {m['mrr@10']:.4f} | "
                        f"{m['recall@100']:.4f} |")
    t = r["config"]["training"]
    text = (f"## Cross-encoder ranker on SciFact ({r['date']})\n\n"
            f"Machine: {r['machine']}.\n\n"
            f"Ranker: all-MiniLM-L6-v2 weights + fresh head, listwise over 1 positive + "
            f"{r['config']['negatives']['per_query']} negatives from zero-shot MiniLM's top 100, "
            f"{r['train_steps']} steps x {t['batch_size']} queries, lr {t['learning_rate']}"
            f"{'' if t.get('head_learning_rate') is None else ' (head ' + str(t['head_learning_rate']) + ')'}, max_length "
            f"{r['config']['model']['max_length']}, bf16 {t['bf16']}; training time {r['train_seconds']:.0f} s "
            f"(loss {r['train_loss_first_last'][0]:.3f} -> {r['train_loss_first_last'][1]:.3f}).\n\n"
            f"| split | system | nDCG@10 | MRR@10 | Recall of the top {r['depth']} |\n|---|---|---|---|---|\n" + "\n".join(rows) + "\n")
    (ROOT / "bench" / "results" / "ranker_scifact.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
