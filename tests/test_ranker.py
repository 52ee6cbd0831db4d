"""The cross-encoder ranker: CrossEncoder-format round trips, loading, scoring, listwise training, resume."""

import json
import math
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
import yaml

from retriever.checkpoint import list_checkpoints
from retriever.losses.listwise_ranker import ListwiseRankerLoss
from retriever.ranker import Ranker
from retriever.ranker_train import RankerConfig, load_ranker_config, train_ranker

WORDS = ["faiss", "bm25", "python", "vector", "encoder", "token", "index", "query", "batch", "loss"]


@pytest.fixture
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _pairs():
    return [("a query about foxes", "the quick brown fox jumps over the lazy dog " * 6),
            ("dense retrieval", "faiss searches millions of vectors by inner product"),
            ("x", "y"), ("bm25 scores", "bm25 scores documents by term frequency " * 3)] * 3


def _synthetic_jsonl(path, n=48, seed=0):
    """Queries name a word; the positive holds it and a phrase no negative has (a signal a random tiny model
    can pick up in a few dozen steps), the negatives hold other words."""
    rng = np.random.default_rng(seed)
    rows = []
    for i in range(n):
        w = WORDS[i % len(WORDS)]
        others = [x for x in WORDS if x != w]
        neg = [" ".join(rng.choice(others, 4)) for _ in range(5)]
        rows.append({"query": f"{w}", "pos": [f"{w} the quick brown fox " + " ".join(rng.choice(others, 2))], "neg": neg,
                     "query_id": f"q{i}", "pos_ids": [f"p{i}"], "neg_ids": [f"n{i}-{j}" for j in range(5)]})
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _config(model, jsonl, **training):
    t = {"batch_size": 4, "max_steps": 12, "learning_rate": 1e-3, "warmup_ratio": 0.0, "log_every": 2,
         "num_threads": 1, "seed": 3, "bf16": False, **training}
    return {"model": {"name": str(model), "max_length": 32}, "data": {"jsonl": str(jsonl), "dev_fraction": 0.25},
            "negatives": {"source": "data", "per_query": 3}, "training": t}


def test_saved_ranker_is_a_crossencoder_with_equal_fp32_scores(tiny_model_dir, tmp_path, one_thread):
    from sentence_transformers import CrossEncoder

    ranker = Ranker.load(tiny_model_dir, max_length=48)
    assert ranker.fresh_head and ranker.activation == "identity"
    pairs = _pairs()
    ours = ranker.score(pairs, bf16=False, batch_size=5)
    ranker.save(tmp_path / "ranker")
    theirs = CrossEncoder(str(tmp_path / "ranker"), device="cpu").predict(pairs, batch_size=7)
    assert np.abs(ours - theirs).max() <= 1e-5
    assert np.ptp(ours) > 0  # the pairs do get different scores (a real comparison, not constants)
    again = Ranker.load(tmp_path / "ranker")
    assert not again.fresh_head and again.max_length == 48
    assert np.abs(again.score(pairs, bf16=False) - ours).max() <= 1e-5


def test_existing_crossencoder_checkpoint_loads_as_a_ranker(tiny_model_dir, tmp_path, one_thread):
    from sentence_transformers import CrossEncoder
    from transformers import AutoTokenizer, BertForSequenceClassification

    torch.manual_seed(0)
    model = BertForSequenceClassification.from_pretrained(tiny_model_dir, num_labels=1)
    model.save_pretrained(tmp_path / "hf")
    AutoTokenizer.from_pretrained(tiny_model_dir).save_pretrained(tmp_path / "hf")
    ce = CrossEncoder(str(tmp_path / "hf"), device="cpu")
    ce.save(str(tmp_path / "ce"))
    pairs = _pairs()
    expected = CrossEncoder(str(tmp_path / "ce"), device="cpu").predict(pairs)
    for folder in (tmp_path / "ce", tmp_path / "hf"):  # sentence-transformers v4+ layout and plain HF layout
        ranker = Ranker.load(folder)
        assert not ranker.fresh_head and ranker.activation == "sigmoid"
        assert np.abs(ranker.score(pairs, bf16=False) - expected).max() <= 1e-5


def test_fresh_head_depends_on_the_seed_only(tiny_model_dir):
    torch.manual_seed(123)
    a = Ranker.load(tiny_model_dir, seed=1).model.classifier.weight
    torch.manual_seed(456)
    b = Ranker.load(tiny_model_dir, seed=1).model.classifier.weight
    c = Ranker.load(tiny_model_dir, seed=2).model.classifier.weight
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_multi_label_classifier_is_refused(tiny_model_dir, tmp_path):
    from transformers import BertForSequenceClassification

    BertForSequenceClassification.from_pretrained(tiny_model_dir, num_labels=3).save_pretrained(tmp_path / "m")
    with pytest.raises(ValueError, match="num_labels=1"):
        Ranker.load(tmp_path / "m")


