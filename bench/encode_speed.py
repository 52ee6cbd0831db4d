"""negatron encode vs sentence-transformers ``SentenceTransformer.encode`` on SciFact (title + text),
same model (all-MiniLM-L6-v2), same max length (256), same process and threads; then the
``negatron encode`` command itself under ``torchrun``, one rank per core (one thread each), timed from
launch to exit (interpreter start-up and model loading included; the in-process rows exclude them).

Prints a Markdown table: docs/s, speed-up, min/mean cosine to the fp32 sentence-transformers
embeddings, and the fraction of the machine's measured bf16 (and fp32) matmul peak reached.

    python bench/encode_speed.py --data ../shared/data/beir/scifact [--stride 1]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch


def matmul_peak(dtype: torch.dtype, n: int = 2048, reps: int = 5) -> float:
    """Best-of-``reps`` FLOP/s of one n x n matmul: the machine's practical GEMM limit for ``dtype``."""
    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    torch.matmul(a, b)  # warm-up
    best = float("inf")
    for _ in range(reps):
        t = time.perf_counter()
        torch.matmul(a, b)
        best = min(best, time.perf_counter() - t)
    return 2 * n ** 3 / best


def linear_flops(config, tokens) -> float:
    """FLOPs of the encoder's linear layers (Q, K, V, output, both FFN matrices) over ``tokens`` token positions:
    2 x their parameters per token."""
    d, ffn = config.hidden_size, config.intermediate_size
    return 2.0 * tokens * config.num_hidden_layers * (4 * d * d + 2 * d * ffn)


def encoder_flops(config, token_counts: np.ndarray) -> float:
    """Useful FLOPs: the linear layers + attention scores and mixing (4 x seq x d per token per layer)."""
    seq = token_counts.astype(np.float64)
    return float(linear_flops(config, seq.sum()) + np.sum(4 * config.num_hidden_layers * seq * seq * config.hidden_size))


