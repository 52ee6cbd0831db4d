"""Scale rehearsal: every pipeline stage, run as the CLI a user runs, on MS MARCO-shaped files of a chosen size.

No machine here can encode 8.8M passages with MiniLM in reasonable time, so this measures the *system*
(readers, offset indexes, embedding shards, FAISS, mining, the trainer's data path, evaluation), not
the model: a tiny BERT (2 layers, hidden 64, a WordPiece tokenizer trained on the fly) encodes cheaply.

Data: ``collection.tsv``, ``queries.train.tsv``, ``qrels.train.tsv``, ``triples.train.small.tsv``,
``queries.dev.small.tsv``, ``qrels.dev.small.tsv`` in the official formats, generated deterministically
from real text - sentences of the ``../shared/data`` corpora (SciFact abstracts, MS MARCO passages),
recombined 2-3 to a passage (MS MARCO's ~56 words) - and written once to a cache folder
(``$NEGATRON_CACHE_DIR/scale-rehearsal/n<N>``, never inside the repository). Ratios follow MS MARCO:
503k train queries and 6,980 dev queries per 8.84M passages, one positive each; 10 triples per train
query (the official file has ~80).

Per stage and size it records wall time, peak RSS of the whole process tree (polled every 50 ms, and
never below the stage process's own ``VmHWM``; ``ru_maxrss`` would also count the launching
process's RSS), disk written, and between sizes the growth exponents (time ~ N^a, memory ~ N^b).
The memory bound checked is the issue's:
``peak RSS <= 1.5 x fp16 embedding matrix + model + CONSTANT_MIB``.

    .venv/bin/python bench/scale_rehearsal.py --sizes 100000 [1000000] [--steps 200] [--json out.json]
    .venv/bin/python bench/scale_rehearsal.py --sizes 20000 --gpu     # the GPU rows (faiss GPU, CUDA encode)
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Sequence

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("NEGATRON_SHARED_DATA", ROOT.parent / "shared" / "data"))
GENERATOR_VERSION = 1
HIDDEN = 64
# The constant of the memory bound: a Python process with torch, transformers, faiss and the CLI loaded
# (~430 MiB measured for `index build` at 5k passages), plus the trainer's optimizer state, tokenizer and
# batch (~700 MiB measured for `train` at 5k). It does not grow with N. A stage above
# 1.5 x fp16 matrix + model + this constant holds something that grows with N where it should not.
CONSTANT_MIB = 1024
TRAIN_QUERIES_PER_PASSAGE = 502_939 / 8_841_823
DEV_QUERIES_PER_PASSAGE = 6_980 / 8_841_823
TRIPLES_PER_QUERY = 10
# Indexes hold fp16 codes (``SQfp16``: the shards' own values, so the exhaustive one is exact over what
# was stored), as the auto factory does at scale; ``index-flat`` (fp32 ``Flat``, 2x the fp16 matrix by
# construction, over the bound) is measured only when named.
DEFAULT_STAGES = {"read", "encode", "index-exact", "index-ivf", "mine", "train-inbatch", "train-triples", "train-star",
                  "train-adore", "train-ance", "eval", "serve"}


# ------------------------------------------------------------------------------------------ data
def _sentences(shared: Path) -> list[str]:
    """Real sentences from the shared corpora, deduplicated, in a fixed order."""
    sources = [shared / "beir" / "scifact" / "corpus.jsonl", shared / "msmarco" / "dl19-mini-beir" / "corpus.jsonl",
               shared / "msmarco" / "trec-dl-2019" / "collection.dl19-positives.tsv",
               shared / "msmarco" / "samples" / "collection.head89.tsv"]
    texts = []
    for path in sources:
        if not path.is_file():
            continue
        with open(path, encoding="utf-8") as fh:
            for line in fh:
                if path.suffix == ".jsonl":
                    obj = json.loads(line)
                    texts.append(f"{obj.get('title', '')}. {obj.get('text', '')}")
                else:
                    parts = line.rstrip("\n").split("\t")
                    texts.append(parts[1] if len(parts) > 1 else "")
    if not texts:
        raise SystemExit(f"no corpora under {shared}: set NEGATRON_SHARED_DATA to the shared data folder")
    seen, out = set(), []
    for text in texts:
        for s in re.split(r"(?<=[.!?])\s+", re.sub(r"\s+", " ", text)):
            s = s.strip(" .")
            if 4 <= len(s.split()) <= 60 and s not in seen:
                seen.add(s)
                out.append(s + ".")
    return out


def generate(folder: Path, n: int, seed: int = 13) -> dict:
    """MS MARCO-shaped files for ``n`` passages in ``folder`` (reused when already complete)."""
    done = folder / "GENERATED.json"
    if done.is_file():
        meta = json.loads(done.read_text())
        if meta.get("version") == GENERATOR_VERSION and meta.get("passages") == n:
            return meta
    sentences = _sentences(SHARED)
    rng = np.random.default_rng([seed, n])
    counts = rng.integers(2, 4, size=n)                              # 2 or 3 sentences a passage
    picks = rng.integers(0, len(sentences), size=(n, 3))
    folder.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".gen.", dir=folder))

    def passage(pid: int) -> str:
        return " ".join(sentences[j] for j in picks[pid, :counts[pid]].tolist())

    with open(tmp / "collection.tsv", "w", encoding="utf-8") as fh:
        for start in range(0, n, 50_000):
            fh.write("".join(f"{pid}\t{passage(pid)}\n" for pid in range(start, min(n, start + 50_000))))
    n_train = max(64, round(n * TRAIN_QUERIES_PER_PASSAGE))
    n_dev = max(50, round(n * DEV_QUERIES_PER_PASSAGE))
    positives = rng.choice(n, size=n_train + n_dev, replace=False)

    def query(pid: int) -> str:  # 4-8 consecutive words of the positive's first sentence
        words = sentences[int(picks[pid, 0])].rstrip(".").split()
        width = int(rng.integers(4, 9))
        start = int(rng.integers(0, max(1, len(words) - width + 1)))
        return " ".join(words[start:start + width]).lower()

    def write_split(queries_name, qrels_name, qid_base, pids):
        with open(tmp / queries_name, "w", encoding="utf-8") as qf, open(tmp / qrels_name, "w") as rf:
            for i, pid in enumerate(pids.tolist()):
                qf.write(f"{qid_base + i}\t{query(pid)}\n")
                rf.write(f"{qid_base + i}\t0\t{pid}\t1\n")

    write_split("queries.train.tsv", "qrels.train.tsv", 1_000_000, positives[:n_train])
    write_split("queries.dev.small.tsv", "qrels.dev.small.tsv", 9_000_000, positives[n_train:])
    train_q = (tmp / "queries.train.tsv").read_text(encoding="utf-8").splitlines()
    with open(tmp / "triples.train.small.tsv", "w", encoding="utf-8") as fh:
        for i, line in enumerate(train_q):
            q = line.split("\t", 1)[1]
            pos = passage(int(positives[i]))
            for neg in rng.integers(0, n, size=TRIPLES_PER_QUERY).tolist():
                fh.write(f"{q}\t{pos}\t{passage(neg)}\n")
    for f in tmp.iterdir():
        os.replace(f, folder / f.name)
    tmp.rmdir()
    meta = {"version": GENERATOR_VERSION, "passages": n, "train_queries": n_train, "dev_queries": n_dev,
            "triples": n_train * TRIPLES_PER_QUERY, "sentences": len(sentences), "seed": seed,
            "bytes": {f.name: f.stat().st_size for f in folder.iterdir() if f.suffix == ".tsv"}}
    done.write_text(json.dumps(meta, indent=2) + "\n")
    return meta


def tiny_model(cache: Path) -> Path:
    """The rehearsal's 2-layer, hidden-64 BERT with a WordPiece tokenizer trained on the shared sentences."""
    path = cache / f"tiny-bert-h{HIDDEN}"
    if not (path / "config.json").is_file():
        from retriever.testing import build_tiny_model

        sentences = _sentences(SHARED)
        tmp = cache / f".tiny-{os.getpid()}"
        build_tiny_model(tmp, texts=sentences[:30_000], vocab_size=8_000, hidden=HIDDEN, layers=2, heads=2, max_position=512)
        os.replace(tmp, path) if not path.exists() else shutil.rmtree(tmp)
    return path


