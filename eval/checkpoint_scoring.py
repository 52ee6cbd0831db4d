"""Score checkpoints on dev sets during training, keep the best one, stop early.

The trainer calls ``scorer.score(model, step, run_dir)`` every ``every_steps`` steps
(``scorer.due(step)``) and stops when ``scorer.should_stop``. Each call evaluates every dev set
(BEIR folders) into ``run_dir/eval/step-<step>/``, appends a line
``{"step", "eval": {dataset: metrics}, "score", "best_step", "best_score"}`` to
``run_dir/checkpoint_eval.jsonl`` (read by ``negatron report``), and on improvement saves the
model to ``run_dir/best/`` atomically with ``best.json`` beside the weights.
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


class CheckpointScorer:
    """Evaluate on dev sets; the score is ``metric`` averaged over them (higher is better).

    ``early_stopping_patience``: stop after that many consecutive evaluations without improvement
    (None: never). ``k`` documents are retrieved per query (metrics cut deeper than ``k`` are dropped).
    Never point ``dev_sets`` at a test split: carve a dev split from train.
    """

    def __init__(self, dev_sets: Sequence[Mapping | DevSet], metric: str = "ndcg@10", every_steps: int = 500,
                 keep_best: bool = True, early_stopping_patience: int | None = None, k: int = 100,
                 batch_size: int | None = None, bf16: bool | None = None):
        parse_metric(metric)
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
        results = {}
        for dev in self.dev_sets:
            result = evaluate_beir(model, dev.path, split=dev.split, output_dir=run_dir / "eval" / f"step-{step}",
                                   k=self.k, batch_size=self.batch_size, bf16=self.bf16, metrics=self.metrics)
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
                "best_step": self.best_step, "best_score": self.best_score}
        with open(run_dir / LOG_FILE, "a", encoding="utf-8") as fh:
            fh.write(json.dumps(line) + "\n")
        self.history.append(line)
        logger.info("step %d: %s %.4f (best %.4f at step %d)%s", step, self.metric, score, self.best_score,
                    self.best_step, "" if improved else f", {self.bad_evals} without improvement")
        return line
