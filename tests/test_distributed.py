"""Two gloo processes on CPU compute the same loss and gradients as one process on the same global batch."""

import pytest
import torch
import torch.multiprocessing as mp

from retriever.data import iter_triples
from retriever.distributed import DistContext, average_gradients, context_from_group, mean_across
from retriever.losses import ContrastiveLoss
from retriever.modeling import BiEncoder
from retriever.negatives import HardNegatives
from retriever.step import grad_cache_step, plain_step
from retriever.train_data import BatchCollator

WORLD = 2


def step(model, examples, ctx: DistContext, grad_cache: bool):
    model.zero_grad(set_to_none=True)
    batch = BatchCollator(HardNegatives(), seed=0, rank=ctx.rank, world_size=ctx.world_size)(
        examples, list(range(len(examples))), epoch=0)
    kw = {"chunk_size": 3} if grad_cache else {}
    fn = grad_cache_step if grad_cache else plain_step
    loss = fn(model, batch, ContrastiveLoss(0.05), HardNegatives(), bf16=False, dist_ctx=ctx, **kw)
    average_gradients(list(model.parameters()), ctx)
    return mean_across(loss, ctx), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def worker(rank, init_file, model_dir, examples, out):
    torch.set_num_threads(1)
    torch.distributed.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD)
    model = BiEncoder.from_pretrained(model_dir)
    model.eval()  # no dropout, so both layouts compute the same function
    result = {grad_cache: step(model, examples, context_from_group(), grad_cache) for grad_cache in (False, True)}
    if rank == 0:
        torch.save(result, out)
    torch.distributed.destroy_process_group()


@pytest.fixture
def one_thread():
    """One intra-op thread (two gloo workers share 2 cores), restored afterwards for later tests."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def test_two_gloo_processes_match_one_process(tiny_model_dir, shared_data, tmp_path, one_thread):
    examples = list(iter_triples(shared_data / "msmarco" / "samples" / "triples.train.small.head100.tsv"))[:8]
    out = tmp_path / "rank0.pt"
    mp.spawn(worker, args=(str(tmp_path / "init"), str(tiny_model_dir), examples, str(out)), nprocs=WORLD, join=True)
    distributed = torch.load(out)
    model = BiEncoder.from_pretrained(tiny_model_dir)
    model.eval()
    for grad_cache in (False, True):  # plain step, then GradCache with chunks smaller than a shard
        single_loss, single_grads = step(model, examples, DistContext(), grad_cache)
        compare(*distributed[grad_cache], single_loss, single_grads)


def compare(dist_loss, dist_grads, single_loss, single_grads):
    assert abs(dist_loss - single_loss) < 1e-5, (dist_loss, single_loss)
    assert dist_grads.keys() == single_grads.keys()
    for name, g in single_grads.items():
        diff = (dist_grads[name] - g).abs().max().item()
        # fp32 noise from different padding and summation order is ~1e-6; a lost cross-device gradient
        # term would differ by a sizeable fraction of the gradient itself.
        assert diff <= 1e-5 + 1e-3 * g.abs().max().item(), (name, diff)
