"""The resume matrix: for every negative strategy, a CLI run killed with SIGKILL after its first checkpoint
and resumed (``resume=True``, what ``--resume`` calls) ends with the uninterrupted run's weights and train_log rows (AR2: and ranker).

The kill is deterministic: the CLI runs under a wrapper that sends itself SIGKILL when the step after the
first checkpoint's next step begins, so the interrupted run has written one log row past its checkpoint
(the resume must drop it) and never reaches ``final/``. Tolerance: 1e-6 absolute on every weight (in
practice bit-identical, 0.0, on one machine); log rows equal except timing columns.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys

import numpy as np
import pytest
import torch
import yaml

from retriever.checkpoint import list_checkpoints
from retriever.data import load_beir, training_examples_from_qrels, write_jsonl_atomic
from strategy_data import shared_mini, tiny_config

# Runs the CLI; SIGKILLs itself at the start of the second optimizer step after its first checkpoint (in the
# stage whose folder name is $KILL_STAGE, for pipelines).
_KILLER = """
import os, signal, sys
import retriever.trainer as t
stage, saved, calls = os.environ.get("KILL_STAGE", ""), [], []
save, step = t.Trainer._save_checkpoint, t.Trainer.train_step
def _save(self, n):
    save(self, n)
    if self.output_dir.name == stage or not stage:
        saved.append(n)
def _step(self, n):
    if saved:
        calls.append(n)
        if len(calls) == 2:
            os.kill(os.getpid(), signal.SIGKILL)
    return step(self, n)
