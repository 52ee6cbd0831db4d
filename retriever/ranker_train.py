"""Listwise training of a cross-encoder ranker (``negatron train-ranker``).

Python API (stable; AR2's ranker warm-up calls it):

- ``RankerConfig`` (pydantic, every section ``extra="forbid"``) and ``load_ranker_config(path, overrides)``;
- ``train_ranker(config: RankerConfig, output_dir, resume=False) -> Path`` returns ``<output>/final``, a
  sentence-transformers ``CrossEncoder`` folder (load it with :meth:`retriever.ranker.Ranker.load`).

Each training query forms a group: one of its positives and ``negatives.per_query`` hard negatives drawn
(seeded by step and example) from its negative list, which comes from the data (a mined JSONL), from
BM25, or from a dense retriever's exact top-k over the corpus (``negatives.source``). The loss is the
softmax cross-entropy over the group, positive first (:class:`retriever.losses.listwise_ranker.ListwiseRankerLoss`,
FlagEmbedding's reranker loss). The loop is the bi-encoder trainer's: AdamW with linear warmup/decay,
gradient accumulation, clipping, bf16 autocast where native, atomic checkpoints with RNG states for exact
resume after a kill (:mod:`retriever.checkpoint`), gradient averaging under torchrun
(:mod:`retriever.distributed`), a progress bar and ``train_log.jsonl``. With an ``evaluation`` section the
ranker reranks the held-out dev queries' candidates (positives + negatives) every ``every_steps``, logs
``dev_eval.jsonl``, keeps the best model in ``<output>/best`` and can stop early.
"""

from __future__ import annotations

import json
import time
from dataclasses import replace
from pathlib import Path
from typing import Any, Literal, Sequence

import numpy as np
import torch
import yaml
from pydantic import BaseModel, Field, ValidationError, model_validator

from retriever.checkpoint import Position, load_position, load_trainer_state, rng_state, save_checkpoint
from retriever.config import (PATH_KEYS, ConfigError, DataConfig, TrainingConfig, _resolve_paths, _Strict,
                              _unknown_message, apply_overrides)
from retriever.data import TrainingExample, write_jsonl_atomic
from retriever.distributed import average_gradients, barrier, gather_objects, mean_across
from retriever.io import write_text_atomic
from retriever.losses.listwise_ranker import ListwiseRankerLoss
from retriever.modeling import apply_attention_dropout, autocast
from retriever.ranker import Ranker
from retriever.train_data import epoch_order, load_examples, split_dev

LOG_FILE = "train_log.jsonl"
DEV_LOG = "dev_eval.jsonl"
MINED_FILE = "ranker_negatives.jsonl"


# ---------------------------------------------------------------------------------------- config
class RankerModelConfig(_Strict):
    name: str = Field("sentence-transformers/all-MiniLM-L6-v2",
                      description="CrossEncoder / sequence-classification folder, or a plain encoder (fresh head)")
    max_length: int = Field(256, gt=0, description="tokens per (query, document) pair")
    attention_dropout: float | None = Field(
        0.0, ge=0.0, lt=1.0,
        description="dropout on attention probabilities while training; 0 (default) lets PyTorch use its fused "
                    "attention kernel (as the bi-encoder's model.attention_dropout); null keeps the checkpoint's rate")


class RankerNegativesConfig(_Strict):
    """Where each query's hard negatives come from.

    ``data``: the negatives stored in the training data (``data.jsonl``, e.g. ``negatron mine`` output).
    ``dense``: the exact top-``k`` of ``model`` (a bi-encoder) over the ``data.beir`` corpus.
    ``bm25``: the top-``k`` of the Lucene index ``index`` (``negatron index bm25``). Positives are never
    negatives; ranks ``[range_min, range_max)`` are kept (0-based, positives included)."""

    source: Literal["data", "dense", "bm25"] = "data"
    per_query: int = Field(7, gt=0, description="negatives per group (group size = 1 + per_query)")
    model: str | None = Field(None, description="dense: the bi-encoder that retrieves (default all-MiniLM-L6-v2)")
    index: str | None = Field(None, description="bm25: Lucene index folder; dense: optional prebuilt FAISS index")
    k: int = Field(100, gt=0)
    range_min: int = Field(0, ge=0)
    range_max: int | None = Field(None, gt=0, description="default k")
    encode_batch_size: int | None = Field(None, gt=0)

    @model_validator(mode="after")
    def _consistent(self) -> "RankerNegativesConfig":
        if self.source == "bm25" and not self.index:
            raise ValueError("negatives.source bm25 needs negatives.index (a `negatron index bm25` folder)")
        upper = self.range_max or self.k
        if not self.range_min < upper <= self.k:
            raise ValueError(f"need range_min < range_max <= k, got {self.range_min}, {upper}, {self.k}")
        return self


