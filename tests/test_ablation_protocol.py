"""bench/ablation_protocol.py carries out issue #12's clean protocol: choices on dev only, test scored only
after every choice is made, the report's picks and paired tests computed from the recorded results."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))

import ablation_protocol as ap  # noqa: E402

QUERIES = [f"q{i}" for i in range(30)]


def _results(best_lr: dict[str, float], test_boost: dict[str, float]) -> dict:
    """Phase-1 and phase-2 results in the driver's layout: each arm's dev score peaks at ``best_lr``;
    its per-query test scores are a shared base plus ``test_boost`` plus a little per-seed noise."""
    rng = np.random.default_rng(0)
    base = rng.uniform(0.3, 0.9, len(QUERIES))
    results = {"_setup": {"precision": "fp32", "dev_fraction": 0.2, "begun": "then"}}

    def entry(arm, lr, seed, dev, with_test):
        row = {"dev": {"ndcg@10": dev}, "arm": arm, "lr": lr, "seed": seed, "train_s": 10.0, "machine": "cpu x"}
        if with_test:
            values = np.clip(base + test_boost.get(arm, 0.0) + rng.normal(0, 0.01, len(QUERIES)), 0, 1)
            row["test_per_query"] = dict(zip(QUERIES, values.tolist()))
            row["test"] = {"ndcg@10": float(values.mean()), "mrr@10": 0.5, "recall@100": 0.9}
        return row

    results[ap.key("zero-shot", None, 0)] = entry("zero-shot", None, 0, 0.60, True)
    for arm in ap.ORDER:
        for lr in ap.PROTOCOL["grid"]:
            dev = 0.70 - (0.0 if lr == best_lr[arm] else 0.02) + (0.01 if arm == "star-adore" else 0.0)
            results[ap.key(arm, lr, 42)] = entry(arm, lr, 42, dev, True)
        for seed in ap.PROTOCOL["seeds"][1:]:
            dev = 0.70 + (0.01 if arm == "star-adore" else 0.0)
            results[ap.key(arm, best_lr[arm], seed)] = entry(arm, best_lr[arm], seed, dev, True)
    return results


def test_the_report_uses_each_arms_dev_choice_and_tests_the_best_arm_against_the_peer():
    grid = ap.PROTOCOL["grid"]
    best_lr = {arm: grid[i % len(grid)] for i, arm in enumerate(ap.ORDER)}
    results = _results(best_lr, {"star-adore": 0.05})
    for seed in ap.PROTOCOL["seeds"]:  # the peer best on dev: the best of negatron's arms is still tested
        results[ap.key("st-mnrl", best_lr["st-mnrl"], seed)]["dev"]["ndcg@10"] = 0.9
    text = ap.report(results)
    rows = {line.split(" | ")[0].lstrip("| "): line for line in text.splitlines() if line.startswith("| ")}
    for arm in ap.ORDER:
        assert rows[arm].split(" | ")[1].startswith(f"{best_lr[arm]:g} ("), rows[arm]
    best = rows["star-adore (negatron's best on dev)"].split(" | ")
    peer, system, delta, p_randomization = (float(x) for x in best[1:5])
    assert system == pytest.approx(peer + 0.05, abs=0.01) and delta == pytest.approx(system - peer, abs=1e-4)
    assert p_randomization < 0.01  # a 0.05 gain on every query is significant
    assert "inbatch (negatron in-batch)" in rows


def test_ties_on_dev_choose_the_lower_rate():
    runner = ap.Runner.__new__(ap.Runner)
    runner.results = {ap.key("inbatch", lr, 42): {"dev": {"ndcg@10": 0.7}} for lr in ap.PROTOCOL["grid"]}
    assert runner.chosen("inbatch") == min(ap.PROTOCOL["grid"])


def test_test_is_not_scored_before_every_dev_choice_is_made():
    runner = ap.Runner.__new__(ap.Runner)
    grid = ap.PROTOCOL["grid"]
    runner.results = {ap.key(arm, lr, 42): {"dev": {"ndcg@10": 0.7}} for arm in ap.ORDER for lr in grid}
    del runner.results[ap.key("ar2", grid[-1], 42)]
    runner.path, runner._written = Path("/nonexistent/results.json"), set()
    runner.run = lambda *a, **k: pytest.fail("a run started before phase 1 was complete")
    with pytest.raises(SystemExit, match="phase 1 .* not complete, 1 runs missing"):
        runner.phase_test()


def test_results_of_another_precision_are_not_continued(tmp_path):
    path = tmp_path / "results.json"
    path.write_text('{"_setup": {"precision": "bf16", "dev_fraction": 0.2, "begun": "then"}}')
    with pytest.raises(SystemExit, match="begun with .*bf16.* another --results file"):
        ap.Runner(tmp_path / "work", path)


def test_two_drivers_on_other_arms_never_overwrite_each_other(tmp_path, monkeypatch):
    """`--arms` splits the runs between drivers; each save merges its own runs into the file, so a driver
    holding an older copy of another driver's run does not write it back."""
    path = tmp_path / "results.json"

    def driver():
        runner = ap.Runner.__new__(ap.Runner)
        runner.path, runner._written = path, set()
        runner.results = json.loads(path.read_text()) if path.exists() else {"_setup": {"precision": "fp32"}}
        return runner

    a, b = driver(), driver()
    for runner, k, value in ((a, "inbatch@lr=1e-4/42", 1), (b, "star@lr=1e-4/42", 2)):
        runner.results[k] = {"dev": value}
        runner._written.add(k)
        runner.save()
    c = driver()  # reads both, then b adds the star run's test score
    b.results["star@lr=1e-4/42"] = {"dev": 2, "test": 3}
    b.save()
    c.results["gist@lr=1e-4/42"] = {"dev": 4}
    c._written.add("gist@lr=1e-4/42")
    c.save()
    saved = json.loads(path.read_text())
    assert saved["star@lr=1e-4/42"] == {"dev": 2, "test": 3} and saved["inbatch@lr=1e-4/42"] == {"dev": 1}
    assert saved["gist@lr=1e-4/42"] == {"dev": 4} and saved["_setup"] == {"precision": "fp32"}
    assert ap._ordered(["ance", "inbatch"]) == ["inbatch", "ance"]
    with pytest.raises(SystemExit, match="unknown arms"):
        ap._ordered(["nope"])


