"""Kill a training run with SIGKILL after a checkpoint, resume it, and get the uninterrupted run's weights."""

import json
import os
import signal
import subprocess
import sys
import time

import torch
import yaml

from retriever.checkpoint import list_checkpoints
from retriever.config import load_config
from retriever.modeling import BiEncoder
from retriever.trainer import train


def cli(config, output, *extra):
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false"}
    return subprocess.Popen([sys.executable, "-m", "retriever.cli", "train", "--config", str(config),
                             "--output", str(output), *extra], env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)


def test_sigkill_then_resume_matches_uninterrupted_run(tiny_model_dir, shared_data, tmp_path):
    config = tmp_path / "run.yaml"
    config.write_text(yaml.safe_dump({
        "model": {"name": str(tiny_model_dir), "query_max_length": 32, "doc_max_length": 64},
        "data": {"triples": str(shared_data / "msmarco" / "samples" / "triples.train.small.head100.tsv")},
        "negatives": {"strategy": "hard"},
        # 25 steps per epoch: the run crosses an epoch boundary after the resume point.
        "training": {"batch_size": 4, "max_steps": 40, "learning_rate": 1e-3, "save_every": 5, "keep_last": 2,
                     "log_every": 5, "num_threads": 1, "seed": 3},
    }))
    out = tmp_path / "killed"
    proc = cli(config, out)
    deadline = time.time() + 300
    while not list_checkpoints(out) and proc.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, proc.stderr.read()[-2000:]
    assert list_checkpoints(out) and not (out / "final").exists(), "the run must die mid-way"

    resumed = cli(config, out, "--resume")
    _, err = resumed.communicate(timeout=600)
    assert resumed.returncode == 0, err[-2000:]

    threads = torch.get_num_threads()
    reference = train(load_config(config), tmp_path / "reference")
    torch.set_num_threads(threads)

    a = BiEncoder.from_pretrained(out / "final").state_dict()
    b = BiEncoder.from_pretrained(reference).state_dict()
    assert a.keys() == b.keys()
    worst = max((a[k].float() - b[k].float()).abs().max().item() for k in a)
    assert worst <= 1e-6, worst  # in practice bit-identical (0.0) on one machine
    steps = [json.loads(line)["step"] for line in (out / "train_log.jsonl").read_text().splitlines()]
    assert steps == [5, 10, 15, 20, 25, 30, 35, 40]
    assert [p.name for p in list_checkpoints(out)] == ["step-0000035", "step-0000040"]
