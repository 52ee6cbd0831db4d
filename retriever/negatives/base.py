"""The negative-strategy interface and its registry.

A strategy decides which documents a query is contrasted with. The trainer calls its hooks and never
branches on a strategy's name, so new sources (STAR, ADORE, GISTEmbed, AR2) plug in by subclassing
:class:`NegativeStrategy` and decorating the class with ``@register_strategy("name")``.

Hooks, in the order the trainer calls them:

1. ``prepare(trainer)``: once, before the first step (after a resume too): build an index, load a guide model.
2. ``negatives_for(example, rng)``: per example while a batch is collated: the hard-negative texts this
   query brings into the batch (they also serve as in-batch negatives for every other query).
3. ``exclude_mask(batch, query_emb, doc_emb)``: per micro-batch, on detached embeddings: a boolean
   ``[queries, documents]`` mask of candidates to drop from the softmax (e.g. GISTEmbed's guide-flagged
   false negatives), or ``None``. It is OR-ed with the collator's duplicate-positive mask.
   ``extra_candidates(batch, query_emb, doc_emb, dist_ctx)``: optional candidate columns of the strategy's
   own (GISTEmbed's query–query and document–document similarities) with their mask.
4. ``on_step_end(step)``: after each optimizer step: refresh mined negatives, update a generator.
   Optional: ``epoch_order`` (batch composition, TAS-B), ``micro_step`` (a strategy's own loss, ADORE/AR2),
   ``log_metrics`` (extra log columns), ``updates_model`` / ``model_update_steps`` (steps that leave the
   bi-encoder alone and the LR schedule's length: AR2's ranker steps), ``on_model_saved`` (save a
   companion model beside ``final/`` and ``best/``: AR2's ranker).
5. ``state_dict()`` / ``load_state_dict(state)``: whatever must survive a checkpoint for exact resume.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Callable, ClassVar

import numpy as np
from pydantic import BaseModel, ConfigDict

if TYPE_CHECKING:
    from pathlib import Path

    import torch

    from retriever.data import TrainingExample
    from retriever.train_data import Batch


class StrategyOptions(BaseModel):
    """Base for a strategy's options (the ``negatives.options`` config section)."""

    model_config = ConfigDict(extra="forbid")


