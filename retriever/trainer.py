"""The training loop: AdamW, linear warmup/decay, gradient accumulation, optional GradCache, bf16
autocast, gradient clipping, cross-device negatives under torchrun, checkpoints and exact resume.

Python API (stable): ``train(config: TrainConfig, output_dir, resume: bool = False) -> Path`` returns the
final model folder ``<output>/final`` (sentence-transformers format). The run folder also holds
``config.yaml`` (the full resolved config), ``train_log.jsonl`` (step, epoch, loss, lr, pairs_per_s,
elapsed), ``dev.jsonl`` when ``data.dev_fraction`` > 0, and ``checkpoints/step-<N>/``.

Negative strategies receive the :class:`Trainer` in ``prepare``; its public attributes are ``config``,
``output_dir``, ``model``, ``train_examples``, ``dev_examples``, ``dist`` and ``device``.
"""

from __future__ import annotations

import json
import logging
import random
import time
from pathlib import Path
from typing import Iterable

import numpy as np
import torch

from index.openvino_backend import release_compiled
from retriever.checkpoint import (Position, list_checkpoints, load_position, load_trainer_state, rng_state,
                                  save_checkpoint)
from retriever.config import TrainConfig
from retriever.distributed import average_gradients, barrier, gather_objects, init_distributed, mean_across
from retriever.data import write_jsonl_atomic
from retriever.io import write_text_atomic
from retriever.losses import CONTRASTIVE_LOSSES
from retriever.modeling import BiEncoder, apply_attention_dropout, bf16_supported
from retriever.negatives import get_strategy
from retriever.step import grad_cache_step, plain_step
from retriever.train_data import (BatchCollator, epoch_order, load_examples, no_duplicates_order, pair_rows, row_keys,
                                  split_dev, write_examples)

logger = logging.getLogger(__name__)

