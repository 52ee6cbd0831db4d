"""Training examples stored compactly: ids and packed bytes, turned into :class:`TrainingExample` on access.

At MS MARCO scale a list of ``TrainingExample`` objects holding texts does not fit (40M triples ~55 GB;
a 503k-query JSONL with corpus ids expanded to texts ~11 GB). Every source here is a read-only
``Sequence[TrainingExample]`` whose ``[i]`` builds one example when the collator asks for it:

* :class:`ExampleTable` - qrels, BEIR and hard-negative JSONL: queries as packed UTF-8, positives and
  negatives as CSR arrays of int64 *corpus rows* (a passage's text is read from the corpus offset index
  at collate time) or, for inline texts, references into a packed text store; scores as float32.
* :class:`TriplesFile` - ``triples.train.small.tsv``: a memory-mapped line-offset index (8 bytes a line,
  built once and cached); line ``i`` is read and parsed when example ``i`` is collated.
* :class:`HFExamples` - a Hugging Face ``datasets`` table, left in (memory-mapped) Arrow; ids survive.
* :class:`ExampleView` - a row subset (the dev carve-out, ``max_examples``) without copying.
"""

from __future__ import annotations

from array import array
from pathlib import Path
from typing import Iterable, Iterator, Sequence

import numpy as np

from retriever.data import (Corpus, DataError, TrainingExample, _require_file, iter_jsonl_objects,
                            training_record_keys)
from retriever.offset_index import CorpusIds, PreadColumn, line_offsets


def open_text(path: Path):
    """A text handle on a plain or gzip-compressed (``.gz``) file."""
    import gzip

    return gzip.open(path, "rt", encoding="utf-8") if path.name.endswith(".gz") else open(path, "r", encoding="utf-8")


def _position(key, n: int, what: str) -> int:
    """``key`` as a position in ``range(n)`` (negative counts from the end), or an IndexError."""
    i = int(key)
    if i < 0:
        i += n
    if not 0 <= i < n:
        raise IndexError(f"{what} {key} out of range for {n}")
    return i


class StringPacker:
    """Appends strings into one bytearray + an int64 end per string (no Python object per string)."""

    def __init__(self):
        self._blob, self._ends = bytearray(), array("q")

    def add(self, text: str) -> int:
        self._blob += text.encode("utf-8")
        self._ends.append(len(self._blob))
        return len(self._ends) - 1

    def __len__(self) -> int:
        return len(self._ends)

    def freeze(self) -> CorpusIds:
        ends = np.frombuffer(self._ends, dtype=np.int64).copy() if len(self._ends) else np.empty(0, np.int64)
        return CorpusIds(np.frombuffer(bytes(self._blob), dtype=np.uint8), ends)


class _Csr:
    """A ragged int64 (or float32) column: ``values[ptr[i]:ptr[i+1]]`` per example."""

    def __init__(self, dtype: str = "q"):
        self.ptr, self.values, self._code = array("q", [0]), array(dtype), dtype

    def add(self, items: Iterable) -> None:
        self.values.extend(items)
        self.ptr.append(len(self.values))

    def freeze(self) -> tuple[np.ndarray, np.ndarray]:
        dt = np.int64 if self._code == "q" else np.float32
        vals = np.frombuffer(self.values, dtype=dt).copy() if len(self.values) else np.empty(0, dt)
        return np.frombuffer(self.ptr, dtype=np.int64).copy(), vals


