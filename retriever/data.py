"""Readers for retrieval data: BEIR folders, MS MARCO TSVs, Hugging Face datasets and
hard-negative training JSONL (FlagEmbedding / Tevatron layout).

Everything streams. Corpora are opened through a shared on-disk offset index (:mod:`retriever.offset_index`,
memory-mapped: ~41 bytes a document plus its id bytes, built once per corpus version), never a dict of texts.
Every malformed record raises :class:`DataError` naming the file, the line and the fix.
"""

from __future__ import annotations

import json
import os
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Iterator, Mapping, Sequence

import numpy as np

__all__ = [
    "DataError",
    "Document",
    "TrainingExample",
    "Corpus",
    "BeirDataset",
    "iter_corpus",
    "read_queries",
    "read_qrels",
    "iter_triples",
    "iter_training_jsonl",
    "load_beir",
    "load_hf_dataset",
    "training_examples_from_qrels",
]


class DataError(ValueError):
    """A data file is malformed. The message names the file, the line and the fix."""

    def __init__(self, path: str | os.PathLike, line: int | None, problem: str, fix: str):
        self.path, self.line, self.problem, self.fix = str(path), line, problem, fix
        where = f"{path}:{line}" if line is not None else f"{path}"
        super().__init__(f"{where}: {problem}. Fix: {fix}")


@dataclass(frozen=True)
class Document:
    id: str
    text: str
    title: str = ""

    @property
    def full_text(self) -> str:
        """BEIR/MTEB convention: title and text joined by a space."""
        return f"{self.title} {self.text}".strip() if self.title else self.text


@dataclass
class TrainingExample:
    """One training query with its positives and (optional) hard negatives, as texts."""

    query: str
    positives: list[str]
    negatives: list[str] = field(default_factory=list)
    query_id: str | None = None
    positive_ids: list[str] = field(default_factory=list)
    negative_ids: list[str] = field(default_factory=list)
    positive_scores: list[float] | None = None
    negative_scores: list[float] | None = None


def _require_file(path: Path, what: str) -> Path:
    if not path.is_file():
        raise DataError(path, None, f"{what} not found", "check the path (relative paths resolve from the working directory)")
    return path


def _detect_corpus_format(path: Path) -> str:
    name = path.name.lower()
    if name.endswith((".jsonl", ".json")):
        return "jsonl"
    if name.endswith((".tsv", ".txt")):
        return "tsv"
    raise DataError(path, None, "unknown corpus format", "use a BEIR corpus.jsonl or an MS MARCO-style `id<TAB>text` .tsv")


def _parse_jsonl_doc(path: Path, lineno: int, raw: bytes) -> Document:
    try:
        obj = json.loads(raw)
    except json.JSONDecodeError as exc:
        raise DataError(path, lineno, f"malformed JSON ({exc.msg} at column {exc.colno})", "each line must be one JSON object") from None
    if not isinstance(obj, dict):
        raise DataError(path, lineno, "line is not a JSON object", 'write {"_id": ..., "title": ..., "text": ...}')
    doc_id = obj.get("_id", obj.get("id", obj.get("docid")))
    if doc_id is None:
        raise DataError(path, lineno, "document has no id", 'add an "_id" field (BEIR) or "docid" (Tevatron)')
    text = obj.get("text", obj.get("contents"))
    if text is None:
        raise DataError(path, lineno, f"document {doc_id!r} has no text field", 'add a "text" field')
    title = obj.get("title") or ""
    if not str(text).strip() and not str(title).strip():
        raise DataError(path, lineno, f"document {doc_id!r} has an empty text and title", "remove the line or give the document text")
    return Document(str(doc_id), str(text), str(title))


def _parse_tsv_doc(path: Path, lineno: int, raw: bytes) -> Document:
    line = raw.decode("utf-8", errors="replace").rstrip("\r\n")
    parts = line.split("\t")
    if len(parts) < 2:
        raise DataError(path, lineno, "expected `id<TAB>text` (or `id<TAB>text<TAB>title`)", "separate the id and the text with one tab")
    doc_id, text = parts[0].strip(), parts[1]
    title = parts[2] if len(parts) > 2 else ""
    if not doc_id:
        raise DataError(path, lineno, "empty document id", "every line must start with an id")
    if not text.strip() and not title.strip():
        raise DataError(path, lineno, f"document {doc_id!r} has an empty text", "remove the line or give the document text")
    return Document(doc_id, text, title)