class RankerTrainingConfig(TrainingConfig):
    """The bi-encoder's training section with ranker defaults; ``temperature`` divides the ranker logits
    (1 = FlagEmbedding). GradCache and the contrastive loss choice do not apply to a cross-encoder."""

    learning_rate: float = Field(2e-5, gt=0)
    batch_size: int = Field(8, gt=0, description="queries (groups) per micro-step on each process")
    temperature: float = Field(1.0, gt=0)
    head_learning_rate: float | None = Field(
        None, gt=0, description="learning rate of the classification head (the parameters outside the backbone); "
                                "null: learning_rate. A fresh head on a bi-encoder checkpoint barely moves at an "
                                "encoder's 2e-5 in a few hundred steps")

    @model_validator(mode="after")
    def _no_biencoder_options(self) -> "RankerTrainingConfig":
        if self.grad_cache:
            raise ValueError("training.grad_cache applies to bi-encoders; a ranker's group is one forward pass "
                             "(lower batch_size and raise gradient_accumulation_steps instead)")
        if self.loss != "infonce":
            raise ValueError("training.loss chooses a bi-encoder contrastive loss; a ranker trains listwise")
        return self


class RankerEvaluationConfig(_Strict):
    """Dev scoring: rerank each held-out dev query's candidates (its positives and negatives)."""

    every_steps: int = Field(100, gt=0)
    metric: str = "ndcg@10"
    early_stopping_patience: int | None = Field(None, gt=0)
    keep_best: bool = True

    @model_validator(mode="after")
    def _metric(self) -> "RankerEvaluationConfig":
        from eval.metrics import parse_metric

        parse_metric(self.metric)
        return self


class RankerConfig(_Strict):
    model: RankerModelConfig = Field(default_factory=RankerModelConfig)
    data: DataConfig
    negatives: RankerNegativesConfig = Field(default_factory=RankerNegativesConfig)
    training: RankerTrainingConfig = Field(default_factory=RankerTrainingConfig)
    evaluation: RankerEvaluationConfig | None = None

    @model_validator(mode="after")
    def _sources(self) -> "RankerConfig":
        if self.data.rows != "per_query":
            raise ValueError("data.rows: per_pair is a bi-encoder trainer layout (negatron train); the ranker "
                             "trains one row per query: remove it")
        if self.data.sampler != "random":
            raise ValueError("data.sampler is a bi-encoder trainer option (negatron train): a ranker has no "
                             "in-batch negatives to keep distinct; remove it")
        if self.negatives.source in ("dense", "bm25") and self.data.beir is None:
            raise ValueError(f"negatives.source {self.negatives.source} retrieves from a corpus: use a data.beir source")
        if self.evaluation is not None and self.data.dev_fraction == 0:
            raise ValueError("the evaluation section scores the data.dev_fraction held-out queries; set "
                             "data.dev_fraction > 0 (e.g. 0.1)")
        return self

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.model_dump(mode="json"), sort_keys=False)


def _owner(loc: Sequence[Any]) -> type[BaseModel] | None:
    model: type[BaseModel] = RankerConfig
    for part in loc[:-1]:
        annotation = getattr(model.model_fields.get(str(part)), "annotation", None)
        options = [a for a in getattr(annotation, "__args__", (annotation,)) if isinstance(a, type)]
        found = next((a for a in options if issubclass(a, BaseModel)), None)
        if found is None:
            return None
        model = found
    return model


