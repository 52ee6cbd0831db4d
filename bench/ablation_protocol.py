"""The negative-strategy ablation under the clean protocol of issue #12, as one resumable command.

The protocol (docs/benchmarks.md, "The ablation under the clean protocol", written before any run) is data
here, in ``PROTOCOL``; this driver only carries it out, in two phases that cannot overlap:

1. **Choose on dev.** Every trained arm at every grid point of its learning rate, seed 42, dev only (the
   20 % carve-out of SciFact train). The test split is neither encoded nor scored in this phase.
2. **Score test once.** Only when phase 1 is complete for every arm: each arm at its dev-chosen rate, seeds
   42, 43 and 44, dev and test scored from one encoding; per-query test nDCG@10 kept for the paired tests.

Then the report: mean ± sd per arm, and paired tests on test nDCG@10 (per query, averaged over the seeds;
``eval/significance.py``) of the best arm on dev against the sentence-transformers peer, and of in-batch
against the peer. Every (arm, setting, seed) result is saved as it finishes, in a file kept under version
control (``bench/results/ablation-protocol/results.json``, not the ``--work`` folder of models), so the
protocol continues where it stopped in a later session on another machine. Every run trains and encodes in
fp32, the one precision every CPU computes natively (bf16 runs would not be comparable with fp32 ones, and
the machine changes between sessions); each result records the machine it ran on.

    .venv/bin/python bench/ablation_protocol.py [--work runs/ablation-protocol] [--phase dev|train-ahead|test|report]
        [--arms ARM ...]

``--arms`` runs only those arms' runs (in protocol order), so that two drivers can share a machine, each on
its own arms: every save merges into the results file under a lock, never over another driver's results.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import ablation_scifact as ab  # noqa: E402

from retriever.io import write_text_atomic  # noqa: E402

PROTOCOL = {
    "dev_fraction": 0.2,
    "dev_seed": 0,
    "grid": [3e-5, 1e-4, 3e-4],  # every trained arm's learning rate; for star-adore the ADORE stage's
    "tuning_seed": 42,
    "seeds": [42, 43, 44],
    # Equal budget: two epochs of the train split. star-adore spends it as 1 STAR + 1 ADORE epoch (its STAR
    # stage at the star arm's dev-chosen rate); ar2's own schedule is 2 epochs (1 ranker warm-up epoch).
    "epochs": {"inbatch": 2, "bm25": 2, "star": 2, "star-adore": 1, "gist": 2, "ar2": None, "ance": 2,
               "tasb": 2, "st-mnrl": 2},
    "peer": "st-mnrl",
    "precision": "fp32",  # amended 2026-12-07 before the fp32 series' first run (docs/benchmarks.md)
    # Amended 2026-12-07 (fifth session), from ance onwards: a checkpoint every 5 steps, so a run cut by a
    # session's end resumes exactly instead of starting over. It changes no trained weight (exact resume).
    "checkpoint_every": 5,
}
ORDER = ["inbatch", "st-mnrl", "tasb", "bm25", "star", "star-adore", "gist", "ance", "ar2"]  # star before star-adore


def key(arm: str, lr: float | None, seed: int) -> str:
    return f"{arm}@lr={lr:g}/{seed}" if lr is not None else f"{arm}/{seed}"


def chosen_lr(results: dict, arm: str) -> float:
    """The grid point with the best dev nDCG@10 at the tuning seed (ties: the lower rate)."""
    scores = {lr: results[key(arm, lr, PROTOCOL["tuning_seed"])]["dev"]["ndcg@10"] for lr in PROTOCOL["grid"]}
    return max(sorted(scores), key=lambda lr: scores[lr])


def machine() -> str:
    """The bench runner's machine tag (CPU model, cores, top GEMM flag: a Zen 3 and a Zen 4 VM differ)."""
    import run_benchmarks

    return run_benchmarks.record_machine(os.cpu_count(), gemm=False)["tag"]