def test_untimed_training_is_left_out_of_the_mean_and_said():
    runs = [{"train_s": 100.0}, {"train_s": None}, {"train_s": 200.0}]
    assert ap._train_seconds(runs) == "150 (timed 2 of 3)"
    assert ap._train_seconds([{"train_s": 10.0}]) == "10" and ap._train_seconds([{"train_s": None}]) == "not measured"


def test_a_run_resumed_from_a_checkpoint_keeps_its_score_but_not_a_partial_training_time(tmp_path, monkeypatch):
    """Runs checkpoint every few steps, so one cut by a session's end resumes; the time measured after the
    resume is only part of its training, so it is recorded as not measured, with the reason."""
    import ablation_scifact as ab
    import retriever.trainer

    calls = []
    monkeypatch.setattr(retriever.trainer, "train", lambda cfg, out, resume: calls.append(resume) or out / "final")
    monkeypatch.setattr(ab, "RESUMED", [])
    fresh, cut = tmp_path / "fresh", tmp_path / "cut"
    (cut / "checkpoints" / "step-0000005").mkdir(parents=True)
    (cut / "checkpoints" / "step-0000005" / "position.json").write_text("{}")
    import retriever.config

    monkeypatch.setattr(retriever.config.TrainConfig, "model_validate", staticmethod(lambda cfg: cfg))
    ab.train({}, fresh)
    assert ab.RESUMED == []
    ab.train({}, cut)
    assert ab.RESUMED == [cut] and calls == [False, True]
    finished = tmp_path / "finished"  # trained to its final model by a driver killed before scoring it
    (finished / "final").mkdir(parents=True)
    assert ab.train({}, finished) == finished / "final"
    assert ab.RESUMED == [cut, finished] and calls == [False, True]

    runner = ap.Runner.__new__(ap.Runner)
    runner.path, runner._written, runner.work = tmp_path / "results.json", set(), tmp_path
    runner.results, runner.train_examples, runner.dev = {"_setup": {"precision": "fp32"}}, [], []

    def run_arm(arm, work, examples, seed, lr, epochs, star_lr):
        if arm == "ance":
            ab.RESUMED.append(work / "ance@lr=3e-05,epochs=2")
        return "model", 123.0

    monkeypatch.setattr(ab, "run_arm", run_arm)
    monkeypatch.setattr(ab, "evaluate", lambda *a, **k: {"dev": {"ndcg@10": 0.7}})
    monkeypatch.setattr(ap, "machine", lambda: "cpu x")
    resumed = runner.run("ance", 3e-5, 42, with_test=False)
    assert resumed["train_s"] is None and "resumed from a checkpoint" in resumed["train_s_note"]
    assert resumed["dev"] == {"ndcg@10": 0.7}
    whole = runner.run("ar2", 3e-5, 42, with_test=False)
    assert whole["train_s"] == 123.0 and "train_s_note" not in whole
    monkeypatch.setattr(ab, "CHECKPOINT_EVERY", None)  # a Runner made by another test sets it
    assert ap.PROTOCOL["checkpoint_every"] and ab.base_config("inbatch", 42)["training"].get("save_every") is None
    monkeypatch.setattr(ab, "CHECKPOINT_EVERY", ap.PROTOCOL["checkpoint_every"])
    assert ab.base_config("inbatch", 42)["training"]["save_every"] == ap.PROTOCOL["checkpoint_every"]


