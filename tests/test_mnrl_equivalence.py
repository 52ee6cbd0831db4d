"""negatron's in-batch training loop is the same computation as sentence-transformers' trainer with
MultipleNegativesRankingLoss (issue #12): the same pairs, the same initial weights, dropout off, fp32, two
optimizer steps each; the weights must end up where the peer's do. Any change to the loss (temperature, a
mask that drops true negatives), the optimizer (betas, eps, decay groups), the schedule, the gradient
clipping or the pooling moves them apart by far more than the tolerance."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

PAIRS = [
    ("what does dense retrieval do", "dense retrieval maps queries and documents to vectors"),
    ("what is a hard negative", "hard negatives are documents that look relevant but are not"),
    ("which animal jumps over the dog", "the quick brown fox jumps over the lazy dog"),
    ("what does contrastive learning do", "contrastive learning pulls positives together and pushes negatives apart"),
    ("how does faiss search", "faiss searches millions of vectors by inner product"),
    ("how does bm25 score documents", "bm25 scores documents by term frequency and inverse document frequency"),
    ("what reads query and document together", "a cross encoder reads the query and the document together"),
    ("what do python functions do", "python functions return values and raise exceptions"),
]
LR, STEPS = 1e-3, 2


def _without_dropout(tiny_model_dir: Path, folder: Path) -> Path:
    shutil.copytree(tiny_model_dir, folder)
    config = json.loads((folder / "config.json").read_text())
    config.update(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    (folder / "config.json").write_text(json.dumps(config))
    return folder


def _peer_weights(model_dir: Path, work: Path) -> dict[str, torch.Tensor]:
    from datasets import Dataset
    from sentence_transformers import SentenceTransformer, SentenceTransformerTrainer, losses, models
    from sentence_transformers.training_args import SentenceTransformerTrainingArguments

    transformer = models.Transformer(str(model_dir), max_seq_length=64)
    model = SentenceTransformer(modules=[transformer, models.Pooling(transformer.auto_model.config.hidden_size, "mean"),
                                         models.Normalize()], device="cpu")
    # One batch holds every pair, so each epoch is one step whatever order the sampler picks: the loss is a
    # mean over rows and every row sees the same candidates.
    args = SentenceTransformerTrainingArguments(
        output_dir=str(work / "peer"), num_train_epochs=STEPS, per_device_train_batch_size=len(PAIRS),
        learning_rate=LR, warmup_steps=0, weight_decay=0.0, max_grad_norm=1.0, seed=0, bf16=False, use_cpu=True,
        save_strategy="no", report_to="none", disable_tqdm=True)
    data = Dataset.from_dict({"anchor": [q for q, _ in PAIRS], "positive": [d for _, d in PAIRS]})
    SentenceTransformerTrainer(model=model, args=args, train_dataset=data,
                               loss=losses.MultipleNegativesRankingLoss(model, scale=20.0)).train()
    return {n: p.detach().clone() for n, p in model[0].auto_model.named_parameters()}


def _negatron_weights(model_dir: Path, work: Path, temperature: float) -> dict[str, torch.Tensor]:
    from transformers import AutoModel

    from retriever.config import TrainConfig
    from retriever.trainer import train

    jsonl = work / "pairs.jsonl"
    jsonl.write_text("".join(json.dumps({"query": q, "pos": [d]}) + "\n" for q, d in PAIRS))
    config = {"model": {"name": str(model_dir), "pooling": "mean", "normalize": True, "query_max_length": 64,
                        "doc_max_length": 64, "attention_dropout": 0.0},
              "data": {"jsonl": str(jsonl)}, "negatives": {"strategy": "inbatch"},
              "training": {"learning_rate": LR, "batch_size": len(PAIRS), "epochs": STEPS, "warmup_ratio": 0.0,
                           "weight_decay": 0.0, "max_grad_norm": 1.0, "temperature": temperature, "bf16": False,
                           "seed": 0, "log_every": 1}}
    final = train(TrainConfig.model_validate(config), work / f"negatron-{temperature:g}")
    return {n: p.detach().clone() for n, p in AutoModel.from_pretrained(final).named_parameters()}


def _relative_difference(a: dict, b: dict, start: dict) -> float:
    """||(a - start) - (b - start)|| / ||a - start||: how far apart the two updates are."""
    apart = sum(((a[n] - b[n]) ** 2).sum() for n in a).sqrt()
    update = sum(((a[n] - start[n]) ** 2).sum() for n in a).sqrt()
    return float(apart / update)


def test_inbatch_training_matches_sentence_transformers_mnrl(tiny_model_dir, tmp_path):
    pytest.importorskip("sentence_transformers")
    from transformers import AutoModel

    model_dir = _without_dropout(tiny_model_dir, tmp_path / "model")
    start = {n: p.detach().clone() for n, p in AutoModel.from_pretrained(model_dir).named_parameters()}
    peer = _peer_weights(model_dir, tmp_path)
    assert set(peer) == set(start)

    same = _relative_difference(peer, _negatron_weights(model_dir, tmp_path, temperature=0.05), start)
    # The control: the one change of a 0.1 temperature (MNRL's scale 10 instead of 20) must be visible.
    other = _relative_difference(peer, _negatron_weights(model_dir, tmp_path, temperature=0.1), start)
    print(f"relative update difference: same settings {same:.2e}, temperature 0.1 {other:.2e}")
    assert same < 1e-4, f"negatron's update differs from MNRL's by {same:.2e} of its size"
    assert other > 100 * same and other > 1e-2, f"a different temperature is not detected ({other:.2e} vs {same:.2e})"
