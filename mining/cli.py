"""`negatron mine` (offline hard-negative mining) and `negatron serve` (the mining service)."""

from __future__ import annotations

from enum import Enum
from pathlib import Path
from typing import Optional

import typer


class Sampling(str, Enum):
    top = "top"
    random = "random"


class ScorerType(str, Enum):
    cross_encoder = "cross-encoder"
    bi_encoder = "bi-encoder"
    ranker = "ranker"  # a cross-encoder whose scores become the rows' pos_scores/neg_scores (teacher)


def _fail(message: str) -> None:
    from rich.console import Console

    Console(stderr=True).print(f"[bold red]error:[/] {message}", highlight=False)
    raise typer.Exit(2)


def mine_command(
    queries: Path = typer.Option(..., "--queries", help="BEIR folder, queries file (+ --qrels), training JSONL or triples TSV"),
    output: Path = typer.Option(..., "--output", help="training JSONL to write (stats go to <name>.stats.json)"),
    index: Optional[Path] = typer.Option(None, "--index", help="dense index folder (built from --model if absent)"),
    model: Optional[str] = typer.Option(None, "--model", help="bi-encoder that built --index (path or packaged name)"),
    bm25: Optional[Path] = typer.Option(None, "--bm25", help="BM25 (Lucene) index folder, instead of --index"),
    qrels: Optional[Path] = typer.Option(None, "--qrels", help="relevance judgements for a queries file"),
    corpus: Optional[Path] = typer.Option(None, "--corpus", help="corpus.jsonl / collection.tsv (default: the BEIR folder's)"),
    split: str = typer.Option("train", "--split", help="qrels split of a BEIR folder"),
    k: int = typer.Option(200, "--k", help="candidates retrieved per query"),
    range_min: int = typer.Option(10, "--range-min", help="first rank (0-based) a negative may have"),
    range_max: int = typer.Option(200, "--range-max", help="negatives come from ranks below this"),
    num_negatives: int = typer.Option(5, "--num-negatives", help="negatives per query"),
    sampling: Sampling = typer.Option(Sampling.top, "--sampling", help="top: best-ranked survivors; random: seeded sample"),
    relative_margin: Optional[float] = typer.Option(None, "--relative-margin", help="drop candidates above pos - |pos| x margin"),
    absolute_margin: Optional[float] = typer.Option(None, "--absolute-margin", help="drop candidates above pos - margin"),
    scorer: Optional[str] = typer.Option(None, "--scorer", help="cross-encoder or guide bi-encoder to veto false negatives; "
                                         "ranker:R = cross-encoder R whose scores become pos_scores/neg_scores (teacher)"),
    scorer_type: ScorerType = typer.Option(ScorerType.cross_encoder, "--scorer-type", help="kind of --scorer (ranker: as ranker:R)"),
    scorer_threshold: Optional[float] = typer.Option(None, "--scorer-threshold", help="drop candidates the scorer rates above this"),
    seed: int = typer.Option(42, "--seed", help="seed for --sampling random"),
    batch_size: Optional[int] = typer.Option(None, "--batch-size", min=1, help="encoding batch size (default: 16 on CPU, 128 on GPU)"),
    query_batch_size: int = typer.Option(256, "--query-batch-size", help="queries searched per chunk (bounds memory)"),
    device: Optional[str] = typer.Option(None, "--device", help="torch device for the models (default: cuda:<LOCAL_RANK> when CUDA is available, else cpu)"),
    fp32: bool = typer.Option(False, "--fp32", help="encode in fp32 instead of bf16 autocast"),
    backend: str = typer.Option("auto", "--backend", help="inference backend for every encoding of this run: auto (OpenVINO when installed, on a CPU: for bf16, and for bulk fp32 where the CPU has no native bf16), torch or openvino"),
) -> None:
    """Mine hard negatives for training queries into FlagEmbedding training JSONL.

    A killed run continues where it stopped when the same command is run again (rows are kept in <output>.partial);
    under torchrun each rank mines a block of the queries."""
    import time

    from index.openvino_backend import encode_backend, resolve_backend

    from rich.console import Console

    from mining.job import run_mining_job
    from mining.miner import BM25Retriever, MiningConfig, load_training_queries
    from retriever.data import DataError
    from retriever.distributed import barrier, init_distributed, shutdown

    console = Console(stderr=True)
    if (index is None) == (bm25 is None):
        _fail("give exactly one retriever: --index DIR --model M (dense) or --bm25 DIR")
    if index is not None and model is None:
        _fail("--index needs --model, the bi-encoder that built it (it encodes the queries)")
    if scorer_threshold is not None and scorer is None:
        _fail("--scorer-threshold needs --scorer MODEL")
    scorer_kind = scorer_type.value
    if scorer is not None and scorer.startswith("ranker:"):
        scorer, scorer_kind = scorer[len("ranker:"):], ScorerType.ranker.value
        if not scorer:
            _fail("--scorer ranker:R needs the ranker folder after `ranker:`")
    from mining.service import default_device

    device = device or default_device()
    try:
        resolve_backend(backend, device, not fp32)
    except (ValueError, ImportError) as exc:
        _fail(str(exc))
    with encode_backend(backend):  # the corpus, the queries and any scorer encode alike
        config = MiningConfig(k=k, range_min=range_min, range_max=range_max, num_negatives=num_negatives,
                              sampling=sampling.value, relative_margin=relative_margin, absolute_margin=absolute_margin,
                              scorer_threshold=scorer_threshold, seed=seed, query_batch_size=query_batch_size)
        try:
            config.validate()
        except ValueError as exc:
            _fail(str(exc))
        t_start = time.perf_counter()
        ctx = init_distributed()  # under torchrun: each rank mines a block of the queries
        if ctx.world_size > 1 and index is not None and not index.exists():
            _fail(f"{index} does not exist: under torchrun, encode the corpus and build the index first "
                  "(`torchrun ... -m retriever.cli encode`, then `negatron index build`), so that the ranks do not "
                  "each build it")
        try:
            training, docs = load_training_queries(queries, split=split, qrels=qrels, corpus=corpus)
        except DataError as exc:
            _fail(str(exc))
        if not training:
            _fail(f"{queries}: no query with a positive to mine for")
        bf16 = False if fp32 else None
        timings = {}
        if index is not None:
            retriever = _dense_retriever(index, model, docs, training, device, batch_size, bf16, console, timings)
        else:
            from index.bm25 import BM25Searcher

            retriever = BM25Retriever(BM25Searcher(bm25))
        scorer_obj = None
        if scorer is not None:
            from mining.filters import load_scorer

            try:
                scorer_obj = load_scorer(scorer, scorer_kind, device=device)
            except (OSError, ValueError) as exc:
                _fail(f"cannot load --scorer {scorer}: {exc}")
        fingerprint = _mining_fingerprint(training, docs, index or bm25, model, config, scorer, scorer_kind,
                                          backend, fp32, batch_size, device)
        settings = {**config.__dict__, "retriever": retriever.name, "queries": str(queries), "index": str(index or bm25),
                    "model": model, "scorer": scorer, "scorer_type": scorer_kind if scorer else None}
        done = run_mining_job(output, training, docs, retriever, config, fingerprint=fingerprint, settings=settings,
                              scorer=scorer_obj, seconds=timings, rank=ctx.rank, world=ctx.world_size,
                              barrier=lambda: barrier(ctx), console=console)
        shutdown(ctx)
        if done is None:  # another rank: rank 0 wrote the file
            return
        out_path, stats_path, stats = done
        stats.seconds["total"] = time.perf_counter() - t_start
        stats.write(stats_path)
        console.print(stats.table())
        console.print(f"wrote {stats.settings['rows_written']:,} rows to {out_path} (stats: {stats_path})")