class ExampleTable(Sequence[TrainingExample]):
    """Examples as ids. A passage entry ``v >= 0`` is corpus row ``v``; ``v < 0`` is inline text ``-v - 1``."""

    def __init__(self, corpus: Corpus | None, queries: CorpusIds, query_ids: CorpusIds | None,
                 pos: tuple[np.ndarray, np.ndarray], neg: tuple[np.ndarray, np.ndarray], texts: CorpusIds,
                 text_ids: CorpusIds, pos_scores=None, neg_scores=None):
        self.corpus, self.queries, self.query_ids = corpus, queries, query_ids
        self.pos_ptr, self.pos_rows = pos
        self.neg_ptr, self.neg_rows = neg
        self.texts, self.text_ids = texts, text_ids
        self.pos_scores, self.neg_scores = pos_scores, neg_scores

    def __len__(self) -> int:
        return len(self.queries)

    def _passages(self, refs: np.ndarray) -> tuple[list[str], list[str]]:
        texts, ids = [], []
        for v in refs.tolist():
            if v >= 0:
                doc = self.corpus[v]
                texts.append(doc.full_text)
                ids.append(doc.id)
            else:
                texts.append(self.texts[-v - 1])
                tid = self.text_ids[-v - 1]
                if tid:
                    ids.append(tid)
        return texts, ids

    def positive_rows(self, i: int) -> np.ndarray:
        """Corpus rows of example ``i``'s positives (inline-text positives excluded): for id-based strategies."""
        refs = self.pos_rows[self.pos_ptr[i]:self.pos_ptr[i + 1]]
        return refs[refs >= 0]

    def negative_rows(self, i: int) -> np.ndarray:
        refs = self.neg_rows[self.neg_ptr[i]:self.neg_ptr[i + 1]]
        return refs[refs >= 0]

    def _one(self, i: int) -> TrainingExample:
        pos, pos_ids = self._passages(self.pos_rows[self.pos_ptr[i]:self.pos_ptr[i + 1]])
        neg, neg_ids = self._passages(self.neg_rows[self.neg_ptr[i]:self.neg_ptr[i + 1]])

        def scores(column):
            if column is None or not column[2][i]:  # column = (ptr, values, per-example "was given" flags)
                return None
            return column[1][column[0][i]:column[0][i + 1]].tolist()

        qid = self.query_ids[i] if self.query_ids is not None else ""
        return TrainingExample(query=self.queries[i], positives=pos, negatives=neg, query_id=qid or None,
                               positive_ids=pos_ids, negative_ids=neg_ids,
                               positive_scores=scores(self.pos_scores), negative_scores=scores(self.neg_scores))

    def __getitem__(self, key):  # type: ignore[override]
        if isinstance(key, slice):
            return ExampleView(self, np.arange(len(self))[key])
        return self._one(_position(key, len(self), "example"))

    def nbytes(self) -> int:
        """Bytes held by the table's arrays (what a list of texts would have cost is the comparison)."""
        arrays = [self.pos_ptr, self.pos_rows, self.neg_ptr, self.neg_rows, self.queries._bytes, self.queries._ends,
                  self.texts._bytes, self.texts._ends]
        return int(sum(a.nbytes for a in arrays))


class ExampleTableBuilder:
    """Streams examples in; ``build()`` freezes them into an :class:`ExampleTable`."""

    def __init__(self, corpus: Corpus | None):
        self.corpus = corpus
        self.queries, self.query_ids, self.texts, self.text_ids = StringPacker(), StringPacker(), StringPacker(), StringPacker()
        self.pos, self.neg = _Csr(), _Csr()
        self.pos_scores, self.neg_scores = _Csr("f"), _Csr("f")
        self._given = [array("b"), array("b")]

    def text_ref(self, text: str, doc_id: str = "") -> int:
        self.text_ids.add(doc_id)
        return -self.texts.add(text) - 1

    def add(self, query: str, query_id: str | None, pos: Sequence[int], neg: Sequence[int],
            pos_scores: Sequence[float] | None = None, neg_scores: Sequence[float] | None = None) -> None:
        self.queries.add(query)
        self.query_ids.add(query_id or "")
        self.pos.add(pos)
        self.neg.add(neg)
        for k, (col, vals, n) in enumerate(((self.pos_scores, pos_scores, len(pos)), (self.neg_scores, neg_scores, len(neg)))):
            self._given[k].append(vals is not None)
            col.add([float(v) for v in vals] if vals is not None else [float("nan")] * n)

    def __len__(self) -> int:
        return len(self.queries)

    def build(self) -> ExampleTable:
        if self.corpus is not None:  # the rows were looked up by id: 503k scattered reads at MS MARCO scale
            self.corpus.release_pages()
        return ExampleTable(self.corpus, self.queries.freeze(), self.query_ids.freeze(), self.pos.freeze(), self.neg.freeze(),
                            self.texts.freeze(), self.text_ids.freeze(),
                            self._scores(0, self.pos_scores), self._scores(1, self.neg_scores))

    def _scores(self, k: int, col: _Csr):
        given = np.frombuffer(self._given[k], dtype=np.int8).astype(bool) if len(self._given[k]) else np.zeros(0, bool)
        return (*col.freeze(), given) if given.any() else None


class ExampleView(Sequence[TrainingExample]):
    """Rows ``rows`` of a base sequence, in that order."""

    def __init__(self, base: Sequence[TrainingExample], rows: np.ndarray):
        if isinstance(base, ExampleView):
            base, rows = base.base, base.rows[rows]
        self.base, self.rows = base, np.asarray(rows, dtype=np.int64)

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, key):  # type: ignore[override]
        if isinstance(key, slice):
            return ExampleView(self.base, self.rows[key])
        return self.base[int(self.rows[int(key)])]

    def __iter__(self) -> Iterator[TrainingExample]:
        for r in self.rows.tolist():
            yield self.base[r]


