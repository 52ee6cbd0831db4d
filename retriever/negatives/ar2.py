"""AR2: a dual-encoder retriever and a cross-encoder ranker trained in alternation (a minimax game).

Zhang et al., "Adversarial Retriever-Ranker for Dense Text Retrieval", ICLR 2022; reference code
microsoft/AR2 (``wiki/co_training_wiki_train.py``). Each query's candidates are its positive plus
negatives the retriever retrieves from its own index, refreshed every ``refresh_every`` steps through the
in-process mining service (as :mod:`retriever.negatives.ance`, whose margin and rank options apply).

Steps, in order: ``ranker_warmup_steps`` ranker-only steps (the paper's ranker warm start, on the
retriever's own candidates: use them when ``ranker`` is not already a trained cross-encoder), then cycles
of ``ranker_steps`` ranker steps (cross-entropy putting the positive first,
:class:`retriever.losses.ar2.AR2RankerLoss`) and ``retriever_steps`` retriever steps (KL to the ranker's
distribution plus the adversarial term, :class:`retriever.losses.ar2.AR2RetrieverLoss`). As in the
reference, each model has its own AdamW and linear warmup/decay schedule over *its own* steps: a ranker
step leaves the retriever, its optimizer and its LR schedule untouched (``updates_model``), and the ranker
clips its gradients at ``ranker_max_grad_norm`` (default ``training.max_grad_norm``). Under torchrun the
ranker's gradients are averaged across processes like the retriever's.

The ranker is a :class:`retriever.ranker.Ranker`: a sentence-transformers ``CrossEncoder`` or any
one-logit ``AutoModelForSequenceClassification`` checkpoint, or (the default, the retriever's base model)
a plain encoder with a fresh head. It is saved in ``CrossEncoder`` format to ``<run>/ranker`` beside
``<run>/final``, to ``<run>/best/ranker`` whenever dev scoring keeps a new ``best/`` (also on early
stopping), and with its optimizer and schedule in every checkpoint for exact resume.
``<run>/ar2_log.jsonl`` has one row per step (phase, ranker or retriever loss, KL and adversarial terms,
index version, both learning rates); ``train_log.jsonl`` gets their means over each logging window.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from pydantic import Field

from retriever.distributed import average_gradients
from retriever.losses.ar2 import AR2RankerLoss, AR2RetrieverLoss
from retriever.modeling import apply_attention_dropout, autocast
from retriever.negatives.ance import ANCENegatives, ANCEOptions
from retriever.negatives.base import register_strategy

RANKER_DIR = "ranker"
AR2_LOG = "ar2_log.jsonl"
_TERMS = ("ranker_loss", "retriever_loss", "kl_term", "adv_term")


class AR2Options(ANCEOptions):
    per_query: int = Field(3, gt=0, description="retrieved negatives per query (candidates = 1 + per_query)")
    ranker: str | None = Field(None, description="cross-encoder checkpoint (default: the retriever's base model "
                                                 "with a fresh head; then set ranker_warmup_steps)")
    ranker_lr: float = Field(2e-5, gt=0)
    ranker_max_length: int = Field(256, gt=0)
    ranker_temperature: float = Field(1.0, gt=0)
    ranker_warmup_steps: int = Field(0, ge=0, description="ranker-only steps before co-training (ranker warm start)")
    ranker_warmup_ratio: float = Field(0.1, ge=0.0, le=1.0,
                                       description="LR warm-up share of the ranker's linear schedule (reference: 0.1)")
    ranker_max_grad_norm: float | None = Field(None, ge=0.0, description="ranker gradient clip (default: "
                                               "training.max_grad_norm, as the reference; 0 = none)")
    ranker_steps: int = Field(10, gt=0, description="ranker steps per cycle (each cycle starts with the ranker)")
    retriever_steps: int = Field(10, gt=0, description="retriever steps per cycle")
    adv_lambda: float = Field(0.5, ge=0.0, le=1.0, description="weight of the adversarial term")
    adv_reduction: Literal["sum", "mean"] = Field(
        "sum", description="adversarial term summed over the batch's queries (microsoft/AR2) or averaged")
    score_scale: float | None = Field(None, gt=0, description="multiplier on the retriever's scores before its "
                                      "softmax (default 1 / training.temperature: 20 for cosine at 0.05)")


@register_strategy("ar2")
class AR2Strategy(ANCENegatives):
    Options = AR2Options
    supports_loss_options = False  # trains with its own adversarial loss in micro_step

    def __init__(self, options=None):
        super().__init__(options)
        self.ranker = None
        self.ranker_optimizer = None
        self.ranker_scheduler = None
        self.ranker_loss = AR2RankerLoss(self.options.ranker_temperature)
        self.retriever_loss: AR2RetrieverLoss | None = None
        self.completed_steps = 0
        self._step_terms: dict[str, list[float]] = {}
        self._window: list[dict] = []

    # ------------------------------------------------------------------ phases
    def phase_of(self, step: int) -> str:
        """``"ranker"`` or ``"retriever"`` for 0-based optimizer step ``step``."""
        o = self.options
        if step < o.ranker_warmup_steps:
            return "ranker"
        in_cycle = (step - o.ranker_warmup_steps) % (o.ranker_steps + o.retriever_steps)
        return "ranker" if in_cycle < o.ranker_steps else "retriever"

    def ranker_step_count(self, total_steps: int) -> int:
        o = self.options
        warm = min(o.ranker_warmup_steps, total_steps)
        cycles, rest = divmod(total_steps - warm, o.ranker_steps + o.retriever_steps)
        return warm + cycles * o.ranker_steps + min(rest, o.ranker_steps)

    @property
    def phase(self) -> str:
        return self.phase_of(self.completed_steps)

    def updates_model(self, step: int) -> bool:
        return self.phase_of(step) == "retriever"

    def model_update_steps(self, total_steps: int) -> int:
        return total_steps - self.ranker_step_count(total_steps)

    # ------------------------------------------------------------------ setup
    def prepare(self, trainer: Any) -> None:
        from transformers import get_linear_schedule_with_warmup

        from retriever.ranker import Ranker

        t = trainer.config.training
        if self.model_update_steps(trainer.total_steps) == 0:
            o = self.options
            raise ValueError(f"AR2: all {trainer.total_steps} training steps would be ranker steps "
                             f"(negatives.options ranker_warmup_steps {o.ranker_warmup_steps}, ranker_steps "
                             f"{o.ranker_steps}); train longer or lower those options")
        super().prepare(trainer)
        self.ranker = Ranker.load(self.options.ranker or trainer.config.model.name,
                                  max_length=self.options.ranker_max_length, device=trainer.device, seed=t.seed)
        # the retriever's setting covers the ranker it trains against: the same fused-attention speed-up
        apply_attention_dropout([self.ranker.model], trainer.config.model.attention_dropout)
        self.ranker_optimizer = torch.optim.AdamW(self.ranker.parameters(), lr=self.options.ranker_lr,
                                                  weight_decay=t.weight_decay)
        ranker_steps = self.ranker_step_count(trainer.total_steps)
        self.ranker_scheduler = get_linear_schedule_with_warmup(
            self.ranker_optimizer, int(round(self.options.ranker_warmup_ratio * ranker_steps)), ranker_steps)
        scale = self.options.score_scale or 1.0 / t.temperature
        self.retriever_loss = AR2RetrieverLoss(self.options.adv_lambda, scale=scale,
                                               ranker_temperature=self.options.ranker_temperature,
                                               adv_reduction=self.options.adv_reduction)
        self.ranker.train()

    @property
    def ranker_clip(self) -> float:
        clip = self.options.ranker_max_grad_norm
        return self.trainer.config.training.max_grad_norm if clip is None else clip

    # ------------------------------------------------------------------ steps
    def candidates(self, batch) -> tuple[list[str], list[list[str]]]:
        """Each query's candidate texts: its positive, then its retrieved negatives."""
        b, n = len(batch.queries), self.options.per_query
        positives, negatives = batch.documents[:b], batch.documents[b:]
        return batch.queries, [[positives[i]] + negatives[i * n:(i + 1) * n] for i in range(b)]

    def ranker_logits(self, queries: list[str], cands: list[list[str]]) -> torch.Tensor:
        pairs_q = [q for q, c in zip(queries, cands) for _ in c]
        pairs_d = [d for c in cands for d in c]
        return self.ranker.logits(pairs_q, pairs_d).view(len(queries), -1).float()

    def micro_step(self, trainer: Any, batch, scale: float) -> float:
        queries, cands = self.candidates(batch)
        bf16 = trainer.bf16
        if self.phase == "ranker":
            self.ranker.train()
            with autocast(self.ranker.device, bf16):
                loss = self.ranker_loss(self.ranker_logits(queries, cands))
            self._step_terms.setdefault("ranker_loss", []).append(float(loss.detach()))
        else:
            self.ranker.eval()
            with torch.no_grad(), autocast(self.ranker.device, bf16):
                ranker_scores = self.ranker_logits(queries, cands)
            model = trainer.model
            with autocast(model.device, bf16):
                q = model.embed(model.tokenize(queries, "query"), "query").float()
                d = model.embed(model.tokenize([t for c in cands for t in c], "document"), "document").float()
            retriever_scores = torch.einsum("bd,bcd->bc", q, d.view(len(queries), len(cands[0]), -1))
            loss = self.retriever_loss(retriever_scores, ranker_scores)
            for key, value in (("retriever_loss", float(loss.detach())), ("kl_term", self.retriever_loss.last_kl),
                               ("adv_term", self.retriever_loss.last_adversarial)):
                self._step_terms.setdefault(key, []).append(value)
        (loss * scale).backward()
        return float(loss.detach())

    def _refresh(self, step: int) -> None:
        """Re-index only when the retriever changed since the last refresh: during the ranker warm-up (and
        cycles with ``ranker_steps >= refresh_every``) a rebuild would re-encode the corpus with the same
        weights."""
        since = range(max(0, step - self.options.refresh_every), step)
        if any(self.updates_model(s) for s in since):
            super()._refresh(step)

    def _update_ranker(self) -> None:
        params = [p for p in self.ranker.parameters() if p.requires_grad]
        average_gradients(params, self.trainer.dist)  # torchrun: every process applies the same update
        if self.ranker_clip:
            torch.nn.utils.clip_grad_norm_(params, self.ranker_clip)
        self.ranker_optimizer.step()
        self.ranker_scheduler.step()
        self.ranker_optimizer.zero_grad(set_to_none=True)

    def on_step_end(self, step: int) -> None:
        phase = self.phase_of(step - 1)
        if phase == "ranker":
            self._update_ranker()
        row = {"step": step, "phase": phase, **{k: float(np.mean(v)) for k, v in self._step_terms.items()},
               "lr": self.trainer.scheduler.get_last_lr()[0], "ranker_lr": self.ranker_scheduler.get_last_lr()[0]}
        self._step_terms = {}
        self.completed_steps = step
        super().on_step_end(step)  # logs the index version of this step's negatives, refreshes, prefetches
        row["index_version"] = self._last_row.get("index_version")
        self._window.append(row)
        if self.trainer.dist.is_main:
            with open(Path(self.trainer.output_dir) / AR2_LOG, "a") as fh:
                fh.write(json.dumps(row) + "\n")

    def log_metrics(self) -> dict:
        """The logging window's mean of each term (None where the window had no step of that phase)."""
        window, self._window = self._window, []
        out = {**super().log_metrics(), "ar2_phase": window[-1]["phase"] if window else None,
               "ranker_lr": window[-1]["ranker_lr"] if window else None}
        for key in _TERMS:
            values = [r[key] for r in window if key in r]
            out[key] = float(np.mean(values)) if values else None
        return out

    # ------------------------------------------------------------------ saving
    def save_ranker(self, path: Path) -> Path:
        return self.ranker.save(path)

    def on_model_saved(self, folder: Path, kind: str) -> None:
        if kind == "best":  # the ranker of the step dev scoring picked, beside that retriever
            self.save_ranker(Path(folder) / RANKER_DIR)
        else:  # the end of training, also after early stopping
            self.save_ranker(Path(self.trainer.output_dir) / RANKER_DIR)
            self.close()

    # ------------------------------------------------------------------ resume
    def state_dict(self) -> dict:
        return {"ance": super().state_dict(), "completed_steps": self.completed_steps,
                "ranker": self.ranker.state_dict(), "ranker_optimizer": self.ranker_optimizer.state_dict(),
                "ranker_scheduler": self.ranker_scheduler.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        if "ranker_scheduler" not in state:
            raise ValueError("this AR2 checkpoint predates the ranker's LR schedule (no ranker_scheduler in its "
                             "strategy state); start the run again without --resume")
        self.completed_steps = int(state["completed_steps"])
        self.ranker.load_state_dict(state["ranker"])
        self.ranker_optimizer.load_state_dict(state["ranker_optimizer"])
        self.ranker_scheduler.load_state_dict(state["ranker_scheduler"])
        super().load_state_dict(state["ance"])  # the checkpoint's index, rebuilt from its snapshot
        if self.trainer.dist.is_main:  # drop the rows the interrupted run wrote after its checkpoint
            from retriever.io import write_text_atomic

            path = Path(self.trainer.output_dir) / AR2_LOG
            rows = path.read_text().splitlines() if path.exists() else []
            kept = [r for r in rows if r.strip() and json.loads(r)["step"] <= self.completed_steps]
            write_text_atomic(path, "".join(r + "\n" for r in kept))