def _mining_fingerprint(training, docs, index: Path, model, config, scorer, scorer_kind, backend, fp32,
                        batch_size, device) -> dict:
    """What a mined file's rows depend on: a killed run's rows are kept only when all of it is unchanged."""
    import dataclasses

    from retriever.resumable_jsonl import fingerprint_texts

    def files(path: Path) -> list:
        path = Path(path)
        found = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
        return [[str(p.resolve()), p.stat().st_size, p.stat().st_mtime_ns] for p in found]

    return {
        "queries": [len(training), fingerprint_texts(lambda: (
            f"{q.query_id}\t{q.text}\t{'|'.join(q.positive_ids)}\t{'|'.join(q.positive_texts or ())}"
            for q in training))],
        "corpus": files(docs.path), "index": files(index), "model": model,
        "mining": dataclasses.asdict(config), "scorer": [scorer, scorer_kind if scorer else None],
        "encoding": [backend, fp32, batch_size, str(device)],
    }


def _dense_retriever(index: Path, model: str, docs, training, device, batch_size, bf16, console, timings):
    """Load the index (building it from the corpus first when the folder does not exist)."""
    import time

    from index.faiss_index import DenseIndex
    from mining.miner import DenseRetriever, StoreEmbeddingLookup
    from retriever.modeling import BiEncoder

    bi = BiEncoder.from_pretrained(model)
    bi.to(device)
    store = None
    if not index.exists():
        from index.encode import encode_corpus

        console.print(f"{index} does not exist: encoding {len(docs):,} documents with {model} and building it")
        t0 = time.perf_counter()
        store = encode_corpus(bi, docs, embeddings_dir_for(index), batch_size=batch_size, bf16=bf16)
        timings["encode_corpus"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        DenseIndex.build(store, index, factory="Flat", metric="ip")
        timings["build_index"] = time.perf_counter() - t0
    try:
        dense = DenseIndex.load(index, expect_dim=bi.dim)
    except (ValueError, OSError, RuntimeError) as exc:
        _fail(f"cannot load index {index}: {exc}")
    if dense.count != len(docs) or (len(docs) and dense.ids[0] != docs.ids[0]):
        _fail(f"index {index} holds {dense.count:,} documents but the corpus {docs.path} has {len(docs):,}: "
              "pass the corpus the index was built from")
    if store is None:
        store = _store_of(index)
    lookup = None
    if store is not None and any(q.positive_ids for q in training):
        # read on demand from the memory-mapped shards: nothing per training query is gathered up front
        lookup = StoreEmbeddingLookup(store, docs) if store.count == len(docs) else None
    return DenseRetriever(dense, bi, batch_size=batch_size, bf16=bf16, doc_lookup=lookup)


def embeddings_dir_for(index: Path) -> Path:
    return index.with_name(f"{index.name}.embeddings")


def _store_of(index: Path):
    """The EmbeddingStore an index was built from, when it is still on disk (for exact positive scores)."""
    import json

    from index.store import EmbeddingStore

    candidates = [embeddings_dir_for(index)]
    try:
        recorded = json.loads((index / "manifest.json").read_text()).get("embeddings")
        if recorded:
            candidates.insert(0, Path(recorded))
    except (OSError, ValueError):
        pass
    for candidate in candidates:
        if candidate.is_dir():
            try:
                return EmbeddingStore.open(candidate)
            except Exception:  # moved or unfinished: positives get encoded instead
                continue
    return None


def serve_command(
    index: Path = typer.Option(..., "--index", help="dense index folder to serve"),
    model: str = typer.Option(..., "--model", help="bi-encoder that built --index"),
    corpus: Optional[Path] = typer.Option(None, "--corpus", help="corpus file or BEIR folder (texts, query ids, refreshes)"),
    watch: Optional[Path] = typer.Option(None, "--watch", help="checkpoint folder to follow (step-<N>/ subfolders)"),
    refresh_every: Optional[float] = typer.Option(None, "--refresh-every", help="also re-encode every N minutes"),
    host: str = typer.Option("127.0.0.1", "--host", help="interface to bind"),
    port: int = typer.Option(8765, "--port", help="TCP port"),
    device: Optional[str] = typer.Option(None, "--device", help="torch device for encoding, e.g. cuda:1 (default: cuda:<LOCAL_RANK> when CUDA is available, else cpu)"),
    split: str = typer.Option("train", "--split", help="qrels split of a BEIR --corpus (positives for query ids)"),
    work_dir: Optional[Path] = typer.Option(None, "--work-dir", help="where refreshed index versions go (default <index>.versions)"),
    poll_seconds: float = typer.Option(10.0, "--poll-seconds", help="how often --watch is checked"),
) -> None:
    """Serve hard negatives over HTTP from an index that follows training checkpoints."""
    from mining.server import serve
    from mining.service import MiningRequestError, MiningService
    from retriever.data import DataError

    if not index.is_dir():
        _fail(f"index folder {index} not found: build one with `negatron index build` first")
    try:
        service = MiningService(index, model, corpus=corpus, watch_dir=watch, refresh_every=refresh_every, device=device,
                                split=split, work_dir=work_dir, poll_seconds=poll_seconds)
    except (DataError, MiningRequestError) as exc:
        _fail(str(exc))
    try:
        serve(service, host=host, port=port)
    finally:
        service.close(wait=False)


def register(app: typer.Typer) -> None:
    app.command("mine")(mine_command)
    app.command("serve")(serve_command)
