"""`negatron eval beir|msmarco|mteb` and `negatron report`."""

from __future__ import annotations

from pathlib import Path
from typing import List, Optional

import typer

eval_app = typer.Typer(help="Evaluate a retriever on BEIR, MS MARCO / TREC DL or MTEB.", no_args_is_help=True)

TABLE_METRICS = ("ndcg@10", "mrr@10", "recall@100", "recall@1000", "map@100")


def _print_table(results: list[dict], title: str) -> None:
    from rich.console import Console
    from rich.table import Table

    names = [m for m in TABLE_METRICS if any(m in r["metrics"] for r in results)]
    for r in results:
        names += [m for m in r["metrics"] if m not in names and m.split("@")[0] in {"ndcg", "recall", "map", "mrr"}
                  and m not in ("ndcg@1", "ndcg@3", "ndcg@5", "ndcg@100", "recall@10")]
    table = Table(title=title)
    table.add_column("dataset", no_wrap=True)
    for name in names:
        table.add_column(name, justify="right")
    table.add_column("queries", justify="right")
    table.add_column("docs", justify="right")
    table.add_column("seconds", justify="right")
    for r in results:
        table.add_row(r["dataset"], *(f"{r['metrics'][m]:.4f}" if m in r["metrics"] else "" for m in names),
                      str(r["num_queries"]), str(r["num_docs"]), f"{r['seconds']:.1f}")
    _console().print(table)


def _console():
    from rich.console import Console

    console = Console()
    if not console.is_terminal:  # pipes and CliRunner get 80 columns; keep the numbers unabbreviated
        console.width = max(console.width, 150)
    return console


def _user_errors():
    from retriever.data import DataError

    return (DataError, FileNotFoundError, ValueError)


@eval_app.command("beir")
def beir_command(
    model: str = typer.Option(..., "--model", help="Model folder, packaged model or hub id."),
    data: List[Path] = typer.Option(..., "--data", help="BEIR folder (corpus.jsonl, queries.jsonl, qrels/); repeatable."),
    output: Path = typer.Option(..., "--output", help="Output folder; one subfolder per dataset."),
    split: str = typer.Option("test", help="qrels split to score."),
    batch_size: Optional[int] = typer.Option(None, min=1, help="Encoding batch size (default: 16 on CPU, 128 on GPU)."),
    k: int = typer.Option(1000, help="Documents retrieved per query."),
    index: Optional[Path] = typer.Option(None, "--index", help="Prebuilt dense index folder (one --data only)."),
    fp32: bool = typer.Option(False, "--fp32", help="Encode in fp32 instead of bf16 autocast."),
    keep_identical_ids: bool = typer.Option(False, "--keep-identical-ids",
                                            help="Score a document whose id equals the query id (ignored by default)."),
    strict_qrels: bool = typer.Option(False, "--strict-qrels",
                                      help="Fail on judgements of documents absent from the corpus (default: count, "
                                           "warn once and score them as BEIR does: relevant, never retrieved)."),
    rerank: Optional[str] = typer.Option(None, "--rerank", help="CrossEncoder folder: also rerank the top "
                                         "--rerank-depth and score that into <output>/<dataset>-reranked/."),
    rerank_depth: int = typer.Option(100, "--rerank-depth", min=1, help="Documents per query the --rerank ranker rescores."),
) -> None:
    """Evaluate a dense retriever on BEIR folders (nDCG@10, MRR@10, Recall@k, MAP@100)."""
    from eval.beir import evaluate_beir, load_model
    from retriever.progress import ProgressDisplay

    if index is not None and len(data) > 1:
        raise typer.BadParameter("--index serves one corpus; give a single --data with it", param_hint="--index")
    try:
        encoder = load_model(model)
        results = [evaluate_beir(encoder, d, split=split, output_dir=output, k=k, batch_size=batch_size,
                                 bf16=False if fp32 else None, index_dir=index,
                                 ignore_identical_ids=not keep_identical_ids, strict_qrels=strict_qrels,
                                 progress=ProgressDisplay()) for d in data]
        if rerank is not None:  # second stage on the run just written (retriever/ranker_commands.py)
            from retriever.ranker import Ranker
            from retriever.ranker_commands import rerank_evaluation

            ranker = Ranker.load(rerank, device=str(encoder.device))
            results += [rerank_evaluation(ranker, d, split, output, r, rerank_depth, bf16=False if fp32 else None,
                                          ignore_identical_ids=not keep_identical_ids) for d, r in zip(data, results)]
    except _user_errors() as exc:
        raise typer.BadParameter(str(exc)) from None
    _print_table(results, f"{model} — BEIR {split}")
    _print_written(output, results)