class NegativeStrategy:
    """Base class: in-batch negatives only, every hook a no-op."""

    Options: ClassVar[type[StrategyOptions]] = StrategyOptions
    name: ClassVar[str] = ""
    # False for a strategy that trains with its own loss in ``micro_step`` (ADORE, AR2): the trainer's
    # ``training.loss`` and ``training.grad_cache`` would do nothing, so the config refuses them.
    supports_loss_options: ClassVar[bool] = True

    @classmethod
    def uses_trainer_loss(cls, options: StrategyOptions) -> bool:
        """Whether a run with these (validated) options trains with the trainer's contrastive step, i.e.
        whether ``training.loss`` and ``training.grad_cache`` take effect. Checked once, when a
        :class:`retriever.config.TrainConfig` is validated. Override where it depends on the options
        (TAS-B: not under its distillation losses)."""
        return cls.supports_loss_options

    def __init__(self, options: StrategyOptions | dict | None = None):
        self.options = options if isinstance(options, StrategyOptions) else self.Options.model_validate(options or {})

    def prepare(self, trainer: Any) -> None:
        """Called once with the :class:`retriever.trainer.Trainer` before training starts."""

    def negatives_for(self, example: "TrainingExample", rng: np.random.Generator) -> list[str]:
        """Hard-negative texts for one example; ``rng`` is seeded per (seed, epoch, example)."""
        return []

    def negatives_given_positive(self, example: "TrainingExample", positive: int,
                                 rng: np.random.Generator) -> list[str]:
        """What the collator calls: :meth:`negatives_for` once the batch's positive of ``example``
        (``example.positives[positive]``) is drawn; override when the choice depends on it (TAS-B's
        teacher margins are taken against the positive actually in the batch)."""
        return self.negatives_for(example, rng)

    def exclude_mask(self, batch: "Batch", query_emb: "torch.Tensor", doc_emb: "torch.Tensor") -> "torch.Tensor | None":
        """Boolean ``[len(batch.queries), doc_emb.shape[0]]``; True drops that candidate."""
        return None

    def extra_candidates(self, batch: "Batch", query_emb: "torch.Tensor", doc_emb: "torch.Tensor",
                         dist_ctx: Any) -> "tuple[torch.Tensor, torch.Tensor] | None":
        """Candidate columns beyond the batch's documents, or ``None``: ``(similarities [Q, E]`` with
        gradients, ``exclude [Q, E]`` bool``)``, appended to each query's row of the contrastive loss
        (GISTEmbed's query–query and document–document blocks). ``doc_emb`` holds every process's
        documents; the call is collective under torchrun (every process makes it)."""
        return None

    def on_step_end(self, step: int) -> None:
        """Called after optimizer step ``step`` (1-based)."""

    def updates_model(self, step: int) -> bool:
        """Whether optimizer step ``step`` (0-based) updates the bi-encoder. False skips the trainer's
        optimizer and LR-schedule step (AR2's ranker steps train only the ranker)."""
        return True

    def model_update_steps(self, total_steps: int) -> int:
        """How many of the run's ``total_steps`` steps update the bi-encoder: the LR schedule's length."""
        return total_steps

    def on_model_saved(self, folder: "Path", kind: str) -> None:
        """Called on the main process after the bi-encoder was saved to ``folder`` (``kind``: ``"final"``,
        or ``"best"`` when dev scoring kept a new best): save what belongs with it (AR2's ranker)."""

    @classmethod
    def orders_epoch(cls) -> bool:
        """Whether the strategy overrides :meth:`epoch_order` (its batches are built from queries, so the
        trainer's ``data.rows: per_pair`` layout does not apply)."""
        return cls.epoch_order is not NegativeStrategy.epoch_order

    def epoch_order(self, num_examples: int, seed: int, epoch: int) -> "np.ndarray | None":
        """The example order of one epoch (consecutive global batches are taken from it), or ``None``
        for the trainer's seeded shuffle. TAS-B returns cluster-pure batches here."""
        return None

    def micro_step(self, trainer: Any, batch: "Batch", scale: float) -> float | None:
        """Run one micro-step's forward and ``(loss * scale).backward()`` in place of the trainer's
        contrastive step and return the loss, or ``None`` to use the trainer's step (ADORE, AR2 and the
        distillation losses need their own)."""
        return None

    def log_metrics(self) -> dict:
        """Extra numbers merged into each ``train_log.jsonl`` row (e.g. index age, masked fraction)."""
        return {}

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        """Restore what :meth:`state_dict` returned."""


_REGISTRY: dict[str, type[NegativeStrategy]] = {}


def register_strategy(name: str) -> Callable[[type[NegativeStrategy]], type[NegativeStrategy]]:
    """Class decorator: make a strategy available as ``negatives.strategy: <name>`` in configs."""

    def decorate(cls: type[NegativeStrategy]) -> type[NegativeStrategy]:
        if not (isinstance(cls, type) and issubclass(cls, NegativeStrategy)):
            raise TypeError(f"{cls!r} must subclass NegativeStrategy")
        if name in _REGISTRY and _REGISTRY[name] is not cls:
            raise ValueError(f"negative strategy {name!r} is already registered by {_REGISTRY[name].__qualname__}")
        cls.name = name
        _REGISTRY[name] = cls
        return cls

    return decorate


def get_strategy(name: str) -> type[NegativeStrategy]:
    """The strategy class registered as ``name`` (KeyError listing the known names otherwise)."""
    try:
        return _REGISTRY[name]
    except KeyError:
        raise KeyError(f"unknown negative strategy {name!r}; known: {', '.join(sorted(_REGISTRY))}") from None


def available_strategies() -> list[str]:
    return sorted(_REGISTRY)