LOG_FILE = "train_log.jsonl"
HELD_OUT_DEV_DIR = "held_out_dev"


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def _param_groups(params: Iterable[torch.nn.Parameter], weight_decay: float) -> list[dict]:
    """No weight decay on biases and normalisation weights (the BERT/AdamW convention)."""
    decay, no_decay = [], []
    for p in params:
        if p.requires_grad:
            (no_decay if p.ndim < 2 else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def start_run(t, output_dir: Path, resume: bool):
    """What every trainer (bi-encoder, ranker) does first: the process group, threads, device, bf16, the
    checkpoint to resume from (refusing to train over one without ``--resume``) and the per-rank seed.
    Returns ``(dist, device, bf16, resume_from)``."""
    dist = init_distributed()
    if t.num_threads:
        torch.set_num_threads(t.num_threads)
    device = torch.device(f"cuda:{dist.local_rank}" if torch.cuda.is_available() else "cpu")
    bf16 = bf16_supported(device) if t.bf16 == "auto" else t.bf16
    existing = list_checkpoints(output_dir)
    if existing and not resume:
        raise ValueError(f"{output_dir} already holds checkpoints; pass --resume to continue that run "
                         "or choose a new --output")
    seed_everything(t.seed + dist.rank)
    return dist, device, bf16, (existing[-1] if resume and existing else None)


class Trainer:
    def __init__(self, config: TrainConfig, output_dir: str | Path, resume: bool = False):
        self.config, self.output_dir = config, Path(output_dir)
        t = config.training
        self.dist, self.device, self.bf16, self.resume_from = start_run(t, self.output_dir, resume)
        self.train_examples, self.dev_examples = split_dev(load_examples(config.data), config.data.dev_fraction,
                                                           config.data.dev_seed)
        # data.rows: per_pair trains every (query, positive) pair once an epoch; per_query: one row per query
        self.pairs = pair_rows(self.train_examples) if config.data.rows == "per_pair" else None
        self.num_rows = len(self.train_examples) if self.pairs is None else len(self.pairs)
        # data.sampler: no_duplicates regroups each epoch's shuffle; the keys are read once, the order per epoch
        self.duplicate_keys = row_keys(self.train_examples, self.pairs) if config.data.sampler == "no_duplicates" else None
        self._epoch_order: tuple[int, np.ndarray] | None = None
        self.global_batch = t.batch_size * self.dist.world_size
        self.steps_per_epoch = self.num_rows // (self.global_batch * t.gradient_accumulation_steps)
        if self.steps_per_epoch == 0:
            raise ValueError(f"{self.num_rows} training rows ({config.data.rows}) do not fill one step of "
                             f"{self.global_batch} x {t.gradient_accumulation_steps}; lower training.batch_size")
        self.total_steps = t.max_steps or t.epochs * self.steps_per_epoch

        self.model = self._load_model().to(self.device)
        self.model.train()
        self.strategy = get_strategy(config.negatives.strategy)(config.negatives.options)
        self.loss_fn = CONTRASTIVE_LOSSES[t.loss](t.temperature)
        self.collator = BatchCollator(self.strategy, t.seed, self.dist.rank, self.dist.world_size)
        self._build_optimizer()
        self.scorer = self._make_scorer()

    def _build_optimizer(self) -> None:
        """AdamW and its schedule over the parameters that train now. Called again after the strategy's
        ``prepare``, which may freeze or split towers (ADORE), so the optimizer (and a resumed optimizer
        state) covers exactly the parameters that train."""
        from transformers import get_linear_schedule_with_warmup

        t = self.config.training
        self.optimizer = torch.optim.AdamW(_param_groups(self.model.parameters(), t.weight_decay), lr=t.learning_rate)
        schedule_steps = self.strategy.model_update_steps(self.total_steps)  # AR2: its retriever steps only
        self.scheduler = get_linear_schedule_with_warmup(
            self.optimizer, int(round(t.warmup_ratio * schedule_steps)), schedule_steps)

    def _make_scorer(self):
        """The checkpoint scorer of the ``evaluation`` section, or None. Every process holds one: scoring is
        a collective (each rank encodes its shards of the dev collections, rank 0 scores and broadcasts)."""
        ev = self.config.evaluation
        if ev is None:
            return None
        from eval.checkpoint_scoring import CheckpointScorer

        dev_sets = [{"name": d.name, "path": d.path, "split": d.split} for d in ev.dev_sets]
        if ev.held_out_dev:
            dev_sets.append({"name": "held-out-dev", "path": self.output_dir / HELD_OUT_DEV_DIR, "split": "dev"})
        return CheckpointScorer(dev_sets, metric=ev.metric, every_steps=ev.every_steps, keep_best=ev.keep_best,
                                early_stopping_patience=ev.early_stopping_patience, k=ev.k, bf16=self.bf16,
                                sub_collection=ev.sub_collection)

    def _write_held_out_dev(self) -> None:
        """The queries held out by ``data.dev_fraction`` as a BEIR folder over the training corpus, so the
        checkpoint scorer retrieves them from the full corpus like any BEIR dev set."""
        folder = self.output_dir / HELD_OUT_DEV_DIR
        (folder / "qrels").mkdir(parents=True, exist_ok=True)
        corpus = Path(self.config.data.beir).resolve() / "corpus.jsonl"
        link = folder / "corpus.jsonl"
        if link.is_symlink() or link.exists():
            link.unlink()
        link.symlink_to(corpus)
        write_jsonl_atomic(folder / "queries.jsonl", ({"_id": e.query_id, "text": e.query} for e in self.dev_examples))
        rows = "".join(f"{e.query_id}\t{d}\t1\n" for e in self.dev_examples for d in e.positive_ids)
        write_text_atomic(folder / "qrels" / "dev.tsv", "query-id\tcorpus-id\tscore\n" + rows)

    def _load_model(self) -> BiEncoder:
        m = self.config.model
        source = self.resume_from / "model" if self.resume_from else m.name
        model = BiEncoder.from_pretrained(source, pooling=m.pooling, normalize=m.normalize, shared=m.shared,
                                          query_prefix=m.query_prefix, doc_prefix=m.doc_prefix,
                                          query_max_length=m.query_max_length, doc_max_length=m.doc_max_length)
        apply_attention_dropout([model.query_model] + ([] if model.doc_model is None else [model.doc_model]),
                                m.attention_dropout)
        return model

    # ------------------------------------------------------------------------------------ loop
    def _micro_step(self, batch, scale: float) -> float:
        t = self.config.training
        custom = self.strategy.micro_step(self, batch, scale)
        if custom is not None:
            return custom
        if t.grad_cache:
            return grad_cache_step(self.model, batch, self.loss_fn, self.strategy, chunk_size=t.grad_cache_chunk_size,
                                   bf16=self.bf16, scale=scale, dist_ctx=self.dist)
        return plain_step(self.model, batch, self.loss_fn, self.strategy, bf16=self.bf16, scale=scale, dist_ctx=self.dist)

    def step_rows(self, step: int) -> np.ndarray:
        """The global rows of optimizer step ``step`` (0-based), its micro-batches in order: indices into
        ``train_examples`` (``data.rows: per_query``) or into ``pairs`` (per_pair)."""
        t = self.config.training
        epoch, in_epoch = divmod(step, self.steps_per_epoch)
        order = self._order(epoch)
        span = t.gradient_accumulation_steps * self.global_batch
        return order[in_epoch * span:(in_epoch + 1) * span]

    def _order(self, epoch: int) -> np.ndarray:
        """The rows of ``epoch`` in training order: a pure function of (seed, epoch), so a resumed run and
        every process agree on it. A no_duplicates order is kept for the epoch (one pass over its rows)."""
        t = self.config.training
        order = self.strategy.epoch_order(self.num_rows, t.seed, epoch) if self.pairs is None else None
        if order is not None:
            return order
        if self.duplicate_keys is None:
            return epoch_order(self.num_rows, t.seed, epoch)
        if self._epoch_order is None or self._epoch_order[0] != epoch:
            order = no_duplicates_order(epoch_order(self.num_rows, t.seed, epoch), self.duplicate_keys, self.global_batch)
            self._epoch_order = (epoch, order)
        return self._epoch_order[1]

    def step_examples(self, step: int) -> list:
        """The training examples of optimizer step ``step`` (a query trained on two of its positives
        appears twice under per_pair)."""
        rows = self.step_rows(step)
        return [self.train_examples[int(i)] for i in (rows if self.pairs is None else self.pairs[rows, 0])]

    def _batches(self, step: int):
        """The micro-batches of optimizer step ``step`` (0-based) for this process."""
        epoch = step // self.steps_per_epoch
        rows = self.step_rows(step)
        for start in range(0, len(rows), self.global_batch):
            micro = rows[start:start + self.global_batch]
            if self.pairs is None:
                yield self.collator([self.train_examples[i] for i in micro], micro, epoch)
            else:
                example, positive = self.pairs[micro, 0], self.pairs[micro, 1]
                yield self.collator([self.train_examples[int(i)] for i in example], micro, epoch, positive_index=positive)

    def train_step(self, step: int) -> float:
        """Optimizer step ``step`` (0-based): accumulate its micro-batches, average gradients across
        processes, clip, update. Returns the loss averaged over micro-batches and processes."""
        t = self.config.training
        losses = [self._micro_step(batch, 1.0 / t.gradient_accumulation_steps) for batch in self._batches(step)]
        if self.strategy.updates_model(step):  # False on AR2's ranker steps: no update, no LR-schedule step
            params = [p for p in self.model.parameters() if p.requires_grad]
            average_gradients(params, self.dist)
            if t.max_grad_norm:
                torch.nn.utils.clip_grad_norm_(params, t.max_grad_norm)
            self.optimizer.step()
            self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.strategy.on_step_end(step + 1)
        return mean_across(float(np.mean(losses)), self.dist)

    def _position(self, step: int) -> Position:
        epoch, in_epoch = divmod(step, self.steps_per_epoch)
        return Position(step=step, epoch=epoch, step_in_epoch=in_epoch, order_seed=self.config.training.seed)

    def _start(self) -> int:
        """Write the run's config (and dev split); restore a checkpoint. Returns the first step to run."""
        if self.dist.is_main:
            self.output_dir.mkdir(parents=True, exist_ok=True)
            write_text_atomic(self.output_dir / "config.yaml", self.config.to_yaml())
            if self.dev_examples:
                write_examples(self.output_dir / "dev.jsonl", self.dev_examples)
            if self.config.evaluation is not None and self.config.evaluation.held_out_dev:
                self._write_held_out_dev()
        self.strategy.prepare(self)
        release_compiled(self.model)  # what prepare encoded with is stale after the first step
        self._build_optimizer()  # before any step: prepare may have changed which parameters train
        if self.resume_from is None:
            if self.dist.is_main:
                write_text_atomic(self.output_dir / LOG_FILE, "")
            return 0
        position = load_position(self.resume_from)
        load_trainer_state(self.resume_from, self.optimizer, self.scheduler, self.strategy, self.dist.rank)
        if self.dist.is_main:
            self._truncate_log(position.step)
        return position.step

    def _truncate_log(self, step: int) -> None:
        """Drop log lines written after the checkpoint by the interrupted run."""
        path = self.output_dir / LOG_FILE
        rows = [line for line in path.read_text().splitlines() if line.strip()] if path.exists() else []
        kept = [line for line in rows if json.loads(line)["step"] <= step]
        write_text_atomic(path, "".join(line + "\n" for line in kept))

    def run(self) -> Path:
        from retriever.progress import StepBar

        t = self.config.training
        start = self._start()
        pairs_per_step = self.global_batch * t.gradient_accumulation_steps
        bar = StepBar("train", self.total_steps, initial=start, enabled=self.dist.is_main)
        began = window_start = time.perf_counter()
        window_losses: list[float] = []
        log = open(self.output_dir / LOG_FILE, "a") if self.dist.is_main else None
        try:
            for step in range(start, self.total_steps):
                window_losses.append(self.train_step(step))
                bar.update(1)
                done = step + 1
                if done % t.log_every == 0 or done == self.total_steps:
                    now = time.perf_counter()
                    row = {"step": done, "epoch": step // self.steps_per_epoch, "loss": float(np.mean(window_losses)),
                           "lr": self.scheduler.get_last_lr()[0],
                           "pairs_per_s": pairs_per_step * len(window_losses) / (now - window_start),
                           "elapsed": now - began, "bf16": self.bf16, **self.strategy.log_metrics()}
                    bar.set_postfix(loss=f"{row['loss']:.4f}", pairs_per_s=f"{row['pairs_per_s']:.1f}")
                    if log:
                        log.write(json.dumps(row) + "\n")
                        log.flush()
                    window_losses, window_start = [], now
                if t.save_every and done % t.save_every == 0:
                    self._save_checkpoint(done)
                if self._score_checkpoint(done):
                    break
        finally:
            bar.close()
            if log:
                log.close()
        final = self.output_dir / "final"
        if self.dist.is_main:
            self.model.save(final)
            self.strategy.on_model_saved(final, "final")
        barrier(self.dist)
        return final

    def _score_checkpoint(self, step: int) -> bool:
        """Score the model on the dev sets when due (every process takes part, see ``_make_scorer``); True
        when early stopping says to stop, on every process alike (the scorer broadcasts rank 0's verdict)."""
        if self.scorer is None or not self.scorer.due(step):
            return False
        line = self.scorer.score(self.model, step, self.output_dir, dist=self.dist)
        if self.dist.is_main:
            if line["improved"] and self.scorer.keep_best:
                self.strategy.on_model_saved(self.output_dir / "best", "best")
            print(f"step {step}: dev {line['metric']} {line['score']:.4f} (best {line['best_score']:.4f} "
                  f"at step {line['best_step']})", flush=True)
        return self.scorer.should_stop

    def _save_checkpoint(self, step: int) -> None:
        states = gather_objects(rng_state(), self.dist)
        if self.dist.is_main:
            save_checkpoint(self.output_dir, self._position(step), self.model, self.optimizer, self.scheduler,
                            self.strategy, states, self.config.training.keep_last)
        barrier(self.dist)


def train(config: TrainConfig, output_dir: str | Path, resume: bool = False) -> Path:
    """Train a bi-encoder as ``config`` says; returns ``<output_dir>/final``. ``resume=True`` continues
    from the newest checkpoint in ``output_dir`` (same weights as an uninterrupted run)."""
    return Trainer(config, output_dir, resume).run()
