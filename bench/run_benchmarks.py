"""Run the speed benchmarks on this machine and rewrite docs/benchmarks.md's generated tables (`make bench`).

First records the machine (CPU model and the flags that set its GEMM limit, cores, torch, GPU, date) and
measures that limit (``torch.matmul`` 2048², best of 5, fp32 and, where native, bf16, at the benches'
threads). Then runs each bench as its own subprocess, its JSON and log into
``bench/results/<machine-tag>-<date>/``, and after each success rewrites that bench's table in the
machine's section of docs/benchmarks.md (between ``<!-- bench:<tag>:<bench>:begin/end -->`` markers).
Other machines' sections are never touched; a failed bench keeps its previous table and makes the exit
status non-zero. The multi-hour runs (ablation, ranker, scale) run only when named with ``--only``.

    .venv/bin/python bench/run_benchmarks.py [--only encode mine ...] [--dry-run] [--tag NAME]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shlex
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs" / "benchmarks.md"
RESULTS = ROOT / "bench" / "results"
FLAGS = ("avx2", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile")  # what decides the fp32/bf16 GEMM limit
CONTAINER = "machines"  # the docs' region that holds one section per machine


# ---------------------------------------------------------------- the machine


def lscpu() -> dict[str, str]:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
    except FileNotFoundError:  # not Linux: fall back to platform below
        out = ""
    return {k.strip(): v.strip() for k, v in (line.split(":", 1) for line in out.splitlines() if ":" in line)}


def gemm_limits(threads: int, n: int = 2048, reps: int = 5) -> dict[str, float]:
    """GFLOP/s of the best of ``reps`` n×n matmuls; bf16 only where native (emulated bf16 is no limit)."""
    import torch

    from encode_speed import matmul_peak  # bench/ is this script's folder, first on sys.path
    from retriever.modeling import bf16_supported

    torch.set_num_threads(threads)
    limits = {"fp32": matmul_peak(torch.float32, n, reps) / 1e9}
    if bf16_supported("cpu"):
        limits["bf16"] = matmul_peak(torch.bfloat16, n, reps) / 1e9
    return limits


def machine_tag(m: dict) -> str:
    """cpu-model-Ncpu-topflag[-gpu]: the CPU model string alone does not tell Zen 3 from Zen 4 VMs."""
    parts = [m["cpu"], f"{m['cores']}cpu", m["flags"][-1] if m["flags"] else "", m["gpu"] or ""]
    return re.sub(r"[^a-z0-9]+", "-", " ".join(parts).lower()).strip("-")


def record_machine(threads: int, gemm: bool = True) -> dict:
    import torch

    info = lscpu()
    present = set(info.get("Flags", "").split())
    m = {"cpu": info.get("Model name") or platform.processor() or platform.machine(),
         "flags": [f for f in FLAGS if f in present], "cores": os.cpu_count(), "threads": threads,
         "torch": torch.__version__, "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
         "date": time.strftime("%Y-%m-%d", time.gmtime()),
         "started": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
         "load_average": [round(x, 2) for x in os.getloadavg()]}
    m["tag"] = machine_tag(m)
    m["gemm_gflops"] = gemm_limits(threads) if gemm else {}
    return m


def describe(m: dict) -> str:
    flags = "+".join(m["flags"]) or "none of " + ", ".join(FLAGS)
    gemm = ", ".join(f"{k} {v:.0f}" for k, v in m["gemm_gflops"].items())
    return (f"{m['cpu']}, {m['cores']} cores ({m['threads']} threads), flags {flags}, torch {m['torch']}, "
            f"GPU {m['gpu'] or 'none'}; GEMM limit {gemm + ' GFLOP/s' if gemm else 'not measured'}")


# ---------------------------------------------------------------- the benches


@dataclass(frozen=True)
class Bench:
    name: str
    title: str
    script: str  # under bench/ (an absolute path also works: tests use fake scripts)
    args: Callable[[int, Path], list[str]]  # (threads, results folder) -> arguments before the output flag
    columns: tuple[str, ...] = ()
    rows: Callable[[dict], list[list[str]]] | None = None  # None: results kept, no generated table
    output_flag: str | None = "--json"  # None: the bench writes its outputs where its args say
    slow: bool = False  # hours: only with --only
    needs: tuple[str, ...] = ()  # files (relative to the repository) another bench must have made


def pct(x: float) -> str:
    return f"{100 * x:.0f} %"


def encode_rows(r: dict) -> list[list[str]]:
    # no native bf16: emulated bf16 is no limit (runs before 2026-12-07 still measured one and recorded
    # nativeness only inside the machine string)
    native = r["native_bf16"] if "native_bf16" in r else "native bf16 False" not in r["machine"]
    rows = [[x["system"], f"{x['docs_per_s']:.1f}", f"{x['speedup']:.2f}×", f"{x['min_cos']:.5f}",
             f"{x['mean_cos']:.6f}", f"{x['gflops']:.0f}",
             pct(x["frac_bf16_peak"]) if native and x.get("frac_bf16_peak") else "– (not native)",
             pct(x["frac_fp32_peak"])] for x in r["rows"]]
    emulated = r.get("st_bf16_emulated")
    if emulated:  # timed on a sample: its rate is scaled by ST fp32's rate on the whole corpus over the same sample
        rate = emulated["st_bf16_docs_per_s"] * r["rows"][0]["docs_per_s"] / emulated["st_fp32_docs_per_s"]
        rows.append([f"sentence-transformers encode, bf16 autocast (emulated: no native bf16), timed on every "
                     f"{emulated['stride']}th doc ({emulated['docs']}) and scaled by ST fp32's rate on the same sample",
                     f"{rate:.2f}", f"{rate / r['rows'][0]['docs_per_s']:.3f}×", "–", "–", "–", "– (not native)", "–"])
    return rows


def mine_rows(r: dict) -> list[list[str]]:
    base = r["results"][0]["seconds"]  # the first tool run is sentence-transformers, the reference
    return [[x["tool"], f"{x['seconds']:.1f}", f"{x['cpu_seconds']:.0f}", f"{x['peak_rss_mib']:,.0f}",
             str(x["queries"]), f"{x['triplets']:,}", f"{base / x['seconds']:.2f}×"] for x in r["results"]]


def train_rows(r: dict) -> list[list[str]]:
    same = lambda x, key, fmt: format(x[key], fmt) if key in x else "–"  # noqa: E731 - absent before 2026-12-06
    return [[x["precision"], f"{x['sentence_transformers_pairs_per_s']:.2f}", f"{x['negatron_pairs_per_s']:.2f}",
             f"{x['speedup']:.2f}×", same(x, "negatron_checkpoint_attention_dropout_pairs_per_s", ".2f"),
             same(x, "checkpoint_attention_dropout_speedup", ".2f") + "×"] for x in r["rows"]]


def service_rows(report: dict) -> list[list[str]]:
    return [service_row(r) for r in report.get("runs", [report])]  # one run per backend


def service_row(r: dict) -> list[str]:
    versions = ", ".join(map(str, r["versions_in_answers"]))
    backend = r.get("backend", "auto")
    if r.get("resolved_backend") and r["resolved_backend"] != backend:
        backend += f" ({r['resolved_backend']})"
    return [backend, f"{r['answered']:,}", str(r["failed"]), f"{r['answered_during_refresh']:,}",
             versions + (" (all valid)" if r["all_versions_valid"] else " (INVALID)"),
             f"{r['p50_ms']} ms", f"{r['p99_ms']} ms", f"{r['requests_per_second']}", f"{r['refresh_seconds']} s"]


def rerank_rows(r: dict) -> list[list[str]]:
    return [[arm, f"{rate:.1f}", f"{r['speedup_vs_st_fp32'][arm]:.2f}×", f"{r['speedup_vs_st_bf16'][arm]:.2f}×",
             f"{r['max_abs_delta_vs_st_fp32'][arm]:.1e}"] for arm, rate in r["pairs_per_s"].items()]


def index_rows(r: dict) -> list[list[str]]:
    return [[x["factory"], f"{x['build_seconds']:.2f}", f"{x['qps']:.0f}", f"{x['recall_at_10']:.3f}",
             f"{x['index_mb']:.1f}"] for x in r["rows"]]


RANKER = "runs/ranker-bench"  # bench/ranker_scifact.py's default work folder; rerank times its ranker
BENCHES = [
    Bench("encode", "Corpus encoding, SciFact 5,183 docs", "encode_speed.py",
          lambda t, d: ["--threads", str(t), "--emulated-bf16-stride", "648"],
          ("system", "docs/s", "vs ST fp32", "min cosine", "mean cosine", "useful GFLOP/s", "% of bf16 GEMM limit",
           "% of fp32 GEMM limit"), encode_rows),
    Bench("mine", "Hard-negative mining, SciFact train", "mine_speed.py", lambda t, d: [],
          ("tool", "wall s", "CPU s", "peak RSS MiB", "queries with negatives", "triplets", "vs ST wall"), mine_rows),
    Bench("train", "Training throughput, batch 32, max length 256", "train_throughput.py",
          lambda t, d: ["--steps", "10", "--warmup", "2", "--threads", str(t)],
          ("precision", "sentence-transformers pairs/s", "negatron pairs/s", "negatron / ST",
           "negatron, checkpoint attention dropout (ST's recipe) pairs/s", "that / ST"), train_rows),
    Bench("service", "Mining service, 4 clients × 500 requests during a refresh", "service_load.py",
          lambda t, d: ["--clients", "4", "--requests", "500", "--backends", "auto", "torch"],
          ("backend", "answered", "failed", "during the refresh", "versions", "p50", "p99", "req/s", "refresh"), service_rows),
    Bench("rerank", "Rerank throughput, 256 SciFact dev pairs", "rerank_speed.py",
          lambda t, d: ["--ranker", f"{RANKER}/ranker/final", "--run", f"{RANKER}/dev-first-stage.trec",
                        "--pairs", "256"],
          ("arm", "pairs/s", "vs ST fp32", "vs ST bf16", "max abs delta vs ST fp32"), rerank_rows,
          output_flag="--output", needs=(f"{RANKER}/ranker/final", f"{RANKER}/dev-first-stage.trec")),
    Bench("index", "FAISS index, 5,183 × 384 random unit vectors, 300 queries", "index_speed.py", lambda t, d: [],
          ("factory", "build s", "search QPS", "recall@10 vs Flat", "index MiB"), index_rows),
    # the quality runs and the rehearsal: hours each, and their tables are written by hand from their outputs
    Bench("ablation", "SciFact negative-strategy ablation", "ablation_scifact.py",
          lambda t, d: ["--seeds", "42", "43", "44", "--work", str(d / "ablation"), "--output", str(d / "ablation.md")],
          output_flag=None, slow=True),
    Bench("ranker", "SciFact cross-encoder ranker", "ranker_scifact.py", lambda t, d: ["--work", RANKER],
          output_flag=None, slow=True),
    Bench("scale", "Scale rehearsal, 100k passages", "scale_rehearsal.py",
          lambda t, d: ["--sizes", "100000", "--threads", str(t)], slow=True),
]


def command(bench: Bench, threads: int, folder: Path) -> list[str]:
    cmd = [sys.executable, str(ROOT / "bench" / bench.script), *bench.args(threads, folder)]
    return cmd + ([bench.output_flag, str(folder / f"{bench.name}.json")] if bench.output_flag else [])


def shown(cmd: list[str]) -> str:
    """The command as a reader would type it: `python bench/...`, paths relative to the repository."""
    words = ["python", *(os.path.relpath(w, ROOT) if os.path.isabs(w) else w for w in cmd[1:])]
    return shlex.join(words)


# ---------------------------------------------------------------- the Markdown


def markers(name: str) -> tuple[str, str]:
    return f"<!-- bench:{name}:begin -->", f"<!-- bench:{name}:end -->"


def get_block(text: str, name: str) -> str | None:
    begin, end = markers(name)
    i, j = text.find(begin), text.find(end)
    return text[i + len(begin):j].strip("\n") if 0 <= i < j else None


def set_block(text: str, name: str, body: str, insert_at: int | None = None) -> str:
    """Replace the named block's body, or add the block at ``insert_at`` (default: the end)."""
    begin, end = markers(name)
    block = f"{begin}\n{body.strip()}\n{end}"
    i, j = text.find(begin), text.find(end)
    if 0 <= i < j:
        return text[:i] + block + text[j + len(end):]
    if insert_at is None:
        return (text.rstrip("\n") + "\n\n" if text.strip() else "") + block + "\n"
    return text[:insert_at] + block + "\n\n" + text[insert_at:]