def _format_errors(exc: ValidationError, source: str) -> str:
    lines = []
    for err in exc.errors():
        loc = [str(p) for p in err["loc"]]
        key = ".".join(loc) or "<top level>"
        if err["type"] == "extra_forbidden":
            owner = _owner(err["loc"])
            section = ".".join(loc[:-1]) or "top-level"
            lines.append(f"  {key}: " + _unknown_message(f"key in section {section}", loc[-1],
                                                         list(owner.model_fields) if owner else []))
        else:
            got = err.get("input")
            shown = f" (got {got!r})" if err["type"] != "value_error" and not isinstance(got, (dict, list)) else ""
            lines.append(f"  {key}: {err['msg'].removeprefix('Value error, ')}{shown}")
    return f"invalid ranker config {source}:\n" + "\n".join(lines)


def load_ranker_config(path: str | Path, overrides: Sequence[str] = ()) -> RankerConfig:
    """Read, override (``section.key=value``), resolve relative paths (as :func:`retriever.config.load_config`)
    and validate a ranker config; :class:`ConfigError` names the file, the key and the valid keys."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {path} not found")
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML ({exc})") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of sections ({', '.join(RankerConfig.model_fields)})")
    raw = apply_overrides(raw, overrides)
    if isinstance(raw.get("data"), dict):
        _resolve_paths(raw["data"], PATH_KEYS, path)
    if isinstance(raw.get("negatives"), dict):
        _resolve_paths(raw["negatives"], ("index", "model"), path)
    if isinstance(raw.get("model"), dict):
        _resolve_paths(raw["model"], ("name",), path)
    try:
        return RankerConfig.model_validate(raw)
    except ValidationError as exc:
        raise ConfigError(_format_errors(exc, str(path))) from None


# ---------------------------------------------------------------------------------------- negatives
def retrieve_negatives(config: RankerConfig, examples: Sequence[TrainingExample]) -> dict[str, list[str]]:
    """``{query_id: [negative doc ids in rank order]}`` from BM25 or a dense retriever (positives dropped,
    ranks outside ``[range_min, range_max)`` dropped)."""
    from mining.filters import filter_candidates
    from retriever.data import Corpus

    neg = config.negatives
    corpus = Corpus(Path(config.data.beir) / "corpus.jsonl")
    queries = {e.query_id: e.query for e in examples}
    ids = list(queries)
    if neg.source == "bm25":
        from index.bm25 import BM25Searcher

        hits = BM25Searcher(neg.index).search(queries, k=neg.k)
        ranked = {q: [str(d) for d, _ in hits.get(q, [])] for q in ids}
    else:
        from eval.beir import dense_search, load_model

        model = load_model(neg.model or "sentence-transformers/all-MiniLM-L6-v2")
        scores, rows, doc_ids = dense_search(model, corpus, [queries[q] for q in ids], neg.k, neg.encode_batch_size,
                                             None, index_dir=neg.index)
        ranked = {q: [doc_ids[int(r)] for r in rows[i] if r >= 0] for i, q in enumerate(ids)}
    positives = {e.query_id: set(e.positive_ids) for e in examples}
    out = {}
    for q in ids:
        cand = ranked[q]
        kept = filter_candidates(cand, np.zeros(len(cand), dtype=np.float32), exclude_ids=positives[q] | {q},
                                 range_min=neg.range_min, range_max=neg.range_max or neg.k).kept
        out[q] = [cand[i] for i in kept]
    return out


class WithNegatives(Sequence[TrainingExample]):
    """``base`` (any example sequence, e.g. the lazy tables of :func:`retriever.train_data.load_examples`)
    with each example's negatives replaced by retrieved corpus ids, texts read when ``[i]`` is asked."""

    def __init__(self, base: Sequence[TrainingExample], table: dict[str, list[str]], corpus):
        self.base, self.table, self.corpus = base, table, corpus

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, i):  # type: ignore[override]
        e = self.base[int(i)]
        ids = list(self.table.get(e.query_id, []))
        return replace(e, negative_ids=ids, negatives=[self.corpus.get(d).full_text for d in ids])


class Rows(Sequence[TrainingExample]):
    """The examples of ``base`` at ``rows`` (a view, no copy)."""

    def __init__(self, base: Sequence[TrainingExample], rows: Sequence[int]):
        self.base, self.rows = base, np.asarray(rows, dtype=np.int64)

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i):  # type: ignore[override]
        return self.base[int(self.rows[int(i)])]


