"""Ranker training under torchrun: two gloo processes with half the batch each reach the optimizer with
the gradients one process computes on the whole batch (train_step's gradient averaging)."""

import os

import torch
import torch.multiprocessing as mp

from test_ranker import _config, _synthetic_jsonl

WORLD = 2


def captured_step(config_dict, output, env):
    from retriever.ranker_train import RankerConfig, RankerTrainer

    os.environ.update(env)
    torch.set_num_threads(1)
    trainer = RankerTrainer(RankerConfig.model_validate(config_dict), output)
    trainer.ranker.eval()  # no dropout, so both layouts compute the same function
    grads = {}

    def capture(*args, **kwargs):
        grads.update({n: p.grad.clone() for n, p in trainer.ranker.named_parameters() if p.grad is not None})

    trainer.optimizer.step = capture
    loss = trainer.train_step(0)
    return loss, grads


def worker(rank, config_dict, tmp, port):
    env = {"WORLD_SIZE": str(WORLD), "RANK": str(rank), "LOCAL_RANK": str(rank), "MASTER_ADDR": "127.0.0.1",
           "MASTER_PORT": str(port)}
    result = captured_step(config_dict, f"{tmp}/rank{rank}", env)
    if rank == 0:
        torch.save(result, f"{tmp}/rank0.pt")
    torch.distributed.destroy_process_group()


def test_two_gloo_processes_match_one_process(tiny_model_dir, tmp_path):
    import socket

    jsonl = _synthetic_jsonl(tmp_path / "train.jsonl", n=16)
    half = _config(tiny_model_dir, jsonl, batch_size=2, max_grad_norm=None)
    whole = _config(tiny_model_dir, jsonl, batch_size=4, max_grad_norm=None)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(worker, args=(half, str(tmp_path), port), nprocs=WORLD, join=True)
    dist_loss, dist_grads = torch.load(tmp_path / "rank0.pt")
    threads = torch.get_num_threads()
    try:
        single_loss, single_grads = captured_step(whole, tmp_path / "single", {"WORLD_SIZE": "1"})
    finally:
        torch.set_num_threads(threads)
    assert abs(dist_loss - single_loss) < 1e-5, (dist_loss, single_loss)
    assert dist_grads.keys() == single_grads.keys() and single_grads
    for name, g in single_grads.items():
        diff = (dist_grads[name] - g).abs().max().item()
        assert diff <= 1e-5 + 1e-3 * g.abs().max().item(), (name, diff)
