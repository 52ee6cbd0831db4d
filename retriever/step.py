"""One micro-step of contrastive training: forward, loss, backward. Plain, or with GradCache.

GradCache (Gao et al., "Scaling Deep Contrastive Learning Batch Size under Memory Limited Setup", 2021):
1. embed every text in chunks without building a graph, recording each chunk's RNG state;
2. compute the loss on those cached embeddings (detached leaves) and backprop into them only;
3. re-run each chunk with gradients under its recorded RNG state (same dropout masks) and backprop the
   cached embedding gradients through it.
Peak activation memory is one chunk, whatever the batch size; the gradients equal the plain step's.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterator

import torch

from retriever.distributed import DistContext, gather_with_grad
from retriever.losses import ContrastiveLoss
from retriever.modeling import BiEncoder, autocast
from retriever.negatives import NegativeStrategy
from retriever.train_data import Batch


@dataclass(frozen=True)
class RandState:
    """CPU and CUDA RNG states, to replay a forward pass with identical dropout."""

    cpu: torch.Tensor
    cuda: list[torch.Tensor]

    @classmethod
    def capture(cls) -> "RandState":
        return cls(torch.get_rng_state(), torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [])

    @contextmanager
    def replay(self) -> Iterator[None]:
        """Run the block from this state, leaving the global RNG as it was before the block."""
        devices = list(range(len(self.cuda)))
        with torch.random.fork_rng(devices=devices):
            torch.set_rng_state(self.cpu)
            if self.cuda:
                torch.cuda.set_rng_state_all(self.cuda)
            yield


def _exclusions(batch: Batch, strategy: NegativeStrategy, q: torch.Tensor, d: torch.Tensor) -> torch.Tensor:
    exclude = batch.exclude.to(q.device)
    extra = strategy.exclude_mask(batch, q.detach(), d.detach())
    return exclude if extra is None else exclude | extra.to(q.device)


def _loss(batch, loss_fn, strategy, q, d_local, dist_ctx) -> torch.Tensor:
    d = gather_with_grad(d_local, dist_ctx)
    targets, exclude = batch.targets.to(q.device), _exclusions(batch, strategy, q, d)
    extra = strategy.extra_candidates(batch, q, d, dist_ctx)
    if extra is None:
        return loss_fn(q, d, targets, exclude)
    sims, extra_exclude = extra
    return loss_fn.from_similarities(torch.cat([q @ d.T, sims], dim=1), targets,
                                     torch.cat([exclude, extra_exclude.to(q.device)], dim=1))


def plain_step(model: BiEncoder, batch: Batch, loss_fn: ContrastiveLoss, strategy: NegativeStrategy, *,
               bf16: bool, scale: float = 1.0, dist_ctx: DistContext = DistContext()) -> float:
    """Forward the whole micro-batch with gradients; backward ``loss * scale``. Returns the loss."""
    with autocast(model.device, bf16):
        q = model.embed(model.tokenize(batch.queries, "query"), "query")
        d = model.embed(model.tokenize(batch.documents, "document"), "document")
    loss = _loss(batch, loss_fn, strategy, q.float(), d.float(), dist_ctx)
    (loss * scale).backward()
    return float(loss.detach())


def _chunks(texts: list[str], size: int) -> list[list[str]]:
    return [texts[i:i + size] for i in range(0, len(texts), size)]


def grad_cache_step(model: BiEncoder, batch: Batch, loss_fn: ContrastiveLoss, strategy: NegativeStrategy, *,
                    chunk_size: int, bf16: bool, scale: float = 1.0, dist_ctx: DistContext = DistContext()) -> float:
    """GradCache: same loss and gradients as :func:`plain_step`, activation memory of one chunk."""
    plan = [("query", c) for c in _chunks(batch.queries, chunk_size)] + \
           [("document", c) for c in _chunks(batch.documents, chunk_size)]
    tokenized, states, cached = [], [], []
    with torch.no_grad():
        for kind, texts in plan:
            tokens = model.tokenize(texts, kind)
            states.append(RandState.capture())
            with autocast(model.device, bf16):
                cached.append(model.embed(tokens, kind).float())
            tokenized.append(tokens)
    n_query_chunks = len(_chunks(batch.queries, chunk_size))
    q = torch.cat(cached[:n_query_chunks]).requires_grad_()
    d = torch.cat(cached[n_query_chunks:]).requires_grad_()
    loss = _loss(batch, loss_fn, strategy, q, d, dist_ctx)
    (loss * scale).backward()
    grads = list(q.grad.split([len(c) for k, c in plan if k == "query"])) + \
        list(d.grad.split([len(c) for k, c in plan if k == "document"]))
    for (kind, _), tokens, state, grad in zip(plan, tokenized, states, grads):
        with state.replay(), autocast(model.device, bf16):
            emb = model.embed(tokens, kind).float()
        emb.backward(grad)
    return float(loss.detach())