def attach_negatives(config: RankerConfig, examples: Sequence[TrainingExample], output_dir: Path,
                     is_main: bool = True) -> Sequence[TrainingExample]:
    """The examples with negatives from ``negatives.source``; retrieved ones are cached in
    ``<output>/ranker_negatives.jsonl`` (a resumed run reads them back instead of retrieving again)."""
    if config.negatives.source == "data":
        return examples
    from retriever.data import Corpus

    cache = output_dir / MINED_FILE
    if cache.exists():
        table = {row["query_id"]: row["neg_ids"] for row in map(json.loads, cache.read_text().splitlines()) if row}
    else:
        table = retrieve_negatives(config, [examples[i] for i in range(len(examples))])
        if is_main:
            write_jsonl_atomic(cache, ({"query_id": q, "neg_ids": d} for q, d in table.items()))
    return WithNegatives(examples, table, Corpus(Path(config.data.beir) / "corpus.jsonl"))


# ---------------------------------------------------------------------------------------- training
class _LoopState:
    """What :mod:`retriever.checkpoint` stores as the strategy state: the dev-scoring bookkeeping
    (best score, its step, evaluations without improvement), so early stopping survives a resume."""

    def __init__(self, trainer: "RankerTrainer"):
        self.trainer = trainer

    def state_dict(self) -> dict:
        t = self.trainer
        return {"best_score": t.best_score, "best_step": t.best_step, "bad_evals": t.bad_evals}

    def load_state_dict(self, state: dict) -> None:
        t = self.trainer
        t.best_score, t.best_step, t.bad_evals = state.get("best_score"), state.get("best_step", 0), state.get("bad_evals", 0)


def group_for(example: TrainingExample, per_query: int, rng: np.random.Generator) -> list[str]:
    """The positive (drawn from the example's positives) followed by ``per_query`` negatives, drawn without
    replacement when the example has enough, with replacement otherwise."""
    positive = example.positives[int(rng.integers(len(example.positives)))]
    pool = example.negatives
    replace = len(pool) < per_query
    picks = rng.choice(len(pool), size=per_query, replace=replace)
    return [positive] + [pool[int(i)] for i in picks]


def _ranker_param_groups(model: torch.nn.Module, t: RankerTrainingConfig) -> list[dict]:
    """The bi-encoder's decay / no-decay groups, split again into backbone and head (every parameter outside
    ``model.base_model``) when the head has its own ``head_learning_rate``."""
    from retriever.trainer import _param_groups

    if t.head_learning_rate is None:
        return _param_groups(model.parameters(), t.weight_decay)
    backbone = {id(p) for p in model.base_model.parameters()}
    head = [p for p in model.parameters() if id(p) not in backbone]
    groups = _param_groups(model.base_model.parameters(), t.weight_decay)
    groups += [{**g, "lr": t.head_learning_rate} for g in _param_groups(head, t.weight_decay)]
    return [g for g in groups if g["params"]]


