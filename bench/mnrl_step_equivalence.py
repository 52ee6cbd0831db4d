"""Is negatron's in-batch training step the same computation as sentence-transformers' trainer + MNRL
(issue #12)? The real all-MiniLM-L6-v2 with every dropout set to 0, 32 SciFact train pairs with distinct
positives (from the ablation's 20 % dev carve-out), lr 1e-4, no warm-up, weight decay 0, one batch of 32
trained for two epochs (= 2 optimizer steps) by each trainer. Prints both losses' logs and the relative
difference of the two weight updates, ``||d_ST - d_negatron|| / ||d_ST||``.

    .venv/bin/python bench/mnrl_step_equivalence.py [--bf16] [--work runs/mnrl-equivalence]

``tests/test_mnrl_equivalence.py`` checks the same on the tiny test model.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from ablation_scifact import MODEL, split  # noqa: E402

BATCH, LR = 32, 1e-4


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--bf16", action="store_true", help="bf16 autocast in both trainers (default fp32)")
    parser.add_argument("--work", type=Path, default=Path("runs/mnrl-equivalence"))
    args = parser.parse_args()

    from datasets import Dataset
    from sentence_transformers import SentenceTransformer, SentenceTransformerTrainer, losses
    from sentence_transformers.training_args import SentenceTransformerTrainingArguments

    from retriever.config import TrainConfig
    from retriever.resolve import resolve_model
    from retriever.trainer import train

    work = args.work
    shutil.rmtree(work, ignore_errors=True)
    model_dir = work / "minilm-without-dropout"
    shutil.copytree(resolve_model(MODEL), model_dir)
    config = json.loads((model_dir / "config.json").read_text())
    config.update(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    (model_dir / "config.json").write_text(json.dumps(config))

    pairs, seen = [], set()
    for ex in split()[0]:
        if len(ex.positives) == 1 and ex.positives[0] not in seen:
            seen.add(ex.positives[0])
            pairs.append((ex.query, ex.positives[0]))
        if len(pairs) == BATCH:
            break
    jsonl = work / "pairs.jsonl"
    jsonl.write_text("".join(json.dumps({"query": q, "pos": [d]}) + "\n" for q, d in pairs))

    start = {n: p.detach().clone() for n, p in SentenceTransformer(str(model_dir))[0].auto_model.named_parameters()}
    peer = SentenceTransformer(str(model_dir))
    peer[0].max_seq_length = 256
    targs = SentenceTransformerTrainingArguments(
        output_dir=str(work / "peer"), num_train_epochs=2, per_device_train_batch_size=BATCH, learning_rate=LR,
        warmup_steps=0, weight_decay=0.0, seed=42, bf16=args.bf16, use_cpu=True, save_strategy="no",
        report_to="none", logging_steps=1)
    data = Dataset.from_dict({"anchor": [q for q, _ in pairs], "positive": [d for _, d in pairs]})
    SentenceTransformerTrainer(model=peer, args=targs, train_dataset=data,
                               loss=losses.MultipleNegativesRankingLoss(peer)).train()
    peer_weights = {n: p.detach() for n, p in peer[0].auto_model.named_parameters()}

    ours = {"model": {"name": str(model_dir), "query_max_length": 256, "doc_max_length": 256, "attention_dropout": 0.0},
            "data": {"jsonl": str(jsonl)}, "negatives": {"strategy": "inbatch"},
            "training": {"learning_rate": LR, "batch_size": BATCH, "epochs": 2, "warmup_ratio": 0.0,
                         "weight_decay": 0.0, "temperature": 0.05, "bf16": args.bf16, "seed": 42, "log_every": 1}}
    final = train(TrainConfig.model_validate(ours), work / "negatron")
    our_weights = {n: p.detach() for n, p in SentenceTransformer(str(final))[0].auto_model.named_parameters()}
    for row in map(json.loads, (work / "negatron" / "train_log.jsonl").read_text().splitlines()):
        print("negatron", {k: row[k] for k in ("step", "loss") if k in row})

    apart = sum(((peer_weights[n] - our_weights[n]) ** 2).sum() for n in peer_weights).sqrt()
    update = sum(((peer_weights[n] - start[n]) ** 2).sum() for n in peer_weights).sqrt()
    print(f"{'bf16' if args.bf16 else 'fp32'}: ||d_ST - d_negatron|| / ||d_ST|| = {float(apart / update):.3e}")


if __name__ == "__main__":
    main()
