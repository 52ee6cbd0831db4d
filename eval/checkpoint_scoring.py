"""Score checkpoints on dev sets during training, keep the best one, stop early.

The trainer calls ``scorer.score(model, step, run_dir)`` every ``every_steps`` steps
(``scorer.due(step)``) and stops when ``scorer.should_stop``. Each call evaluates every dev set
(BEIR folders) into ``run_dir/eval/step-<step>/``, appends a line
``{"step", "eval": {dataset: metrics}, "score", "best_step", "best_score"}`` to
``run_dir/checkpoint_eval.jsonl`` (read by ``negatron report``), and on improvement saves the
model to ``run_dir/best/`` atomically with ``best.json`` beside the weights.

``sub_collection=N`` (``evaluation.sub_collection``) scores each dev set against a fixed sub-collection
instead of its whole corpus: every document judged for the dev queries plus a random sample of ``N``
corpus rows drawn once with ``sub_collection_seed``, identical at every evaluation so scores are comparable
across steps. Encoding it costs N documents instead of the corpus (8.8M for MS MARCO) at each evaluation.
Its metrics are *not* full-corpus metrics (there are fewer distractors, so they read higher): the log line,
``checkpoint_eval.jsonl`` and each ``metrics.json`` say ``"collection": "sub-collection"`` with its size,
sample and seed. The full-corpus evaluation after training (``negatron eval``) is unaffected.
Not wired: the dev queries' BM25 top-k union (it needs a Lucene index of every dev corpus).

Under torchrun scoring is a collective: every rank builds the same scorer and calls
``score(model, step, run_dir, dist=ctx)`` at the same steps (the trainer does). Every rank encodes its share
of each dev collection with :func:`index.encode.encode_corpus` (rank ``r`` of ``w`` takes shards
``r, r+w, ...``, float32 so the scores equal a single process's) into the scratch folder
``run_dir/eval/step-<step>/.encoded/<dev set>/`` (shared storage for a multi-node run); rank 0 then encodes
the queries, searches the shards exactly, scores, saves ``best/``, writes the log and broadcasts the verdict
(the logged line and the count of evaluations without improvement), so ``should_stop`` and ``best_step``
agree on every rank; rank 0 deletes the scratch folder once every rank has the verdict. A failure in rank
0's part is broadcast too and raised on every rank instead of leaving them in a collective. A single process
(``dist`` None or one process) evaluates in-process as before, without collectives or scratch files.
"""

from __future__ import annotations

import json
import logging
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping, Sequence

from eval.metrics import DEFAULT_METRICS, parse_metric
from retriever.data import Corpus

logger = logging.getLogger(__name__)
BEST_DIR = "best"
BEST_FILE = "best.json"
LOG_FILE = "checkpoint_eval.jsonl"
ENCODED_DIR = ".encoded"  # run_dir/eval/step-<N>/.encoded/<dev set>/: the ranks' shards, deleted after scoring


@dataclass(frozen=True)
class DevSet:
    name: str
    path: Path
    split: str = "dev"


class SubCorpus(Corpus):  # a Corpus, so index.encode.encode_corpus shards it like a file's rows
    """A row view of a corpus: ``len``, ``texts(rows)``, ``ids``, ``[row]`` / ``[start:stop]`` documents and
    ``path`` (the parent's file), as :func:`eval.beir.dense_search` and :func:`index.encode.encode_corpus`
    read them, over the parent's rows ``rows`` (sorted int64); ``row``/``get``/``in`` look ids up within it."""

    def __init__(self, corpus, rows):  # no Corpus.__init__: nothing is read or indexed
        import numpy as np

        self.corpus, self.rows = corpus, np.asarray(rows, dtype=np.int64)
        self.path = corpus.path
        self._fh = None
        self._ids = _RowIds(corpus.ids, self.rows)

    @property
    def ids(self):
        return self._ids

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, key):
        if isinstance(key, slice):
            return [self.corpus[int(r)] for r in self.rows[key]]
        return self.corpus[int(self.rows[int(key)])]

    def __iter__(self):
        return (self.corpus[int(r)] for r in self.rows)

    def rows_of(self, doc_ids):
        """Sub-collection rows of ``doc_ids`` (-1 for an id outside it); ``rows`` is the parent's row array,
        not ``Corpus.rows``."""
        import numpy as np

        parent = self.corpus.rows(list(doc_ids))
        at = np.minimum(np.searchsorted(self.rows, parent), max(len(self.rows) - 1, 0))
        return np.where((parent >= 0) & (self.rows[at] == parent), at, -1).astype(np.int64)

    def row(self, doc_id: str) -> int:
        row = int(self.rows_of([doc_id])[0]) if isinstance(doc_id, str) else -1
        if row < 0:
            raise KeyError(f"document id {doc_id!r} is not in the sub-collection of {self.path}")
        return row

    def __contains__(self, doc_id: object) -> bool:
        return isinstance(doc_id, str) and int(self.rows_of([doc_id])[0]) >= 0

    def get(self, doc_id: str):
        return self[self.row(doc_id)]

    def texts(self, rows) -> list[str]:
        return self.corpus.texts(int(self.rows[int(r)]) for r in rows)


