"""torch.distributed helpers: process-group setup from torchrun's environment, an all-gather that keeps
gradients, one gradient all-reduce per optimizer step, and object gather/broadcast for decisions every
process must share (checkpoint scoring's best/early-stop verdict).

Why not ``DistributedDataParallel``: a bi-encoder step runs several forwards before one backward (queries,
documents, and with GradCache one re-run per chunk), which DDP's reducer does not support without
``static_graph`` tricks. Averaging the gradients once per optimizer step is what DDP with ``no_sync`` on
accumulation steps computes, with fewer collectives.
"""

from __future__ import annotations

import os
import warnings
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class DistContext:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def collective_timeout():
    """How long a rank waits in a collective: ``NEGATRON_DIST_TIMEOUT_MIN`` minutes, default 180. The
    defaults (10 min NCCL, 30 gloo) are too short for waits that are normal here: ranks waiting while rank 0
    builds an IVF index over 8.8M passages, or while another rank finishes its share of a resumed mining job."""
    from datetime import timedelta

    return timedelta(minutes=float(os.environ.get("NEGATRON_DIST_TIMEOUT_MIN", "180")))


def init_distributed() -> DistContext:
    """Join the process group torchrun describes (``WORLD_SIZE`` > 1); a no-op for a single process."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size == 1:
        return DistContext()
    if not dist.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        dist.init_process_group(backend=backend, timeout=collective_timeout())
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if torch.cuda.is_available():
        torch.cuda.set_device(local_rank)
    return DistContext(rank=dist.get_rank(), world_size=dist.get_world_size(), local_rank=local_rank)


def context_from_group() -> DistContext:
    """The context of an already initialised process group (single process when there is none)."""
    if not (dist.is_available() and dist.is_initialized()):
        return DistContext()
    return DistContext(rank=dist.get_rank(), world_size=dist.get_world_size(),
                       local_rank=int(os.environ.get("LOCAL_RANK", "0")))


def gather_with_grad(tensor: torch.Tensor, ctx: DistContext) -> torch.Tensor:
    """Concatenate every process's ``tensor`` (same shape on all) in rank order; gradients flow back to
    each process's own slice from every process's loss (cross-device negatives)."""
    if not ctx.enabled:
        return tensor
    from torch.distributed.nn.functional import all_gather

    with warnings.catch_warnings():
        # Deprecated in favour of a private functional-collectives API; this one is public and autograd-aware.
        warnings.simplefilter("ignore", FutureWarning)
        return torch.cat(all_gather(tensor), dim=0)


def average_gradients(parameters, ctx: DistContext) -> None:
    """All-reduce and average the gradients of ``parameters`` across processes (one flat buffer)."""
    if not ctx.enabled:
        return
    grads = [p.grad for p in parameters if p.grad is not None]
    if not grads:
        return
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat)
    flat /= ctx.world_size
    offset = 0
    for g in grads:
        g.copy_(flat[offset:offset + g.numel()].view_as(g))
        offset += g.numel()


def mean_across(value: float, ctx: DistContext) -> float:
    """The mean of a Python number over processes (for logging)."""
    if not ctx.enabled:
        return value
    device = "cuda" if dist.get_backend() == "nccl" else "cpu"
    t = torch.tensor([value], dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return float(t.item()) / ctx.world_size


def gather_objects(obj, ctx: DistContext) -> list:
    """Every process's picklable ``obj``, in rank order, on every process."""
    if not ctx.enabled:
        return [obj]
    out = [None] * ctx.world_size
    dist.all_gather_object(out, obj)
    return out


def broadcast_object(obj, ctx: DistContext, src: int = 0):
    """Process ``src``'s picklable ``obj`` on every process (the others pass anything, e.g. None)."""
    if not ctx.enabled:
        return obj
    box = [obj if ctx.rank == src else None]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def barrier(ctx: DistContext) -> None:
    if ctx.enabled:
        dist.barrier()


def shutdown(ctx: DistContext) -> None:
    if ctx.enabled and dist.is_initialized():
        dist.destroy_process_group()