class Runner:
    def __init__(self, work: Path, results_path: Path):
        self.work = work
        self.path = results_path
        self.results = json.loads(self.path.read_text()) if self.path.exists() else {}
        here = {"precision": PROTOCOL["precision"], "dev_fraction": PROTOCOL["dev_fraction"]}
        begun = self.results.get("_setup")
        if begun and any(begun.get(k) != v for k, v in here.items()):
            raise SystemExit(f"{results_path} was begun with {begun}, the protocol now says {here}: results of "
                             "another protocol cannot be continued; pass another --results file")
        self.results.setdefault("_setup", {**here, "begun": time.strftime("%Y-%m-%d %H:%M")})
        self._written: set[str] = set()  # the keys this driver ran (the only ones its saves write)
        ab.DEV_FRACTION = PROTOCOL["dev_fraction"]
        ab.BF16 = PROTOCOL["precision"] == "bf16"  # training, the peer and every evaluation
        ab.CHECKPOINT_EVERY = PROTOCOL["checkpoint_every"]
        from retriever.resolve import resolve_model
        for model in (ab.MODEL, ab.GIST_GUIDE):  # fail now, not hours later at the gist arm
            resolve_model(model, require=True)
        _import_every_arms_code()
        self.train_examples, self.dev = ab.split()

    def save(self) -> None:
        """Merge this driver's results into the file under an exclusive lock: another driver on other arms
        may have saved since this one read it."""
        import fcntl

        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path.with_name(self.path.name + ".lock"), "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            on_disk = json.loads(self.path.read_text()) if self.path.exists() else {}
            mine = {k: self.results[k] for k in self._written}  # another driver's keys: as it saved them
            self.results = {"_setup": self.results["_setup"], **on_disk, **mine}
            write_text_atomic(self.path, json.dumps(self.results, indent=2) + "\n")

    def refresh(self) -> None:
        """Read the runs other drivers saved (the dev choices of arms this driver does not run)."""
        if self.path.exists():
            on_disk = json.loads(self.path.read_text())
            self.results = {**self.results, **on_disk, **{k: self.results[k] for k in self._written}}

    def chosen(self, arm: str) -> float:
        missing = [key(arm, lr, PROTOCOL["tuning_seed"]) for lr in PROTOCOL["grid"]
                   if key(arm, lr, PROTOCOL["tuning_seed"]) not in self.results]
        if missing:  # e.g. `--arms star-adore` before another driver has finished the star arm's dev runs
            raise SystemExit(f"{arm}'s dev choice is not made yet ({missing[0]} has not run): run that arm's "
                             "phase 1 first")
        return chosen_lr(self.results, arm)

    def run(self, arm: str, lr: float | None, seed: int, with_test: bool) -> dict:
        k = key(arm, lr, seed)
        done = self.results.get(k)
        if done is not None and ("test" in done or not with_test):
            return done
        star_lr = self.chosen("star") if arm == "star-adore" else None
        t0 = time.perf_counter()
        ab.RESUMED.clear()
        model_dir, seconds = ab.run_arm(arm, self.work / f"seed-{seed}", self.train_examples, seed, lr,
                                        PROTOCOL["epochs"].get(arm), star_lr)
        timing = {"train_s": seconds}
        if done is not None:  # trained in phase 1: keep that training time
            timing = {k: done[k] for k in ("train_s", "train_s_note") if k in done}
        elif ab.RESUMED:  # only the part after the last checkpoint was timed
            timing = {"train_s": None, "train_s_note": "resumed from a checkpoint or a final model of an earlier "
                      f"session ({', '.join(p.name for p in ab.RESUMED)}): training time not measured in one piece"}
        scores = ab.evaluate(model_dir, self.dev, with_test=with_test, per_query=with_test)
        if done is not None and "dev" in done:  # the dev score the choice was made on stays the record: a
            scores["dev"] = done["dev"]  # re-encoding on another CPU can differ in the last digits and flip a tie
        self._written.add(k)
        self.results[k] = {**scores, "arm": arm, "lr": lr, "star_lr": star_lr, "seed": seed, **timing,
                           "wall_s": time.perf_counter() - t0, "machine": machine(),
                           "finished": time.strftime("%Y-%m-%d %H:%M")}
        self.save()
        print(k, json.dumps({s: self.results[k][s] for s in ("dev", "test") if s in self.results[k]}), flush=True)
        return self.results[k]

    def phase_dev(self, arms: list[str] | None = None) -> None:
        for arm in _ordered(arms):
            for lr in PROTOCOL["grid"]:
                if arm == "star-adore":
                    self.refresh()  # its STAR stage takes the star arm's dev choice
                self.run(arm, lr, PROTOCOL["tuning_seed"], with_test=False)

    def phase_train_ahead(self, arms: list[str] | None = None) -> None:
        """Train the other seeds of every arm whose dev choice is made, scoring dev only, while other arms'
        phase 1 still runs (amendment of 2026-12-07, seventh session): phase 2 then only scores test. No
        test split is encoded or read here, so the test-once rule is untouched."""
        self.refresh()
        for arm in _ordered(arms):
            if any(key(arm, lr, PROTOCOL["tuning_seed"]) not in self.results for lr in PROTOCOL["grid"]):
                print(f"{arm}: dev choice not made yet, skipped", flush=True)
                continue
            for seed in PROTOCOL["seeds"]:
                self.run(arm, self.chosen(arm), seed, with_test=False)

    def phase_test(self, arms: list[str] | None = None) -> None:
        self.refresh()
        missing = [key(a, lr, PROTOCOL["tuning_seed"]) for a in ORDER for lr in PROTOCOL["grid"]
                   if key(a, lr, PROTOCOL["tuning_seed"]) not in self.results]
        if missing:
            raise SystemExit(f"phase 1 (dev) is not complete, {len(missing)} runs missing (first: {missing[0]}): "
                             "no test score before every choice is made")
        self.run("zero-shot", None, 0, with_test=True)  # the report's baseline: whichever driver comes first
        for arm in _ordered(arms):
            for seed in PROTOCOL["seeds"]:
                self.run(arm, self.chosen(arm), seed, with_test=True)


