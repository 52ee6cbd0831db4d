"""Shared plumbing for the index-backed strategies (STAR, ADORE, ANCE, AR2): find the training corpus,
turn training examples into mining queries, encode a corpus into a FAISS index with ``index/`` under the
index settings of ``negatives.options.index`` (:class:`IndexOptions`), and keep per-query data as compact
arrays keyed by a 64-bit hash of the query text (:class:`KeyedRows`) instead of dicts of strings.

Index settings are the ones ``negatron index build`` takes: ``factory`` (``Flat``, ``IVF…,Flat``,
``IVF…,SQfp16``, ``IVF…,PQ…``, ``HNSW…``), ``nprobe`` / ``ef_search``, ``train_sample`` and ``gpu``
(``auto``: every GPU FAISS sees, sharded, float16 storage; ``yes``: fail without one; ``no``: CPU).
``factory: auto`` (the default) picks by corpus size, see :func:`auto_factory`.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
from array import array
from pathlib import Path
from typing import Any, Iterable, Iterator, Literal, Sequence

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, model_validator

from retriever.data import Corpus, TrainingExample
from retriever.offset_index import text_key  # noqa: F401  (the compact maps' key; re-exported)

logger = logging.getLogger(__name__)

# ``factory: auto`` builds an exact Flat index below this many documents and an IVF one at or above it.
# Flat memory is N x d x 4 bytes (FAISS stores float32): 1M x 768 = 2.9 GiB, searched exactly at
# N x d = 0.77 GFLOP a query (an ADORE step of 32 queries: ~25 GFLOP, well under a second on a CPU).
# At MS MARCO's 8.8M x 768 Flat is 25.2 GiB beside the 12.6 GiB fp16 embeddings and 6.8 GFLOP a query,
# so from 1M on the default is IVF<nlist>,SQfp16: 2 bytes a dimension (12.6 GiB at 8.8M x 768, half of
# Flat or IVF,Flat) and lossless here, because the embeddings are stored as float16 already; with
# nprobe = 64 of nlist = 16,384 lists a query scans ~0.4 % of the corpus.
AUTO_FLAT_BELOW = 1_000_000
AUTO_IVF_CODE = "SQfp16"
MIN_POINTS_PER_LIST = 39  # FAISS warns below 39 training points a centroid (index.faiss_index clamps there)


def _unknown_keys(model: type[BaseModel], data: Any, where: str) -> None:
    from retriever.config import _unknown_message

    if isinstance(data, dict):
        for key in data:
            if key not in model.model_fields:
                raise ValueError(_unknown_message(f"key in {where}:", key, list(model.model_fields)))


class IndexOptions(BaseModel):
    """``negatives.options.index``: how STAR, ADORE, ANCE and AR2 index the corpus (the settings of
    ``negatron index build``)."""

    model_config = ConfigDict(extra="forbid")

    factory: str = Field("auto", description='FAISS factory ("Flat", "IVF16384,Flat", "IVF16384,SQfp16", '
                         '"IVF16384,PQ96", "HNSW32"), or "auto": Flat below auto_flat_below documents, '
                         'IVF<4*sqrt(N) rounded to a power of two>,SQfp16 from there on')
    nprobe: int | None = Field(None, gt=0, description="IVF lists probed per query (default min(nlist, 64))")
    ef_search: int | None = Field(None, gt=0, description="HNSW search breadth (default 128)")
    train_sample: int | None = Field(None, gt=0, description="vectors that train IVF/PQ (default max(64*nlist, "
                                     "100k), at most 2M)")
    gpu: Literal["auto", "yes", "no"] = Field("auto", description="auto: every GPU FAISS sees (sharded, float16), "
                                              "else the CPU; yes: fail without a GPU; no: CPU")
    auto_flat_below: int = Field(AUTO_FLAT_BELOW, gt=0, description="factory auto: corpus size from which an IVF "
                                 "index replaces the exact Flat one")
    embeddings: str | None = Field(None, description="an embeddings folder (`negatron encode`, e.g. run beforehand "
                                   "under torchrun) of this corpus by the model that builds the first index (STAR's "
                                   "warm-up model, ADORE's frozen document tower, ANCE/AR2's step 0): reused instead "
                                   "of re-encoding; one from another model or corpus is refused; a missing one is "
                                   "encoded there")

    @model_validator(mode="before")
    @classmethod
    def _refuse_unknown(cls, data: Any) -> Any:
        _unknown_keys(cls, data, "negatives.options.index")
        return data

    @property
    def use_gpu(self) -> bool | str:
        return {"auto": "auto", "yes": True, "no": False}[self.gpu]


def auto_nlist(count: int) -> int:
    """IVF lists for ``count`` vectors: 4·sqrt(N) rounded (in log scale) to a power of two, and never more
    lists than ``count / 39`` can train. 1M -> 4,096; 8.8M -> 16,384."""
    nlist = 2 ** round(math.log2(max(1.0, 4 * math.sqrt(count))))
    most = max(1, count // MIN_POINTS_PER_LIST)
    while nlist > most:
        nlist //= 2
    return max(1, nlist)


def auto_factory(count: int, dim: int, flat_below: int = AUTO_FLAT_BELOW) -> tuple[str, str]:
    """``(factory, why)`` that ``factory: auto`` builds for ``count`` vectors of ``dim`` dimensions."""
    flat_gib = count * dim * 4 / 2**30
    if count < flat_below:
        return "Flat", (f"{count:,} documents < auto_flat_below {flat_below:,}: exact search, "
                        f"{flat_gib:.2f} GiB float32")
    nlist = auto_nlist(count)
    return f"IVF{nlist},{AUTO_IVF_CODE}", (
        f"{count:,} documents >= auto_flat_below {flat_below:,}: Flat would hold {flat_gib:.1f} GiB float32 and scan "
        f"every document; IVF with nlist {nlist} (~4*sqrt(N)) and float16 codes holds {flat_gib / 2:.1f} GiB "
        "(lossless: the embeddings are stored as float16); set negatives.options.index.factory to choose")


def resolve_factory(options: IndexOptions, count: int, dim: int) -> str:
    """The factory to build, logged once (INFO) with the reason."""
    if options.factory.strip().lower() != "auto":
        logger.info("index: factory %r for %d documents (negatives.options.index.factory)", options.factory, count)
        return options.factory
    factory, why = auto_factory(count, dim, options.auto_flat_below)
    logger.info("index: factory auto -> %r (%s)", factory, why)
    return factory


def corpus_path(trainer: Any, override: str | None) -> Path:
    """The corpus the training data's ids refer to: ``override``, else the data source's own corpus."""
    if override:
        return Path(override)
    data = trainer.config.data
    if data.beir:
        return Path(data.beir) / "corpus.jsonl"
    if data.corpus:
        return Path(data.corpus)
    if data.collection:
        return Path(data.collection)
    raise ValueError(f"negatives.strategy {trainer.config.negatives.strategy!r} retrieves from a corpus, but the "
                     f"{data.source} data source names none: set negatives.options.corpus (corpus.jsonl or "
                     "collection.tsv) or use a beir / jsonl+corpus / qrels data source")


class _TrainingQueries(Sequence):
    """:class:`mining.miner.TrainingQuery` per example, built a slice at a time as :func:`mining.miner.mine`
    asks (503k MS MARCO queries never all hold their positive passages at once)."""

    def __init__(self, examples: Sequence[TrainingExample], indices: Sequence[int] | None, corpus: Corpus | None):
        self.examples = examples
        self.indices = indices
        # a table of rows of the corpus being mined: its queries carry positive rows, not ids and texts
        table, rows = _table_rows(examples)
        same = table is not None and _same_corpus(table.corpus, corpus)
        self._table, self._rows = (table, rows) if same else (None, None)

    def __len__(self) -> int:
        return len(self.examples) if self.indices is None else len(self.indices)

    def _one(self, i: int):
        from mining.miner import TrainingQuery

        j = i if self.indices is None else int(self.indices[i])
        if self._table is not None:
            t = int(self._rows[j])
            refs = self._table.pos_rows[self._table.pos_ptr[t]:self._table.pos_ptr[t + 1]]
            if len(refs) and bool((refs >= 0).all()):  # inline-text positives take the general path
                return TrainingQuery(str(i), self._table.queries[t], None, None, np.asarray(refs, dtype=np.int64))
        ex = self.examples[j]
        return TrainingQuery(str(i), ex.query, list(ex.positive_ids), list(ex.positives))

    def __getitem__(self, key):
        if isinstance(key, slice):
            return [self._one(i) for i in range(*key.indices(len(self)))]
        i = int(key)
        if i < 0:
            i += len(self)
        if not 0 <= i < len(self):
            raise IndexError(key)
        return self._one(i)


def _table_rows(examples: Sequence[TrainingExample]):
    """``(table, its rows in the examples' order)`` when ``examples`` is a training table or a view of one,
    else ``(None, None)``: readers that can answer from the table's arrays without building examples."""
    from retriever.example_table import ExampleTable, ExampleView

    base = examples.base if isinstance(examples, ExampleView) else examples
    if not isinstance(base, ExampleTable):
        return None, None
    return base, (examples.rows if isinstance(examples, ExampleView) else np.arange(len(base)))


def example_queries(examples: Sequence[TrainingExample]) -> Iterator[tuple[str, bool]]:
    """``(query text, has negatives)`` of every example. A training table answers from its arrays: building
    each example would read its passages' texts and ids (503k random reads over 8.8M passages)."""
    base, rows = _table_rows(examples)
    if base is not None:
        for t in rows.tolist():
            yield base.queries[t], bool(base.neg_ptr[t + 1] > base.neg_ptr[t])
        return
    for ex in examples:
        yield ex.query, bool(ex.negatives)


def example_positives(examples: Sequence[TrainingExample], corpus: Corpus) -> Iterator[tuple[str, np.ndarray, list[str]]]:
    """``(query, positive corpus rows, positive texts not given as rows)`` of every example. A training table
    of ``corpus`` answers from its arrays (no passage is read); other examples give their positives' ids as
    rows (unknown ids dropped) and every positive text."""
    base, rows = _table_rows(examples)
    if base is not None and _same_corpus(base.corpus, corpus):
        for t in rows.tolist():
            refs = base.pos_rows[base.pos_ptr[t]:base.pos_ptr[t + 1]]
            yield (base.queries[t], np.asarray(refs[refs >= 0], dtype=np.int64),
                   [base.texts[-int(v) - 1] for v in refs[refs < 0]])
        return
    for ex in examples:
        found = corpus.rows(ex.positive_ids) if ex.positive_ids else np.empty(0, np.int64)
        yield ex.query, found[found >= 0], list(ex.positives)


def _same_corpus(a: Corpus | None, b: Corpus | None) -> bool:
    if a is None or b is None:
        return False
    return a is b or (len(a) == len(b) and Path(a.path).resolve() == Path(b.path).resolve())


def training_queries(examples: Sequence[TrainingExample], indices: Sequence[int] | None = None,
                     corpus: Corpus | None = None) -> Sequence:
    """Training examples (or ``examples[indices]``) as a lazy sequence of :class:`mining.miner.TrainingQuery`;
    query ``i``'s id is ``str(i)``, its position in that sequence. ``corpus``: the corpus being mined; a
    training table holding rows of it gives its queries' positives as rows (``positive_rows``), read as ids
    and texts only where mining needs them."""
    return _TrainingQueries(examples, indices, corpus)


def build_index(model, corpus: Corpus, folder: Path, batch_size: int | None = None, bf16: bool | None = None,
                distributed: bool = True, options: IndexOptions | dict | None = None, reuse_embeddings: bool = True,
                reuse_index: bool = False, replace_stale: bool = False):
    """Encode ``corpus`` with ``model``'s document tower and build an inner-product FAISS index with the
    settings of ``options`` (:class:`IndexOptions`; default: ``factory: auto``).

    Returns ``(DenseIndex, EmbeddingStore)``; files go to ``folder/embeddings`` (or ``options.embeddings``,
    when ``reuse_embeddings``: a complete folder of the same model and corpus is not re-encoded, encoding's
    own resume check refuses any other) and ``folder/index``. ``distributed=False`` encodes on this process
    alone (a caller that runs only on the main process). ``reuse_index``: load ``folder/index`` instead of
    building it when it was built from these embeddings with these settings (a job resumed after a kill keeps
    searching the index its first part searched; IVF training is not bit-reproducible across thread counts).
    ``replace_stale``: ``folder/embeddings`` holding another model's vectors is re-encoded instead of refused
    (a working folder of the caller's; a user's ``options.embeddings`` folder is never replaced).
    """
    from index.encode import encode_corpus, encode_or_resume
    from index.faiss_index import DenseIndex

    options = options if isinstance(options, IndexOptions) else IndexOptions.model_validate(options or {})
    embeddings = Path(options.embeddings) if options.embeddings and reuse_embeddings else folder / "embeddings"
    if embeddings != folder / "embeddings":
        logger.info("index: embeddings from %s (negatives.options.index.embeddings)", embeddings)
    encode = encode_or_resume if replace_stale and embeddings == folder / "embeddings" else encode_corpus
    store = encode(model, corpus, embeddings, batch_size=batch_size, bf16=bf16, show_progress=False,
                   distributed=distributed)
    factory = resolve_factory(options, store.count, store.dim)
    if reuse_index:
        kept = _matching_index(folder / "index", store, factory, options)
        if kept is not None:
            return kept, store
    dense = DenseIndex.build(store, folder / "index", factory=factory, metric="ip", train_sample=options.train_sample,
                             use_gpu=options.use_gpu, nprobe=options.nprobe, ef_search=options.ef_search,
                             distributed=distributed)
    return dense, store


def _matching_index(folder: Path, store, factory: str, options: IndexOptions):
    """The saved index in ``folder`` if it holds ``store``'s vectors built with ``factory`` (else None)."""
    from index.faiss_index import CorruptIndexError, DenseIndex

    manifest = folder / "manifest.json"
    if not manifest.is_file():
        return None
    try:
        saved = json.loads(manifest.read_text())
    except ValueError:
        return None
    same = (saved.get("checkpoint_hash") == store.manifest.get("checkpoint_hash") and saved.get("count") == store.count
            and saved.get("requested_factory") == factory and saved.get("metric") == "ip"
            and saved.get("embeddings") == str(Path(store.folder).resolve())
            and (options.train_sample is None or saved.get("train_sample") in (None, min(store.count, options.train_sample))))
    if not same:
        logger.info("index: %s was built from other embeddings or settings; rebuilding", folder)
        return None
    try:
        dense = DenseIndex.load(folder, expect_dim=store.dim, use_gpu=options.use_gpu)
    except CorruptIndexError as exc:
        logger.info("index: %s cannot be reused (%s); rebuilding", folder, exc)
        return None
    dense.set_search_params(nprobe=options.nprobe, ef_search=options.ef_search)
    logger.info("index: reusing %s (built from the same embeddings with %s)", folder, factory)
    return dense


# ---------------------------------------------------------------------------------------------- compact maps
class KeyedRows:
    """int64 keys -> ragged integer arrays, frozen into sorted keys + CSR (no Python object per entry).

    ``add(key, values)`` appends; a key added more than once gets the concatenation of its values in the
    order added (``unique=True`` at :meth:`freeze`: sorted and deduplicated instead)."""

    def __init__(self, dtype=np.int64):
        self.dtype = np.dtype(dtype)
        self._keys, self._lens = array("q"), array("q")
        self._vals = array("q" if self.dtype.itemsize == 8 else "i")
        self.keys = np.empty(0, np.int64)
        self.ptr = np.zeros(1, np.int64)
        self.values = np.empty(0, self.dtype)

    def add(self, key: int, values: Iterable[int]) -> None:
        before = len(self._vals)
        self._vals.extend(int(v) for v in values)
        self._keys.append(int(key))
        self._lens.append(len(self._vals) - before)

    def add_many(self, keys: np.ndarray, values: np.ndarray) -> None:
        """``add(keys[i], [values[i]])`` for every i, without a Python call per pair."""
        keys, values = np.asarray(keys, dtype=np.int64), np.asarray(values)
        if len(keys) != len(values):
            raise ValueError(f"{len(keys)} keys but {len(values)} values")
        self._keys.frombytes(keys.tobytes())
        self._lens.frombytes(np.ones(len(keys), np.int64).tobytes())
        self._vals.frombytes(values.astype(np.dtype(self._vals.typecode)).tobytes())

    def freeze(self, unique: bool = False) -> "KeyedRows":
        keys = np.frombuffer(self._keys, dtype=np.int64) if len(self._keys) else np.empty(0, np.int64)
        lens = np.frombuffer(self._lens, dtype=np.int64) if len(self._lens) else np.empty(0, np.int64)
        vals = np.frombuffer(self._vals, dtype=self.dtype) if len(self._vals) else np.empty(0, self.dtype)
        order = np.argsort(keys, kind="stable")
        lens_o = lens[order]
        starts = (np.cumsum(lens) - lens)[order]
        vals = self._gather(vals, starts, lens_o)
        ukeys, first = np.unique(keys[order], return_index=True)
        counts = np.add.reduceat(lens_o, first) if len(first) else np.empty(0, np.int64)
        if unique and len(vals):
            group = np.repeat(np.arange(len(ukeys)), counts)
            o = np.lexsort((vals, group))
            vals, group = vals[o], group[o]
            keep = np.ones(len(vals), dtype=bool)
            keep[1:] = (vals[1:] != vals[:-1]) | (group[1:] != group[:-1])
            vals, counts = vals[keep], np.bincount(group[keep], minlength=len(ukeys))
        self.keys, self.values = ukeys.astype(np.int64), np.ascontiguousarray(vals, dtype=self.dtype)
        self.ptr = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
        self._keys, self._lens, self._vals = array("q"), array("q"), array(self._vals.typecode)
        return self

    @staticmethod
    def _gather(vals: np.ndarray, starts: np.ndarray, lens: np.ndarray, groups: int = 4_096) -> np.ndarray:
        """``vals[starts[i]:starts[i]+lens[i]]`` for every i, concatenated, a block of groups at a time: one
        int64 index over all 50M values of an 8.8M-passage STAR pool was 1.2 GB of transient memory, more
        than the pool itself, and put the stage over its bound."""
        out = np.empty(int(lens.sum()), dtype=vals.dtype)
        pos = 0
        for b in range(0, len(lens), groups):
            s, n = starts[b:b + groups], lens[b:b + groups]
            total = int(n.sum())
            index = np.arange(total, dtype=np.int64)
            index += np.repeat(s - (np.cumsum(n) - n), n)
            out[pos:pos + total] = vals[index]
            pos += total
        return out

    def _slot(self, key: int) -> int:
        i = int(np.searchsorted(self.keys, key))
        return i if i < len(self.keys) and int(self.keys[i]) == key else -1

    def __contains__(self, key: int) -> bool:
        return self._slot(key) >= 0

    def get(self, key: int) -> np.ndarray | None:
        i = self._slot(key)
        return None if i < 0 else self.values[self.ptr[i]:self.ptr[i + 1]]

    def __len__(self) -> int:
        return len(self.keys)

    @property
    def nbytes(self) -> int:
        return int(self.keys.nbytes + self.ptr.nbytes + self.values.nbytes)
