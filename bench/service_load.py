"""Load test of the mining server: N concurrent clients x M requests while an index refresh runs.

Starts `negatron serve` as a subprocess on 127.0.0.1 (a free port), triggers a refresh (re-encode the
corpus, rebuild, swap) once the clients are running, and checks: no failed request, every answer
tagged with a version the server has had. Reports p50/p99 latency and how many requests were answered
while the refresh was in progress. Every loop is bounded; the server is stopped at the end.

    .venv/bin/python bench/service_load.py [--clients 4 --requests 500] [--docs 1000] [--json out.json]
        [--backends auto torch]

``--backends`` runs the whole test once per inference backend (the server's ``NEGATRON_ENCODE_BACKEND``:
queries and the refresh's re-encode both use it); with more than one, the JSON holds one report per
backend under ``runs``.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_DATA = Path(os.environ.get("NEGATRON_SHARED_DATA", ROOT.parent / "shared" / "data")) / "beir" / "scifact"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA, help="BEIR folder (corpus + queries)")
    parser.add_argument("--model", default="sentence-transformers/all-MiniLM-L6-v2")
    parser.add_argument("--docs", type=int, default=1000, help="corpus slice size (first N documents)")
    parser.add_argument("--clients", type=int, default=4)
    parser.add_argument("--requests", type=int, default=500)
    parser.add_argument("--k", type=int, default=50)
    parser.add_argument("--json", type=Path)
    parser.add_argument("--backends", nargs="+", default=["auto"], choices=["auto", "torch", "openvino"],
                        help="inference backend(s) of the server, one load test each")
    args = parser.parse_args()
    runs = [load_test(args, backend) for backend in args.backends]
    ok = all([run.pop("_ok") for run in runs])
    report = runs[0] if len(runs) == 1 else {"runs": runs}
    print(json.dumps(report, indent=2))
    if args.json:
        args.json.write_text(json.dumps(report, indent=2) + "\n")
    sys.exit(0 if ok else 1)


def load_test(args, backend: str) -> dict:
    from index.encode import encode_corpus
    from index.faiss_index import DenseIndex
    from index.openvino_backend import encode_backend, resolve_backend
    from mining.client import MiningClient
    from retriever.data import Corpus, read_queries
    from retriever.modeling import bf16_supported

    tmp = Path(tempfile.mkdtemp(prefix="service-load-"))
    source = Corpus(args.data / "corpus.jsonl")
    with open(tmp / "corpus.jsonl", "w", encoding="utf-8") as fh:
        for doc in source[: args.docs]:
            fh.write(json.dumps({"_id": doc.id, "title": doc.title, "text": doc.text}) + "\n")
    t0 = time.perf_counter()
    with encode_backend(backend):
        store = encode_corpus(args.model, tmp / "corpus.jsonl", tmp / "emb", show_progress=False)
    DenseIndex.build(store, tmp / "index", factory="Flat", metric="ip")
    build_seconds = time.perf_counter() - t0
    queries = list(read_queries(args.data / "queries.jsonl").values())

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    url = f"http://127.0.0.1:{port}"
    server = subprocess.Popen([sys.executable, "-m", "retriever.cli", "serve", "--index", str(tmp / "index"),
                               "--model", args.model, "--corpus", str(tmp / "corpus.jsonl"), "--port", str(port),
                               "--work-dir", str(tmp / "versions")], cwd=ROOT,
                              env={**os.environ, "NEGATRON_ENCODE_BACKEND": backend})
    latencies: list[float] = []
    versions: list[int] = []
    during_refresh = [0]
    failures: list[str] = []
    refreshing = threading.Event()
    try:
        with MiningClient(url, timeout=120) as admin:
            deadline = time.monotonic() + 300
            while True:
                try:
                    admin.health()
                    break
                except Exception:  # noqa: BLE001 - not up yet
                    if server.poll() is not None or time.monotonic() > deadline:
                        raise SystemExit("server did not start")
                    time.sleep(0.5)
            seen_versions = {admin.status()["version"]}

            def client_loop(worker: int) -> None:
                rng = np.random.default_rng(worker)
                with MiningClient(url, timeout=120) as client:
                    for _ in range(args.requests):
                        text = queries[int(rng.integers(len(queries)))]
                        t = time.perf_counter()
                        try:
                            [result] = client.mine([text], k=args.k, range_min=5, num_negatives=5)
                        except Exception as exc:  # noqa: BLE001 - counted, never raised
                            failures.append(repr(exc))
                            continue
                        latencies.append(time.perf_counter() - t)
                        versions.append(result.version)
                        if refreshing.is_set():
                            during_refresh[0] += 1

            threads = [threading.Thread(target=client_loop, args=(i,)) for i in range(args.clients)]
            started = time.perf_counter()
            for t in threads:
                t.start()
            time.sleep(1.0)
            admin.refresh()  # same model: a full re-encode + rebuild + swap
            refreshing.set()
            refresh_started = time.perf_counter()
            refresh_seconds = None
            while any(t.is_alive() for t in threads):
                status = admin.status()
                seen_versions.add(status["version"])
                if refresh_seconds is None and not status["refresh_in_progress"]:
                    refresh_seconds = time.perf_counter() - refresh_started
                    refreshing.clear()
                time.sleep(0.2)
            for t in threads:
                t.join()
            wall = time.perf_counter() - started
            while refresh_seconds is None and time.monotonic() < deadline + 600:
                status = admin.status()
                seen_versions.add(status["version"])
                if not status["refresh_in_progress"]:
                    refresh_seconds = time.perf_counter() - refresh_started
                time.sleep(0.5)
            final = admin.status()
    finally:
        server.terminate()
        server.wait(timeout=30)

    lat = np.asarray(latencies) * 1000
    valid = set(range(1, final["version"] + 1))
    report = {
        "backend": backend, "resolved_backend": resolve_backend(backend, "cpu", bf16_supported("cpu")), "clients": args.clients, "requests_per_client": args.requests, "docs": args.docs, "model": args.model,
        "index_build_seconds": round(build_seconds, 1), "wall_seconds": round(wall, 1),
        "answered": len(latencies), "failed": len(failures), "failures_sample": failures[:3],
        "answered_during_refresh": during_refresh[0], "refresh_seconds": round(refresh_seconds or -1, 1),
        "versions_in_answers": sorted(set(versions)), "final_version": final["version"],
        "all_versions_valid": set(versions) <= valid,
        "p50_ms": round(float(np.percentile(lat, 50)), 1) if len(lat) else None,
        "p99_ms": round(float(np.percentile(lat, 99)), 1) if len(lat) else None,
        "requests_per_second": round(len(latencies) / wall, 1),
        "load_average": os.getloadavg(),
    }
    report["_ok"] = not failures and report["all_versions_valid"] and final["version"] >= 2
    return report


if __name__ == "__main__":
    main()
