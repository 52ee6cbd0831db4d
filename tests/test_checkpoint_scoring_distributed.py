"""Issue #13: checkpoint scoring is a collective under torchrun. Two gloo processes both call the scorer:
each encodes a disjoint half of the dev collection's shards, rank 0 scores, and both ranks get the same
verdict (best step, early stopping) with the metrics of a single-process scoring of the same model."""

import json
import time
from datetime import timedelta
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

WORLD = 2
TIMEOUT_S = 300  # a rank left waiting in a collective the other never enters would hang: fail instead


def _dev_set(folder: Path, n_docs: int = 300) -> Path:
    """The toy dev set plus random filler, so the corpus spans several shards."""
    import random

    from _eval_data import write_toy_beir

    folder = write_toy_beir(folder, split="dev")
    rng = random.Random(0)
    words = "alpha beta gamma delta vectors index search ranking model query passage token river fox".split()
    with open(folder / "corpus.jsonl", "a") as fh:
        for i in range(n_docs):
            fh.write(json.dumps({"_id": f"filler{i}", "title": "", "text": " ".join(rng.choices(words, k=10))}) + "\n")
    return folder


def _scorers(dev: Path):
    from eval.checkpoint_scoring import CheckpointScorer

    sets = [{"name": "big", "path": str(dev), "split": "dev"}]
    return {"full": CheckpointScorer(sets, every_steps=1, early_stopping_patience=1, k=20, bf16=False),
            "sub": CheckpointScorer(sets, every_steps=1, k=20, bf16=False, sub_collection=60)}


def worker(rank, init_file, model_dir, dev, run_root, out):
    import index.encode as encode
    from retriever.distributed import context_from_group
    from retriever.modeling import BiEncoder

    torch.set_num_threads(1)
    torch.distributed.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD,
                                         timeout=timedelta(seconds=120))
    written: list[str] = []  # the shard files this rank wrote
    real_atomic_write = encode.atomic_write

    def spy(path, *args, **kwargs):
        if Path(path).name.startswith("shard-"):
            written.append(f"{Path(path).parent.name}/{Path(path).name}")
        return real_atomic_write(path, *args, **kwargs)

    encode.atomic_write = spy
    model = BiEncoder.from_pretrained(model_dir)
    model.eval()
    ctx = context_from_group()
    report = {}
    for name, scorer in _scorers(Path(dev)).items():
        run_dir = Path(run_root) / name
        calls = []
        for step in (1, 2):  # the same model twice: step 1 is the best, step 2 no improvement
            before = len(written)
            line = scorer.score(model, step, run_dir, dist=ctx)
            calls.append({"line": line, "shards": written[before:], "should_stop": scorer.should_stop,
                          "best_step": scorer.best_step, "bad_evals": scorer.bad_evals})
        report[name] = calls
    Path(out, f"rank{rank}.json").write_text(json.dumps(report))
    torch.distributed.destroy_process_group()