def iter_corpus(path: str | os.PathLike) -> Iterator[Document]:
    """Stream documents from a BEIR ``corpus.jsonl`` or an MS MARCO ``collection.tsv``."""
    path = _require_file(Path(path), "corpus file")
    fmt = _detect_corpus_format(path)
    parse = _parse_jsonl_doc if fmt == "jsonl" else _parse_tsv_doc
    with open(path, "rb") as fh:
        for lineno, raw in enumerate(fh, start=1):
            if raw.strip():
                yield parse(path, lineno, raw)


class Corpus(Sequence[Document]):
    """Random access to a corpus file through a shared, memory-mapped offset index.

    The index (byte offset, id and id hash per document; :mod:`retriever.offset_index`) is built on the
    first open of a corpus version and cached on disk, so every later ``Corpus(path)`` - in the trainer,
    STAR, ANCE, the mining service, another process - maps the same files instead of rescanning: ~41 bytes
    a document on disk, only touched pages resident, no Python object per document. ``ids`` is a read-only
    sequence of strings. Duplicate ids are an error naming both lines. Thread-safe: the mining service's
    refresh thread re-encodes the corpus while the trainer reads negatives' texts from the same object.
    """

    def __init__(self, path: str | os.PathLike):
        from retriever.offset_index import OffsetIndex

        self.path = _require_file(Path(path), "corpus file")
        self._fmt = _detect_corpus_format(self.path)
        self._parse = _parse_jsonl_doc if self._fmt == "jsonl" else _parse_tsv_doc
        self._index = OffsetIndex.open_or_build(self.path, self._scan, self._duplicate)
        if not len(self._index):
            raise DataError(self.path, None, "corpus is empty", "point at a file with at least one document")
        self._offsets = self._index.offsets
        self._fh = None
        self._lock = threading.Lock()  # one file position shared by every reader
        self._keys_lock = threading.Lock()
        self._text_keys = None

    def _scan(self) -> Iterator[tuple[int, int, str]]:
        """Every document's (line number, byte offset, id), validating each line as it goes."""
        with open(self.path, "rb") as fh:
            pos = 0
            for lineno, raw in enumerate(fh, start=1):
                if raw.strip():
                    yield lineno, pos, self._parse(self.path, lineno, raw).id
                pos += len(raw)

    def _duplicate(self, first: int, second: int, doc_id: str, offsets: np.ndarray) -> None:
        raise DataError(self.path, self._lineno_of(second, offsets), f"duplicate document id {doc_id!r} "
                        f"(first seen on line {self._lineno_of(first, offsets)})",
                        "ids must be unique: remove or rename one of the two")

    @property
    def ids(self):
        """Row -> document id (a memory-mapped :class:`~retriever.offset_index.CorpusIds`)."""
        return self._index.ids

    def _lineno_of(self, row: int, offsets: Sequence[int]) -> int:
        """Line number of a row (error messages only): counts newlines in 1 MiB chunks."""
        remaining, lines = int(offsets[row]), 1
        with open(self.path, "rb") as fh:
            while remaining > 0:
                chunk = fh.read(min(remaining, 1 << 20))
                if not chunk:
                    break
                lines += chunk.count(b"\n")
                remaining -= len(chunk)
        return lines

    def __len__(self) -> int:
        return len(self._index)

    def __contains__(self, doc_id: object) -> bool:
        return isinstance(doc_id, str) and self._index.row(doc_id) is not None

    def row(self, doc_id: str) -> int:
        row = self._index.row(doc_id) if isinstance(doc_id, str) else None
        if row is None:
            raise KeyError(f"document id {doc_id!r} is not in {self.path}")
        return row

    def rows(self, doc_ids: Iterable[str]) -> np.ndarray:
        """int64 rows of many ids (-1 for an unknown id): how id-based training data reaches texts."""
        return self._index.rows(list(doc_ids))

    def _read(self, row: int) -> Document:
        with self._lock:
            if self._fh is None:
                self._fh = open(self.path, "rb")
            if row < 0:
                row += len(self)
            self._fh.seek(self._index.offset(row))
            raw = self._fh.readline()
        try:
            return self._parse(self.path, None, raw)
        except DataError as exc:  # the file changed after it was indexed: name the real line
            raise DataError(self.path, self._lineno_of(row, self._offsets), exc.problem,
                            f"{exc.fix} (the file changed since it was opened? reopen it)") from None

    def __getitem__(self, key):  # type: ignore[override]
        if isinstance(key, slice):
            return [self._read(i) for i in range(*key.indices(len(self)))]
        if isinstance(key, (int, np.integer)):
            return self._read(int(key))
        raise TypeError("index a Corpus by row number; use corpus.get(doc_id) for ids")

    def get(self, doc_id: str) -> Document:
        return self._read(self.row(doc_id))

    def __iter__(self) -> Iterator[Document]:
        return iter_corpus(self.path)

    def texts(self, rows: Iterable[int]) -> list[str]:
        return [self._read(int(r)).full_text for r in rows]

    def release_pages(self) -> None:
        """Unmap the offset index's pages that a burst of lookups (a qrels file's ids, a spot check) left
        resident; later reads map back what they touch (:func:`retriever.memory.release_mapped_pages`)."""
        self._index.release_pages(self._text_keys)

    def iter_text_keys(self, block: int = 1 << 20) -> Iterator[tuple[int, np.ndarray]]:
        """``(first row, keys)`` blocks of every row's :meth:`text_keys`, in row order, read through a map that
        is closed afterwards: a scan of the whole corpus (67 MiB at 8.8M) leaves none of it resident."""
        self.text_keys(np.empty(0, np.int64))  # made and cached on first use
        path = self._index.folder / "text_keys.npy" if self._index.folder is not None else None
        keys = np.load(path, mmap_mode="r") if path is not None and path.is_file() else self._text_keys
        try:
            for lo in range(0, len(keys), block):
                yield lo, np.array(keys[lo:lo + block])
        finally:
            del keys

    def text_keys(self, rows) -> np.ndarray:
        """:func:`~retriever.offset_index.text_key` of each row's stripped full text (int64). Tests for
        duplicate passages compare these instead of reading every candidate's text; the array is made in one
        pass over the file on first use and cached beside the offset index (8 bytes a document)."""
        with self._keys_lock:
            if self._text_keys is None:
                self._text_keys = self._index.text_keys(lambda: (doc.full_text.strip() for doc in self))
        return self._text_keys[np.asarray(rows, dtype=np.int64)]

    def __getstate__(self):
        state = self.__dict__.copy()
        state["_fh"] = None
        del state["_lock"], state["_keys_lock"]
        state["_text_keys"] = None  # reopened from the cache on first use
        if self._index.folder is not None:  # ship the folder name, not 8.8M offsets (DataLoader workers)
            del state["_index"], state["_offsets"]
            state["_index_folder"] = self._index.folder
        return state

    def __setstate__(self, state):
        folder = state.pop("_index_folder", None)
        self.__dict__.update(state)
        if folder is not None:
            from retriever.offset_index import OffsetIndex

            self._index = OffsetIndex.open(folder)
            self._offsets = self._index.offsets
        self._lock = threading.Lock()
        self._keys_lock = threading.Lock()

    def __del__(self):
        if getattr(self, "_fh", None) is not None:
            self._fh.close()


