"""Where the encoders spend their time, per kernel, one thread, all-MiniLM-L6-v2 on SciFact: negatron's
OpenVINO encoder per node type (PERF_COUNT) on the longest batches of a sample, and, with ``--peer``,
sentence-transformers' ``encode`` (the mining peer's encoder) per torch operator on the same sample. Each
GEMM kernel's rate is set against the one-thread ``torch.matmul`` limit of the same dtype, measured in the
same run. A profiling aid behind docs/benchmarks.md.

    .venv/bin/python bench/profile_openvino.py [--precision auto|fp32|bf16] [--stride 16] [--batches 8] [--peer]
"""

from __future__ import annotations

import argparse
import collections
import json
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))


def print_table(title: str, seconds_by_kernel: collections.Counter, gemm_keys: set, gemm_flops: float,
                limit: float, top: int) -> dict:
    total = sum(seconds_by_kernel.values())
    gemm_seconds = sum(s for k, s in seconds_by_kernel.items() if k in gemm_keys)
    rate = gemm_flops / gemm_seconds if gemm_seconds else 0.0
    print(f"\n{title}: {total:.2f} s profiled")
    print("| share | node / operator | kernel |\n|---|---|---|")
    for (kind, kernel), seconds in seconds_by_kernel.most_common(top):
        print(f"| {100 * seconds / total:.1f} % | {kind} | {kernel} |")
    print(f"GEMMs of the linear layers: {100 * gemm_seconds / total:.1f} % of the time, {rate / 1e9:.1f} GFLOP/s "
          f"= {100 * rate / limit:.0f} % of the one-thread matmul limit ({limit / 1e9:.1f} GFLOP/s)")
    return {"seconds": total, "gemm_share": gemm_seconds / total, "gemm_gflops": rate / 1e9,
            "gemm_fraction_of_limit": rate / limit,
            "kernels": [{"kind": k, "kernel": e, "share": s / total} for (k, e), s in seconds_by_kernel.most_common(top)]}


def main() -> None:
    import openvino as ov

    from encode_speed import linear_flops, matmul_peak
    from retriever.modeling import BiEncoder, bf16_supported
    from retriever.resolve import resolve_model

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=ROOT.parent / "shared" / "data" / "beir" / "scifact")
    parser.add_argument("--precision", choices=["auto", "fp32", "bf16"], default="auto",
                        help="auto: bf16 where the CPU has it natively, else fp32 (what `negatron encode` picks)")
    parser.add_argument("--stride", type=int, default=16, help="every Nth document of the corpus")
    parser.add_argument("--batches", type=int, default=8)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--peer", action="store_true", help="also profile sentence-transformers' encode (fp32)")
    parser.add_argument("--top", type=int, default=12)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    torch.set_num_threads(1)
    native = bf16_supported("cpu")
    precision = ("bf16" if native else "fp32") if args.precision == "auto" else args.precision
    dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    limit = matmul_peak(dtype)
    path = resolve_model("sentence-transformers/all-MiniLM-L6-v2", require=True)
    model = BiEncoder.from_pretrained(path)
    config = model.query_model.config
    with open(args.data / "corpus.jsonl", encoding="utf-8") as fh:
        docs = [json.loads(line) for line in fh][::args.stride]
    texts = [(d.get("title", "") + " " + d["text"]).strip() for d in docs]
    enc = model._tokenize_compact(texts, model.doc_max_length)
    order = np.argsort(-enc.lengths, kind="stable")
    batches = [model._pad(enc, order[i:i + args.batch_size]) for i in range(0, len(order), args.batch_size)]
    with torch.no_grad():
        graph = ov.convert_model(model.tower("document").eval(), example_input=dict(model._pad(enc, [order[0], order[-1]])))
    compiled = ov.Core().compile_model(graph, "CPU", {"INFERENCE_NUM_THREADS": 1, "NUM_STREAMS": 1,
                                                      "INFERENCE_PRECISION_HINT": "bf16" if precision == "bf16" else "f32",
                                                      "PERF_COUNT": True})
    request = compiled.create_infer_request()
    names = [port.get_any_name() for port in compiled.inputs]
    request.infer({n: batches[0][n].numpy() for n in names})  # warm-up
    per_kind: collections.Counter = collections.Counter()
    padded_tokens = 0
    for batch in batches[:args.batches]:
        request.infer({n: batch[n].numpy() for n in names})
        padded_tokens += batch["input_ids"].numel()
        for node in request.profiling_info:
            per_kind[(node.node_type, node.exec_type)] += node.real_time.total_seconds()
    machine = f"{platform.processor() or platform.machine()}, 1 thread, bf16 native: {native}, {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}"
    print(machine)
    n = min(args.batches, len(batches))
    out = {"machine": machine, "precision": precision, "matmul_limit_gflops": limit / 1e9,
           "openvino": print_table(f"negatron OpenVINO {precision}, {n} longest batches of {args.batch_size}", per_kind,
                                   {k for k in per_kind if k[0] == "FullyConnected"},
                                   linear_flops(config, padded_tokens), limit, args.top)}
    if args.peer:
        from sentence_transformers import SentenceTransformer
        from torch.profiler import ProfilerActivity, profile

        st = SentenceTransformer(str(path), device="cpu")
        st.max_seq_length = model.doc_max_length
        st.encode(texts[:8], batch_size=32)  # warm-up
        # what ST's encode feeds the model: batches of 32 in its own sort order (by `_input_length`, a character
        # count, not tokens), each padded to its longest
        tokens = [len(x) for x in st.tokenizer(texts, truncation=True, max_length=st.max_seq_length)["input_ids"]]
        lengths = [tokens[i] for i in np.argsort([-st._input_length(t) for t in texts], kind="stable")]
        peer_tokens = sum(max(lengths[i:i + 32]) * len(lengths[i:i + 32]) for i in range(0, len(lengths), 32))
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            st.encode(texts, batch_size=32, normalize_embeddings=True)
        per_op: collections.Counter = collections.Counter()
        for event in prof.key_averages():
            per_op[(event.key, "self CPU")] += event.self_cpu_time_total / 1e6
        out["peer"] = print_table(f"sentence-transformers encode fp32, {len(texts)} docs, batch 32", per_op,
                                  {k for k in per_op if k[0] in {"aten::addmm", "aten::mm"}},
                                  linear_flops(config, peer_tokens), limit, args.top)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(out, indent=1) + "\n")


if __name__ == "__main__":
    main()