def _print_written(output: Path, results: list[dict]) -> None:
    """The folders just written, by their real paths."""
    for r in results:
        typer.echo(f"wrote {output / r['dataset']}/: metrics.json, run.trec, per_query.jsonl")


@eval_app.command("msmarco")
def msmarco_command(
    model: str = typer.Option(..., "--model", help="Model folder, packaged model or hub id."),
    output: Path = typer.Option(..., "--output", help="Output folder."),
    collection: Optional[Path] = typer.Option(None, help="Passages: `pid<TAB>passage` TSV (or corpus.jsonl)."),
    queries: Optional[Path] = typer.Option(None, help="Queries: `qid<TAB>query` TSV."),
    qrels: Optional[Path] = typer.Option(None, help="Qrels: TREC `qid 0 pid grade` or MS MARCO TSV."),
    data: Optional[Path] = typer.Option(None, "--data", help="A BEIR-layout folder instead of the three files."),
    preset: str = typer.Option("dev", help="dev (MRR@10, R@1000), dl19 or dl20 (nDCG@10, R@1000 at grade ≥ 2)."),
    name: Optional[str] = typer.Option(None, help="Output subfolder name (default: the preset's)."),
    batch_size: Optional[int] = typer.Option(None, min=1, help="Encoding batch size (default: 16 on CPU, 128 on GPU)."),
    k: int = typer.Option(1000, help="Passages retrieved per query."),
    index: Optional[Path] = typer.Option(None, "--index", help="Prebuilt dense index folder."),
    fp32: bool = typer.Option(False, "--fp32", help="Encode in fp32 instead of bf16 autocast."),
) -> None:
    """Evaluate on MS MARCO dev or TREC DL 2019/2020 from the official TSV/TREC files."""
    from eval.msmarco import PRESETS, evaluate_msmarco
    from retriever.progress import ProgressDisplay

    if preset not in PRESETS:
        raise typer.BadParameter(f"choose one of {', '.join(PRESETS)}", param_hint="--preset")
    try:
        result = evaluate_msmarco(model, collection=collection, queries=queries, qrels=qrels, data_dir=data,
                                  preset=preset, output_dir=output, k=k, batch_size=batch_size,
                                  bf16=False if fp32 else None, index_dir=index, name=name,
                                  progress=ProgressDisplay())
    except _user_errors() as exc:
        raise typer.BadParameter(str(exc)) from None
    _print_table([result], f"{model} — {preset}")
    _print_written(output, [result])


@eval_app.command("mteb")
def mteb_command(
    model: str = typer.Option(..., "--model", help="Model folder, packaged model or hub id."),
    output: Path = typer.Option(..., "--output", help="Folder for mteb's result JSON files."),
    tasks: Optional[str] = typer.Option(None, "--tasks", help="Comma-separated mteb task names, e.g. SciFact,NFCorpus."),
    data: List[Path] = typer.Option([], "--data", help="Local BEIR folder run as an mteb retrieval task; repeatable."),
    split: str = typer.Option("test", help="Split for local BEIR folders."),
    batch_size: Optional[int] = typer.Option(None, min=1, help="Encoding batch size (default: 16 on CPU, 128 on GPU)."),
    fp32: bool = typer.Option(False, "--fp32", help="Encode in fp32 instead of bf16 autocast."),
) -> None:
    """Run MTEB tasks (registered ones from the local HF cache, or local BEIR folders) offline."""
    from eval.mteb_runner import MtebDataMissing, run_mteb

    if not tasks and not data:
        raise typer.BadParameter("give --tasks and/or --data")
    try:
        results = run_mteb(model, tasks=[t.strip() for t in (tasks or "").split(",") if t.strip()],
                           data_dirs=data, output_dir=output, split=split, batch_size=batch_size,
                           bf16=False if fp32 else None)
    except MtebDataMissing as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2) from None
    except _user_errors() as exc:
        raise typer.BadParameter(str(exc)) from None
    from rich.table import Table

    table = Table(title=f"{model} — MTEB")
    for col in ("task", "split", "main score", "ndcg@10", "result file"):
        table.add_column(col)
    for r in results:
        table.add_row(r["task"], r["split"], f"{r['main_score']:.4f}",
                      f"{r['ndcg_at_10']:.4f}" if r.get("ndcg_at_10") is not None else "", str(r["path"]))
    _console().print(table)