def read_queries(path: str | os.PathLike) -> dict[str, str]:
    """Queries from BEIR ``queries.jsonl`` or MS MARCO ``queries.*.tsv`` (``qid<TAB>text``)."""
    path = _require_file(Path(path), "queries file")
    queries: dict[str, str] = {}
    lines: dict[str, int] = {}
    is_jsonl = path.name.lower().endswith((".jsonl", ".json"))
    with open(path, "r", encoding="utf-8", errors="replace") as fh:
        for lineno, line in enumerate(fh, start=1):
            if not line.strip():
                continue
            if is_jsonl:
                try:
                    obj = json.loads(line)
                except json.JSONDecodeError as exc:
                    raise DataError(path, lineno, f"malformed JSON ({exc.msg})", "each line must be one JSON object") from None
                qid, text = obj.get("_id", obj.get("query_id", obj.get("id"))), obj.get("text", obj.get("query"))
                if qid is None or text is None:
                    raise DataError(path, lineno, "query needs an id and a text", 'write {"_id": ..., "text": ...}')
            else:
                parts = line.rstrip("\r\n").split("\t")
                if len(parts) < 2:
                    raise DataError(path, lineno, "expected `qid<TAB>query`", "separate id and query with one tab")
                qid, text = parts[0], parts[1]
            qid, text = str(qid).strip(), str(text).strip()
            if not text:
                raise DataError(path, lineno, f"query {qid!r} is empty", "remove the line or give the query text")
            if qid in queries:
                raise DataError(path, lineno, f"duplicate query id {qid!r} (first seen on line {lines[qid]})", "query ids must be unique")
            queries[qid] = text
            lines[qid] = lineno
    return queries