# ------------------------------------------------------------------------------------------ measuring
def _tree_rss_bytes(pid: int) -> int:
    import psutil

    try:
        root = psutil.Process(pid)
        procs = [root] + root.children(recursive=True)
    except psutil.Error:
        return 0
    total = 0
    for p in procs:
        try:
            total += p.memory_info().rss
        except psutil.Error:
            pass
    return total


def _own_hwm_bytes(pid: int) -> int:
    """The process's own RSS high-water mark since its exec (``VmHWM``). Unlike ``ru_maxrss``, which on
    Linux also records the forking parent's RSS at exec time, this is the stage's own figure."""
    try:
        with open(f"/proc/{pid}/status") as fh:
            for line in fh:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def _du(path: Path) -> int:
    if not path.exists():
        return 0
    if path.is_file():
        return path.stat().st_size
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def _rss_split_mib(pid: int) -> tuple[float, float]:
    """(anonymous, file-backed) resident MiB of one process: heap and arrays vs memory-mapped files."""
    fields = {}
    try:
        with open(f"/proc/{pid}/status") as fh:
            for line in fh:
                if line.startswith(("RssAnon:", "RssFile:")):
                    fields[line.split(":")[0]] = int(line.split()[1]) / 1024
    except OSError:
        pass
    return fields.get("RssAnon", 0.0), fields.get("RssFile", 0.0)


