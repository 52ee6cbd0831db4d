"""`negatron quickstart`: fine-tune all-MiniLM-L6-v2 on a built-in task and show before/after figures.

Stages: (1) build (or reuse) the stdlib docstring → function BEIR set of
:mod:`retriever.quickstart_data`, or take a BEIR folder given with ``--data``; (2) evaluate the
untouched model on the test split; (3) fine-tune on the train split with in-batch negatives (or TAS-B
batches, ``negatives="tasb"``) through :func:`retriever.trainer.train`; (4) evaluate the fine-tuned model on the same test split.
Everything lands in the output folder; ``quickstart.json`` there sums the run up.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path

from rich.console import Console
from rich.table import Table

from retriever.data import DataError
from retriever.io import write_text_atomic

__all__ = ["QuickstartOptions", "run_quickstart", "DEFAULT_MODEL", "SHOWN_METRICS", "QUICKSTART_NEGATIVES"]

DEFAULT_MODEL = "sentence-transformers/all-MiniLM-L6-v2"
SHOWN_METRICS = ("ndcg@10", "mrr@10", "recall@10", "recall@100")
SUMMARY_FILE = "quickstart.json"
# Strategies that cost what an in-batch step costs (no index, no extra documents per query), so they fit
# the quickstart's time limit; STAR/ADORE/ANCE/AR2 need a corpus index and several times the step time.
QUICKSTART_NEGATIVES = {"inbatch": "in-batch negatives", "tasb": "TAS-B topic-aware batches"}


@dataclass
class QuickstartOptions:
    output: Path = Path("runs/quickstart")
    data: Path | None = None            # a BEIR folder; None builds the stdlib task
    model: str = DEFAULT_MODEL
    epochs: int = 1                     # used when max_steps is None (or 0 on the command line)
    # 40 steps x 32 pairs = 1,280 of the 2,313 train queries: sized for the 15-minute budget on a
    # 2-core CPU (a full epoch, 72 steps, costs ~15 CPU-minutes of training alone).
    max_steps: int | None = 40
    batch_size: int = 32
    learning_rate: float = 5e-5
    negatives: str = "inbatch"          # a key of QUICKSTART_NEGATIVES
    query_max_length: int = 64
    doc_max_length: int = 256           # code is long: 256 word pieces hold the signature and most bodies
    eval_batch_size: int | None = None
    eval_split: str = "test"            # "dev" for tuning: never tune on test
    max_queries: int | None = None      # stdlib task only: at most this many queries per split
    max_docs: int | None = None         # stdlib task only: at most this many documents
    cache_dir: Path | None = None       # stdlib task only: where built datasets are kept


def _heading(console: Console, number: int, title: str) -> None:
    console.rule(f"[bold cyan]{number}/4  {title}")


def _prepare_data(opts: QuickstartOptions, console: Console) -> tuple[Path, dict | None]:
    """The BEIR folder to use and, for the stdlib task, its stats."""
    if opts.data is not None:
        folder = Path(opts.data)
        for required in ("corpus.jsonl", "queries.jsonl", f"qrels/{opts.eval_split}.tsv"):
            if not (folder / required).is_file():
                raise DataError(folder / required, None, f"--data folder lacks {required}",
                                "point --data at a BEIR folder (corpus.jsonl, queries.jsonl, qrels/test.tsv, "
                                "and qrels/train.tsv to fine-tune)")
        console.print(f"BEIR folder [bold]{folder}[/]")
        return folder, None
    from retriever.quickstart_data import cached_stdlib_dataset

    start = time.perf_counter()
    with console.status("extracting functions and docstrings from the standard library…"):
        folder, cached = cached_stdlib_dataset(opts.cache_dir, opts.max_queries, opts.max_docs)
    stats = json.loads((folder / "stats.json").read_text())
    how = "reused from cache" if cached else f"built in {time.perf_counter() - start:.1f} s"
    console.print(f"Python {stats['python']} stdlib docstring → function retrieval, {how}: [bold]{folder}[/]")
    table = Table(show_header=True, header_style="bold")
    for column in ("", "train", "dev", "test"):
        table.add_column(column, justify="right" if column else "left")
    table.add_row("queries", *(f"{stats['queries'][s]:,}" for s in ("train", "dev", "test")))
    table.add_row("modules", *(f"{stats['modules_with_queries'][s]:,}" for s in ("train", "dev", "test")))
    console.print(table)
    f = stats["filters"]
    console.print(f"corpus: {stats['documents']:,} functions (all splits: every query searches all of them); "
                  f"dropped {f['duplicate_documents_dropped']} duplicate documents and "
                  f"{f['ambiguous_queries_dropped']} ambiguous summaries")
    return folder, stats


def _load_model(path: str, opts: QuickstartOptions):
    from retriever.modeling import BiEncoder

    return BiEncoder.from_pretrained(path, query_max_length=opts.query_max_length, doc_max_length=opts.doc_max_length)


def _evaluate(model_path: str, folder: Path, output: Path, opts: QuickstartOptions, console: Console, what: str) -> dict:
    from eval.beir import evaluate_beir

    from retriever.progress import ProgressDisplay

    model = _load_model(model_path, opts)
    start = time.perf_counter()
    # advanced by the encoder itself per batch, so it ends at its true total whatever backend runs the model
    result = evaluate_beir(model, folder, split=opts.eval_split, output_dir=output, k=1000,
                           batch_size=opts.eval_batch_size, bf16=None, progress=ProgressDisplay(console))
    m = result["metrics"]
    console.print(f"{what}: nDCG@10 {m['ndcg@10']:.4f}  MRR@10 {m['mrr@10']:.4f}  Recall@100 {m['recall@100']:.4f}  "
                  f"({result['num_queries']} queries, {result['num_docs']:,} documents, "
                  f"{time.perf_counter() - start:.0f} s)")
    return result


def _train_config(model_path: str, folder: Path, opts: QuickstartOptions):
    from retriever.config import TrainConfig

    return TrainConfig.model_validate({
        "model": {"name": model_path, "query_max_length": opts.query_max_length, "doc_max_length": opts.doc_max_length},
        "data": {"beir": str(folder), "split": "train"},
        "negatives": {"strategy": opts.negatives},
        "training": {"learning_rate": opts.learning_rate, "batch_size": opts.batch_size, "epochs": opts.epochs,
                     "max_steps": opts.max_steps or None, "warmup_ratio": 0.1, "temperature": 0.05,
                     "bf16": "auto", "seed": 42, "log_every": 5},
    })


def _results_table(before: dict, after: dict | None, split: str) -> Table:
    table = Table(title=f"{split} split", show_header=True, header_style="bold")
    table.add_column("metric")
    table.add_column("zero-shot", justify="right")
    if after is not None:
        table.add_column("fine-tuned", justify="right")
        table.add_column("change", justify="right")
    for name in SHOWN_METRICS:
        b = before["metrics"][name]
        if after is None:
            table.add_row(name, f"{b:.4f}")
            continue
        a = after["metrics"][name]
        colour = "green" if a > b else "red" if a < b else "white"
        table.add_row(name, f"{b:.4f}", f"{a:.4f}", f"[{colour}]{a - b:+.4f}[/]")
    return table


def _write_report(output: Path, trained: bool) -> Path:
    """The before/after report of ``negatron report``: table, charts, loss curve, paired significance test."""
    from eval.report import write_report

    runs, names = [output / "eval" / "zero-shot"], ["zero-shot"]
    if trained:
        runs.append(output / "train")
        names.append("fine-tuned")
    return write_report(runs, output / "report", names=names)


def run_quickstart(opts: QuickstartOptions | None = None, console: Console | None = None) -> dict:
    """Run the four stages; returns (and writes to ``<output>/quickstart.json``) the summary."""
    from retriever.resolve import resolve_model

    opts = opts or QuickstartOptions()
    if opts.negatives not in QUICKSTART_NEGATIVES:
        raise ValueError(f"unknown quickstart negatives {opts.negatives!r}; choose one of {', '.join(QUICKSTART_NEGATIVES)} "
                         "(other strategies: `negatron train --config configs/...yaml`)")
    console = console or Console()
    output = Path(opts.output)
    began = time.perf_counter()
    timings: dict[str, float] = {}

    _heading(console, 1, "dataset")
    start = time.perf_counter()
    folder, stats = _prepare_data(opts, console)
    can_train = (folder / "qrels" / "train.tsv").is_file()
    timings["dataset_s"] = time.perf_counter() - start
    model_path = resolve_model(opts.model)
    console.print(f"model {opts.model} → {model_path}")

    _heading(console, 2, f"zero-shot evaluation ({opts.eval_split} split)")
    start = time.perf_counter()
    before = _evaluate(model_path, folder, output / "eval" / "zero-shot", opts, console, "zero-shot")
    timings["zero_shot_eval_s"] = time.perf_counter() - start

    after, final = None, None
    if can_train:
        _heading(console, 3, f"fine-tuning (train split, {QUICKSTART_NEGATIVES[opts.negatives]})")
        config = _train_config(model_path, folder, opts)
        t = config.training
        console.print(f"lr {t.learning_rate:g}, batch {t.batch_size}, "
                      f"{f'{t.max_steps} steps' if t.max_steps else f'{t.epochs} epoch(s)'}, "
                      f"max length query {opts.query_max_length} / document {opts.doc_max_length} tokens")
        start = time.perf_counter()
        from retriever.trainer import train

        final = train(config, output / "train", resume=False)
        timings["train_s"] = time.perf_counter() - start

        _heading(console, 4, f"fine-tuned evaluation ({opts.eval_split} split)")
        start = time.perf_counter()
        # Inside the training run folder, so the report pairs these figures with the run's loss curve.
        after = _evaluate(str(final), folder, output / "train" / "eval", opts, console, "fine-tuned")
        timings["fine_tuned_eval_s"] = time.perf_counter() - start
    else:
        console.print(f"[yellow]{folder / 'qrels' / 'train.tsv'} does not exist: skipping fine-tuning (stages 3-4).")
    timings["total_s"] = time.perf_counter() - began

    console.rule("[bold cyan]results")
    console.print(_results_table(before, after, opts.eval_split))
    summary = {
        "data": str(folder),
        "dataset_stats": stats,
        "model": opts.model,
        "fine_tuned_model": str(final) if final else None,
        "zero_shot": before["metrics"],
        "fine_tuned": after["metrics"] if after else None,
        "eval_split": opts.eval_split,
        "num_queries": before["num_queries"],
        "num_docs": before["num_docs"],
        "options": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(opts).items()},
        "timings_s": {k: round(v, 1) for k, v in timings.items()},
    }
    report = _write_report(output, trained=final is not None)
    summary["report"] = str(report)
    write_text_atomic(output / SUMMARY_FILE, json.dumps(summary, indent=2) + "\n")
    if final:
        console.print(f"fine-tuned model (sentence-transformers format): [bold]{final}[/]")
        console.print(f"training log: {output / 'train' / 'train_log.jsonl'}")
    console.print(f"metrics, runs and per-query scores: {output / 'eval'}" + (f", {output / 'train' / 'eval'}" if final else ""))
    console.print(f"report (tables, plots, significance test): [bold]{report}[/]")
    console.print(f"summary: {output / SUMMARY_FILE}    total time {timings['total_s'] / 60:.1f} min")
    return summary