def read_qrels(path: str | os.PathLike) -> dict[str, dict[str, int]]:
    """Relevance judgements from BEIR TSV (with header), TREC (``qid Q0 docid rel``) or
    MS MARCO TSV (``qid<TAB>0<TAB>pid<TAB>rel`` or ``qid<TAB>pid``)."""
    path = _require_file(Path(path), "qrels file")
    qrels: dict[str, dict[str, int]] = {}
    with open(path, "r", encoding="utf-8") as fh:
        for lineno, line in enumerate(fh, start=1):
            parts = line.split()
            if not parts:
                continue
            if lineno == 1 and parts[0].lower() in {"query-id", "qid", "query_id"}:
                continue  # BEIR header
            if len(parts) == 3:
                qid, docid, rel = parts
            elif len(parts) == 4:
                qid, _, docid, rel = parts
            elif len(parts) == 2:
                (qid, docid), rel = parts, "1"
            else:
                raise DataError(path, lineno, f"expected 2, 3 or 4 columns, found {len(parts)}",
                                "use BEIR `query-id corpus-id score`, TREC `qid Q0 docid rel` or `qid docid`")
            try:
                grade = int(float(rel))
            except ValueError:
                raise DataError(path, lineno, f"relevance {rel!r} is not a number", "the last column must be an integer grade") from None
            qrels.setdefault(qid, {})[docid] = grade
    if not qrels:
        raise DataError(path, None, "no judgements found", "the file is empty or has only a header")
    return qrels


def iter_triples(path: str | os.PathLike) -> Iterator[TrainingExample]:
    """MS MARCO ``triples.train.small.tsv``: ``query<TAB>positive<TAB>negative`` (texts)."""
    path = _require_file(Path(path), "triples file")
    with open(path, "r", encoding="utf-8", errors="replace") as fh:
        for lineno, line in enumerate(fh, start=1):
            if not line.strip():
                continue
            parts = line.rstrip("\r\n").split("\t")
            if len(parts) != 3:
                raise DataError(path, lineno, f"expected 3 tab-separated columns, found {len(parts)}",
                                "each line is `query<TAB>positive passage<TAB>negative passage`")
            q, p, n = (s.strip() for s in parts)
            for name, value in (("query", q), ("positive", p), ("negative", n)):
                if not value:
                    raise DataError(path, lineno, f"empty {name}", "remove the line or fill the column")
            yield TrainingExample(query=q, positives=[p], negatives=[n])


def _texts_or_ids(path, lineno, obj, key, corpus: Corpus | None) -> tuple[list[str], list[str]]:
    values = obj.get(key, [])
    if isinstance(values, (str, int)):
        values = [values]
    if not isinstance(values, list):
        raise DataError(path, lineno, f"{key!r} must be a list", f'write "{key}": ["..."]')
    texts, ids = [], []
    for v in values:
        if isinstance(v, dict):  # Tevatron: {"docid", "title", "text"}
            doc = Document(str(v.get("docid", v.get("_id", ""))), str(v.get("text", "")), str(v.get("title", "")))
            texts.append(doc.full_text)
            ids.append(doc.id)
        elif corpus is not None and str(v) in corpus:
            ids.append(str(v))
            texts.append(corpus.get(str(v)).full_text)
        elif isinstance(v, int) or (corpus is not None and str(v).isdigit() and len(str(v)) < 12):
            raise DataError(path, lineno, f"{key} id {v!r} is not in the corpus",
                            "pass the corpus these ids come from, or write the passage text instead of its id")
        else:
            texts.append(str(v))
    for t in texts:
        if not t.strip():
            raise DataError(path, lineno, f"empty text in {key!r}", "remove the empty entry")
    return texts, ids


