"""AR2: a dual-encoder retriever and a cross-encoder ranker trained in alternation (a minimax game).

Zhang et al., "Adversarial Retriever-Ranker for Dense Text Retrieval", ICLR 2022. Each query's
candidates are its positive plus negatives the retriever retrieves from its own index, refreshed every
``refresh_every`` steps through the in-process mining service (as :mod:`retriever.negatives.ance`).
Training cycles through ``ranker_steps`` steps of the ranker (cross-entropy putting the positive first,
:class:`retriever.losses.ar2.AR2RankerLoss`) and ``retriever_steps`` steps of the retriever (KL to the
ranker's distribution plus the adversarial term, :class:`retriever.losses.ar2.AR2RetrieverLoss`).
During a ranker phase the retriever has no gradient, so the trainer's optimizer leaves it unchanged.

The ranker is any Hugging Face ``AutoModelForSequenceClassification`` (one logit); by default the
retriever's starting checkpoint with a fresh head. It is saved to ``<run>/ranker`` at the end of training
(and kept in every checkpoint's strategy state for exact resume); the retriever goes to ``<run>/final``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from pydantic import Field

from retriever.losses.ar2 import AR2RankerLoss, AR2RetrieverLoss
from retriever.modeling import autocast
from retriever.negatives.ance import ANCENegatives, ANCEOptions
from retriever.negatives.base import register_strategy

RANKER_DIR = "ranker"
AR2_LOG = "ar2_log.jsonl"


class AR2Options(ANCEOptions):
    per_query: int = Field(3, gt=0, description="retrieved negatives per query (candidates = 1 + per_query)")
    ranker: str | None = Field(None, description="cross-encoder checkpoint (default: the retriever's base model)")
    ranker_lr: float = Field(2e-5, gt=0)
    ranker_max_length: int = Field(256, gt=0)
    ranker_temperature: float = Field(1.0, gt=0)
    ranker_steps: int = Field(10, gt=0, description="ranker steps per cycle (each cycle starts with the ranker)")
    retriever_steps: int = Field(10, gt=0, description="retriever steps per cycle")
    adv_lambda: float = Field(0.5, ge=0.0, le=1.0, description="weight of the adversarial term")


@register_strategy("ar2")
class AR2Strategy(ANCENegatives):
    Options = AR2Options

    def __init__(self, options=None):
        super().__init__(options)
        self.ranker = None
        self.ranker_tokenizer = None
        self.ranker_optimizer = None
        self.ranker_loss = AR2RankerLoss(self.options.ranker_temperature)
        self.retriever_loss: AR2RetrieverLoss | None = None
        self.completed_steps = 0
        self._losses: dict[str, list[float]] = {"ranker": [], "retriever": []}

    def prepare(self, trainer: Any) -> None:
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        from retriever.resolve import resolve_model

        super().prepare(trainer)
        source = resolve_model(self.options.ranker or trainer.config.model.name)
        if (Path(source) / "modules.json").exists() and not (Path(source) / "config.json").exists():
            raise ValueError(f"{source} is a sentence-transformers folder without a Hugging Face config.json; "
                             "set negatives.options.ranker to a Hugging Face model")
        self.ranker = AutoModelForSequenceClassification.from_pretrained(source, num_labels=1).to(trainer.device)
        self.ranker_tokenizer = AutoTokenizer.from_pretrained(source)
        self.ranker_optimizer = torch.optim.AdamW(self.ranker.parameters(), lr=self.options.ranker_lr)
        self.retriever_loss = AR2RetrieverLoss(self.options.adv_lambda, scale=1.0 / trainer.config.training.temperature,
                                               ranker_temperature=self.options.ranker_temperature)
        self.ranker.train()

    # ------------------------------------------------------------------ phases
    @property
    def phase(self) -> str:
        cycle = self.options.ranker_steps + self.options.retriever_steps
        return "ranker" if self.completed_steps % cycle < self.options.ranker_steps else "retriever"

    def candidates(self, batch) -> tuple[list[str], list[list[str]]]:
        """Each query's candidate texts: its positive, then its retrieved negatives."""
        b, n = len(batch.queries), self.options.per_query
        positives, negatives = batch.documents[:b], batch.documents[b:]
        return batch.queries, [[positives[i]] + negatives[i * n:(i + 1) * n] for i in range(b)]

    def ranker_logits(self, queries: list[str], cands: list[list[str]]) -> torch.Tensor:
        pairs_q = [q for q, c in zip(queries, cands) for _ in c]
        pairs_d = [d for c in cands for d in c]
        enc = self.ranker_tokenizer(pairs_q, pairs_d, padding=True, truncation=True,
                                    max_length=self.options.ranker_max_length, return_tensors="pt")
        enc = {k: v.to(self.ranker.device) for k, v in enc.items()}
        return self.ranker(**enc).logits.view(len(queries), -1).float()

    def micro_step(self, trainer: Any, batch, scale: float) -> float:
        queries, cands = self.candidates(batch)
        bf16 = trainer.bf16
        if self.phase == "ranker":
            self.ranker.train()
            with autocast(self.ranker.device, bf16):
                loss = self.ranker_loss(self.ranker_logits(queries, cands))
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
        (loss * scale).backward()
        self._losses[self.phase].append(float(loss.detach()))
        return float(loss.detach())

    def on_step_end(self, step: int) -> None:
        phase = self.phase
        if phase == "ranker":
            torch.nn.utils.clip_grad_norm_(self.ranker.parameters(), 1.0)
            self.ranker_optimizer.step()
            self.ranker_optimizer.zero_grad(set_to_none=True)
        row = {"step": step, "phase": phase, "loss": sum(self._losses[phase]) / max(1, len(self._losses[phase]))}
        if phase == "retriever":
            row["kl"] = self.retriever_loss.last_kl
        self._losses = {"ranker": [], "retriever": []}
        self.completed_steps = step
        if self.trainer.dist.is_main:
            with open(Path(self.trainer.output_dir) / AR2_LOG, "a") as fh:
                fh.write(json.dumps(row) + "\n")
        self._last_phase_row = row
        if step >= self.trainer.total_steps and self.trainer.dist.is_main:
            self.save_ranker(Path(self.trainer.output_dir) / RANKER_DIR)
        super().on_step_end(step)

    def save_ranker(self, path: Path) -> Path:
        from retriever.io import atomic_dir

        with atomic_dir(path) as tmp:
            self.ranker.save_pretrained(tmp)
            self.ranker_tokenizer.save_pretrained(tmp)
        return path

    def log_metrics(self) -> dict:
        row = getattr(self, "_last_phase_row", {})
        return {**super().log_metrics(), "ar2_phase": row.get("phase"), "ar2_phase_loss": row.get("loss")}

    # ------------------------------------------------------------------ resume
    def state_dict(self) -> dict:
        return {"completed_steps": self.completed_steps, "ranker": self.ranker.state_dict(),
                "ranker_optimizer": self.ranker_optimizer.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        if not state:
            return
        self.completed_steps = int(state["completed_steps"])
        self.ranker.load_state_dict(state["ranker"])
        self.ranker_optimizer.load_state_dict(state["ranker_optimizer"])
