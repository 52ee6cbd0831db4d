"""Training throughput (pairs/s): negatron's trainer vs sentence-transformers' SentenceTransformerTrainer
with MultipleNegativesRankingLoss, same model (all-MiniLM-L6-v2), batch size, max length, steps and
SciFact train pairs, fp32 and bf16. Each measurement runs in its own subprocess, back to back.
negatron runs twice per precision: with its defaults (``model.attention_dropout: 0``, which lets PyTorch
use its fused attention kernel) and with the checkpoint's attention dropout (0.1), sentence-transformers'
recipe, so the table separates the recipe's gain from the loop's.

    python bench/train_throughput.py --data ../shared/data/beir/scifact --steps 20 --warmup 3 \
        --markdown bench/results/training.md
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from datetime import date
from pathlib import Path

MODEL = "sentence-transformers/all-MiniLM-L6-v2"


def _pairs(data: str):
    from retriever.data import load_beir, training_examples_from_qrels

    ds = load_beir(data, "train")
    return [(e.query, e.positives[0]) for e in training_examples_from_qrels(ds.queries, ds.qrels, ds.corpus)]


def run_negatron(args) -> float:
    from retriever.config import TrainConfig
    from retriever.trainer import Trainer

    cfg = TrainConfig.model_validate({
        "model": {"name": MODEL, "query_max_length": args.max_length, "doc_max_length": args.max_length,
                  **({"attention_dropout": None} if args.checkpoint_attention_dropout else {})},
        "data": {"beir": args.data, "split": "train"},
        "training": {"batch_size": args.batch_size, "max_steps": args.warmup + args.steps, "bf16": args.bf16,
                     "num_threads": args.threads, "learning_rate": 2e-5},
    })
    trainer = Trainer(cfg, Path(args.scratch) / "negatron")
    for step in range(args.warmup):
        trainer.train_step(step)
    start = time.perf_counter()
    for step in range(args.warmup, args.warmup + args.steps):
        trainer.train_step(step)
    return args.steps * args.batch_size / (time.perf_counter() - start)


def run_sentence_transformers(args) -> float:
    import torch
    from datasets import Dataset
    from sentence_transformers import (SentenceTransformer, SentenceTransformerTrainer,
                                       SentenceTransformerTrainingArguments)
    from sentence_transformers.losses import MultipleNegativesRankingLoss
    from transformers import TrainerCallback

    from retriever.resolve import resolve_model

    torch.set_num_threads(args.threads)
    model = SentenceTransformer(resolve_model(MODEL), device="cpu")
    model.max_seq_length = args.max_length
    pairs = _pairs(args.data)
    dataset = Dataset.from_dict({"anchor": [q for q, _ in pairs], "positive": [p for _, p in pairs]})
    stamps: list[float] = []

    class Clock(TrainerCallback):
        def on_step_end(self, *a, **k):
            stamps.append(time.perf_counter())

    train_args = SentenceTransformerTrainingArguments(
        output_dir=str(Path(args.scratch) / "st"), per_device_train_batch_size=args.batch_size,
        max_steps=args.warmup + args.steps, learning_rate=2e-5, warmup_ratio=0.1, bf16=args.bf16, use_cpu=True,
        save_strategy="no", report_to="none", logging_steps=1000, dataloader_drop_last=True, seed=42)
    trainer = SentenceTransformerTrainer(model=model, args=train_args, train_dataset=dataset,
                                         loss=MultipleNegativesRankingLoss(model), callbacks=[Clock()])
    trainer.train()
    return args.steps * args.batch_size / (stamps[-1] - stamps[args.warmup - 1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default="../shared/data/beir/scifact")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--max-length", type=int, default=256)
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    parser.add_argument("--scratch", default="/tmp/negatron-bench-train")
    parser.add_argument("--markdown", help="write the results section to this file")
    parser.add_argument("--json", type=Path, help="also write the figures here")
    parser.add_argument("--one", choices=["negatron", "sentence-transformers"], help=argparse.SUPPRESS)
    parser.add_argument("--bf16", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--checkpoint-attention-dropout", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    args.data = str(Path(args.data).resolve())

    if args.one:
        fn = run_negatron if args.one == "negatron" else run_sentence_transformers
        print(json.dumps({"pairs_per_s": fn(args)}))
        return

    rows = []
    systems = {"sentence-transformers": ["--one", "sentence-transformers"], "negatron": ["--one", "negatron"],
               "negatron, checkpoint attention dropout": ["--one", "negatron", "--checkpoint-attention-dropout"]}
    from retriever.modeling import bf16_supported

    # emulated bf16 (no AVX512-BF16/AMX) runs many times slower than fp32: no one trains in it, nothing to compare
    precisions = ("fp32", "bf16") if bf16_supported("cpu") else ("fp32",)
    if len(precisions) == 1:
        print("bf16 skipped: this CPU has no native bf16", flush=True)
    for precision in precisions:
        rates = {}
        for system, flags in systems.items():
            cmd = [sys.executable, __file__, *flags, "--data", args.data, "--steps", str(args.steps),
                   "--warmup", str(args.warmup), "--batch-size", str(args.batch_size), "--max-length",
                   str(args.max_length), "--threads", str(args.threads), "--scratch", args.scratch]
            cmd += ["--bf16"] if precision == "bf16" else []
            out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
            rates[system] = json.loads(out.strip().splitlines()[-1])["pairs_per_s"]
            print(f"{precision} {system}: {rates[system]:.2f} pairs/s", flush=True)
        rows.append((precision, *rates.values()))

    table = ["| precision | sentence-transformers (pairs/s) | negatron (pairs/s) | speed-up | negatron with the "
             "checkpoint's attention dropout (pairs/s) | speed-up |", "|---|---|---|---|---|---|"]
    table += [f"| {p} | {st:.2f} | {ng:.2f} | {ng / st:.2f}x | {same:.2f} | {same / st:.2f}x |"
              for p, st, ng, same in rows]
    report = "\n".join(table)
    print(report)
    if args.json:
        args.json.write_text(json.dumps({
            "date": date.today().isoformat(), "threads": args.threads, "batch_size": args.batch_size,
            "max_length": args.max_length, "steps": args.steps, "warmup": args.warmup,
            "rows": [{"precision": p, "sentence_transformers_pairs_per_s": st, "negatron_pairs_per_s": ng,
                      "speedup": ng / st, "negatron_checkpoint_attention_dropout_pairs_per_s": same,
                      "checkpoint_attention_dropout_speedup": same / st} for p, st, ng, same in rows]},
            indent=2) + "\n")
    if args.markdown:
        cmd = " ".join(["python bench/train_throughput.py"] + sys.argv[1:])
        Path(args.markdown).parent.mkdir(parents=True, exist_ok=True)
        Path(args.markdown).write_text(
            f"## Training throughput\n\nMachine: {platform.machine()} CPU, {os.cpu_count()} cores, no GPU "
            f"({platform.processor() or platform.platform()}); date {date.today().isoformat()}.\n"
            f"Command: `{cmd}`\n\nall-MiniLM-L6-v2, SciFact train pairs, batch {args.batch_size}, max length "
            f"{args.max_length}, {args.steps} timed steps after {args.warmup} warm-up steps, {args.threads} threads.\n\n"
            f"{report}\n")


if __name__ == "__main__":
    main()
