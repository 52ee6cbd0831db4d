"""`negatron train-ranker` and `negatron rerank` (registered by retriever.cli)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import List, Optional

import typer


def train_ranker_command(
    config: Path = typer.Option(..., "--config", help="ranker config YAML (see configs/scifact-ranker.yaml)"),
    output: Path = typer.Option(..., "--output", help="run folder: checkpoints, logs, final CrossEncoder"),
    overrides: Optional[List[str]] = typer.Option(None, "--set", help="override a config key: section.key=value"),
    resume: bool = typer.Option(False, "--resume", help="continue from the newest checkpoint in --output"),
) -> None:
    """Train a cross-encoder ranker listwise on mined, BM25 or dense negatives (torchrun-aware)."""
    from retriever.config import ConfigError
    from retriever.data import DataError
    from retriever.ranker_train import load_ranker_config, train_ranker

    try:
        final = train_ranker(load_ranker_config(config, overrides or []), output, resume=resume)
    except (ConfigError, DataError, ValueError, OSError) as exc:
        typer.secho(f"error: {exc}", fg=typer.colors.RED, err=True)
        raise typer.Exit(2) from None
    if os.environ.get("RANK", "0") == "0":
        typer.echo(f"final ranker: {final}")


def top_k_of_run(run: dict[str, dict[str, float]], k: int) -> dict[str, list[str]]:
    """Each query's ``k`` best-scored documents of a first-stage run, best first."""
    return {q: [d for d, _ in sorted(docs.items(), key=lambda item: item[1], reverse=True)[:k]] for q, docs in run.items()}


def rerank_run(ranker, run: dict[str, dict[str, float]], queries: dict[str, str], corpus, depth: int, *,
               batch_size: int | None = None, bf16: bool | None = None, show_progress: bool = True
               ) -> dict[str, dict[str, float]]:
    """The first-stage ``run`` with its top ``depth`` per query rescored by ``ranker`` (placed above the
    rest, which keep their order below), as a new run. Queries without text are dropped."""
    from retriever.ranker import rerank

    heads = top_k_of_run(run, depth)
    rescored = rerank(ranker, queries, heads, lambda d: corpus.get(d).full_text, batch_size=batch_size, bf16=bf16,
                      show_progress=show_progress)
    out = {}
    for qid, docs in rescored.items():
        floor = min(docs.values()) if docs else 0.0
        tail = sorted(((d, s) for d, s in run[qid].items() if d not in docs), key=lambda item: item[1], reverse=True)
        # keep the first stage's order below the reranked head: strictly decreasing scores under its minimum
        out[qid] = {**docs, **{d: floor - 1.0 - i for i, (d, _) in enumerate(tail)}}
    return out


def rerank_evaluation(ranker, data_dir: Path, split: str, output: Path, first_stage: dict, depth: int, *,
                      batch_size: int | None = None, bf16: bool | None = None, ignore_identical_ids: bool = True) -> dict:
    """``negatron eval beir --rerank``: rerank the top ``depth`` of the first-stage run just written to
    ``<output>/<dataset>/run.trec`` and score it into ``<output>/<dataset>-reranked/`` (same metrics and files)."""
    import time

    from eval.beir import evaluate_run
    from eval.metrics import read_trec_run
    from retriever.data import load_beir
    from retriever.modeling import bf16_supported

    start = time.perf_counter()
    ds = load_beir(data_dir, split)
    run = read_trec_run(Path(output) / first_stage["dataset"] / "run.trec")
    judged = {q: ds.queries[q] for q in run if q in ds.qrels and q in ds.queries}
    reranked = rerank_run(ranker, {q: run[q] for q in judged}, judged, ds.corpus, depth, batch_size=batch_size, bf16=bf16)
    use_bf16 = bf16 if bf16 is not None else bf16_supported(ranker.device)
    return evaluate_run(f"{first_stage['dataset']}-reranked", split, f"{first_stage['model']} >> {ranker.source}", judged,
                        {q: ds.qrels[q] for q in judged}, reranked, num_docs=first_stage["num_docs"],
                        seconds=time.perf_counter() - start, output_dir=output, ignore_identical_ids=ignore_identical_ids,
                        extra={"ranker": ranker.source, "rerank_depth": depth, "bf16": bool(use_bf16),
                               "first_stage": first_stage["metrics"]})