@pytest.fixture
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def test_every_rank_encodes_its_shards_and_rank0s_verdict_reaches_all(tiny_model_dir, tmp_path, one_thread):
    from index.encode import default_shard_size
    from retriever.data import load_beir
    from retriever.modeling import BiEncoder

    dev = _dev_set(tmp_path / "dev")
    results = tmp_path / "results"
    results.mkdir()
    context = mp.spawn(worker, args=(str(tmp_path / "init"), str(tiny_model_dir), str(dev), str(tmp_path / "runs"),
                                     str(results)), nprocs=WORLD, join=False)
    deadline = time.monotonic() + TIMEOUT_S
    while not context.join(timeout=5):
        if time.monotonic() > deadline:
            for p in context.processes:
                p.kill()
            pytest.fail(f"the ranks did not finish within {TIMEOUT_S}s: one waits on a collective the other "
                        "never entered")
    ranks = [json.loads((results / f"rank{r}.json").read_text()) for r in range(WORLD)]

    # the same collection encoded as in one process, with the same model
    model = BiEncoder.from_pretrained(tiny_model_dir)
    model.eval()
    single = _scorers(dev)
    corpus_docs = len(load_beir(dev, "dev", check_ids=False).corpus)
    for name, scorer in single.items():
        docs = corpus_docs if name == "full" else ranks[0][name][0]["line"]["sub_collection"]["big"]["docs"]
        num_shards = -(-docs // default_shard_size(docs, WORLD))
        assert num_shards == WORLD
        for step in (1, 2):
            expected = scorer.score(model, step, tmp_path / "single" / name)
            calls = [rank[name][step - 1] for rank in ranks]
            # each rank wrote a disjoint half of the shards: rank r takes shards r, r+2, ...
            for r, call in enumerate(calls):
                assert call["shards"] == [f"big/shard-{i:05d}.npy" for i in range(r, num_shards, WORLD)], (name, r)
            # both ranks hold rank 0's verdict
            assert calls[0]["line"] == calls[1]["line"], name
            assert [c["should_stop"] for c in calls] == [scorer.should_stop] * WORLD
            assert [c["best_step"] for c in calls] == [scorer.best_step] * WORLD == [1] * WORLD
            assert [c["bad_evals"] for c in calls] == [scorer.bad_evals] * WORLD
            line = calls[0]["line"]
            assert line["improved"] == expected["improved"] == (step == 1)
            assert line["collection"] == expected["collection"] and line.get("sub_collection") == expected.get(
                "sub_collection")
            assert line["eval"]["big"].keys() == expected["eval"]["big"].keys()
            for metric, value in expected["eval"]["big"].items():
                assert line["eval"]["big"][metric] == pytest.approx(value, abs=1e-6), (name, step, metric)
            assert line["score"] == pytest.approx(expected["score"], abs=1e-6)
        assert calls[0]["should_stop"] == (name == "full")  # patience 1: the second evaluation stops the run

        # the same files as one process writes; the ranks' shards are gone
        run_dir, single_dir = tmp_path / "runs" / name, tmp_path / "single" / name
        logged = [json.loads(x) for x in (run_dir / "checkpoint_eval.jsonl").read_text().splitlines()]
        alone = [json.loads(x) for x in (single_dir / "checkpoint_eval.jsonl").read_text().splitlines()]
        assert [sorted(x) for x in logged] == [sorted(x) for x in alone] and len(logged) == 2
        assert json.loads((run_dir / "best" / "best.json").read_text())["step"] == 1
        assert (run_dir / "best" / "modules.json").exists()
        for step in (1, 2):
            got = json.loads((run_dir / "eval" / f"step-{step}" / "dev" / "metrics.json").read_text())
            want = json.loads((single_dir / "eval" / f"step-{step}" / "dev" / "metrics.json").read_text())
            assert got.keys() == want.keys() and got["num_docs"] == want["num_docs"]
            assert got["timings"].keys() == want["timings"].keys()
            assert not (run_dir / "eval" / f"step-{step}" / ".encoded").exists()


def _failing_worker(rank, init_file, model_dir, dev, run_root, out):
    """Rank 0's scoring fails after the encode: every rank raises instead of waiting in the broadcast."""
    import eval.checkpoint_scoring as cs
    from retriever.distributed import context_from_group
    from retriever.modeling import BiEncoder

    torch.set_num_threads(1)
    torch.distributed.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD,
                                         timeout=timedelta(seconds=120))

    def broken(*args, **kwargs):
        raise OSError("disk full")

    cs.CheckpointScorer._search_encoded = broken
    scorer = _scorers(Path(dev))["full"]
    try:
        scorer.score(BiEncoder.from_pretrained(model_dir), 1, run_root, dist=context_from_group())
        outcome = "returned"
    except Exception as exc:  # noqa: BLE001
        outcome = f"{type(exc).__name__}: {exc}"
    Path(out, f"rank{rank}.txt").write_text(outcome)
    torch.distributed.destroy_process_group()