class PeakRSS:
    """Polls a process tree's RSS every 50 ms in a thread (never below the root's own ``VmHWM``).
    ``timeline``: also write a TSV row every 5 s (elapsed s, tree RSS, the root's anonymous and file-backed
    RSS in MiB), so that a stage over its bound shows when, and in which kind of memory, it grew."""

    def __init__(self, pid: int, timeline: Path | None = None):
        self.pid, self.bytes, self._stop = pid, 0, threading.Event()
        self.timeline = timeline
        self._thread = threading.Thread(target=self._poll, daemon=True)
        self._thread.start()

    def _poll(self) -> None:
        started, last = time.monotonic(), -1e9
        out = open(self.timeline, "w") if self.timeline is not None else None
        if out is not None:
            out.write("elapsed_s\ttree_rss_mib\troot_anon_mib\troot_file_mib\n")
        try:
            while not self._stop.is_set():
                tree = _tree_rss_bytes(self.pid)
                self.bytes = max(self.bytes, tree, _own_hwm_bytes(self.pid))
                if out is not None and time.monotonic() - last >= 5:
                    last = time.monotonic()
                    anon, file = _rss_split_mib(self.pid)
                    out.write(f"{last - started:.0f}\t{tree / 2**20:.0f}\t{anon:.0f}\t{file:.0f}\n")
                    out.flush()
                self._stop.wait(0.05)
        finally:
            if out is not None:
                out.close()

    def stop(self) -> int:
        self._stop.set()
        self._thread.join()
        return self.bytes


def run_stage(name: str, cmd: list[str], outputs: list[Path], env: dict, log: Path, timeout: float | None = None) -> dict:
    """Run one stage in a child process; wall time, peak process-tree RSS, disk of its outputs."""
    started = time.perf_counter()
    with open(log, "w") as fh:
        proc = subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT, env=env, cwd=ROOT)
        peak = PeakRSS(proc.pid, timeline=log.with_suffix(".rss.tsv"))
        try:
            _, status, _ = os.wait4(proc.pid, 0) if timeout is None else _wait4_timeout(proc, timeout)
        finally:
            peak.stop()
        proc.returncode = os.waitstatus_to_exitcode(status)
    wall = time.perf_counter() - started
    if proc.returncode != 0:
        tail = log.read_text(errors="replace")[-3000:]
        raise RuntimeError(f"stage {name} failed (exit {proc.returncode}): {' '.join(map(str, cmd))}\n{tail}")
    return {"stage": name, "wall_s": round(wall, 2), "peak_rss_mib": round(peak.bytes / 2**20, 1),
            "disk_mib": round(sum(_du(p) for p in outputs) / 2**20, 2)}


def _wait4_timeout(proc, timeout):
    deadline = time.monotonic() + timeout
    while True:
        pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
        if pid:
            return pid, status, usage
        if time.monotonic() > deadline:
            proc.kill()
            return os.wait4(proc.pid, 0)
        time.sleep(0.05)


def _cli(*args) -> list[str]:
    return [sys.executable, "-c", "import sys; from retriever.cli import main; sys.argv[0] = 'negatron'; main()", *map(str, args)]


_READ_SCRIPT = """
import sys, time
import numpy as np
from retriever.config import DataConfig
from retriever.data import Corpus
from retriever.example_table import TriplesFile
from retriever.train_data import load_examples
folder = sys.argv[1]
corpus = Corpus(folder + '/collection.tsv')                      # builds the shared offset index
rows = np.random.default_rng(0).integers(0, len(corpus), 20000)
assert all(corpus.row(corpus.ids[int(r)]) == int(r) for r in rows[:2000])
texts = corpus.texts(rows)                                         # random-access reads
examples = load_examples(DataConfig(qrels=folder + '/qrels.train.tsv', queries=folder + '/queries.train.tsv',
                                    collection=folder + '/collection.tsv'))
batch = [examples[int(i)] for i in np.random.default_rng(1).integers(0, len(examples), 4096)]
triples = TriplesFile(folder + '/triples.train.small.tsv')        # builds the triples line index
picked = [triples[int(i)] for i in np.random.default_rng(2).integers(0, len(triples), 4096)]
print(len(corpus), len(examples), len(triples), sum(map(len, texts)))
"""