t.Trainer._save_checkpoint, t.Trainer.train_step = _save, _step
from retriever.cli import main
sys.argv = ["negatron"] + sys.argv[1:]
main()
"""

TIMING = {"pairs_per_s", "elapsed"}
STEPS, SAVE_EVERY = 8, 3  # 6 steps per epoch (24 queries, batch 4): the resumed run crosses an epoch


@pytest.fixture(scope="module")
def mini(scifact):
    return shared_mini(scifact)


def _cli(*args, kill_stage: str | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1"}
    if kill_stage is not None:
        env["KILL_STAGE"] = kill_stage
        cmd = [sys.executable, "-c", _KILLER, *args]
    else:
        cmd = [sys.executable, "-m", "retriever.cli", *args]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)


def _scored_jsonl(folder, path):
    """FlagEmbedding JSONL of the mini set with 3 text negatives and made-up teacher scores per query."""
    ds = load_beir(folder, "train")
    examples = training_examples_from_qrels(ds.queries, ds.qrels, ds.corpus)
    texts = [d.full_text for d in ds.corpus]
    rng = np.random.default_rng(0)
    rows = []
    for ex in examples:
        negs = [t for t in rng.choice(texts, size=4, replace=False).tolist() if t not in ex.positives][:3]
        rows.append({"query": ex.query, "pos": ex.positives, "neg": negs,
                     "pos_scores": [float(rng.uniform(5, 10)) for _ in ex.positives],
                     "neg_scores": [float(rng.uniform(-5, 5)) for _ in negs]})
    write_jsonl_atomic(path, rows)
    return path


def _config(folder, model, strategy, options, data=None):
    cfg = tiny_config(folder, model, strategy, options, max_steps=STEPS, save_every=SAVE_EVERY, keep_last=2)
    if data is not None:
        cfg["data"] = {"jsonl": str(data)}
    return cfg


def _cases(folder, model, tmp_path):
    scored = _scored_jsonl(folder, tmp_path / "scored.jsonl")
    ance = {"k": 20, "pool": 5, "range_min": 0, "refresh_every": 2, "wait_for_refresh": True}
    star = {"hard_per_query": 1, "random_per_query": 1, "mine_pool": 5}
    return {
        "inbatch": _config(folder, model, "inbatch", {}),
        "hard": _config(folder, model, "hard", {"per_query": 1}, data=scored),
        "star": _config(folder, model, "star", star),
        "adore": _config(folder, model, "adore", {"k": 10}),
        "star-adore": {"pipeline": [{"name": "star", "config": _config(folder, model, "star", star)},
                                    {"name": "adore", "config": _config(folder, model, "adore", {"k": 10})}]},
        "gist": _config(folder, model, "gist", {"guide": str(model), "guide_bf16": False}),
        "tasb": _config(folder, model, "tasb", {"n_clusters": 2}),
        "tasb-margin-mse": _config(folder, model, "tasb", {"n_clusters": 2, "hard_per_query": 1, "loss": "margin_mse"},
                                   data=scored),
        "ance": _config(folder, model, "ance", ance),
        "ar2": _config(folder, model, "ar2", {**ance, "ranker": str(model), "per_query": 2, "ranker_steps": 2,
                                              "retriever_steps": 2, "ranker_lr": 2e-3}),
    }


def _train_in_process(config, output, pipeline: bool, resume: bool = False) -> None:
    from retriever.config import load_config
    from retriever.pipeline import run_pipeline
    from retriever.trainer import train

    threads = torch.get_num_threads()
    try:
        run_pipeline(config, output, resume=resume) if pipeline else train(load_config(config), output, resume=resume)
    finally:
        torch.set_num_threads(threads)


def _rows(run):
    lines = (run / "train_log.jsonl").read_text().splitlines()
    return [{k: v for k, v in json.loads(line).items() if k not in TIMING} for line in lines if line.strip()]


def _state(folder):
    from retriever.modeling import BiEncoder

    return BiEncoder.from_pretrained(folder).state_dict()


def _assert_same_weights(a, b, what):
    assert a.keys() == b.keys(), what
    worst = max((a[k].float() - b[k].float()).abs().max().item() for k in a)
    assert worst <= 1e-6, f"{what}: resumed weights differ from the uninterrupted run's by {worst}"


def _assert_same_rows(resumed, reference):
    assert [r["step"] for r in resumed] == [r["step"] for r in reference] == list(range(1, STEPS + 1))
    for a, b in zip(resumed, reference):
        assert a.keys() == b.keys()
        for key in a:
            if isinstance(a[key], float):
                assert a[key] == pytest.approx(b[key], rel=1e-5, abs=1e-6), (a["step"], key)
            else:
                assert a[key] == b[key], (a["step"], key)


CASES = ["inbatch", "hard", "star", "adore", "star-adore", "gist", "tasb", "tasb-margin-mse", "ance", "ar2"]


@pytest.mark.parametrize("case", CASES)
def test_sigkill_then_resume_matches_uninterrupted_run(case, mini, tmp_path):
    folder, model = mini
    config = tmp_path / "run.yaml"
    config.write_text(yaml.safe_dump(_cases(folder, model, tmp_path)[case]))
    pipeline = case == "star-adore"
    last = "adore" if pipeline else None   # the stage that is killed and compared

    killed, reference = tmp_path / "killed", tmp_path / "reference"
    died = _cli("train", "--config", str(config), "--output", str(killed), kill_stage=last or "")
    assert died.returncode == -signal.SIGKILL, died.stderr[-3000:]
    run = killed / last if pipeline else killed
    assert list_checkpoints(run) and not (run / "final").exists(), "the run must die mid-way"
    assert [r["step"] for r in _rows(run)] == list(range(1, SAVE_EVERY + 2))  # one row past the checkpoint

    # resumed and uninterrupted runs in-process (one interpreter start less each; tests/test_resume.py covers
    # the CLI's --resume flag itself)
    _train_in_process(config, killed, pipeline, resume=True)
    _train_in_process(config, reference, pipeline)

    ref_run = reference / last if pipeline else reference
    _assert_same_weights(_state(run / "final"), _state(ref_run / "final"), case)
    _assert_same_rows(_rows(run), _rows(ref_run))
    if case == "ar2":
        from transformers import AutoModelForSequenceClassification

        a, b = (AutoModelForSequenceClassification.from_pretrained(r / "ranker").state_dict() for r in (run, ref_run))
        _assert_same_weights(a, b, "ar2 ranker")