class _RowIds(Sequence[str]):
    def __init__(self, ids, rows):
        self._ids, self._rows = ids, rows

    def __len__(self) -> int:
        return len(self._rows)

    def __getitem__(self, i):  # type: ignore[override]
        if isinstance(i, slice):
            return [self._ids[int(r)] for r in self._rows[i]]
        return self._ids[int(self._rows[int(i)])]


def sub_collection_rows(corpus, qrels: Mapping[str, Mapping[str, int]], size: int, seed: int = 0):
    """Sorted corpus rows: every judged document of ``qrels`` found in ``corpus`` plus ``size`` rows drawn
    with ``numpy.random.default_rng(seed)`` (the same rows for the same corpus, size and seed)."""
    import numpy as np

    judged = sorted({d for docs in qrels.values() for d in docs})
    rows = corpus.rows(judged) if judged else np.empty(0, np.int64)
    rng = np.random.default_rng(seed)
    sample = rng.choice(len(corpus), size=min(int(size), len(corpus)), replace=False)
    return np.unique(np.concatenate([rows[rows >= 0], sample.astype(np.int64)]))


class CheckpointScorer:
    """Evaluate on dev sets; the score is ``metric`` averaged over them (higher is better).

    ``early_stopping_patience``: stop after that many consecutive evaluations without improvement
    (None: never). ``k`` documents are retrieved per query (metrics cut deeper than ``k`` are dropped).
    Never point ``dev_sets`` at a test split: carve a dev split from train.
    """

    def __init__(self, dev_sets: Sequence[Mapping | DevSet], metric: str = "ndcg@10", every_steps: int = 500,
                 keep_best: bool = True, early_stopping_patience: int | None = None, k: int = 100,
                 batch_size: int | None = None, bf16: bool | None = None, sub_collection: int | None = None,
                 sub_collection_seed: int = 0):
        parse_metric(metric)
        if sub_collection is not None and sub_collection < 1:
            raise ValueError(f"sub_collection must be >= 1 or None, got {sub_collection}")
        self.sub_collection, self.sub_collection_seed = sub_collection, int(sub_collection_seed)
        self._subsets: dict[str, tuple] = {}  # dev set name -> (data, SubCorpus, label): drawn once
        self._datasets: dict[str, tuple] = {}  # dev set name -> (data, corpus, extra): collective scoring
        if not dev_sets:
            raise ValueError("CheckpointScorer needs at least one dev set ({name, path, split})")
        self.dev_sets = [d if isinstance(d, DevSet) else DevSet(str(d.get("name") or Path(d["path"]).name),
                                                                Path(d["path"]), str(d.get("split", "dev")))
                         for d in dev_sets]
        for dev in self.dev_sets:
            if dev.split == "test":
                logger.warning("dev set %s uses its test split for checkpoint selection; that tunes on test",
                               dev.name)
        if every_steps < 1:
            raise ValueError(f"every_steps must be ≥ 1, got {every_steps}")
        if early_stopping_patience is not None and early_stopping_patience < 1:
            raise ValueError(f"early_stopping_patience must be ≥ 1 or None, got {early_stopping_patience}")
        self.metric = metric.lower()
        self.every_steps = int(every_steps)
        self.keep_best = keep_best
        self.patience = early_stopping_patience
        self.k = int(k)
        self.batch_size = batch_size
        self.bf16 = bf16
        self.metrics = [m for m in dict.fromkeys([*DEFAULT_METRICS, self.metric]) if parse_metric(m)[1] <= self.k
                        or m == self.metric]
        self.best_score: float | None = None
        self.best_step: int | None = None
        self.bad_evals = 0
        self.history: list[dict] = []

    def due(self, step: int) -> bool:
        return step > 0 and step % self.every_steps == 0

    @property
    def should_stop(self) -> bool:
        return self.patience is not None and self.bad_evals >= self.patience

    def _resume(self, run_dir: Path) -> None:
        """Pick up the best score of an earlier, interrupted run in the same folder."""
        best_file = run_dir / BEST_DIR / BEST_FILE
        if self.best_score is None and best_file.exists():
            saved = json.loads(best_file.read_text())
            if saved.get("metric") == self.metric:
                self.best_score, self.best_step = float(saved["score"]), int(saved["step"])

    def score(self, model, step: int, run_dir, dist=None) -> dict:
        """Evaluate ``model`` now; returns the logged line (``eval``, ``score``, ``improved``, best so far).

        ``dist`` (a :class:`retriever.distributed.DistContext`): under torchrun, every rank calls ``score``
        with its context at the same step and gets the same line back (see the module docstring); None or a
        single process evaluates here alone."""
        run_dir = Path(run_dir)
        if dist is not None and dist.enabled:
            return self._score_collective(model, step, run_dir, dist)
        results, collections = {}, {}
        for dev in self.dev_sets:
            out = run_dir / "eval" / f"step-{step}"
            if self.sub_collection is None:
                from eval.beir import evaluate_beir

                result = evaluate_beir(model, dev.path, split=dev.split, output_dir=out, k=self.k,
                                       batch_size=self.batch_size, bf16=self.bf16, metrics=self.metrics)
            else:
                result = self._score_sub_collection(model, dev, out)
                collections[dev.name] = result["collection_info"]
            results[dev.name] = result["metrics"]
        return self._decide(model, step, run_dir, results, collections)

    def _decide(self, model, step: int, run_dir: Path, results: dict, collections: dict) -> dict:
        """Best so far, ``best/``, early-stopping count, the log line (the main process only)."""
        from retriever.io import atomic_dir

        self._resume(run_dir)
        score = sum(r[self.metric] for r in results.values()) / len(results)
        improved = self.best_score is None or score > self.best_score
        if improved:
            self.best_score, self.best_step, self.bad_evals = score, step, 0
            if self.keep_best:
                with atomic_dir(run_dir / BEST_DIR) as tmp:
                    model.save(tmp)
                    (tmp / BEST_FILE).write_text(json.dumps(
                        {"step": step, "metric": self.metric, "score": score, "eval": results}, indent=2) + "\n")
        else:
            self.bad_evals += 1
        line = {"step": step, "eval": results, "metric": self.metric, "score": score, "improved": improved,
                "best_step": self.best_step, "best_score": self.best_score,
                "collection": "sub-collection" if self.sub_collection is not None else "full"}
        if collections:
            line["sub_collection"] = collections
        with open(run_dir / LOG_FILE, "a", encoding="utf-8") as fh:
            fh.write(json.dumps(line) + "\n")
        self.history.append(line)
        logger.info("step %d: %s %.4f%s (best %.4f at step %d)%s", step, self.metric, score,
                    "" if not collections else " on a sub-collection (" + ", ".join(
                        f"{n}: {c['docs']:,} of {c['corpus_docs']:,} docs" for n, c in collections.items()) + ")",
                    self.best_score, self.best_step, "" if improved else f", {self.bad_evals} without improvement")
        return line

    # ------------------------------------------------------------------------------ collective scoring
    def _score_collective(self, model, step: int, run_dir: Path, ctx) -> dict:
        """Every rank encodes its shards of every dev collection; rank 0 searches, scores and decides, then
        broadcasts the line and the early-stopping count so every rank's scorer holds the same state."""
        from index.encode import default_shard_size, encode_corpus
        from retriever.distributed import barrier, broadcast_object

        out = run_dir / "eval" / f"step-{step}"
        scratch = out / ENCODED_DIR
        if ctx.is_main and scratch.exists():  # an interrupted evaluation of this step: never resume into it
            shutil.rmtree(scratch)
        barrier(ctx)
        stores, encode_s = {}, {}
        for dev in self.dev_sets:
            _, corpus, _ = self._collection(dev, ctx.is_main)
            started = time.perf_counter()
            stores[dev.name] = encode_corpus(
                model, corpus, scratch / dev.name, batch_size=self.batch_size, bf16=self.bf16,
                shard_size=default_shard_size(len(corpus), ctx.world_size), show_progress=False,
                dtype="float32", distributed=True)  # float32: the single-process search's exact scores
            encode_s[dev.name] = time.perf_counter() - started
        verdict, failure = None, None
        if ctx.is_main:
            try:
                results, collections = {}, {}
                for dev in self.dev_sets:
                    result = self._search_encoded(model, dev, stores[dev.name], out, encode_s[dev.name])
                    if self.sub_collection is not None:
                        collections[dev.name] = self._collection(dev, True)[2]
                    results[dev.name] = result["metrics"]
                verdict = {"line": self._decide(model, step, run_dir, results, collections),
                           "bad_evals": self.bad_evals}
            except Exception as exc:  # tell the other ranks instead of leaving them in the broadcast
                failure, verdict = exc, {"error": f"{type(exc).__name__}: {exc}"}
        stores.clear()
        verdict = broadcast_object(verdict, ctx)
        if ctx.is_main:  # every rank is past encode_corpus: nobody reads the shards any more
            shutil.rmtree(scratch, ignore_errors=True)
        if failure is not None:
            raise failure
        if "error" in verdict:
            raise RuntimeError(f"checkpoint scoring at step {step} failed on rank 0: {verdict['error']}")
        line = verdict["line"]
        if not ctx.is_main:
            self.best_score, self.best_step = line["best_score"], line["best_step"]
            self.bad_evals = verdict["bad_evals"]
            self.history.append(line)
        return line

    def _collection(self, dev: DevSet, main: bool) -> tuple:
        """``(data, corpus, extra)`` of a dev set, loaded once: the whole corpus (``extra`` =
        ``dangling_qrels``, counted on the main process) or its fixed sub-collection (``extra`` = its info)."""
        if self.sub_collection is not None:
            return self._sub_collection(dev)
        if dev.name not in self._datasets:
            from eval.beir import check_qrels
            from retriever.data import load_beir

            data = load_beir(dev.path, dev.split, check_ids=False)
            extra = {"dangling_qrels": check_qrels(dev.path / "qrels" / f"{dev.split}.tsv", data.qrels, data.queries,
                                                   data.corpus)} if main else {}
            self._datasets[dev.name] = (data, data.corpus, extra)
        return self._datasets[dev.name]

    def _search_encoded(self, model, dev: DevSet, store, output_dir: Path, encode_s: float) -> dict:
        """:func:`eval.beir.evaluate_corpus` over a collection the ranks have encoded into ``store``: the same
        judged queries, exact top-k, run and ``metrics.json`` fields (main process only)."""
        from eval.beir import evaluate_run
        from eval.metrics import run_from_arrays
        from eval.search import TopK
        from index.encode import encode_texts

        data, corpus, extra = self._collection(dev, True)
        started = time.perf_counter()
        judged = {qid: text for qid, text in data.queries.items() if qid in data.qrels}
        query_ids = list(judged)
        q_emb = encode_texts(model, [judged[q] for q in query_ids], "query", self.batch_size, self.bf16)
        timings = {"encode_queries_s": time.perf_counter() - started, "encode_corpus_s": encode_s}
        searched = time.perf_counter()
        top = TopK(q_emb, self.k)
        for _, block in store.iter_shards():
            top.add(block)
        scores, rows = top.result()
        timings["search_s"] = time.perf_counter() - searched
        run = run_from_arrays(query_ids, corpus.ids, scores, rows)
        return evaluate_run(data.name, dev.split, str(model.name or "model"), judged,
                            {q: data.qrels[q] for q in query_ids}, run, num_docs=len(corpus.ids),
                            seconds=encode_s + time.perf_counter() - started, output_dir=output_dir,
                            metrics=self.metrics, extra={"k": self.k, "bf16": self.bf16 is not False, **extra,
                                                         "timings": {key: round(v, 3) for key, v in timings.items()}})

    def _sub_collection(self, dev: DevSet) -> tuple:
        """``(data, SubCorpus, info)`` of a dev set's fixed sub-collection, drawn once."""
        from retriever.data import load_beir

        if dev.name not in self._subsets:
            data = load_beir(dev.path, dev.split, check_ids=False)
            rows = sub_collection_rows(data.corpus, data.qrels, self.sub_collection, self.sub_collection_seed)
            info = {"collection": "sub-collection", "docs": int(len(rows)), "corpus_docs": len(data.corpus),
                    "sample": min(self.sub_collection, len(data.corpus)), "seed": self.sub_collection_seed,
                    "judged_docs_included": True}
            self._subsets[dev.name] = (data, SubCorpus(data.corpus, rows), info)
        return self._subsets[dev.name]

    def _score_sub_collection(self, model, dev: DevSet, output_dir: Path) -> dict:
        """``evaluate_corpus`` over the dev set's fixed sub-collection, labelled as such in metrics.json."""
        from eval.beir import evaluate_corpus

        data, sub, info = self._sub_collection(dev)
        result = evaluate_corpus(model, data.name, sub, data.queries, data.qrels, split=dev.split,
                                 output_dir=output_dir, k=self.k, batch_size=self.batch_size, bf16=self.bf16,
                                 metrics=self.metrics, extra=dict(info))
        result["collection_info"] = info
        return result
