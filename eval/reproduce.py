"""Reproduction tables: published figures as data, re-measured by ``negatron reproduce``.

A table is a YAML file in the style of pyserini's two-click reproductions (2CR), one row per
published figure::

    rows:
      - dataset: beir/scifact          # folder under the data root (``--data-root``)
        split: test
        retriever: dense               # dense (a BiEncoder) or bm25 (pyserini/Lucene, flat title + text)
        model: sentence-transformers/all-MiniLM-L6-v2
        metric: ndcg@10
        published: 0.645
        tolerance: 0.002
        source: "MTEB results, all-MiniLM-L6-v2, SciFact test ndcg_at_10"

Rows that share retriever, model, parameters, dataset and split are evaluated once. A row whose
dataset folder is absent is reported as skipped, not failed. Shipped tables live in
``configs/reproductions/``.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Sequence

from eval.metrics import parse_metric

ROOT = Path(__file__).resolve().parents[1]
TABLE_DIR = ROOT / "configs" / "reproductions"
RETRIEVERS = ("dense", "bm25")
_REQUIRED = ("dataset", "retriever", "metric", "published", "tolerance", "source")
_KNOWN = set(_REQUIRED) | {"split", "model", "params", "note"}


@dataclass(frozen=True)
class Row:
    dataset: str
    retriever: str
    metric: str
    published: float
    tolerance: float
    source: str
    model: str = ""
    split: str = "test"
    params: dict = field(default_factory=dict, hash=False, compare=False)
    note: str = ""
    table: str = ""

    @property
    def run_key(self) -> tuple:
        """Rows with the same key are measured by one evaluation."""
        return (self.retriever, self.model, tuple(sorted(self.params.items())), self.dataset, self.split)

    @property
    def label(self) -> str:
        return self.model.rsplit("/", 1)[-1] if self.retriever == "dense" else f"BM25 {self.params.get('fields', 'flat')}"


@dataclass
class Outcome:
    row: Row
    measured: float | None  # None: skipped
    status: str  # "ok", "fail", "skipped"
    detail: str = ""
    result: dict | None = None

    @property
    def delta(self) -> float | None:
        return None if self.measured is None else self.measured - self.row.published


def default_tables() -> list[Path]:
    return sorted(TABLE_DIR.glob("*.yaml"))


def default_data_root() -> Path:
    """``$NEGATRON_SHARED_DATA``, else ``../shared/data`` from the working folder, else next to the repository."""
    env = os.environ.get("NEGATRON_SHARED_DATA")
    if env:
        return Path(env)
    here = Path("../shared/data")
    return here if here.is_dir() else ROOT.parent / "shared" / "data"


def load_table(path: str | os.PathLike) -> list[Row]:
    """The rows of one YAML table; a malformed row is a :class:`DataError` naming the file, row and fix."""
    import yaml

    from retriever.data import DataError

    path = Path(path)
    if not path.is_file():
        raise DataError(path, None, "reproduction table not found", f"pass a YAML file, e.g. one of {TABLE_DIR}/*.yaml")
    try:
        doc = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as exc:
        line = getattr(getattr(exc, "problem_mark", None), "line", None)
        raise DataError(path, None if line is None else line + 1, f"not valid YAML ({exc})", "fix the YAML syntax") from None
    entries = doc.get("rows") if isinstance(doc, dict) else None
    if not isinstance(entries, list) or not entries:
        raise DataError(path, None, "no `rows:` list", "write `rows:` followed by one mapping per published figure")
    rows = []
    for i, entry in enumerate(entries, start=1):
        where = f"row {i}"
        if not isinstance(entry, dict):
            raise DataError(path, None, f"{where} is not a mapping", "give dataset, retriever, metric, published, tolerance, source")
        missing = [k for k in _REQUIRED if k not in entry]
        unknown = sorted(set(entry) - _KNOWN)
        if missing or unknown:
            problem = f"{where} " + (f"lacks {', '.join(missing)}" if missing else f"has unknown keys {', '.join(unknown)}")
            raise DataError(path, None, problem, f"keys are {', '.join(sorted(_KNOWN))}")
        if entry["retriever"] not in RETRIEVERS:
            raise DataError(path, None, f"{where}: unknown retriever {entry['retriever']!r}", f"choose {' or '.join(RETRIEVERS)}")
        if entry["retriever"] == "dense" and not entry.get("model"):
            raise DataError(path, None, f"{where}: a dense row needs a model", "add `model: <name or folder>`")
        try:
            parse_metric(str(entry["metric"]))
            published, tolerance = float(entry["published"]), float(entry["tolerance"])
        except (TypeError, ValueError) as exc:
            raise DataError(path, None, f"{where}: {exc}", "metric like ndcg@10; published and tolerance are numbers") from None
        rows.append(Row(dataset=str(entry["dataset"]), retriever=entry["retriever"], metric=str(entry["metric"]).lower(),
                        published=published, tolerance=tolerance, source=str(entry["source"]),
                        model=str(entry.get("model", "")), split=str(entry.get("split", "test")),
                        params=dict(entry.get("params") or {}), note=str(entry.get("note", "")), table=str(path)))
    return rows


def load_tables(paths: Iterable[str | os.PathLike] = ()) -> list[Row]:
    return [row for p in (list(paths) or default_tables()) for row in load_table(p)]


def _output_name(row: Row) -> str:
    p = row.params
    label = (row.model.rstrip("/").rsplit("/", 1)[-1] if row.retriever == "dense"
             else f"bm25-{p.get('fields', 'flat')}-k1={p.get('k1', 0.9)}-b={p.get('b', 0.4)}")
    return f"{label}/{row.split}"  # the evaluation adds /<dataset name>/


def measure(row: Row, data_dir: Path, output_dir: Path | None = None, batch_size: int | None = None,
            bf16: bool | None = None, progress=None) -> dict:
    """Evaluate ``row``'s retriever on ``data_dir``; the metrics.json dict (written under ``output_dir``)."""
    out = None if output_dir is None else Path(output_dir) / _output_name(row)
    if row.retriever == "dense":
        from eval.beir import evaluate_beir

        return evaluate_beir(row.model, data_dir, split=row.split, output_dir=out, batch_size=batch_size, bf16=bf16,
                             progress=progress)
    return _measure_bm25(row, data_dir, out)