# ---------------------------------------------------------------------------------------------- sources
def table_from_qrels(queries, qrels, corpus: Corpus, min_relevance: int = 1, limit: int | None = None) -> ExampleTable:
    """One example per judged query (positives = documents graded >= ``min_relevance``), as corpus rows."""
    b = ExampleTableBuilder(corpus)
    for qid, judged in qrels.items():
        if limit is not None and len(b) >= limit:
            break
        pos_ids = [d for d, g in judged.items() if g >= min_relevance]
        if not pos_ids or qid not in queries:
            continue
        rows = corpus.rows(pos_ids)
        if (rows < 0).any():
            missing = [d for d, r in zip(pos_ids, rows.tolist()) if r < 0]
            raise DataError(corpus.path, None, f"query {qid!r} is judged relevant to ids {missing[:3]} that are not in the corpus",
                            "use the collection the qrels were made for")
        b.add(queries[qid], qid, rows.tolist(), [])
    return b.build()


def _refs(b: ExampleTableBuilder, path, lineno, obj, key, corpus) -> list[int]:
    values = obj.get(key, [])
    if isinstance(values, (str, int)):
        values = [values]
    if not isinstance(values, list):
        raise DataError(path, lineno, f"{key!r} must be a list", f'write "{key}": ["..."]')
    refs = []
    for v in values:
        if isinstance(v, dict):  # Tevatron: {"docid", "title", "text"}
            doc_id = str(v.get("docid", v.get("_id", "")))
            row = corpus._index.row(doc_id) if corpus is not None and doc_id else None
            if row is not None:
                refs.append(row)
                continue
            title, text = str(v.get("title", "")), str(v.get("text", ""))
            full = f"{title} {text}".strip() if title else text
            if not full.strip():
                raise DataError(path, lineno, f"empty text in {key!r}", "remove the empty entry")
            refs.append(b.text_ref(full, doc_id))
            continue
        row = corpus._index.row(str(v)) if corpus is not None else None
        if row is not None:
            refs.append(row)
        elif isinstance(v, int) or (corpus is not None and str(v).isdigit() and len(str(v)) < 12):
            raise DataError(path, lineno, f"{key} id {v!r} is not in the corpus",
                            "pass the corpus these ids come from, or write the passage text instead of its id")
        elif not str(v).strip():
            raise DataError(path, lineno, f"empty text in {key!r}", "remove the empty entry")
        else:
            refs.append(b.text_ref(str(v)))
    return refs


def table_from_jsonl(path, corpus: Corpus | None = None, limit: int | None = None) -> ExampleTable:
    """FlagEmbedding / Tevatron JSONL, plain or ``.gz`` (see :func:`retriever.data.iter_training_jsonl`), streamed;
    ids (and Tevatron passages whose ``docid`` is in ``corpus``) are kept as corpus rows, not texts."""
    path = _require_file(Path(path), "training file")
    b = ExampleTableBuilder(corpus)
    with open_text(path) as fh:
        for lineno, obj in iter_jsonl_objects(path, fh):
            if limit is not None and len(b) >= limit:
                break
            query, pos_key, neg_key = training_record_keys(path, lineno, obj)
            pos = _refs(b, path, lineno, obj, pos_key, corpus)
            if not pos:
                raise DataError(path, lineno, "no positives", "every training query needs at least one positive")
            neg = _refs(b, path, lineno, obj, neg_key, corpus)
            pos_scores, neg_scores = obj.get("pos_scores"), obj.get("neg_scores")
            if pos_scores is not None and len(pos_scores) != len(pos):
                raise DataError(path, lineno, f"{len(pos_scores)} pos_scores for {len(pos)} positives", "give one score per positive")
            if neg_scores is not None and len(neg_scores) != len(neg):
                raise DataError(path, lineno, f"{len(neg_scores)} neg_scores for {len(neg)} negatives", "give one score per negative")
            qid = obj.get("query_id", obj.get("qid"))
            b.add(query, None if qid is None else str(qid), pos, neg, pos_scores, neg_scores)
    return b.build()


