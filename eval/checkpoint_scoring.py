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

Under torchrun the scorer runs on the main process only while the other ranks wait in the trainer's next
collective; keep an evaluation well inside the process group's timeout (a sub-collection does), since
sharding the encode over ranks needs every rank to call ``score`` (the trainer does not).
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping, Sequence

from eval.metrics import DEFAULT_METRICS, parse_metric

logger = logging.getLogger(__name__)
BEST_DIR = "best"
BEST_FILE = "best.json"
LOG_FILE = "checkpoint_eval.jsonl"


@dataclass(frozen=True)
class DevSet:
    name: str
    path: Path
    split: str = "dev"


class SubCorpus:
    """A row view of a corpus: ``len``, ``texts(rows)`` and ``ids`` as :func:`eval.beir.dense_search` reads
    them, over the parent's rows ``rows`` (sorted int64)."""

    def __init__(self, corpus, rows):
        import numpy as np

        self.corpus, self.rows = corpus, np.asarray(rows, dtype=np.int64)
        self.ids = _RowIds(corpus.ids, self.rows)

    def __len__(self) -> int:
        return len(self.rows)

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

    def score(self, model, step: int, run_dir) -> dict:
        """Evaluate ``model`` now; returns the logged line (``eval``, ``score``, ``improved``, best so far)."""
        from eval.beir import evaluate_beir
        from retriever.io import atomic_dir

        run_dir = Path(run_dir)
        self._resume(run_dir)
        results, collections = {}, {}
        for dev in self.dev_sets:
            out = run_dir / "eval" / f"step-{step}"
            if self.sub_collection is None:
                result = evaluate_beir(model, dev.path, split=dev.split, output_dir=out, k=self.k,
                                       batch_size=self.batch_size, bf16=self.bf16, metrics=self.metrics)
            else:
                result = self._score_sub_collection(model, dev, out)
                collections[dev.name] = result["collection_info"]
            results[dev.name] = result["metrics"]
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

    def _score_sub_collection(self, model, dev: DevSet, output_dir: Path) -> dict:
        """``evaluate_corpus`` over the dev set's fixed sub-collection, labelled as such in metrics.json."""
        from eval.beir import evaluate_corpus
        from retriever.data import load_beir

        if dev.name not in self._subsets:
            data = load_beir(dev.path, dev.split, check_ids=False)
            rows = sub_collection_rows(data.corpus, data.qrels, self.sub_collection, self.sub_collection_seed)
            info = {"collection": "sub-collection", "docs": int(len(rows)), "corpus_docs": len(data.corpus),
                    "sample": min(self.sub_collection, len(data.corpus)), "seed": self.sub_collection_seed,
                    "judged_docs_included": True}
            self._subsets[dev.name] = (data, SubCorpus(data.corpus, rows), info)
        data, sub, info = self._subsets[dev.name]
        result = evaluate_corpus(model, data.name, sub, data.queries, data.qrels, split=dev.split,
                                 output_dir=output_dir, k=self.k, batch_size=self.batch_size, bf16=self.bf16,
                                 metrics=self.metrics, extra=dict(info))
        result["collection_info"] = info
        return result