def test_training_ahead_scores_no_test_and_phase_two_keeps_its_training_time(tmp_path, monkeypatch):
    """`--phase train-ahead` trains the other seeds of the arms whose dev choice is made, scoring dev only;
    phase 2 then scores test for those models and keeps the training time measured ahead."""
    import ablation_scifact as ab

    grid = ap.PROTOCOL["grid"]
    runner = ap.Runner.__new__(ap.Runner)
    runner.path, runner._written, runner.work = tmp_path / "results.json", set(), tmp_path
    runner.train_examples, runner.dev = [], []
    runner.results = {"_setup": {"precision": "fp32"}}
    for arm in ap.ORDER:
        for lr in grid:
            if not (arm == "ar2" and lr == grid[-1]):  # ar2's dev sweep is still running
                runner.results[ap.key(arm, lr, 42)] = {"dev": {"ndcg@10": 0.7 + (0.01 if lr == grid[1] else 0)},
                                                       "train_s": 5.0}
    runner.path.write_text(json.dumps(runner.results))  # as phase 1's drivers saved it
    trained, scored = [], []

    def run_arm(arm, work, examples, seed, lr, epochs, star_lr):
        if (arm, seed) in trained:
            ab.RESUMED.append(work / arm)  # the final model is there: nothing trains again
        trained.append((arm, seed))
        return "model", 100.0 + seed

    def evaluate(model_dir, dev, with_test, per_query):
        scored.append(with_test)
        return {"dev": {"ndcg@10": 0.7}, **({"test": {"ndcg@10": 0.6}} if with_test else {})}

    monkeypatch.setattr(ab, "run_arm", run_arm)
    monkeypatch.setattr(ab, "evaluate", evaluate)
    monkeypatch.setattr(ap, "machine", lambda: "cpu x")
    runner.phase_train_ahead(["star", "ar2"])
    assert trained == [("star", 43), ("star", 44)] and scored == [False, False]  # seed 42 ran in phase 1; ar2 waits
    ahead = runner.results[ap.key("star", grid[1], 43)]
    assert "test" not in ahead and ahead["train_s"] == 143.0
    saved = json.loads(runner.path.read_text())
    saved[ap.key("ar2", grid[-1], 42)] = {"dev": {"ndcg@10": 0.6}, "train_s": 5.0}  # ar2's driver finished
    runner.path.write_text(json.dumps(saved))
    monkeypatch.setattr(ab, "RESUMED", [])
    runner.phase_test(["star"])
    assert scored[2:] == [True, True, True, True] and trained[2:] == [("zero-shot", 0), ("star", 42), ("star", 43), ("star", 44)]
    done = runner.results[ap.key("star", grid[1], 43)]
    assert done["test"] == {"ndcg@10": 0.6} and done["train_s"] == 143.0 and "train_s_note" not in done
    phase_one = runner.results[ap.key("star", grid[1], 42)]
    assert phase_one["train_s"] == 5.0  # phase 1's time, not the re-score's
    assert phase_one["dev"] == {"ndcg@10": 0.71}  # the score the choice was made on: a re-score cannot flip it