def table(columns: tuple[str, ...], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    return "\n".join(lines + ["| " + " | ".join(row) + " |" for row in rows])


def bench_section(bench: Bench, result: dict, m: dict, cmd: list[str]) -> str:
    # each table carries its own machine line and date: `--only` refreshes one table of a section at a time
    return (f"#### {bench.title} (`bench/{Path(bench.script).name}`), {m['started']}\n\n"
            f"`{shown(cmd)}` on {describe(m)}.\n\n{table(bench.columns, bench.rows(result))}")


def machine_head(m: dict, folder: Path) -> str:
    return (f"### {m['cpu']}, {m['cores']} cores, {'+'.join(m['flags']) or 'no AVX2/AVX-512/AMX'}"
            f"{', ' + m['gpu'] if m['gpu'] else ''} (`{m['tag']}`), last run {m['date']}\n\n"
            f"{describe(m)} (`torch.matmul` 2048², best of 5); load average at the start "
            f"{', '.join(map(str, m['load_average']))}. Raw outputs: `{os.path.relpath(folder, ROOT)}/`.")


def update_doc(text: str, m: dict, folder: Path, tables: dict[str, str]) -> str:
    """Rewrite this machine's head and the given bench tables; every other block stays byte for byte."""
    if get_block(text, CONTAINER) is None:
        text = set_block(text, CONTAINER, "")
    section = get_block(text, m["tag"]) or ""
    section = set_block(section, f"{m['tag']}:head", machine_head(m, folder))
    for name, body in tables.items():
        section = set_block(section, f"{m['tag']}:{name}", body)
    # a new machine goes first in the container: the newest hardware is what a reader looks for
    begin = markers(CONTAINER)[0]
    return set_block(text, m["tag"], section, insert_at=text.find(begin) + len(begin) + 1)


# ---------------------------------------------------------------- running


def run_one(bench: Bench, cmd: list[str], folder: Path, threads: int) -> str | None:
    """Run one bench; None on success, else why it failed (the log keeps its output)."""
    log, out = folder / f"{bench.name}.log", folder / f"{bench.name}.json"
    started = time.time()
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "TOKENIZERS_PARALLELISM": "false"}
    with open(log, "w") as fh:
        code = subprocess.run(cmd, cwd=ROOT, env=env, stdout=fh, stderr=subprocess.STDOUT).returncode
    if code != 0:
        return f"exit {code}, see {os.path.relpath(log, ROOT)}"
    # a same-day earlier run's JSON may be there: only one written by this run counts
    if bench.output_flag and not (out.is_file() and out.stat().st_mtime >= started - 1):
        return f"wrote no {bench.name}.json, see {os.path.relpath(log, ROOT)}"
    return None