def nlist_for(n: int) -> int:
    """IVF lists: the power of two nearest 4 * sqrt(N), and at least 39 training points a list."""
    nlist = 2 ** round(math.log2(4 * math.sqrt(n)))
    return max(1, min(nlist, n // 39))


DOC_MAX_LENGTH = 128  # the train stages' model.doc_max_length


def _encode_cmd(model: Path, corpus: Path, emb: Path, threads: int, ranks: int,
                max_length: int | None = None, resume: bool = False) -> list[str]:
    """``negatron encode``, or with ``ranks`` > 1 the same command under torchrun (each rank its shards,
    ``threads // ranks`` threads each: two 1-thread ranks keep two cores busier than one 2-thread process).
    ``max_length``: truncate as the train stages do, so that their strategies can reuse the folder.
    ``resume``: keep the shards an interrupted run of the same command finished (``negatron encode``'s resume)."""
    args = ["encode", "--model", model, "--corpus", corpus, "--output", emb, "--batch-size", 256,
            *([] if resume else ["--overwrite"]), "--backend", "torch",
            *(["--max-length", max_length] if max_length else [])]
    if ranks <= 1:
        return _cli(*args)
    bin_dir = Path(sys.executable).parent
    per_rank = max(1, threads // ranks)
    return ["env", f"OMP_NUM_THREADS={per_rank}", f"MKL_NUM_THREADS={per_rank}", str(bin_dir / "torchrun"),
            "--standalone", f"--nproc-per-node={ranks}", "-m", "retriever.cli", *map(str, args)]


def rehearse(n: int, cache: Path, work: Path, steps: int, threads: int, gpu: bool = False,
             stages: Sequence[str] | None = None, timeout: float | None = None, encode_ranks: int = 1,
             mine_limit: int | None = None, reuse_embeddings: bool = False, resume_encode: bool = False,
             resume_mining: bool = False, resume_training: bool = False, resume_refresh: bool = False) -> dict:
    """Run ``stages`` (default :data:`DEFAULT_STAGES`, in plan order; a list given runs in its own order)
    on ``n`` passages. ``resume_encode``: the encode stage keeps the finished shards of an interrupted earlier
    run in ``work`` (its row then says how many it found, and its wall time covers this run only).
    ``resume_mining``: the train-star stage keeps the rows STAR's up-front mining wrote before an interruption
    and its warm-up index (``resumed_queries`` in the row; its checkpoints and logs are cleared).
    ``resume_training``: a train stage whose run folder holds a checkpoint continues from it (``negatron
    train --resume``; ``resumed_from_step`` in the row): ANCE checkpoints every quarter of its steps, so a run
    killed in its refresh, hours of re-encoding at 8.8M, keeps them and the refresh's finished shards.
    ``resume_refresh``: serve keeps the shards its interrupted refresh encoded, and the IVF index it serves
    when a complete one of this size is there (the index-ivf stage is then skipped, its row is an earlier run's)."""
    if reuse_embeddings and {"eval", "mine"} & set(stages or DEFAULT_STAGES):
        # the folder is then encoded at the train stages' length, and eval/mine search it with the model's own
        raise ValueError("--reuse-embeddings encodes the corpus at the train stages' doc_max_length; run eval "
                         "and mine in a rehearsal without it")
    data = cache / f"n{n}"
    t = time.perf_counter()
    meta = generate(data, n)
    gen_s = time.perf_counter() - t
    model = tiny_model(cache)
    work.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads),
               NEGATRON_CACHE_DIR=str(work / "negatron-cache"), TOKENIZERS_PARALLELISM="false",
               NEGATRON_ENCODE_BACKEND="torch", PYTHONPATH=str(ROOT))
    if not gpu:
        env["CUDA_VISIBLE_DEVICES"] = ""
    shutil.rmtree(work / "negatron-cache", ignore_errors=True)  # the read stage times a cold offset index
    want = stages or DEFAULT_STAGES
    nlist = nlist_for(n)
    gpu_flag = "yes" if gpu else "no"
    emb, ix_exact, ix_ivf = work / "emb", work / "ix-exact", work / "ix-ivf"
    mine_queries = data / "queries.train.tsv"
    if mine_limit:  # a slice of the training queries (the row says how many); mining time is linear in them
        mine_queries = work / f"queries.train.first{mine_limit}.tsv"
        with open(data / "queries.train.tsv", encoding="utf-8") as src, open(mine_queries, "w", encoding="utf-8") as dst:
            dst.writelines(line for _, line in zip(range(mine_limit), src))
    qrels_data = {"qrels": data / "qrels.train.tsv", "queries": data / "queries.train.tsv",
                  "collection": data / "collection.tsv"}
    plan = [
        ("read", [sys.executable, "-c", _READ_SCRIPT, data], [work / "negatron-cache"]),
        ("encode", _encode_cmd(model, data / "collection.tsv", emb, threads, encode_ranks,
                               DOC_MAX_LENGTH if reuse_embeddings else None, resume_encode), [emb]),
        ("index-exact", _cli("index", "build", "--embeddings", emb, "--output", ix_exact, "--factory", "SQfp16",
                             "--gpu", gpu_flag), [ix_exact]),
        ("index-flat", _cli("index", "build", "--embeddings", emb, "--output", work / "ix-flat", "--factory", "Flat",
                            "--gpu", gpu_flag), [work / "ix-flat"]),
        ("index-ivf", _cli("index", "build", "--embeddings", emb, "--output", ix_ivf, "--factory",
                           f"IVF{nlist},SQfp16", "--nprobe", 32, "--gpu", gpu_flag), [ix_ivf]),
        ("mine", _cli("mine", "--queries", mine_queries, "--qrels", data / "qrels.train.tsv",
                      "--corpus", data / "collection.tsv", "--index", ix_ivf, "--model", model,
                      "--output", work / "mined.jsonl", "--k", 100, "--range-min", 10, "--range-max", 100,
                      "--num-negatives", 5, "--backend", "torch"), [work / "mined.jsonl"]),
        ("train-inbatch", _train_cmd(work, model, "inbatch", steps, threads, qrels_data), [work / "run-inbatch"]),
        ("train-triples", _train_cmd(work, model, "hard", steps, threads, {"triples": data / "triples.train.small.tsv"}),
         [work / "run-hard"]),
        # ANCE checkpoints every quarter of its steps: its refresh re-encodes the corpus, hours at 8.8M
        *[(f"train-{name}", _train_cmd(work, model, name, steps, threads, qrels_data, options,
                                        save_every=max(1, steps // 4) if name == "ance" else None),
           [work / f"run-{name}"])
          for name, options in _strategy_options(steps, emb if reuse_embeddings else None).items()],
        ("eval", _cli("eval", "msmarco", "--model", model, "--collection", data / "collection.tsv",
                      "--queries", data / "queries.dev.small.tsv", "--qrels", data / "qrels.dev.small.tsv",
                      "--index", ix_exact, "--k", 1000, "--output", work / "eval"), [work / "eval"]),
    ]
    rows = []
    by_name = {name: (name, cmd, outputs) for name, cmd, outputs in plan}
    ordered = [step for step in plan if step[0] in want] if stages is None or isinstance(stages, set) \
        else [by_name[name] for name in stages if name in by_name]
    for name, cmd, outputs in ordered:
        resumed, resumed_key = None, "resumed_shards"
        if name == "encode" and resume_encode:
            resumed = len(list(emb.glob("shard-*.npy"))) if emb.is_dir() else 0
        if name == "train-star" and resume_mining:
            resumed, resumed_key = keep_star_mining(work / "run-star"), "resumed_queries"
        elif name.startswith("train-") and resume_training:
            resumed = newest_checkpoint_step(outputs[0])
            if resumed is not None:
                cmd, resumed_key = [*cmd, "--resume"], "resumed_from_step"
        if name == "index-ivf" and resume_refresh and complete_index(ix_ivf, n):
            print(json.dumps({"stage": name, "kept": str(ix_ivf)}), flush=True)
            continue
        for out in outputs:
            if out.is_dir() and name != "read" and resumed is None:
                shutil.rmtree(out)
        row = run_stage(name, cmd, outputs, env, work / f"{name}.log", timeout=timeout)
        row["passages"] = n
        if resumed is not None:
            row[resumed_key] = resumed
        if name == "mine":
            row["queries"] = sum(1 for _ in open(mine_queries, encoding="utf-8"))
        rows.append(row)
        print(json.dumps(row), flush=True)
    if "serve" in want:
        row = run_serve_stage(work, model, data, ix_ivf, env, resume=resume_refresh)
        row["passages"] = n
        rows.append(row)
        print(json.dumps(row), flush=True)
    model_mib = _du(model) / 2**20
    emb_fp16_mib = n * HIDDEN * 2 / 2**20
    for row in rows:
        # the constant and the model are per role: a torchrun encode runs one interpreter per rank, and ANCE
        # trains and re-encodes the corpus for its in-process mining service at once (two working sets)
        roles = {"encode": max(1, encode_ranks), "train-ance": 2}.get(row["stage"], 1)
        row["roles"] = roles
        row["bound_mib"] = round(memory_bound(emb_fp16_mib, model_mib, roles), 1)
        row["within_bound"] = row["peak_rss_mib"] <= row["bound_mib"]
    return {"passages": n, "data": meta, "generate_s": round(gen_s, 1), "model_mib": round(model_mib, 2),
            "emb_fp16_mib": round(emb_fp16_mib, 2), "nlist": nlist, "rows": rows}


def keep_star_mining(run: Path) -> int:
    """Clear an interrupted train-star run folder except what STAR's up-front mining made (the pool file and
    its done marker, a partial pool, torchrun ranks' blocks, the warm-up index); returns the complete rows
    kept (the whole pool's when its mining had finished)."""
    from retriever.negatives.star import POOL_FILE

    if not run.is_dir():
        return 0
    for entry in run.iterdir():
        if not (entry.name.startswith(POOL_FILE) or entry.name == "star-warmup-index"):
            shutil.rmtree(entry) if entry.is_dir() else entry.unlink()
    for name in (POOL_FILE, POOL_FILE + ".partial"):
        if (run / name).exists():
            with open(run / name, "rb") as fh:
                return sum(1 for line in fh if line.endswith(b"\n"))
    return 0


def newest_checkpoint_step(run: Path) -> int | None:
    """The step of the newest complete checkpoint in a train stage's run folder (None: nothing to resume)."""
    from retriever.checkpoint import list_checkpoints

    found = list_checkpoints(run) if run.is_dir() else []
    return int(found[-1].name.split("-")[-1]) if found else None


def complete_index(folder: Path, n: int) -> bool:
    """Whether ``folder`` holds a finished index of ``n`` vectors (the build writes its folder atomically, so
    one with a manifest is complete; the file's size is checked against it too)."""
    from index.faiss_index import INDEX_FILE

    try:
        manifest = json.loads((folder / "manifest.json").read_text())
        return manifest.get("count") == n and (folder / INDEX_FILE).stat().st_size == manifest.get("index_bytes")
    except (OSError, ValueError):
        return False


def memory_bound(emb_fp16_mib: float, model_mib: float, roles: int = 1) -> float:
    """The issue's bound: 1.5 x the fp16 embedding matrix + (the model + CONSTANT_MIB) per role (a process,
    or a trainer and an encoder sharing one)."""
    return 1.5 * emb_fp16_mib + roles * (model_mib + CONSTANT_MIB)


def _train_cmd(work: Path, model: Path, strategy: str, steps: int, threads: int, data: dict,
               options: dict | None = None, name: str | None = None, save_every: int | None = None) -> list[str]:
    import yaml

    name = name or strategy
    config = {
        "model": {"name": str(model), "query_max_length": 32, "doc_max_length": DOC_MAX_LENGTH},
        "data": {k: str(v) for k, v in data.items()},
        "negatives": {"strategy": strategy, **({"options": options} if options else {})},
        "training": {"learning_rate": 1e-4, "batch_size": 32, "max_steps": steps, "warmup_ratio": 0.1,
                     "bf16": False, "seed": 42, "log_every": 50, "num_threads": threads,
                     **({"save_every": save_every, "keep_last": 1} if save_every else {})},
    }
    path = work / f"train-{name}.yaml"
    path.write_text(yaml.safe_dump(config))
    return _cli("train", "--config", path, "--output", work / f"run-{name}")


# The index-backed strategies at scale: each encodes the corpus itself (STAR's warm-up mining, ADORE's
# frozen document index, ANCE's first index and one refresh inside the stage), with the default
# ``negatives.options.index`` (factory auto: Flat below 1M documents, IVF,SQfp16 from there on).
# ``embeddings``: the encode stage's folder (``--reuse-embeddings``), which the tiny model wrote, as the
# first index's model would: each strategy then skips its own first corpus encode (ANCE's refresh still
# encodes its newer snapshot).
def _strategy_options(steps: int, embeddings: Path | None = None) -> dict[str, dict]:
    index = {"index": {"embeddings": str(embeddings)}} if embeddings is not None else {}
    return {
        "star": {"hard_per_query": 1, "random_per_query": 1, "range_max": 100, **index},
        "adore": {"k": 100, "encode_batch_size": 256, **index},
        "ance": {"k": 100, "refresh_every": max(1, steps // 2), "wait_for_refresh": True, "encode_batch_size": 256,
                 **index},
    }


_SERVE_LOAD_SCRIPT = """
import json, sys, threading, time
import numpy as np
from mining.client import MiningClient
url, queries_path, clients, requests = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
max_refresh_s = float(sys.argv[5])
queries = [line.split('\t', 1)[1].strip() for line in open(queries_path, encoding='utf-8')][:20000]
lat, versions, failures, during = [], [], [], [0]
refreshing, finished = threading.Event(), threading.Event()
with MiningClient(url, timeout=600) as admin:
    deadline = time.monotonic() + 900
    while True:
        try:
            admin.health(); break
        except Exception:
            if time.monotonic() > deadline: raise SystemExit('server did not start')
            time.sleep(0.5)
    def loop(worker):
        rng = np.random.default_rng(worker)
        with MiningClient(url, timeout=600) as c:
            sent = 0
            # `requests` back to back, then one a second for as long as the refresh runs (at 8.8M that is
            # hours: the load must span it, without starving the re-encode of the CPU it shares)
            while sent < requests or not finished.is_set():
                if sent >= requests:
                    time.sleep(1.0)
                sent += 1
                t = time.perf_counter()
                try:
                    [r] = c.mine([queries[int(rng.integers(len(queries)))]], k=50, range_min=5, num_negatives=5)
                except Exception as exc:
                    failures.append(repr(exc)); continue
                lat.append(time.perf_counter() - t); versions.append(r.version)
                if refreshing.is_set(): during[0] += 1
    threads = [threading.Thread(target=loop, args=(i,)) for i in range(clients)]
    for t in threads: t.start()
    time.sleep(1.0)
    admin.refresh(); refreshing.set(); t0 = time.perf_counter(); refresh_s = None
    while refresh_s is None or any(t.is_alive() for t in threads):
        st = admin.status()
        if refresh_s is None and not st['refresh_in_progress'] and st['version'] >= 2:
            refresh_s = time.perf_counter() - t0; refreshing.clear(); finished.set()
        if time.perf_counter() - t0 > max_refresh_s: finished.set(); break
        time.sleep(0.2)
    for t in threads: t.join()
    final = admin.status()
ms = np.asarray(lat) * 1000
print(json.dumps({'answered': len(lat), 'failed': len(failures), 'failures_sample': failures[:3],
                  'answered_during_refresh': during[0], 'refresh_s': round(refresh_s or -1, 1),
                  'final_version': final['version'], 'versions': sorted(set(versions)),
                  'p50_ms': round(float(np.percentile(ms, 50)), 1) if len(ms) else None,
                  'p99_ms': round(float(np.percentile(ms, 99)), 1) if len(ms) else None}))
sys.exit(0 if not failures and final['version'] >= 2 else 1)
"""


def run_serve_stage(work: Path, model: Path, data: Path, index: Path, env: dict, clients: int = 4,
                    requests: int = 200, resume: bool = False, max_refresh_s: float = 12 * 3600) -> dict:
    """``negatron serve`` under load from ``clients`` concurrent clients while one refresh re-encodes the
    corpus, rebuilds and swaps: the server's peak RSS (its process tree) and the load's latencies.
    ``resume``: keep the shards an interrupted run's refresh encoded (the service resumes a build of the same
    weights); the row then says how many, and its times cover this run only."""
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    versions = work / "serve-versions"
    kept = len(list(versions.glob("v*/embeddings/shard-*.npy"))) if resume else None
    if not resume:
        shutil.rmtree(versions, ignore_errors=True)
    server_log = open(work / "serve-server.log", "w")
    server = subprocess.Popen(_cli("serve", "--index", index, "--model", model, "--corpus", data / "collection.tsv",
                                   "--port", port, "--work-dir", versions),
                              stdout=server_log, stderr=subprocess.STDOUT, env=env, cwd=ROOT)
    peak = PeakRSS(server.pid, timeline=work / "serve-server.rss.tsv")
    started = time.perf_counter()
    try:
        load = subprocess.run([sys.executable, "-c", _SERVE_LOAD_SCRIPT, f"http://127.0.0.1:{port}",
                               data / "queries.train.tsv", str(clients), str(requests), str(max_refresh_s)],
                              capture_output=True, text=True, env=env, cwd=ROOT)
    finally:
        peak.stop()
        server.terminate()
        try:
            server.wait(timeout=60)
        except subprocess.TimeoutExpired:
            server.kill()
        server_log.close()
    if load.returncode != 0:
        raise RuntimeError(f"stage serve failed: {load.stdout[-2000:]}{load.stderr[-2000:]}")
    stats = json.loads(load.stdout.strip().splitlines()[-1])
    row = {"stage": "serve + refresh under load", "wall_s": round(time.perf_counter() - started, 2),
           "peak_rss_mib": round(peak.bytes / 2**20, 1), "disk_mib": round(_du(versions) / 2**20, 2), **stats}
    if kept is not None:
        row["resumed_shards"] = kept
    return row


# ------------------------------------------------------------------------------------------ reporting
def exponents(results: list[dict]) -> list[dict]:
    """Growth exponents between consecutive sizes: time ~ N^a, peak RSS ~ N^b."""
    out = []
    for small, big in zip(results, results[1:]):
        ratio = math.log(big["passages"] / small["passages"])
        by_stage = {r["stage"]: r for r in small["rows"]}
        for row in big["rows"]:
            a = by_stage.get(row["stage"])
            if a is None:
                continue
            out.append({"stage": row["stage"], "from": small["passages"], "to": big["passages"],
                        "time_exponent": round(math.log(max(row["wall_s"], 1e-3) / max(a["wall_s"], 1e-3)) / ratio, 2),
                        "rss_exponent": round(math.log(row["peak_rss_mib"] / a["peak_rss_mib"]) / ratio, 2)})
    return out


def markdown(results: list[dict], growth: list[dict]) -> str:
    lines = ["| passages | stage | wall s | peak RSS MiB (tree) | bound MiB (roles) | disk MiB |", "|---|---|---|---|---|---|"]
    for res in results:
        for r in res["rows"]:
            lines.append(f"| {res['passages']:,} | {r['stage']} | {r['wall_s']} | {r['peak_rss_mib']} | {r['bound_mib']} ({r.get('roles', 1)}) | {r['disk_mib']} |")
    if growth:
        lines += ["", "| stage | sizes | time exponent a | RSS exponent b |", "|---|---|---|---|"]
        lines += [f"| {g['stage']} | {g['from']:,} -> {g['to']:,} | {g['time_exponent']} | {g['rss_exponent']} |" for g in growth]
    return "\n".join(lines)


def machine() -> dict:
    cpu = ""
    with open("/proc/cpuinfo") as fh:
        for line in fh:
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    return {"cpu": cpu, "cpus": os.cpu_count(), "python": platform.python_version(),
            "load_avg_1m": round(os.getloadavg()[0], 1), "date": datetime.now(timezone.utc).isoformat(timespec="seconds")}


def main(argv=None) -> int:
    from retriever.quickstart_data import default_cache_dir

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[100_000])
    ap.add_argument("--steps", type=int, default=200, help="training steps per train stage")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--cache", type=Path, default=None, help="generated data + tiny model (default $NEGATRON_CACHE_DIR/scale-rehearsal)")
    ap.add_argument("--work", type=Path, default=None, help="stage outputs (default a temp folder, deleted)")
    ap.add_argument("--stages", nargs="+", default=None, help=f"subset of {sorted(DEFAULT_STAGES)}, plus index-flat (fp32, opt-in)")
    ap.add_argument("--mine-queries", type=int, default=None, help="mine only the first N training queries")
    ap.add_argument("--encode-ranks", type=int, default=1, help="run the encode stage under torchrun with this many ranks")
    ap.add_argument("--gpu", action="store_true", help="let stages see the GPU (faiss GPU builds, CUDA encode)")
    ap.add_argument("--json", type=Path, default=None)
    ap.add_argument("--resume-encode", action="store_true",
                    help="keep the shards an interrupted encode stage finished in --work and encode only the rest")
    ap.add_argument("--resume-mining", action="store_true",
                    help="train-star keeps the rows its up-front mining wrote before an interruption in --work "
                         "(and its warm-up index) and mines only the rest")
    ap.add_argument("--resume-training", action="store_true",
                    help="a train stage whose run folder in --work holds a checkpoint continues from it")
    ap.add_argument("--resume-refresh", action="store_true",
                    help="serve keeps the shards its interrupted refresh encoded in --work, and a complete IVF "
                         "index there (index-ivf is skipped)")
    ap.add_argument("--reuse-embeddings", action="store_true",
                    help="STAR/ADORE/ANCE build their first index from the encode stage's folder "
                         "(negatives.options.index.embeddings) instead of encoding the corpus again")
    args = ap.parse_args(argv)
    for flag in ("resume_encode", "resume_mining", "resume_training", "resume_refresh"):
        if getattr(args, flag) and args.work is None:
            ap.error(f"--{flag.replace('_', '-')} needs --work: the folder of the interrupted run")
    cache = args.cache or default_cache_dir() / "scale-rehearsal"
    cache.mkdir(parents=True, exist_ok=True)
    work_root = args.work or Path(tempfile.mkdtemp(prefix="negatron-rehearsal-"))
    results = []
    try:
        for n in args.sizes:
            results.append(rehearse(n, cache, work_root / f"n{n}", args.steps, args.threads, args.gpu,
                                    args.stages, encode_ranks=args.encode_ranks, mine_limit=args.mine_queries,
                                    reuse_embeddings=args.reuse_embeddings, resume_encode=args.resume_encode,
                                    resume_mining=args.resume_mining, resume_training=args.resume_training,
                                    resume_refresh=args.resume_refresh))
    finally:
        if args.work is None:
            shutil.rmtree(work_root, ignore_errors=True)
    growth = exponents(results)
    report = {"machine": machine(), "constant_mib": CONSTANT_MIB, "results": results, "growth": growth}
    if args.json:
        args.json.write_text(json.dumps(report, indent=2) + "\n")
    print(markdown(results, growth))
    over = [(r["passages"], r["stage"]) for res in results for r in res["rows"] if not r["within_bound"]]
    if over:
        print(f"over the memory bound: {over}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
