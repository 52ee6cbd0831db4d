"""Hard-negative mining speed: `negatron mine` vs sentence-transformers `mine_hard_negatives`.

Same model (all-MiniLM-L6-v2), same data (SciFact train: qrels/train.tsv queries and positives, the full
corpus), same options (5 negatives, ranks 10-50, relative margin 0.05, FAISS). Each tool runs in its own
subprocess, back to back, so wall time and peak RSS (the child's own ru_maxrss) are per tool.

    .venv/bin/python bench/mine_speed.py [--data ../shared/data/beir/scifact] [--json results.json]

negatron runs with its default inference backend (OpenVINO bf16 on CPUs with native bf16 when installed,
its model conversion timed); ``NEGATRON_ENCODE_BACKEND=torch`` times the torch path instead.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_DATA = Path(os.environ.get("NEGATRON_SHARED_DATA", ROOT.parent / "shared" / "data")) / "beir" / "scifact"
OPTIONS = dict(num_negatives=5, range_min=10, range_max=50, relative_margin=0.05)


def run_sentence_transformers(data: Path, workdir: Path) -> dict:
    from datasets import Dataset
    from sentence_transformers import SentenceTransformer
    from sentence_transformers.util import mine_hard_negatives

    from retriever.data import Corpus, read_qrels, read_queries
    from retriever.resolve import resolve_model

    t0 = time.perf_counter()
    corpus = Corpus(data / "corpus.jsonl")
    queries = read_queries(data / "queries.jsonl")
    qrels = read_qrels(data / "qrels" / "train.tsv")
    anchors, positives = [], []
    for qid, judged in qrels.items():
        for did, grade in judged.items():
            if grade > 0:
                anchors.append(queries[qid])
                positives.append(corpus.get(did).full_text)
    dataset = Dataset.from_dict({"anchor": anchors, "positive": positives})
    model = SentenceTransformer(resolve_model("sentence-transformers/all-MiniLM-L6-v2"), device="cpu")
    mined = mine_hard_negatives(dataset, model, corpus=[d.full_text for d in corpus], use_faiss=True, verbose=False,
                                **OPTIONS)
    seconds = time.perf_counter() - t0
    return {"tool": "sentence-transformers mine_hard_negatives", "seconds": seconds, "triplets": len(mined),
            "negatives": len(mined), "queries": len(set(mined["anchor"])), "pairs_in": len(dataset)}


def run_negatron(data: Path, workdir: Path) -> dict:
    from typer.testing import CliRunner

    from retriever.cli import _register_all, app

    _register_all()
    os.environ["NEGATRON_CACHE_DIR"] = str(workdir / "cache")  # empty: an OpenVINO conversion is timed too
    out = workdir / "mined.jsonl"
    args = ["mine", "--queries", str(data), "--split", "train", "--index", str(workdir / "index"),
            "--model", "sentence-transformers/all-MiniLM-L6-v2", "--output", str(out), "--k", "50",
            "--range-min", str(OPTIONS["range_min"]), "--range-max", str(OPTIONS["range_max"]),
            "--num-negatives", str(OPTIONS["num_negatives"]), "--relative-margin", str(OPTIONS["relative_margin"])]
    t0 = time.perf_counter()
    result = CliRunner().invoke(app, args, catch_exceptions=False)
    seconds = time.perf_counter() - t0
    if result.exit_code != 0:
        raise SystemExit(f"negatron mine failed: {result.output}")
    rows = [json.loads(line) for line in open(out)]
    stats = json.loads(out.with_name("mined.stats.json").read_text())
    return {"tool": "negatron mine", "seconds": seconds, "negatives": sum(len(r["neg"]) for r in rows),
            # sentence-transformers writes one (anchor, positive, negative) row per positive x negative
            "triplets": sum(len(r["neg"]) * len(r["pos"]) for r in rows), "queries": len(rows),
            "step_seconds": stats.get("seconds", {})}


def child(tool: str, data: Path) -> None:
    with tempfile.TemporaryDirectory(prefix="mine-speed-") as tmp:
        result = (run_sentence_transformers if tool == "st" else run_negatron)(data, Path(tmp))
    usage = resource.getrusage(resource.RUSAGE_SELF)
    result["peak_rss_mib"] = usage.ru_maxrss / 1024
    # CPU seconds are far less sensitive than wall time to other jobs sharing the machine
    result["cpu_seconds"] = usage.ru_utime + usage.ru_stime
    print("RESULT " + json.dumps(result), flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA)
    parser.add_argument("--json", type=Path, help="also write the results here")
    parser.add_argument("--one", choices=["st", "negatron"], help=argparse.SUPPRESS)
    parser.add_argument("--tools", default="st,negatron", help="comma-separated subset, run in this order")
    args = parser.parse_args()
    if args.one:
        return child(args.one, args.data)
    results = []
    for tool in args.tools.split(","):
        proc = subprocess.run([sys.executable, __file__, "--one", tool, "--data", str(args.data)], cwd=ROOT,
                              capture_output=True, text=True, env={**os.environ, "TOKENIZERS_PARALLELISM": "false"})
        lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
        if proc.returncode != 0 or not lines:
            sys.exit(f"{tool} failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}")
        results.append(json.loads(lines[-1][len("RESULT "):]))
        print(json.dumps(results[-1]), flush=True)
    if len(results) == 2:
        st, ours = results
        print(f"speed-up {st['seconds'] / ours['seconds']:.2f}x; peak RSS {ours['peak_rss_mib']:.0f} vs "
              f"{st['peak_rss_mib']:.0f} MiB")
    if args.json:
        args.json.write_text(json.dumps({"date": time.strftime("%Y-%m-%d"), "cpus": os.cpu_count(),
                                         "load_average": os.getloadavg(), "results": results}, indent=2) + "\n")


if __name__ == "__main__":
    main()