class TriplesFile(Sequence[TrainingExample]):
    """``query<TAB>positive<TAB>negative`` lines, read on access through a cached line-offset index."""

    def __init__(self, path):
        self.path = _require_file(Path(path), "triples file")
        self.offsets = line_offsets(self.path)
        if not len(self.offsets):
            raise DataError(self.path, None, "no triples found", "the file is empty")
        self._line_starts = PreadColumn(self.offsets)  # 40M lines: scattered reads stay out of the map
        self._fh = None

    def __len__(self) -> int:
        return len(self.offsets)

    def _line(self, i: int) -> bytes:
        import os

        bounds = self._line_starts.read(i, 2).tolist()
        start, stop = bounds[0], (bounds[1] if len(bounds) == 2 else None)
        if self._fh is None:
            self._fh = open(self.path, "rb")
        if stop is None:
            return os.pread(self._fh.fileno(), 1 << 20, start).split(b"\n", 1)[0]
        return os.pread(self._fh.fileno(), stop - start, start)  # pread: no shared file position, thread-safe

    def __getitem__(self, key):  # type: ignore[override]
        if isinstance(key, slice):
            return ExampleView(self, np.arange(len(self))[key])
        i = _position(key, len(self), "triple")
        parts = self._line(i).decode("utf-8", errors="replace").rstrip("\r\n").split("\t")
        if len(parts) != 3:
            raise DataError(self.path, self._lineno(i), f"expected 3 tab-separated columns, found {len(parts)}",
                            "each line is `query<TAB>positive passage<TAB>negative passage`")
        q, p, n = (s.strip() for s in parts)
        for name, value in (("query", q), ("positive", p), ("negative", n)):
            if not value:
                raise DataError(self.path, self._lineno(i), f"empty {name}", "remove the line or fill the column")
        return TrainingExample(query=q, positives=[p], negatives=[n])

    def _lineno(self, i: int) -> int:
        with open(self.path, "rb") as fh:
            done, lines, target = 0, 1, int(self.offsets[i])
            while done < target:
                chunk = fh.read(min(target - done, 1 << 20))
                lines += chunk.count(b"\n")
                done += len(chunk)
        return lines

    def __getstate__(self):  # ship the path, not 40M offsets: the receiver maps the cached index again
        state = self.__dict__.copy()
        state["_fh"] = None
        del state["offsets"], state["_line_starts"]
        return state

    def __setstate__(self, state):
        self.__dict__.update(state)
        self.offsets = line_offsets(self.path)
        self._line_starts = PreadColumn(self.offsets)


class HFExamples(Sequence[TrainingExample]):
    """Rows of a Hugging Face dataset, read from Arrow one row at a time: ``query``, ``pos`` (str/list) and
    optional ``neg``, ``query_id``/``id``, ``pos_ids``, ``neg_ids``, ``pos_scores``, ``neg_scores``; or
    Tevatron's layout (``query_id``, ``query``, ``positive_passages``/``negative_passages`` of
    ``{docid, title, text}``, e.g. ``Tevatron/msmarco-passage-aug``), whose docids become the ids."""

    def __init__(self, ds):
        tevatron = "positive_passages" in ds.column_names
        missing = [c for c in ("query", "positive_passages" if tevatron else "pos") if c not in ds.column_names]
        if missing:
            raise DataError("<hf dataset>", None, f"columns {missing} missing (it has {ds.column_names})",
                            "map them with `columns: {query: <col>, pos: <col>}`")
        self.ds = ds

    def __len__(self) -> int:
        return len(self.ds)

    def __getitem__(self, key):  # type: ignore[override]
        if isinstance(key, slice):
            return ExampleView(self, np.arange(len(self))[key])
        i = _position(key, len(self), "row")
        return _hf_row(self.ds[i], i)


def _as_list(v):
    if v is None:
        return []
    return list(v) if isinstance(v, (list, tuple)) else [v]


def _passages(entries) -> tuple[list[str], list[str]]:
    """Texts and ids of a row's passages: plain strings, or Tevatron ``{docid, title, text}`` dicts."""
    texts, ids = [], []
    for e in entries:
        if isinstance(e, dict):
            title, text = str(e.get("title") or ""), str(e.get("text") or "")
            texts.append(f"{title} {text}".strip() if title else text)
            ids.append(str(e.get("docid", e.get("_id", ""))))
        else:
            texts.append(str(e))
    return texts, ids


def _hf_row(row: dict, i: int) -> TrainingExample:
    pos_raw = row["pos"] if "pos" in row else row.get("positive_passages")
    neg_raw = row.get("neg") if "pos" in row else row.get("negative_passages")
    pos, pos_ids = _passages(_as_list(pos_raw))
    neg, neg_ids = _passages(_as_list(neg_raw))
    if not str(row["query"]).strip() or not pos:
        raise DataError("<hf dataset>", i + 1, "empty query or no positive", "clean the row")
    qid = row.get("query_id", row.get("id"))
    return TrainingExample(query=str(row["query"]), positives=pos, negatives=neg,
                           query_id=None if qid is None else str(qid),
                           positive_ids=pos_ids or [str(x) for x in _as_list(row.get("pos_ids"))],
                           negative_ids=neg_ids or [str(x) for x in _as_list(row.get("neg_ids"))],
                           positive_scores=row.get("pos_scores"), negative_scores=row.get("neg_scores"))
