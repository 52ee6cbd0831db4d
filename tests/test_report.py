import json
import shutil
import subprocess

import numpy as np
import pytest
from typer.testing import CliRunner

from _eval_data import write_toy_beir


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Two eval output folders (two random tiny models on two toy datasets) and a training run folder."""
    from eval.beir import evaluate_beir
    from retriever.modeling import BiEncoder
    from retriever.testing import build_tiny_model

    root = tmp_path_factory.mktemp("report-runs")
    data = [write_toy_beir(root / "data" / name) for name in ("toy-a", "toy-b")]
    outs = []
    for seed in (0, 3):
        model = BiEncoder.from_pretrained(build_tiny_model(root / f"model{seed}", seed=seed))
        out = root / f"model-seed{seed}"
        for folder in data:
            evaluate_beir(model, folder, output_dir=out, k=10, bf16=False)
        outs.append(out)
    train = root / "train-run"
    (train / "eval").mkdir(parents=True)
    shutil.copytree(outs[1] / "toy-a", train / "eval" / "toy-a")
    rng = np.random.default_rng(0)
    lines = [{"step": s, "loss": float(2.5 * np.exp(-s / 40) + 0.1 * rng.random()), "lr": 2e-5, "pairs_per_s": 30.0}
             for s in range(0, 200, 5)]
    lines += [{"step": s, "eval": {"toy-a": {"ndcg@10": 0.3 + s / 1000}}} for s in (50, 100, 150)]
    (train / "train_log.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines) + '{"step": 19')
    return outs + [train]


def test_report_contents(runs, tmp_path):
    from eval.report import write_report

    html_path = write_report(runs, tmp_path, names=["base", "other", "trained"])
    page = html_path.read_text()
    md = (tmp_path / "report.md").read_text()
    scores = {name: json.loads((run / "toy-a" / "metrics.json").read_text())["metrics"]["ndcg@10"]
              for name, run in zip(("base", "other"), runs[:2])}
    best = max(scores.values())
    assert f"**{best:.4f}**" in md and f"<b>{best:.4f}</b>" in page
    assert "| base |" in md and "| trained |" in md and "toy-b" in md
    assert "p (randomisation)" in page and "p (t-test)" in page
    compared = json.loads((tmp_path / "comparisons.json").read_text())
    assert {(c["system"], c["dataset"]) for c in compared} == {("other", "toy-a"), ("other", "toy-b"),
                                                               ("trained", "toy-a")}
    same = next(c for c in compared if c["system"] == "trained")  # a copy of "other"'s toy-a output
    other = next(c for c in compared if c["system"] == "other" and c["dataset"] == "toy-a")
    assert same["delta"] == pytest.approx(other["delta"]) and same["n"] == 5
    for name in ("datasets.png", "loss.png", "eval_curves.png"):
        png = tmp_path / "plots" / name
        assert png.stat().st_size > 5_000 and f"plots/{name}" in page and f"plots/{name}" in md


def test_report_cli_and_bad_folder(runs, tmp_path):
    from retriever.cli import _register_all, app

    _register_all()
    ok = CliRunner().invoke(app, ["report", str(runs[0]), str(runs[1]), "--output", str(tmp_path / "r")])
    assert ok.exit_code == 0, ok.output and (tmp_path / "r" / "index.html").exists()
    (tmp_path / "empty").mkdir()
    bad = CliRunner().invoke(app, ["report", str(tmp_path / "empty"), "--output", str(tmp_path / "r2")])
    assert bad.exit_code == 2 and "no metrics.json" in " ".join(bad.output.replace("│", " ").split())


def test_significance_tests():
    from scipy.stats import ttest_rel

    from eval.significance import compare_per_query, paired_randomization_test, paired_t_test

    rng = np.random.default_rng(0)
    a = rng.random(200)
    b = np.clip(a + 0.08 + rng.normal(0, 0.1, 200), 0, 1)
    assert paired_randomization_test(b, a) < 0.001 and paired_t_test(b, a) == pytest.approx(ttest_rel(b, a).pvalue)
    assert paired_randomization_test(a, a) == 1.0 and paired_t_test(a, a) == 1.0
    noise = a + rng.normal(0, 0.1, 200)
    assert paired_randomization_test(noise, a) > 0.05
    result = compare_per_query({str(i): {"ndcg@10": v} for i, v in enumerate(a)},
                               {str(i): {"ndcg@10": v} for i, v in enumerate(b)})
    assert result["n"] == 200 and result["delta"] == pytest.approx(b.mean() - a.mean())


def _chromium():
    return shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")


def test_report_renders_in_a_browser(runs, tmp_path):
    """What a person sees: Chromium renders the page with its table and charts (not a blank page)."""
    browser = _chromium()
    if browser is None:
        pytest.skip("no Chromium on this machine (make browser installs it)")
    from PIL import Image

    from eval.report import write_report

    html_path = write_report(runs, tmp_path / "report", names=["base", "other", "trained"])
    shot = tmp_path / "screenshot.png"
    cmd = [browser, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
           "--disable-background-networking", "--disable-component-update", "--disable-sync",
           "--hide-scrollbars", f"--user-data-dir={tmp_path / 'profile'}", f"--screenshot={shot}",
           "--window-size=1280,2000", html_path.resolve().as_uri()]
    subprocess.run(cmd, check=True, capture_output=True, timeout=120)
    image = np.asarray(Image.open(shot).convert("RGB")).astype(np.float64)
    assert image.shape[:2] == (2000, 1280)
    non_white = (image.min(axis=2) < 235).mean()
    coloured = (image.max(axis=2) - image.min(axis=2) > 60).mean()  # chart bars and curves
    assert image.std() > 20 and non_white > 0.03 and coloured > 0.005, (image.std(), non_white, coloured)
    shutil.copy(shot, html_path.parent / "screenshot.png")  # kept beside the report for a look