def test_length_sorted_scores_keep_input_order(tiny_model_dir, one_thread):
    ranker = Ranker.load(tiny_model_dir, max_length=64)
    pairs = _pairs()
    batched = ranker.score(pairs, bf16=False, batch_size=3)
    one_by_one = np.array([ranker.score([p], bf16=False)[0] for p in pairs])
    assert np.abs(batched - one_by_one).max() <= 1e-5


def test_bf16_scores_close_to_fp32(tiny_model_dir, one_thread):
    from retriever.modeling import bf16_supported

    if not bf16_supported("cpu"):
        pytest.skip("no native bf16 on this CPU")
    ranker = Ranker.load(tiny_model_dir, max_length=64)
    pairs = _pairs()
    assert np.abs(ranker.score(pairs, bf16=True) - ranker.score(pairs, bf16=False)).max() <= 1e-2


@pytest.mark.parametrize("batch_size", [3, 64])  # several batches (throughput-compiled, out of order) and one
def test_openvino_scores_equal_torch_and_keep_input_order(tiny_model_dir, tmp_path, monkeypatch, one_thread,
                                                         batch_size):
    pytest.importorskip("openvino")
    monkeypatch.setenv("NEGATRON_CACHE_DIR", str(tmp_path))
    ranker = Ranker.load(tiny_model_dir, max_length=64)
    pairs = _pairs()
    reference = ranker.score(pairs, bf16=False, backend="torch", batch_size=batch_size)
    got = ranker.score(pairs, bf16=False, backend="openvino", batch_size=batch_size)
    assert np.abs(got - reference).max() <= 1e-4


def test_listwise_loss_is_uniform_at_equal_logits_and_pushes_the_positive_up():
    loss_fn = ListwiseRankerLoss()
    logits = torch.zeros(2, 4, requires_grad=True)
    loss = loss_fn(logits)
    assert abs(loss.item() - math.log(4)) < 1e-6
    loss.backward()
    assert (logits.grad[:, 0] < 0).all() and (logits.grad[:, 1:] > 0).all()
    with pytest.raises(ValueError):
        loss_fn(torch.zeros(3, 1))


def test_unknown_config_key_names_the_fix(tmp_path):
    from retriever.config import ConfigError

    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump({"data": {"jsonl": "x.jsonl"}, "negatives": {"per_qeury": 3}}))
    with pytest.raises(ConfigError, match="per_query"):
        load_ranker_config(path)
    path.write_text(yaml.safe_dump({"data": {"jsonl": "x.jsonl"}, "training": {"grad_cache": True}}))
    with pytest.raises(ConfigError, match="grad_cache"):
        load_ranker_config(path)


