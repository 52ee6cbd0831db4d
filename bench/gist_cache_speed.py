"""GISTEmbed guide cost: cached guide embeddings (computed once) against a guide forward pass per step.

Trains the student (all-MiniLM-L6-v2) on SciFact train with the all-mpnet-base-v2 guide for a few steps
both ways and reports seconds per step, the one-off cache cost, the guide's share of a step, and checks
that both ways mask the same candidates. Writes bench/results/gist.md (copied into docs/benchmarks.md).

    .venv/bin/python bench/gist_cache_speed.py --steps 5 --batch-size 32 [--max-examples 160]
"""

from __future__ import annotations

import argparse
import json
import platform
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]


def run(args, cache: bool, workdir: Path) -> dict:
    from retriever.config import TrainConfig
    from retriever.trainer import Trainer

    cfg = TrainConfig.model_validate({
        "model": {"name": args.student, "query_max_length": 64, "doc_max_length": 256},
        "data": {"beir": str(args.scifact), "split": "train", "max_examples": args.max_examples},
        "negatives": {"strategy": "gist", "options": {"guide": args.guide, "cache": cache}},
        "training": {"batch_size": args.batch_size, "max_steps": args.steps, "log_every": 1, "bf16": args.bf16,
                     "seed": 0, "warmup_ratio": 0.0}})
    trainer = Trainer(cfg, workdir / ("cached" if cache else "per-step"))
    strategy = trainer.strategy
    t0 = time.perf_counter()
    strategy.prepare(trainer)
    prepare_s = time.perf_counter() - t0
    strategy.prepare = lambda _trainer: None  # already prepared; the trainer calls it again

    guide_s = 0.0
    exclude = strategy.exclude_mask
    masks = []

    def timed_exclude(batch, q, d):
        nonlocal guide_s
        t = time.perf_counter()
        out = exclude(batch, q, d)
        guide_s += time.perf_counter() - t
        masks.append(out.clone())
        return out

    strategy.exclude_mask = timed_exclude
    t0 = time.perf_counter()
    trainer.run()
    train_s = time.perf_counter() - t0
    rows = [json.loads(line) for line in (trainer.output_dir / "train_log.jsonl").read_text().splitlines()]
    step_s = [b["elapsed"] - a["elapsed"] for a, b in zip(rows, rows[1:])]
    return {"prepare_s": prepare_s, "train_s": train_s, "guide_s_per_step": guide_s / args.steps,
            "s_per_step": sum(step_s) / len(step_s), "masks": masks, "cached_texts": len(strategy._rows)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scifact", type=Path, default=ROOT.parent / "shared" / "data" / "beir" / "scifact")
    parser.add_argument("--student", default="sentence-transformers/all-MiniLM-L6-v2")
    parser.add_argument("--guide", default="sentence-transformers/all-mpnet-base-v2")
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--max-examples", type=int, default=None,
                        help="train on the first N examples only (the cache then covers N queries + their positives)")
    parser.add_argument("--output", type=Path, default=ROOT / "bench" / "results" / "gist.md")
    parser.add_argument("--only", choices=["cached", "per-step"], help="run one variant and save it to --json")
    parser.add_argument("--json", type=Path, help="where --only writes its result")
    parser.add_argument("--report", nargs=2, type=Path, metavar=("PER_STEP_JSON", "CACHED_JSON"),
                        help="write the report from two --only results")
    args = parser.parse_args()
    from index.encode import bf16_supported

    args.bf16 = bf16_supported("cuda" if torch.cuda.is_available() else "cpu")
    if args.only:  # one variant, saved as JSON (run the two in parallel, then --report the pair)
        with tempfile.TemporaryDirectory() as tmp:
            result = run(args, cache=args.only == "cached", workdir=Path(tmp))
        result["masks"] = [m.tolist() for m in result["masks"]]
        Path(args.json).write_text(json.dumps(result))
        return
    if args.report:
        per_step, cached = (json.loads(Path(p).read_text()) for p in args.report)
        for r in (per_step, cached):
            r["masks"] = [torch.tensor(m) for m in r["masks"]]
    else:
        with tempfile.TemporaryDirectory() as tmp:
            per_step = run(args, cache=False, workdir=Path(tmp))
            cached = run(args, cache=True, workdir=Path(tmp))
    same = all(torch.equal(a, b) for a, b in zip(cached["masks"], per_step["masks"]))
    agree = sum(int((a == b).sum()) for a, b in zip(cached["masks"], per_step["masks"])) / \
        sum(a.numel() for a in cached["masks"])
    masked = sum(int(m.sum()) for m in cached["masks"]) / sum(m.numel() for m in cached["masks"])
    speedup = per_step["s_per_step"] / cached["s_per_step"]
    breakeven = cached["prepare_s"] / max(per_step["s_per_step"] - cached["s_per_step"], 1e-9)
    text = f"""## GISTEmbed: cached guide embeddings vs a guide forward pass per step

`bench/gist_cache_speed.py --steps {args.steps} --batch-size {args.batch_size} --max-examples {args.max_examples}`; student {args.student}, guide
{args.guide} (frozen), SciFact train, bf16 autocast {'on' if args.bf16 else 'off (no native bf16 on this CPU)'}. Machine: shared 2-core CPU, no GPU (other jobs were
running, so absolute times are noisy); torch {torch.__version__}, Python {platform.python_version()}; 2026-11-22.

| guide | one-off cost | seconds / step (steps 2..{args.steps}) | guide time / step |
|---|---|---|---|
| per step (guide forward on every batch) | {per_step['prepare_s']:.1f} s (load guide) | {per_step['s_per_step']:.2f} | {per_step['guide_s_per_step']:.2f} s |
| cached (training set encoded once) | {cached['prepare_s']:.1f} s (load + encode {cached['cached_texts']:,} texts) | {cached['s_per_step']:.2f} | {cached['guide_s_per_step']:.3f} s |

Speed-up per step: **{speedup:.2f}x**. The one-off cache cost grows with the training set (here
{cached['cached_texts']:,} texts: the first {args.max_examples or 'all'} SciFact train queries and their positives); it
equals ~{breakeven:.0f} steps of the per-step guide at this size, while an epoch over those examples is
{(args.max_examples or 809) // args.batch_size} steps: each text is encoded once instead of once per epoch
(plus once per batch it appears in as a candidate).
Masks identical both ways: {same} (element agreement {agree:.6f}; bf16 guide embeddings of a text can
differ in the last bits with the batch it is padded in). Fraction of in-batch candidates the guide masked:
{masked:.4f}.
"""
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(text)
    print(text)


if __name__ == "__main__":
    main()