def _measure_bm25(row: Row, data_dir: Path, out: Path | None) -> dict:
    """pyserini BM25 over a flat ``title + " " + text`` Lucene index, scored by negatron (as the BEIR regressions)."""
    import tempfile
    import time

    from eval.beir import check_qrels, evaluate_run
    from index.bm25 import BM25Searcher, build_bm25_index
    from retriever.data import load_beir

    fields = row.params.get("fields", "flat")
    if fields != "flat":
        raise ValueError(f"BM25 fields {fields!r} are not supported; index.bm25 builds flat (title + text) indexes")
    start = time.perf_counter()
    data = load_beir(data_dir, row.split, check_ids=False)
    dangling = check_qrels(Path(data_dir) / "qrels" / f"{row.split}.tsv", data.qrels, data.queries, data.corpus)
    with tempfile.TemporaryDirectory(prefix="negatron-bm25-") as tmp:
        searcher = BM25Searcher(build_bm25_index(data.corpus, Path(tmp) / "index"),
                                k1=float(row.params.get("k1", 0.9)), b=float(row.params.get("b", 0.4)))
        run = {qid: dict(pairs) for qid, pairs in searcher.search(data.queries, k=1000).items()}
    return evaluate_run(data.name, row.split, f"bm25 {fields} k1={searcher.k1} b={searcher.b}", data.queries,
                        data.qrels, run, num_docs=len(data.corpus), seconds=time.perf_counter() - start,
                        output_dir=out, extra={"k": 1000, "dangling_qrels": dangling})


def reproduce(rows: Sequence[Row], data_root: str | os.PathLike | None = None, output_dir=None,
              batch_size: int | None = None, bf16: bool | None = None, progress=None) -> list[Outcome]:
    """Measure every row (each distinct evaluation once) and compare with its published value."""
    data_root = Path(data_root) if data_root is not None else default_data_root()
    measured: dict[tuple, dict | Exception] = {}
    outcomes = []
    for row in rows:
        data_dir = data_root / row.dataset
        if not (data_dir / "corpus.jsonl").is_file():
            outcomes.append(Outcome(row, None, "skipped", f"{data_dir} is absent"))
            continue
        if row.run_key not in measured:
            try:
                measured[row.run_key] = measure(row, data_dir, output_dir, batch_size, bf16, progress)
            except ImportError as exc:  # pyserini (BM25 rows) not installed
                measured[row.run_key] = exc
            except RuntimeError as exc:  # index.java.JavaSetupError: no usable Java for BM25 rows
                if type(exc).__name__ != "JavaSetupError":
                    raise
                measured[row.run_key] = exc
        result = measured[row.run_key]
        if isinstance(result, Exception):
            outcomes.append(Outcome(row, None, "skipped", f"cannot run: {result}"))
            continue
        value = float(result["metrics"][row.metric]) if row.metric in result["metrics"] else None
        if value is None:
            outcomes.append(Outcome(row, None, "fail", f"{row.metric} was not computed", result))
            continue
        ok = abs(value - row.published) <= row.tolerance + 1e-12
        outcomes.append(Outcome(row, value, "ok" if ok else "fail", "", result))
    return outcomes