def test_a_failure_on_rank0_is_raised_on_every_rank(tiny_model_dir, tmp_path, one_thread):
    dev = _dev_set(tmp_path / "dev", n_docs=20)
    results = tmp_path / "results"
    results.mkdir()
    context = mp.spawn(_failing_worker, args=(str(tmp_path / "init"), str(tiny_model_dir), str(dev),
                                              str(tmp_path / "run"), str(results)), nprocs=WORLD, join=False)
    deadline = time.monotonic() + TIMEOUT_S
    while not context.join(timeout=5):
        if time.monotonic() > deadline:
            for p in context.processes:
                p.kill()
            pytest.fail("a rank was left waiting after rank 0 failed")
    assert (results / "rank0.txt").read_text() == "OSError: disk full"
    assert (results / "rank1.txt").read_text() == ("RuntimeError: checkpoint scoring at step 1 failed on rank 0: "
                                                   "OSError: disk full")
    assert not (tmp_path / "run" / "eval" / "step-1" / ".encoded").exists()


def _train_worker(rank, config_dict, out, port, results):
    import os

    from retriever.config import TrainConfig
    from retriever.trainer import Trainer

    os.environ.update({"WORLD_SIZE": str(WORLD), "RANK": str(rank), "LOCAL_RANK": str(rank),
                       "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)})
    torch.set_num_threads(1)
    trainer = Trainer(TrainConfig.model_validate(config_dict), out)
    trainer.run()
    Path(results, f"rank{rank}.json").write_text(json.dumps(
        {"steps": [line["step"] for line in trainer.scorer.history], "should_stop": trainer.scorer.should_stop,
         "best_step": trainer.scorer.best_step}))
    torch.distributed.destroy_process_group()


def test_two_process_training_scores_on_every_rank_and_stops_together(tiny_model_dir, tmp_path, one_thread):
    """The trainer calls the scorer on every rank: both ranks score at the same steps, hold the same best
    step and leave the loop at the same early-stopping step (else the run would hang until the timeout)."""
    import socket

    from _eval_data import write_toy_beir

    beir = write_toy_beir(tmp_path / "toy", split="train",
                          qrels={q: {f"d{i}": 1} for i, q in enumerate(["q1", "q2", "q4", "q5"], start=1)})
    config = {
        "model": {"name": str(tiny_model_dir), "doc_max_length": 32, "query_max_length": 16},
        "data": {"beir": str(beir), "split": "train", "dev_fraction": 0.5, "dev_seed": 0},
        "training": {"batch_size": 1, "max_steps": 20, "learning_rate": 1e-12, "seed": 0, "log_every": 1,
                     "bf16": False},
        "evaluation": {"held_out_dev": True, "every_steps": 1, "early_stopping_patience": 2, "k": 10},
    }
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    results = tmp_path / "results"
    results.mkdir()
    context = mp.spawn(_train_worker, args=(config, str(tmp_path / "run"), port, str(results)), nprocs=WORLD,
                       join=False)
    deadline = time.monotonic() + TIMEOUT_S
    while not context.join(timeout=5):
        if time.monotonic() > deadline:
            for p in context.processes:
                p.kill()
            pytest.fail("the two training processes did not finish: one waits on a collective")
    ranks = [json.loads((results / f"rank{r}.json").read_text()) for r in range(WORLD)]
    assert ranks[0] == ranks[1] and ranks[0]["should_stop"]
    assert 1 < len(ranks[0]["steps"]) < 20, "early stopping should end the run before max_steps"
    lines = [json.loads(x) for x in (tmp_path / "run" / "checkpoint_eval.jsonl").read_text().splitlines()]
    assert [x["step"] for x in lines] == ranks[0]["steps"]  # written once, by rank 0
    assert (tmp_path / "run" / "best" / "best.json").exists() and (tmp_path / "run" / "final").is_dir()