class RankerTrainer:
    """Optimizer steps over listwise groups; see the module docstring."""

    def __init__(self, config: RankerConfig, output_dir: str | Path, resume: bool = False):
        from transformers import get_linear_schedule_with_warmup

        from retriever.trainer import start_run

        self.config, self.output_dir = config, Path(output_dir)
        t = config.training
        self.dist, self.device, self.bf16, self.resume_from = start_run(t, self.output_dir, resume)
        self.output_dir.mkdir(parents=True, exist_ok=True)
        examples = attach_negatives(config, load_examples(config.data), self.output_dir, self.dist.is_main)
        train, dev = split_dev(examples, config.data.dev_fraction, config.data.dev_seed)
        usable = [i for i in range(len(train)) if (lambda e: e.negatives and e.positives)(train[i])]
        self.skipped = len(train) - len(usable)  # queries whose retrieval left no negative
        self.train_examples = Rows(train, usable)
        self.dev_examples = [dev[i] for i in range(len(dev))]
        if not self.train_examples:
            raise ValueError("no training example has both a positive and a negative: check negatives.source "
                             f"({config.negatives.source}) and the data")
        self.global_batch = t.batch_size * self.dist.world_size
        self.steps_per_epoch = len(self.train_examples) // (self.global_batch * t.gradient_accumulation_steps)
        if self.steps_per_epoch == 0:
            raise ValueError(f"{len(self.train_examples)} training examples do not fill one step of "
                             f"{self.global_batch} x {t.gradient_accumulation_steps}; lower training.batch_size")
        self.total_steps = t.max_steps or t.epochs * self.steps_per_epoch
        source = self.resume_from / "model" if self.resume_from else config.model.name
        self.ranker = Ranker.load(source, max_length=config.model.max_length, device=self.device, seed=t.seed)
        self.ranker.activation = "identity"  # listwise logits; see retriever.ranker
        apply_attention_dropout([self.ranker.model], config.model.attention_dropout)
        self.ranker.train()
        self.loss_fn = ListwiseRankerLoss(t.temperature)
        self.optimizer = torch.optim.AdamW(_ranker_param_groups(self.ranker.model, t), lr=t.learning_rate)
        self.scheduler = get_linear_schedule_with_warmup(
            self.optimizer, int(round(t.warmup_ratio * self.total_steps)), self.total_steps)
        self.best_score: float | None = None
        self.best_step = 0
        self.bad_evals = 0

    # ------------------------------------------------------------------ one step
    def _groups(self, step: int):
        """This process's micro-batches of optimizer step ``step`` (0-based): lists of (query, group)."""
        t = self.config.training
        epoch, in_epoch = divmod(step, self.steps_per_epoch)
        order = epoch_order(len(self.train_examples), t.seed, epoch)
        per_rank = t.batch_size
        for micro in range(t.gradient_accumulation_steps):
            start = (in_epoch * t.gradient_accumulation_steps + micro) * self.global_batch + self.dist.rank * per_rank
            rows = order[start:start + per_rank]
            batch = []
            for i in rows:
                rng = np.random.default_rng([t.seed, epoch, int(i)])
                example = self.train_examples[int(i)]
                batch.append((example.query, group_for(example, self.config.negatives.per_query, rng)))
            yield batch

    def _micro_step(self, batch, scale: float) -> float:
        queries = [q for q, group in batch for _ in group]
        docs = [d for _, group in batch for d in group]
        with autocast(self.device, self.bf16):
            logits = self.ranker.logits(queries, docs)
        loss = self.loss_fn(logits.float().view(len(batch), -1))
        (loss * scale).backward()
        return float(loss.detach())

    def train_step(self, step: int) -> float:
        t = self.config.training
        losses = [self._micro_step(b, 1.0 / t.gradient_accumulation_steps) for b in self._groups(step)]
        params = [p for p in self.ranker.parameters() if p.requires_grad]
        average_gradients(params, self.dist)
        if t.max_grad_norm:
            torch.nn.utils.clip_grad_norm_(params, t.max_grad_norm)
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return mean_across(float(np.mean(losses)), self.dist)

    # ------------------------------------------------------------------ dev scoring
    def dev_score(self) -> dict[str, float]:
        """Rerank each dev query's candidates (positives + negatives); metrics over those lists."""
        from eval.metrics import compute_metrics

        qrels, candidates = {}, {}
        for n, e in enumerate(self.dev_examples):
            qid = e.query_id or f"dev-{n}"
            pos = list(zip(e.positive_ids or [f"p{j}" for j in range(len(e.positives))], e.positives))
            neg = list(zip(e.negative_ids or [f"n{j}" for j in range(len(e.negatives))], e.negatives))
            qrels[qid] = {d: 1 for d, _ in pos}
            candidates[qid] = (e.query, dict(pos + neg))
        pairs = [(q, text) for q, docs in candidates.values() for text in docs.values()]
        scores = iter(self.ranker.score(pairs, bf16=self.bf16))
        run = {qid: {d: float(next(scores)) for d in docs} for qid, (_, docs) in candidates.items()}
        self.ranker.train()
        metric = self.config.evaluation.metric
        aggregate, _ = compute_metrics(qrels, run, metrics=sorted({metric, "ndcg@10", "mrr@10"}),
                                       ignore_identical_ids=False)
        return aggregate

    def _evaluate(self, step: int) -> bool:
        """Dev-score when due (main process); True when early stopping says stop (all processes agree)."""
        ev = self.config.evaluation
        if ev is None or (step % ev.every_steps and step != self.total_steps):
            return False
        stop = False
        if self.dist.is_main:
            metrics = self.dev_score()
            score = metrics[ev.metric]
            if self.best_score is None or score > self.best_score:
                self.best_score, self.best_step, self.bad_evals = score, step, 0
                if ev.keep_best:
                    self.ranker.save(self.output_dir / "best")
            else:
                self.bad_evals += 1
            row = {"step": step, "metric": ev.metric, "score": score, **metrics, "best_score": self.best_score,
                   "best_step": self.best_step}
            with open(self.output_dir / DEV_LOG, "a") as fh:
                fh.write(json.dumps(row) + "\n")
            print(f"step {step}: dev {ev.metric} {score:.4f} (best {self.best_score:.4f} at step {self.best_step})",
                  flush=True)
            stop = ev.early_stopping_patience is not None and self.bad_evals >= ev.early_stopping_patience
        return bool(gather_objects(stop, self.dist)[0])

    # ------------------------------------------------------------------ checkpoints
    def _position(self, step: int) -> Position:
        epoch, in_epoch = divmod(step, self.steps_per_epoch)
        return Position(step=step, epoch=epoch, step_in_epoch=in_epoch, order_seed=self.config.training.seed)

    def _save_checkpoint(self, step: int) -> None:
        states = gather_objects(rng_state(), self.dist)
        if self.dist.is_main:
            save_checkpoint(self.output_dir, self._position(step), self.ranker, self.optimizer, self.scheduler,
                            _LoopState(self), states, self.config.training.keep_last)
        barrier(self.dist)

    def _start(self) -> int:
        if self.dist.is_main:
            write_text_atomic(self.output_dir / "config.yaml", self.config.to_yaml())
            if self.skipped:
                print(f"{self.skipped} training queries have no negative ({self.config.negatives.source}) and are "
                      "left out", flush=True)
        if self.resume_from is None:
            if self.dist.is_main:
                write_text_atomic(self.output_dir / LOG_FILE, "")
                write_text_atomic(self.output_dir / DEV_LOG, "")
            return 0
        position = load_position(self.resume_from)
        load_trainer_state(self.resume_from, self.optimizer, self.scheduler, _LoopState(self), self.dist.rank)
        if self.dist.is_main:
            for name in (LOG_FILE, DEV_LOG):
                _truncate_log(self.output_dir / name, position.step)
        return position.step

    def run(self) -> Path:
        from retriever.progress import StepBar

        t = self.config.training
        start = self._start()
        groups_per_step = self.global_batch * t.gradient_accumulation_steps
        bar = StepBar("train-ranker", self.total_steps, initial=start, enabled=self.dist.is_main)
        began = window_start = time.perf_counter()
        window: list[float] = []
        log = open(self.output_dir / LOG_FILE, "a") if self.dist.is_main else None
        try:
            for step in range(start, self.total_steps):
                window.append(self.train_step(step))
                bar.update(1)
                done = step + 1
                if done % t.log_every == 0 or done == self.total_steps:
                    now = time.perf_counter()
                    row = {"step": done, "epoch": step // self.steps_per_epoch, "loss": float(np.mean(window)),
                           "lr": self.scheduler.get_last_lr()[0],
                           "groups_per_s": groups_per_step * len(window) / (now - window_start),
                           "elapsed": now - began, "bf16": self.bf16}
                    bar.set_postfix(loss=f"{row['loss']:.4f}")
                    if log:
                        log.write(json.dumps(row) + "\n")
                        log.flush()
                    window, window_start = [], now
                if t.save_every and done % t.save_every == 0:
                    self._save_checkpoint(done)
                if self._evaluate(done):
                    break
        finally:
            bar.close()
            if log:
                log.close()
        final = self.output_dir / "final"
        if self.dist.is_main:
            self.ranker.save(final)
        barrier(self.dist)
        return final


def _truncate_log(path: Path, step: int) -> None:
    rows = [line for line in path.read_text().splitlines() if line.strip()] if path.exists() else []
    write_text_atomic(path, "".join(line + "\n" for line in rows if json.loads(line)["step"] <= step))


def train_ranker(config: RankerConfig, output_dir: str | Path, resume: bool = False) -> Path:
    """Train a cross-encoder ranker as ``config`` says; returns ``<output_dir>/final`` (CrossEncoder format).
    ``resume=True`` continues from the newest checkpoint (same weights as an uninterrupted run)."""
    return RankerTrainer(config, output_dir, resume).run()