def torchrun_encode(model_path: str, corpus, texts: list[str], args) -> np.ndarray:
    """Run the CLI under torchrun on ``texts`` (written as a corpus file when a stride subsets it); float32 on disk."""
    from index.store import EmbeddingStore

    with tempfile.TemporaryDirectory() as tmp:
        source = corpus.path
        if args.stride != 1:
            source = Path(tmp) / "corpus.jsonl"
            source.write_text("".join(json.dumps({"_id": str(i), "title": "", "text": t}) + "\n" for i, t in enumerate(texts)))
        bin_dir = Path(sys.executable).parent  # the venv's torchrun and negatron
        cmd = [str(bin_dir / "torchrun"), "--standalone", f"--nproc-per-node={args.ranks}", "--no-python",
               str(bin_dir / "negatron"), "encode", "--model", model_path, "--corpus", str(source),
               "--output", str(Path(tmp) / "emb"), "--dtype", "float32"]
        env = {**os.environ, "OMP_NUM_THREADS": str(max(1, args.threads // args.ranks))}
        subprocess.run(cmd, check=True, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        return EmbeddingStore.open(Path(tmp) / "emb").load_all().astype(np.float32)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", type=Path, default=Path(__file__).resolve().parents[2] / "shared/data/beir/scifact")
    ap.add_argument("--model", default="sentence-transformers/all-MiniLM-L6-v2")
    ap.add_argument("--stride", type=int, default=1, help="take every n-th document (1 = the whole corpus)")
    ap.add_argument("--st-batch-size", type=int, default=32, help="sentence-transformers' batch (its default: 32)")
    ap.add_argument("--max-length", type=int, default=256)
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    ap.add_argument("--ranks", type=int, default=os.cpu_count(), help="torchrun ranks for the CLI row (0 = skip it)")
    ap.add_argument("--emulated-bf16-stride", type=int, default=0,
                    help="on a CPU without native bf16, also time ST's encode under bf16 autocast (emulated: 5.5x "
                         "slower than fp32 on a Zen 3) on every N-th of the texts, beside ST fp32 on the same "
                         "sample (0 = skip)")
    ap.add_argument("--json", type=Path, help="also write the figures here")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    # an empty cache: the OpenVINO rows pay their model conversion, as a first run would
    os.environ["NEGATRON_CACHE_DIR"] = tempfile.mkdtemp(prefix="negatron-bench-cache-")

    from sentence_transformers import SentenceTransformer

    from index.encode import encode_texts
    from retriever.data import Corpus
    from retriever.modeling import BiEncoder, bf16_supported, default_batch_size
    from retriever.resolve import resolve_model

    corpus = Corpus(args.data / "corpus.jsonl")
    texts = corpus.texts(range(0, len(corpus), args.stride))
    path = resolve_model(args.model)
    st = SentenceTransformer(path, device="cpu")
    st.max_seq_length = args.max_length
    ours = BiEncoder.from_pretrained(path, doc_max_length=args.max_length)
    tokens = np.array([len(x) for x in st.tokenizer(texts, truncation=True, max_length=args.max_length)["input_ids"]])
    flops = encoder_flops(ours.query_model.config, tokens)

    rows = []

    def timed(name, fn):
        t = time.perf_counter()
        emb = fn()
        seconds = time.perf_counter() - t
        rows.append({"system": name, "seconds": seconds, "docs_per_s": len(texts) / seconds, "emb": emb})
        print(f"{name}: {len(texts) / seconds:.1f} docs/s", flush=True)
        return emb

    def st_bf16():
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return st.encode(texts, batch_size=args.st_batch_size, normalize_embeddings=True, convert_to_numpy=True)

    ref = timed(f"sentence-transformers encode, fp32 (its default), batch {args.st_batch_size}",
                lambda: st.encode(texts, batch_size=args.st_batch_size, normalize_embeddings=True, convert_to_numpy=True))
    if bf16_supported("cpu"):
        timed(f"sentence-transformers encode, bf16 autocast, batch {args.st_batch_size}", st_bf16)
    from index.openvino_backend import resolve_backend

    native = bf16_supported("cpu")
    backend = resolve_backend(None, "cpu", native, bulk=True)
    if backend == "openvino":
        timed(f"negatron encode, torch backend (`--backend torch`: {'bf16 autocast' if native else 'fp32'}), "
              f"batch {default_batch_size('cpu')}", lambda: encode_texts(ours, texts, kind="document", backend="torch"))
    default = ("bf16 " if native else "fp32 (no native bf16 on this CPU) ") + (
        "OpenVINO, one stream per core, model conversion included" if backend == "openvino"
        else "autocast" if native else "torch")
    timed(f"negatron encode (default: {default}, batch {default_batch_size('cpu')})",
          lambda: encode_texts(ours, texts, kind="document"))
    if args.ranks > 0:
        timed(f"`torchrun --nproc-per-node {args.ranks} negatron encode` ({args.ranks} ranks x 1 thread, "
              "launch to exit)", lambda: torchrun_encode(path, corpus, texts, args))
    emulated = None
    if not native and args.emulated_bf16_stride > 0:
        sample = texts[::args.emulated_bf16_stride]
        rates = {}
        for name, context in (("fp32", torch.autocast("cpu", enabled=False)),
                              ("bf16", torch.autocast("cpu", dtype=torch.bfloat16))):
            t = time.perf_counter()
            with context:
                st.encode(sample, batch_size=args.st_batch_size, normalize_embeddings=True, convert_to_numpy=True)
            rates[name] = len(sample) / (time.perf_counter() - t)
        emulated = {"stride": args.emulated_bf16_stride, "docs": len(sample), "st_bf16_docs_per_s": rates["bf16"],
                    "st_fp32_docs_per_s": rates["fp32"]}
        print(f"sentence-transformers on every {args.emulated_bf16_stride}th doc ({len(sample)}): bf16 autocast "
              f"(emulated) {rates['bf16']:.2f} docs/s, fp32 {rates['fp32']:.1f} docs/s", flush=True)
    # emulated bf16 is no limit (under 1 GFLOP/s on a Zen 3) and takes minutes to measure
    peak_bf16 = matmul_peak(torch.bfloat16) if native else None
    peak_fp32 = matmul_peak(torch.float32)

    base = rows[0]["docs_per_s"]
    out = {"date": time.strftime("%Y-%m-%d"), "machine": f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, "
           f"torch {torch.__version__}, CPU capability {torch.backends.cpu.get_cpu_capability()}, native bf16 {bf16_supported('cpu')}",
           "docs": len(texts), "mean_tokens": float(tokens.mean()), "gflop_per_doc": flops / len(texts) / 1e9,
           "native_bf16": native, "peak_bf16_gflops": peak_bf16 / 1e9 if peak_bf16 else None, "peak_fp32_gflops": peak_fp32 / 1e9, "rows": [],
           "st_bf16_emulated": emulated}
    print(f"\n{out['machine']}; {len(texts)} docs, mean {tokens.mean():.0f} tokens, {flops / len(texts) / 1e9:.2f} GFLOP/doc; "
          f"matmul peak bf16 {f'{peak_bf16 / 1e9:.0f} GFLOP/s' if peak_bf16 else 'not native'}, fp32 {peak_fp32 / 1e9:.0f} GFLOP/s\n")
    print("| system | docs/s | vs ST fp32 | min cosine to ST fp32 | mean cosine | achieved GFLOP/s | % of bf16 matmul peak | % of fp32 matmul peak |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        cos = np.sum(r["emb"] * ref, axis=1) / (np.linalg.norm(r["emb"], axis=1) * np.linalg.norm(ref, axis=1))
        achieved = flops / r["seconds"]
        r.update(min_cos=float(cos.min()), mean_cos=float(cos.mean()), speedup=r["docs_per_s"] / base,
                 gflops=achieved / 1e9, frac_bf16_peak=achieved / peak_bf16 if peak_bf16 else None,
                 frac_fp32_peak=achieved / peak_fp32)
        of_bf16 = f"{100 * r['frac_bf16_peak']:.0f}%" if peak_bf16 else "–"
        print(f"| {r['system']} | {r['docs_per_s']:.1f} | {r['speedup']:.2f}x | {r['min_cos']:.5f} | {r['mean_cos']:.6f} | "
              f"{r['gflops']:.0f} | {of_bf16} | {100 * r['frac_fp32_peak']:.0f}% |")
        out["rows"].append({k: v for k, v in r.items() if k != "emb"})
    if args.json:
        args.json.write_text(json.dumps(out, indent=2) + "\n")


if __name__ == "__main__":
    main()