def iter_jsonl_objects(path: Path, fh) -> Iterator[tuple[int, dict]]:
    """``(line number, object)`` for each non-blank line of an open JSONL handle; a line that is not one JSON
    object is a :class:`DataError` naming the file and line."""
    for lineno, line in enumerate(fh, start=1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as exc:
            raise DataError(path, lineno, f"malformed JSON ({exc.msg} at column {exc.colno})",
                            "each line must be one JSON object") from None
        if not isinstance(obj, dict):
            raise DataError(path, lineno, f"a JSON {type(obj).__name__}, not an object", "each line must be one JSON object")
        yield lineno, obj


def training_record_keys(path: Path, lineno: int, obj: dict) -> tuple[str, str, str]:
    """The query text and the positive / negative keys of one FlagEmbedding or Tevatron training record."""
    if "query" not in obj:
        raise DataError(path, lineno, 'missing "query"', 'write {"query": "...", "pos": ["..."], "neg": ["..."]}')
    pos_key = "pos" if "pos" in obj else "positive_passages"
    neg_key = "neg" if "neg" in obj else "negative_passages"
    if pos_key not in obj:
        raise DataError(path, lineno, 'missing "pos"', 'add "pos": [positive passage texts or corpus ids]')
    query = str(obj["query"]).strip()
    if not query:
        raise DataError(path, lineno, "empty query", "remove the line or give the query text")
    return query, pos_key, neg_key


def iter_training_jsonl(path: str | os.PathLike, corpus: Corpus | None = None) -> Iterator[TrainingExample]:
    """Hard-negative training JSONL.

    FlagEmbedding: ``{"query": str, "pos": [str], "neg": [str], "pos_scores"?, "neg_scores"?}``.
    Tevatron: ``{"query_id", "query", "positive_passages": [{docid,title,text}], "negative_passages": [...]}``.
    ``pos``/``neg`` may hold corpus ids instead of texts when ``corpus`` is given.
    """
    path = _require_file(Path(path), "training file")
    with open(path, "r", encoding="utf-8") as fh:
        for lineno, obj in iter_jsonl_objects(path, fh):
            query, pos_key, neg_key = training_record_keys(path, lineno, obj)
            pos, pos_ids = _texts_or_ids(path, lineno, obj, pos_key, corpus)
            if not pos:
                raise DataError(path, lineno, "no positives", "every training query needs at least one positive")
            neg, neg_ids = _texts_or_ids(path, lineno, obj, neg_key, corpus)
            pos_scores, neg_scores = obj.get("pos_scores"), obj.get("neg_scores")
            if pos_scores is not None and len(pos_scores) != len(pos):
                raise DataError(path, lineno, f"{len(pos_scores)} pos_scores for {len(pos)} positives", "give one score per positive")
            if neg_scores is not None and len(neg_scores) != len(neg):
                raise DataError(path, lineno, f"{len(neg_scores)} neg_scores for {len(neg)} negatives", "give one score per negative")
            yield TrainingExample(query=query, positives=pos, negatives=neg, query_id=obj.get("query_id", obj.get("qid")),
                                  positive_ids=pos_ids, negative_ids=neg_ids,
                                  positive_scores=pos_scores, negative_scores=neg_scores)


@dataclass
class BeirDataset:
    name: str
    corpus: Corpus
    queries: dict[str, str]
    qrels: dict[str, dict[str, int]]
    split: str


def load_beir(folder: str | os.PathLike, split: str = "test", check_ids: bool = True) -> BeirDataset:
    """A BEIR folder: ``corpus.jsonl``, ``queries.jsonl``, ``qrels/<split>.tsv``.

    Queries are restricted to those judged in the split. With ``check_ids``, qrels that name
    an unknown query or document are an error (BEIR would silently score them as misses).
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise DataError(folder, None, "BEIR folder not found", "point at a folder holding corpus.jsonl, queries.jsonl and qrels/")
    qrels_path = folder / "qrels" / f"{split}.tsv"
    if not qrels_path.is_file():
        have = sorted(p.stem for p in (folder / "qrels").glob("*.tsv")) if (folder / "qrels").is_dir() else []
        raise DataError(qrels_path, None, f"split {split!r} not found", f"choose one of {have or 'the splits under qrels/'}")
    corpus = Corpus(folder / "corpus.jsonl")
    all_queries = read_queries(folder / "queries.jsonl")
    qrels = read_qrels(qrels_path)
    if check_ids:
        for qid, docs in qrels.items():
            if qid not in all_queries:
                raise DataError(qrels_path, None, f"query id {qid!r} is judged but not in queries.jsonl", "fix the qrels or the queries file")
            missing = [d for d in docs if d not in corpus]
            if missing:
                raise DataError(qrels_path, None, f"query {qid!r} judges unknown document ids {missing[:3]}", "fix the qrels or the corpus file")
    queries = {qid: all_queries[qid] for qid in qrels if qid in all_queries}
    return BeirDataset(folder.name, corpus, queries, qrels, split)


def training_examples_from_qrels(queries: Mapping[str, str], qrels: Mapping[str, Mapping[str, int]], corpus: Corpus,
                                 min_relevance: int = 1) -> list[TrainingExample]:
    """One example per judged query, positives = documents with grade ≥ ``min_relevance``."""
    examples = []
    for qid, judged in qrels.items():
        pos_ids = [d for d, g in judged.items() if g >= min_relevance]
        if not pos_ids or qid not in queries:
            continue
        examples.append(TrainingExample(query=queries[qid], positives=[corpus.get(d).full_text for d in pos_ids],
                                        query_id=qid, positive_ids=pos_ids))
    return examples


def load_hf_dataset(path: str, split: str = "train", columns: Mapping[str, str] | None = None, data_files=None):
    """A Hugging Face ``datasets`` table from a local dir/file (parquet, json, csv, arrow) or a hub name.

    ``columns`` maps negatron's names (``query``, ``pos``, ``neg``, ``id``, ``text``, ``title``) to the
    dataset's own; the result is renamed to negatron's names and memory-mapped by Arrow.
    """
    import datasets

    p = Path(path)
    if p.is_file():
        builder = {".parquet": "parquet", ".jsonl": "json", ".json": "json", ".csv": "csv", ".tsv": "csv", ".arrow": "arrow"}.get(p.suffix)
        if builder is None:
            raise DataError(p, None, f"unsupported file type {p.suffix!r}", "use parquet, jsonl, csv or arrow")
        kwargs = {"delimiter": "\t"} if p.suffix == ".tsv" else {}
        ds = datasets.load_dataset(builder, data_files=str(p), split=split, **kwargs)
    elif p.is_dir() and (p / "dataset_info.json").exists():
        ds = datasets.load_from_disk(str(p))
    else:
        ds = datasets.load_dataset(path, split=split, data_files=data_files)
    if columns:
        missing = [src for src in columns.values() if src not in ds.column_names]
        if missing:
            raise DataError(path, None, f"columns {missing} not in dataset (it has {ds.column_names})", "fix the column mapping")
        ds = ds.rename_columns({src: dst for dst, src in columns.items() if src != dst})
    return ds


def training_examples_from_hf(ds) -> Iterator[TrainingExample]:
    """Rows with ``query``, ``pos`` (str or list) and optional ``neg`` columns; ``query_id``/``id``,
    ``pos_ids``, ``neg_ids`` and score columns are kept when present."""
    from retriever.example_table import _hf_row

    for i, row in enumerate(ds):
        yield _hf_row(row, i)


def write_jsonl_atomic(path: str | os.PathLike, rows: Iterable[dict]) -> Path:
    """Write JSONL through a temp file and a rename, so a kill never leaves half a file."""
    from retriever.io import atomic_write

    with atomic_write(path, "w") as fh:
        for row in rows:
            fh.write(json.dumps(row, ensure_ascii=False) + "\n")
    return Path(path)