def report_command(
    run_dirs: List[Path] = typer.Argument(..., help="Eval output folders or training run folders."),
    output: Path = typer.Option(..., "--output", help="Folder for index.html, report.md and the plots."),
    names: Optional[str] = typer.Option(None, help="Comma-separated display names, one per RUN_DIR."),
    metric: str = typer.Option("ndcg@10", help="Metric for the table, charts and significance tests."),
) -> None:
    """Write an HTML + Markdown report: BEIR-style table, charts, curves, significance tests."""
    from eval.report import write_report

    labels = [n.strip() for n in names.split(",")] if names else None
    if labels is not None and len(labels) != len(run_dirs):
        raise typer.BadParameter(f"{len(labels)} names for {len(run_dirs)} run folders", param_hint="--names")
    try:
        html = write_report(run_dirs, output, names=labels, metric=metric)
    except _user_errors() as exc:
        raise typer.BadParameter(str(exc)) from None
    typer.echo(f"wrote {html} and {html.with_name('report.md')}")


def reproduce_command(
    tables: List[Path] = typer.Argument(None, help="Reproduction tables (YAML); default: configs/reproductions/*.yaml."),
    data_root: Optional[Path] = typer.Option(None, "--data-root",
                                             help="Folder holding the rows' datasets (default: $NEGATRON_SHARED_DATA "
                                                  "or ../shared/data)."),
    output: Path = typer.Option(Path("runs/reproduce"), "--output", help="Folder for each evaluation's metrics and run."),
    only: Optional[str] = typer.Option(None, "--only", help="Run only rows whose dataset, model or retriever contains this."),
    batch_size: Optional[int] = typer.Option(None, min=1, help="Encoding batch size (default: 16 on CPU, 128 on GPU)."),
    fp32: bool = typer.Option(False, "--fp32", help="Encode in fp32 instead of bf16 autocast."),
) -> None:
    """Re-measure published figures (a 2CR-style YAML table) and print measured vs published, ✓/✗ per row."""
    from rich.table import Table

    from eval.reproduce import default_data_root, load_tables, reproduce
    from retriever.progress import ProgressDisplay

    try:
        rows = load_tables(tables or ())
        if only:
            rows = [r for r in rows if any(only.lower() in f.lower() for f in (r.dataset, r.model, r.retriever))]
        if not rows:
            raise typer.BadParameter(f"no row matches --only {only!r}", param_hint="--only")
        root = data_root or default_data_root()
        outcomes = reproduce(rows, root, output_dir=output, batch_size=batch_size, bf16=False if fp32 else None,
                             progress=ProgressDisplay())
    except _user_errors() as exc:
        raise typer.BadParameter(str(exc)) from None
    table = Table(title=f"reproductions ({root})")
    for col, justify in (("", "center"), ("dataset", "left"), ("retriever", "left"), ("metric", "left"),
                         ("published", "right"), ("measured", "right"), ("Δ", "right"), ("tolerance", "right"),
                         ("source", "left")):
        table.add_column(col, justify=justify)
    marks = {"ok": "[green]✓[/]", "fail": "[red]✗[/]", "skipped": "[yellow]–[/]"}
    for o in outcomes:
        measured = f"{o.measured:.4f}" if o.measured is not None else o.detail
        delta = f"{o.delta:+.4f}" if o.delta is not None else ""
        table.add_row(marks[o.status], f"{o.row.dataset} ({o.row.split})", o.row.label, o.row.metric,
                      f"{o.row.published:.4f}", measured, delta, f"±{o.row.tolerance:g}", o.row.source)
    _console().print(table)
    counts = {s: sum(o.status == s for o in outcomes) for s in ("ok", "fail", "skipped")}
    typer.echo(f"{counts['ok']} reproduced, {counts['fail']} not, {counts['skipped']} skipped; "
               f"metrics and runs under {output}")
    if counts["fail"]:
        raise typer.Exit(1)


def register(app: typer.Typer) -> None:
    app.add_typer(eval_app, name="eval")
    app.command("report")(report_command)
    app.command("reproduce")(reproduce_command)
