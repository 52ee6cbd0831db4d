"""`negatron encode`, `negatron index build|bm25` and `negatron search` (dense or BM25, TREC run output)."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

index_app = typer.Typer(help="Build dense (FAISS) and BM25 (Lucene) indexes.", no_args_is_help=True)


def _fail(exc: Exception) -> None:
    typer.secho(f"error: {exc}", fg=typer.colors.RED, err=True)
    raise typer.Exit(code=2)


def encode_command(
    model: str = typer.Option(..., "--model", help="Model folder, packaged model or hub id."),
    corpus: Path = typer.Option(..., "--corpus", help="BEIR folder, corpus.jsonl or MS MARCO collection .tsv."),
    output: Path = typer.Option(..., "--output", help="Embeddings folder (resumable)."),
    batch_size: Optional[int] = typer.Option(None, "--batch-size", min=1, help="Documents per forward pass (default: 16 on CPU, 128 on GPU)."),
    fp32: bool = typer.Option(False, "--fp32", help="Compute in fp32 (default: bf16 autocast where the hardware has bf16)."),
    dtype: str = typer.Option("float16", "--dtype", help="On-disk precision: float16 or float32."),
    shard_size: Optional[int] = typer.Option(None, "--shard-size", min=1, help="Documents per shard, the unit of resume and of torchrun sharding (default: up to 100,000, at least one shard per rank)."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace a folder holding a different run."),
    backend: str = typer.Option("auto", "--backend", help="Inference backend: auto (OpenVINO when installed, on a CPU: for bf16, and for bulk fp32 where the CPU has no native bf16; else torch), torch or openvino."),
    max_length: Optional[int] = typer.Option(None, "--max-length", min=1, help="Truncate documents at this many tokens (default: the model's own). Give a training config's model.doc_max_length to prepare a folder for negatives.options.index.embeddings."),
) -> None:
    """Encode a corpus into float16/float32 embedding shards."""
    from retriever.data import DataError

    from index.encode import encode_corpus

    if dtype not in ("float16", "float32"):
        raise typer.BadParameter("use float16 or float32", param_hint="--dtype")
    try:
        store = encode_corpus(model, corpus, output, batch_size=batch_size, bf16=False if fp32 else None,
                              shard_size=shard_size, dtype=dtype, overwrite=overwrite, backend=backend,
                              max_length=max_length)
    except (DataError, OSError, ValueError, ImportError) as exc:
        _fail(exc)
    if store is not None:
        typer.echo(f"{store.count} x {store.dim} {store.manifest['dtype']} embeddings in {output}")


def build_command(
    embeddings: Path = typer.Option(..., "--embeddings", help="Folder written by `negatron encode`."),
    output: Path = typer.Option(..., "--output", help="Index folder."),
    factory: str = typer.Option("Flat", "--factory", help='FAISS factory: "Flat", "HNSW32", "IVF4096,Flat", "IVF4096,PQ64".'),
    metric: str = typer.Option("ip", "--metric", help="ip (inner product) or cosine."),
    nprobe: Optional[int] = typer.Option(None, "--nprobe", help="IVF lists probed per query (default min(nlist, 64))."),
    ef_search: Optional[int] = typer.Option(None, "--ef-search", help="HNSW search breadth (default 128)."),
    train_sample: Optional[int] = typer.Option(None, "--train-sample", min=1, help="Vectors that train IVF/PQ (default max(64*nlist, 100k), at most 2M)."),
    gpu: str = typer.Option("auto", "--gpu", help="auto (every GPU FAISS sees, else CPU), yes (fail without one) or no."),
) -> None:
    """Build a FAISS index from encoded embeddings."""
    from retriever.data import DataError

    from index.faiss_index import DenseIndex

    if metric not in ("ip", "cosine"):
        raise typer.BadParameter("use ip or cosine", param_hint="--metric")
    if gpu not in ("auto", "yes", "no"):
        raise typer.BadParameter("use auto, yes or no", param_hint="--gpu")
    try:
        index = DenseIndex.build(embeddings, output, factory=factory, metric=metric, nprobe=nprobe, ef_search=ef_search,
                                 train_sample=train_sample, use_gpu={"auto": "auto", "yes": True, "no": False}[gpu])
    except (DataError, ValueError, RuntimeError) as exc:
        _fail(exc)
    typer.echo(f"{index!r} built in {index.manifest['build_seconds']:.1f}s -> {output}")


def bm25_command(
    corpus: Path = typer.Option(..., "--corpus", help="BEIR folder, corpus.jsonl or MS MARCO collection .tsv."),
    output: Path = typer.Option(..., "--output", help="Lucene index folder."),
    threads: int = typer.Option(2, "--threads", min=1, help="Indexing threads."),
) -> None:
    """Build a BM25 (Lucene) index, title + text in one field."""
    from retriever.data import DataError

    from index.bm25 import build_bm25_index
    from index.java import JavaSetupError

    try:
        build_bm25_index(corpus, output, threads=threads)
    except (DataError, JavaSetupError) as exc:
        _fail(exc)
    typer.echo(f"BM25 index -> {output}")


def write_trec_run(path: Path, run: dict[str, list[tuple[str, float]]], tag: str) -> None:
    from eval.metrics import trec_line
    from retriever.io import atomic_write

    with atomic_write(path, "w") as fh:
        for qid, hits in run.items():
            for rank, (docid, score) in enumerate(hits, start=1):
                fh.write(trec_line(qid, docid, rank, score, tag))


def search_command(
    queries: Path = typer.Option(..., "--queries", help="queries.jsonl (BEIR) or qid<TAB>query .tsv."),
    output: Path = typer.Option(..., "--output", help="TREC run file to write."),
    index: Optional[Path] = typer.Option(None, "--index", help="Dense index folder (with --model)."),
    model: Optional[str] = typer.Option(None, "--model", help="Query encoder (the model that encoded the corpus)."),
    bm25: Optional[Path] = typer.Option(None, "--bm25", help="BM25 index folder (instead of --index)."),
    k: int = typer.Option(100, "--k", min=1, help="Hits per query."),
    batch_size: Optional[int] = typer.Option(None, "--batch-size", min=1, help="Queries per encoder batch (default: 16 on CPU, 128 on GPU)."),
    threads: int = typer.Option(2, "--threads", min=1, help="BM25 search threads."),
    k1: float = typer.Option(0.9, "--k1", help="BM25 k1."),
    b: float = typer.Option(0.4, "--b", help="BM25 b."),
) -> None:
    """Search a dense or BM25 index and write a TREC run file."""
    from retriever.data import DataError, read_queries

    if (index is None) == (bm25 is None):
        raise typer.BadParameter("give exactly one of --index (dense, with --model) or --bm25")
    try:
        topics = read_queries(queries)
        if bm25 is not None:
            from index.bm25 import BM25Searcher

            run = BM25Searcher(bm25, k1=k1, b=b).search(topics, k=k, threads=threads)
            tag = "negatron-bm25"
        else:
            if model is None:
                raise typer.BadParameter("dense search needs --model", param_hint="--model")
            from index.encode import encode_texts, load_model
            from index.faiss_index import DenseIndex

            encoder = load_model(model)
            dense = DenseIndex.load(index, expect_dim=encoder.dim, expect_model=encoder)
            qids = list(topics)
            emb = encode_texts(encoder, [topics[q] for q in qids], kind="query", batch_size=batch_size)
            run = dict(zip(qids, dense.search_ids(emb, k)))
            tag = "negatron-dense"
    except DataError as exc:
        _fail(exc)
    write_trec_run(output, run, tag)
    typer.echo(f"{len(run)} queries x top-{k} -> {output}")


def register(app: typer.Typer) -> None:
    app.command("encode", help="Encode a corpus into embedding shards (resumable).")(encode_command)
    index_app.command("build", help="Build a FAISS index from encoded embeddings.")(build_command)
    index_app.command("bm25", help="Build a BM25 (Lucene) index, title + text in one field.")(bm25_command)
    app.add_typer(index_app, name="index")
    app.command("search", help="Search a dense or BM25 index; writes a TREC run file.")(search_command)