def test_training_learns_and_logs(tiny_model_dir, tmp_path, one_thread):
    jsonl = _synthetic_jsonl(tmp_path / "train.jsonl")
    cfg = RankerConfig.model_validate({**_config(tiny_model_dir, jsonl, max_steps=40, learning_rate=5e-3),
                                       "evaluation": {"every_steps": 20, "metric": "mrr@10"}})
    final = train_ranker(cfg, tmp_path / "run")
    rows = [json.loads(line) for line in (tmp_path / "run" / "train_log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == list(range(2, 41, 2))
    assert rows[0]["loss"] > 1.2 and rows[-1]["loss"] < 0.5 * math.log(4), rows  # ln 4 = uniform over 4
    dev = [json.loads(line) for line in (tmp_path / "run" / "dev_eval.jsonl").read_text().splitlines()]
    assert [d["step"] for d in dev] == [20, 40] and dev[-1]["mrr@10"] > 0.8, dev
    assert (tmp_path / "run" / "best" / "modules.json").exists()
    ranker = Ranker.load(final)
    good, bad = ranker.score([("faiss", "faiss the quick brown fox loss"), ("faiss", "token bm25 index loss")], bf16=False)
    assert good > bad


@pytest.mark.parametrize("rate", [0.0, None])
def test_attention_dropout_applies_to_the_ranker_modules_only(tiny_model_dir, tmp_path, one_thread, rate):
    """model.attention_dropout (default 0, the fused attention kernel) sets the ranker's attention layers;
    null keeps the checkpoint's rate; the saved config.json keeps the checkpoint's rate either way."""
    from retriever.ranker_train import RankerTrainer

    checkpoint_rate = json.loads((tiny_model_dir / "config.json").read_text())["attention_probs_dropout_prob"]
    assert checkpoint_rate > 0
    raw = _config(tiny_model_dir, _synthetic_jsonl(tmp_path / "train.jsonl"), max_steps=2, save_every=None)
    cfg = RankerConfig.model_validate({**raw, "model": {**raw["model"], "attention_dropout": rate}})
    trainer = RankerTrainer(cfg, tmp_path / "run")
    rates = {m.dropout.p for m in trainer.ranker.modules() if type(m).__name__.endswith("SelfAttention")}
    assert rates == {checkpoint_rate if rate is None else rate}
    trainer.run()
    assert json.loads((tmp_path / "run" / "final" / "config.json").read_text())["attention_probs_dropout_prob"] \
        == checkpoint_rate


def test_head_learning_rate_covers_exactly_the_parameters_outside_the_backbone(tiny_model_dir, tmp_path, one_thread):
    from retriever.ranker_train import RankerTrainer

    raw = _config(tiny_model_dir, _synthetic_jsonl(tmp_path / "train.jsonl"), max_steps=2, save_every=None,
                  learning_rate=1e-4, head_learning_rate=1e-2, warmup_ratio=0.0)
    trainer = RankerTrainer(RankerConfig.model_validate(raw), tmp_path / "run")
    model = trainer.ranker.model
    by_lr = {}
    for group in trainer.optimizer.param_groups:
        by_lr.setdefault(group["initial_lr"], set()).update(id(p) for p in group["params"])
    backbone = {id(p) for p in model.base_model.parameters()}
    assert by_lr[1e-4] == backbone
    assert by_lr[1e-2] == {id(p) for p in model.parameters()} - backbone
    assert by_lr[1e-2] == {id(p) for p in model.classifier.parameters()}  # BERT's head: the classifier


def _cli(config, output, *extra):
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false"}
    return subprocess.Popen([sys.executable, "-m", "retriever.cli", "train-ranker", "--config", str(config),
                             "--output", str(output), *extra], env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)


def test_sigkill_then_resume_matches_uninterrupted_run(tiny_model_dir, tmp_path, one_thread):
    jsonl = _synthetic_jsonl(tmp_path / "train.jsonl")
    config = tmp_path / "ranker.yaml"
    # 9 steps per epoch (36 training examples / 4): the run crosses an epoch boundary after the resume point.
    config.write_text(yaml.safe_dump({**_config(tiny_model_dir, jsonl, max_steps=14, save_every=3, keep_last=2),
                                      "evaluation": {"every_steps": 7}}))
    out = tmp_path / "killed"
    proc = _cli(config, out)
    deadline = time.time() + 300
    while not list_checkpoints(out) and proc.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, proc.stderr.read()[-2000:]
    assert list_checkpoints(out) and not (out / "final").exists(), "the run must die mid-way"
    resumed = _cli(config, out, "--resume")
    _, err = resumed.communicate(timeout=600)
    assert resumed.returncode == 0, err[-2000:]

    reference = train_ranker(load_ranker_config(config), tmp_path / "reference")
    a = Ranker.load(out / "final").state_dict()
    b = Ranker.load(reference).state_dict()
    worst = max((a[k].float() - b[k].float()).abs().max().item() for k in a)
    assert worst <= 1e-6, worst
    steps = [json.loads(line)["step"] for line in (out / "train_log.jsonl").read_text().splitlines()]
    assert steps == [2, 4, 6, 8, 10, 12, 14]
    dev_steps = [json.loads(line)["step"] for line in (out / "dev_eval.jsonl").read_text().splitlines()]
    assert dev_steps == [7, 14]
    assert [p.name for p in list_checkpoints(out)] == ["step-0000009", "step-0000012"]


def test_shipped_ranker_config_is_valid():
    from pathlib import Path

    cfg = load_ranker_config(Path(__file__).resolve().parents[1] / "configs" / "scifact-ranker.yaml")
    assert cfg.negatives.source == "dense" and cfg.data.dev_fraction == 0.1 and cfg.evaluation is not None


@pytest.mark.integration
def test_minilm_ranker_on_scifact_pairs_matches_crossencoder(minilm_path, scifact, tmp_path, one_thread):
    """The real all-MiniLM-L6-v2 weights as a ranker (fresh head) on SciFact pairs: CrossEncoder.predict of
    the saved folder equals negatron's fp32 scores; bf16 stays within 1e-2."""
    from sentence_transformers import CrossEncoder

    from retriever.data import load_beir
    from retriever.modeling import bf16_supported

    ds = load_beir(scifact, "test")
    qids = list(ds.qrels)[:4]
    docs = [ds.corpus[i] for i in range(6)]
    pairs = [(ds.queries[q], d.full_text) for q in qids for d in docs]
    ranker = Ranker.load(minilm_path, seed=0)
    assert ranker.fresh_head and ranker.max_length == 256  # the bi-encoder folder's max_seq_length
    ours = ranker.score(pairs, bf16=False)
    ranker.save(tmp_path / "ranker")
    theirs = CrossEncoder(str(tmp_path / "ranker"), device="cpu").predict(pairs)
    assert np.abs(ours - theirs).max() <= 1e-5
    if bf16_supported("cpu"):
        assert np.abs(ranker.score(pairs, bf16=True) - ours).max() <= 1e-2
