"""Where the OpenVINO bf16 encoder spends its time: per node type (PERF_COUNT), one stream, one thread,
all-MiniLM-L6-v2 on the longest batches of a SciFact sample. A profiling aid behind docs/benchmarks.md.

    .venv/bin/python bench/profile_openvino.py [--data ../shared/data/beir/scifact] [--stride 16] [--batches 8]
"""

from __future__ import annotations

import argparse
import collections
import json
import sys
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def main() -> None:
    import openvino as ov

    from retriever.modeling import BiEncoder
    from retriever.resolve import resolve_model

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=ROOT.parent / "shared" / "data" / "beir" / "scifact")
    parser.add_argument("--stride", type=int, default=16, help="every Nth document of the corpus")
    parser.add_argument("--batches", type=int, default=8)
    parser.add_argument("--batch-size", type=int, default=16)
    args = parser.parse_args()
    torch.set_num_threads(1)
    model = BiEncoder.from_pretrained(resolve_model("sentence-transformers/all-MiniLM-L6-v2", require=True))
    with open(args.data / "corpus.jsonl", encoding="utf-8") as fh:
        docs = [json.loads(line) for line in fh][::args.stride]
    texts = [(d.get("title", "") + " " + d["text"]).strip() for d in docs]
    enc = model._tokenize_compact(texts, model.doc_max_length)
    order = np.argsort(-enc.lengths, kind="stable")
    batches = [model._pad(enc, order[i:i + args.batch_size]) for i in range(0, len(order), args.batch_size)]
    with torch.no_grad():
        graph = ov.convert_model(model.tower("document").eval(), example_input=dict(model._pad(enc, [order[0], order[-1]])))
    compiled = ov.Core().compile_model(graph, "CPU", {"INFERENCE_NUM_THREADS": 1, "NUM_STREAMS": 1,
                                                      "INFERENCE_PRECISION_HINT": "bf16", "PERF_COUNT": True})
    request = compiled.create_infer_request()
    names = [port.get_any_name() for port in compiled.inputs]
    request.infer({n: batches[0][n].numpy() for n in names})  # warm-up
    per_kind: collections.Counter = collections.Counter()
    for batch in batches[:args.batches]:
        request.infer({n: batch[n].numpy() for n in names})
        for node in request.profiling_info:
            per_kind[(node.node_type, node.exec_type)] += node.real_time.total_seconds()
    total = sum(per_kind.values())
    print(f"{total:.2f} s over {min(args.batches, len(batches))} batches of {args.batch_size}")
    for (kind, kernel), seconds in per_kind.most_common(12):
        print(f"{100 * seconds / total:5.1f} %  {kind:16s} {kernel}")


if __name__ == "__main__":
    main()