def _import_every_arms_code() -> None:
    """Import now what the arms import when they start: the driver runs for hours, and a module an arm first
    imports after the library was edited would be the new version next to old ones already loaded (on
    2026-12-07 the ance arm died so: mining.miner, new, imported a name the old retriever.offset_index lacked)."""
    import importlib

    for name in ("retriever.negatives", "retriever.negatives.ance", "retriever.negatives.ar2",
                 "retriever.negatives.adore", "retriever.negatives.gist", "retriever.negatives.star",
                 "retriever.negatives.tasb", "retriever.pipeline", "retriever.trainer", "retriever.ranker",
                 "retriever.ranker_train", "mining.miner", "mining.service", "mining.job", "index.bm25",
                 "index.encode", "index.faiss_index", "eval.beir", "eval.significance"):
        importlib.import_module(name)


def _ordered(arms: list[str] | None) -> list[str]:
    """``arms`` in protocol order (all of them by default); an unknown arm is refused."""
    unknown = sorted(set(arms or ()) - set(ORDER))
    if unknown:
        raise SystemExit(f"unknown arms {unknown}; the protocol's arms are {ORDER}")
    return [arm for arm in ORDER if arms is None or arm in arms]


def _train_seconds(runs: list[dict]) -> str:
    """Mean training seconds over the runs whose training was timed (``train_s`` null: trained by a driver
    that was stopped before saving the run, so its time was not measured; the count then says so)."""
    timed = [r["train_s"] for r in runs if r.get("train_s") is not None]
    if not timed:
        return "not measured"
    return f"{np.mean(timed):.0f}" + (f" (timed {len(timed)} of {len(runs)})" if len(timed) < len(runs) else "")