def rerank_command(
    ranker: str = typer.Option(..., "--ranker", help="CrossEncoder folder (negatron train-ranker output or any CrossEncoder)"),
    run: Path = typer.Option(..., "--run", help="first-stage TREC run (qid Q0 docid rank score tag)"),
    data: Path = typer.Option(..., "--data", help="BEIR folder with the corpus and queries (and qrels to score)"),
    output: Path = typer.Option(..., "--output", help="folder for run.trec (and metrics.json when qrels exist)"),
    top_k: int = typer.Option(100, "--top-k", min=1, help="documents per query to rerank"),
    split: str = typer.Option("test", "--split", help="qrels split to score the reranked run with"),
    batch_size: Optional[int] = typer.Option(None, "--batch-size", min=1, help="pairs per forward (default 32 on CPU, 128 on GPU)"),
    max_length: Optional[int] = typer.Option(None, "--max-length", min=8, help="tokens per pair (default: the ranker's)"),
    device: Optional[str] = typer.Option(None, "--device", help="torch device (default: cuda when present, else cpu)"),
    fp32: bool = typer.Option(False, "--fp32", help="score in fp32 instead of bf16 autocast"),
) -> None:
    """Rerank a first-stage run with a cross-encoder and score it with the BEIR metrics."""
    import time

    from eval.beir import evaluate_run
    from eval.metrics import read_trec_run, write_trec_run
    from retriever.data import DataError, load_beir, read_queries
    from retriever.modeling import bf16_supported
    from retriever.ranker import Ranker

    start = time.perf_counter()
    try:
        import torch

        model = Ranker.load(ranker, max_length=max_length, device=device or ("cuda" if torch.cuda.is_available() else "cpu"))
        first = read_trec_run(run)
        qrels_path = data / "qrels" / f"{split}.tsv"
        if qrels_path.exists():
            ds = load_beir(data, split)
            corpus, queries, qrels = ds.corpus, ds.queries, ds.qrels
        else:
            from retriever.data import Corpus

            corpus, queries, qrels = Corpus(data / "corpus.jsonl"), read_queries(data / "queries.jsonl"), None
        missing = [q for q in first if q not in queries]
        if len(missing) == len(first):
            raise ValueError(f"none of the {len(first)} queries of {run} is in {data}/queries.jsonl (e.g. {missing[0]!r})")
        reranked = rerank_run(model, {q: docs for q, docs in first.items() if q in queries}, queries, corpus, top_k,
                              batch_size=batch_size, bf16=False if fp32 else None)
    except (DataError, FileNotFoundError, ValueError) as exc:
        typer.secho(f"error: {exc}", fg=typer.colors.RED, err=True)
        raise typer.Exit(2) from None
    seconds = time.perf_counter() - start
    if qrels is None:
        output.mkdir(parents=True, exist_ok=True)
        write_trec_run(output / "run.trec", reranked)
        typer.echo(f"wrote {output}/run.trec ({len(reranked)} queries; no qrels/{split}.tsv to score)")
        return
    judged = {q: queries[q] for q in reranked if q in qrels}
    result = evaluate_run(data.name, split, ranker, judged, {q: qrels[q] for q in judged}, reranked,
                          num_docs=len(corpus), seconds=seconds, output_dir=output,
                          extra={"reranked_from": str(run), "rerank_depth": top_k,
                                 "bf16": (not fp32) and bf16_supported(model.device)})
    m = result["metrics"]
    typer.echo(f"{data.name} {split}: nDCG@10 {m['ndcg@10']:.4f}  MRR@10 {m['mrr@10']:.4f}  "
               f"({len(judged)} queries, {seconds:.1f}s) -> {output}/{data.name}/")


def register(app: typer.Typer) -> None:
    app.command("train-ranker", help="Train a cross-encoder ranker (listwise, hard negatives).")(train_ranker_command)
    app.command("rerank", help="Rerank a first-stage TREC run with a cross-encoder; score it.")(rerank_command)