def selected(only: list[str] | None) -> list[Bench]:
    return [b for b in BENCHES if b.name in only] if only else [b for b in BENCHES if not b.slow]


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    names = [b.name for b in BENCHES]
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                 epilog="slow, only with --only: " + ", ".join(b.name for b in BENCHES if b.slow))
    ap.add_argument("--only", nargs="+", choices=names, metavar="NAME", help=f"run these only ({', '.join(names)})")
    ap.add_argument("--dry-run", action="store_true", help="print the commands, run nothing, write nothing")
    ap.add_argument("--threads", type=int, default=os.cpu_count(), help="torch/OpenMP threads of every bench")
    ap.add_argument("--tag", help="the machine's name in docs and results (default: from CPU, cores, flags, GPU)")
    ap.add_argument("--docs", type=Path, default=DOCS)
    ap.add_argument("--results", type=Path, default=RESULTS)
    return ap.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    m = record_machine(args.threads, gemm=not args.dry_run)
    m["tag"] = args.tag or m["tag"]
    folder = args.results / f"{m['tag']}-{m['date']}"
    print(f"machine {m['tag']}: {describe(m)}", flush=True)
    benches = selected(args.only)
    if args.dry_run:
        for b in benches:
            print(shown(command(b, args.threads, folder)))
        return 0
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "machine.json").write_text(json.dumps(m, indent=2) + "\n")
    failed, skipped = {}, []
    for i, b in enumerate(benches, 1):
        cmd = command(b, args.threads, folder)
        missing = [p for p in b.needs if not (ROOT / p).exists()]
        if missing:
            skipped.append(b.name)
            print(f"[{i}/{len(benches)}] {b.name}: SKIPPED, needs {', '.join(missing)} (`--only ranker` makes them)")
            continue
        print(f"[{i}/{len(benches)}] {b.name}: {shown(cmd)}", flush=True)
        t0 = time.perf_counter()
        error = run_one(b, cmd, folder, args.threads)
        if error is None and b.rows is not None:
            try:  # a result the table cannot read is a failure of that bench, not of the run
                section = bench_section(b, json.loads((folder / f"{b.name}.json").read_text()), m, cmd)
                args.docs.write_text(update_doc(args.docs.read_text(), m, folder, {b.name: section}))
            except (KeyError, TypeError, ValueError, IndexError) as exc:
                error = f"unreadable result: {exc!r}"
        if error:
            failed[b.name] = error
        print(f"    {'FAILED: ' + error if error else 'ok'} ({time.perf_counter() - t0:.0f} s)", flush=True)
    for name, error in failed.items():
        print(f"FAILED {name}: {error}", file=sys.stderr)
    # a bench named with --only that could not run is a failure; in the default set it is a note
    return 1 if failed or (args.only and skipped) else 0


if __name__ == "__main__":
    sys.exit(main())