def report(results: dict) -> str:
    from eval.significance import compare_per_query

    def finals(arm):
        if arm == "zero-shot":
            return [results[key("zero-shot", None, 0)]]
        return [results[key(arm, chosen_lr(results, arm), s)] for s in PROTOCOL["seeds"]]

    def cell(runs, split, metric):
        values = [r[split][metric] for r in runs]
        return f"{values[0]:.4f}" if len(values) == 1 else f"{np.mean(values):.4f} ± {np.std(values, ddof=1):.4f}"

    setup = results["_setup"]
    machines = sorted({r["machine"] for k, r in results.items() if k != "_setup" and "machine" in r})
    lines = [f"Precision {setup['precision']}; begun {setup['begun']}; machines: {'; '.join(machines) or 'not recorded'} "
             "(train seconds compare only within one machine).", "",
             "| arm | dev-chosen lr (dev nDCG@10 at " + ", ".join(f"{g:g}" for g in PROTOCOL["grid"]) + ") | dev nDCG@10 | "
             "test nDCG@10 | test MRR@10 | test Recall@100 | train s (mean) |", "|---|---|---|---|---|---|---|"]
    per_query = {}
    for arm in ["zero-shot"] + ORDER:
        runs = finals(arm)
        if arm == "zero-shot":
            sweep = "—"
        else:
            sweep_scores = [results[key(arm, g, PROTOCOL["tuning_seed"])]["dev"]["ndcg@10"] for g in PROTOCOL["grid"]]
            sweep = f"{runs[0]['lr']:g} ({', '.join(f'{v:.4f}' for v in sweep_scores)})"
        lines.append(f"| {arm} | {sweep} | {cell(runs, 'dev', 'ndcg@10')} | {cell(runs, 'test', 'ndcg@10')} | "
                     f"{cell(runs, 'test', 'mrr@10')} | {cell(runs, 'test', 'recall@100')} | "
                     f"{_train_seconds(runs)} |")
        queries = runs[0]["test_per_query"].keys()
        per_query[arm] = {q: {"ndcg@10": float(np.mean([r["test_per_query"][q] for r in runs]))} for q in queries}
    ours = [a for a in ORDER if a != PROTOCOL["peer"]]
    best = max(ours, key=lambda a: np.mean([r["dev"]["ndcg@10"] for r in finals(a)]))
    lines += ["", "Paired tests on test nDCG@10, per query (averaged over the seeds), against the peer:", "",
              "| system | peer | system | delta | p (randomization) | p (t-test) | queries |", "|---|---|---|---|---|---|---|"]
    for arm, why in ((best, "negatron's best on dev"), ("inbatch", "negatron in-batch")):
        c = compare_per_query(per_query[PROTOCOL["peer"]], per_query[arm])
        lines.append(f"| {arm} ({why}) | {c['baseline']:.4f} | {c['system']:.4f} | {c['delta']:+.4f} | "
                     f"{c['p_randomization']:.4f} | {c['p_ttest']:.4f} | {c['n']} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, default=ab.ROOT / "runs" / "ablation-protocol")
    parser.add_argument("--results", type=Path, default=ab.ROOT / "bench" / "results" / "ablation-protocol" / "results.json",
                        help="every finished run, kept under version control so the protocol spans sessions")
    parser.add_argument("--phase", choices=["dev", "train-ahead", "test", "report", "all"], default="all",
                        help="train-ahead: train the other seeds of arms whose dev choice is made (dev scored only)")
    parser.add_argument("--output", type=Path, default=ab.ROOT / "bench" / "results" / "ablation_protocol.md")
    parser.add_argument("--arms", nargs="+", default=None, choices=ORDER,
                        help="run only these arms (another driver may run the others at the same time)")
    args = parser.parse_args()
    os.environ.setdefault("NEGATRON_ENCODE_BACKEND", "torch")  # every arm's evaluation through the same encoder
    args.work.mkdir(parents=True, exist_ok=True)
    runner = Runner(args.work, args.results)
    if args.phase in ("dev", "all"):
        runner.phase_dev(args.arms)
    if args.phase == "train-ahead":
        runner.phase_train_ahead(args.arms)
    if args.phase in ("test", "all"):
        runner.phase_test(args.arms)
    if args.phase in ("report", "all"):
        runner.refresh()
        text = report(runner.results)
        args.output.parent.mkdir(parents=True, exist_ok=True)
        write_text_atomic(args.output, text)
        print(text)


if __name__ == "__main__":
    main()
