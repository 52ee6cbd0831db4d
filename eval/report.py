"""`negatron report`: a static HTML page and a Markdown file comparing runs.

A run folder is either an evaluation output (``<dataset>/metrics.json`` + ``per_query.jsonl``,
at any depth) or a training run (``train_log.jsonl``, ``checkpoint_eval.jsonl`` and an ``eval/``
folder). The report has a BEIR-style table (runs × datasets, best per column in bold), per-dataset
bar charts, loss and metric-vs-step curves, and paired significance tests of each run against the
first one.
"""

from __future__ import annotations

import datetime as _dt
import html
import json
import logging
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

from eval.significance import compare_per_query

logger = logging.getLogger(__name__)
SKIP_DIRS = {"best", "checkpoints"}  # copies of a checkpoint's evaluation, not the run's final one


@dataclass
class RunData:
    name: str
    path: Path
    results: dict[str, dict] = field(default_factory=dict)  # dataset -> metrics.json dict
    per_query_files: dict[str, Path] = field(default_factory=dict)
    train_log: list[dict] = field(default_factory=list)
    eval_log: list[dict] = field(default_factory=list)  # {"step", "eval": {dataset: {metric: value}}}


def _read_jsonl(path: Path) -> list[dict]:
    rows = []
    with open(path, encoding="utf-8") as fh:
        for lineno, line in enumerate(fh, start=1):
            if not line.strip():
                continue
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                logger.warning("%s:%d: skipping a malformed line (a run still being written?)", path, lineno)
    return rows


def load_run(path, name: str | None = None) -> RunData:
    """Collect a run folder's evaluation results and training logs."""
    from retriever.data import DataError

    path = Path(path)
    if not path.is_dir():
        raise DataError(path, None, "run folder not found", "pass an eval output folder or a training run folder")
    run = RunData(name or path.name, path)
    found = []
    for metrics_file in sorted(path.rglob("metrics.json")):
        rel = metrics_file.relative_to(path).parts
        if any(part in SKIP_DIRS or part.startswith(("step-", "checkpoint-", ".")) for part in rel[:-1]):
            continue
        found.append(metrics_file)
    for metrics_file in found:  # shallower files win: a run's final evaluation over nested copies
        try:
            result = json.loads(metrics_file.read_text())
            dataset = result["dataset"]
            result["metrics"]
        except (json.JSONDecodeError, KeyError) as exc:
            raise DataError(metrics_file, None, f"not a negatron metrics.json ({exc})",
                            "re-run `negatron eval beir` to rewrite it") from None
        previous = run.results.get(dataset)
        if previous is None or len(metrics_file.parts) < len(Path(previous["_path"]).parts):
            result["_path"] = str(metrics_file)
            run.results[dataset] = result
            per_query = metrics_file.with_name("per_query.jsonl")
            if per_query.exists():
                run.per_query_files[dataset] = per_query
            else:
                run.per_query_files.pop(dataset, None)
    log = path / "train_log.jsonl"
    if log.exists():
        for row in _read_jsonl(log):
            if isinstance(row.get("eval"), dict):
                run.eval_log.append(row)
            if "loss" in row and "step" in row:
                run.train_log.append(row)
    checkpoint_log = path / "checkpoint_eval.jsonl"
    if checkpoint_log.exists():
        logged = {row["step"] for row in run.eval_log if "step" in row}
        run.eval_log += [row for row in _read_jsonl(checkpoint_log) if row.get("step") not in logged]
    run.eval_log.sort(key=lambda row: row.get("step", 0))
    if not run.results and not run.train_log and not run.eval_log:
        raise DataError(path, None, "no metrics.json, train_log.jsonl or checkpoint_eval.jsonl found",
                        "pass a folder written by `negatron eval` or by training")
    return run


def _unique_names(paths: Sequence[Path]) -> list[str]:
    names = [p.name for p in paths]
    if len(set(names)) == len(names):
        return names
    return [f"{p.parent.name}/{p.name}" for p in paths]


def _per_query(path: Path) -> dict[str, dict[str, float]]:
    return {str(row.pop("query_id")): row for row in _read_jsonl(path)}


def _fmt(value) -> str:
    return "" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.4f}"


def _fmt_p(p) -> str:
    return "" if p is None else ("<0.0001" if p < 1e-4 else f"{p:.4f}")


# ---------------------------------------------------------------------- tables
def results_matrix(runs: Sequence[RunData], metric: str) -> tuple[list[str], list[list[float | None]]]:
    datasets = sorted({d for run in runs for d in run.results})
    rows = [[run.results[d]["metrics"].get(metric) if d in run.results else None for d in datasets] for run in runs]
    return datasets, rows


def _best_per_column(rows: list[list[float | None]]) -> list[float | None]:
    columns = list(zip(*rows)) if rows else []
    return [max((v for v in col if v is not None), default=None) for col in columns]


def _with_average(datasets, rows):
    if len(datasets) < 2:
        return datasets, rows
    averaged = [row + [sum(row) / len(row) if all(v is not None for v in row) else None] for row in rows]
    return datasets + ["average"], averaged


def markdown_table(runs: Sequence[RunData], metric: str) -> str:
    datasets, rows = _with_average(*results_matrix(runs, metric))
    best = _best_per_column(rows)
    lines = ["| run | " + " | ".join(datasets) + " |", "|---|" + "---:|" * len(datasets)]
    for run, row in zip(runs, rows):
        cells = [(f"**{_fmt(v)}**" if v is not None and v == b and len(runs) > 1 else _fmt(v)) for v, b in zip(row, best)]
        lines.append(f"| {run.name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def html_table(runs: Sequence[RunData], metric: str) -> str:
    datasets, rows = _with_average(*results_matrix(runs, metric))
    best = _best_per_column(rows)
    head = "".join(f"<th>{html.escape(d)}</th>" for d in datasets)
    body = []
    for run, row in zip(runs, rows):
        cells = "".join(f'<td class="best"><b>{_fmt(v)}</b></td>' if v is not None and v == b and len(runs) > 1
                        else f"<td>{_fmt(v)}</td>" for v, b in zip(row, best))
        body.append(f"<tr><td>{html.escape(run.name)}</td>{cells}</tr>")
    return f"<div class=\"wide\"><table><tr><th>run</th>{head}</tr>{''.join(body)}</table></div>"


def _details_rows(runs: Sequence[RunData]) -> list[tuple[str, str, dict]]:
    return [(run.name, d, run.results[d]) for run in runs for d in sorted(run.results)]


def html_details(runs: Sequence[RunData]) -> str:
    rows = _details_rows(runs)
    if not rows:
        return ""
    metrics = []
    for _, _, r in rows:
        metrics += [m for m in r["metrics"] if m not in metrics]
    head = "".join(f"<th>{html.escape(m)}</th>" for m in metrics)
    body = "".join(
        f"<tr><td>{html.escape(name)}</td><td>{html.escape(d)}</td>"
        + "".join(f"<td>{_fmt(r['metrics'].get(m))}</td>" for m in metrics)
        + f"<td>{r.get('num_queries', '')}</td><td>{r.get('num_docs', '')}</td></tr>" for name, d, r in rows)
    return (f"<h2>All metrics</h2><div class=\"wide\"><table><tr><th>run</th><th>dataset</th>{head}<th>queries</th>"
            f"<th>docs</th></tr>{body}</table></div>")


# ---------------------------------------------------------------------- plots
def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_datasets(runs: Sequence[RunData], metric: str, path: Path) -> Path | None:
    datasets, rows = results_matrix(runs, metric)
    if not datasets:
        return None
    plt = _plt()
    cols = min(3, len(datasets))
    nrows = math.ceil(len(datasets) / cols)
    fig, axes = plt.subplots(nrows, cols, figsize=(4.2 * cols, 3.2 * nrows), squeeze=False)
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for i, dataset in enumerate(datasets):
        ax = axes[i // cols][i % cols]
        values = [row[i] if row[i] is not None else 0.0 for row in rows]
        bars = ax.bar(range(len(runs)), values, color=[colors[j % len(colors)] for j in range(len(runs))])
        ax.bar_label(bars, labels=[_fmt(row[i]) for row in rows], fontsize=8, padding=2)
        ax.set_title(dataset)
        ax.set_xticks(range(len(runs)), [run.name for run in runs], rotation=20, ha="right", fontsize=8)
        ax.set_ylabel(metric)
        ax.set_ylim(0, max(1e-9, max(values)) * 1.18)
    for j in range(len(datasets), nrows * cols):
        axes[j // cols][j % cols].axis("off")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_loss(runs: Sequence[RunData], path: Path) -> Path | None:
    with_loss = [run for run in runs if run.train_log]
    if not with_loss:
        return None
    plt = _plt()
    fig, ax = plt.subplots(figsize=(8, 3.6))
    for run in with_loss:
        steps = [row["step"] for row in run.train_log]
        ax.plot(steps, [row["loss"] for row in run.train_log], label=run.name, linewidth=1.2)
    ax.set_xlabel("step")
    ax.set_ylabel("training loss")
    ax.grid(alpha=.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_eval_curves(runs: Sequence[RunData], metric: str, path: Path) -> Path | None:
    series = []
    for run in runs:
        datasets = sorted({d for row in run.eval_log for d in row["eval"]})
        for dataset in datasets:
            points = [(row["step"], row["eval"][dataset][metric]) for row in run.eval_log
                      if metric in row["eval"].get(dataset, {})]
            if points:
                series.append((f"{run.name} · {dataset}", points))
    if not series:
        return None
    plt = _plt()
    fig, ax = plt.subplots(figsize=(8, 3.6))
    for label, points in series:
        ax.plot([p[0] for p in points], [p[1] for p in points], marker="o", label=label, linewidth=1.2)
    ax.set_xlabel("step")
    ax.set_ylabel(metric)
    ax.grid(alpha=.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


# ---------------------------------------------------------------------- significance
def comparisons(runs: Sequence[RunData], metric: str) -> list[dict]:
    """Each run after the first against the first, per shared dataset with per-query scores."""
    if len(runs) < 2:
        return []
    baseline = runs[0]
    out = []
    for system in runs[1:]:
        for dataset in sorted(set(baseline.per_query_files) & set(system.per_query_files)):
            stats = compare_per_query(_per_query(baseline.per_query_files[dataset]),
                                      _per_query(system.per_query_files[dataset]), metric)
            stats["baseline_score"], stats["system_score"] = stats.pop("baseline"), stats.pop("system")
            out.append({"baseline": baseline.name, "system": system.name, "dataset": dataset, **stats})
    return out


def _comparison_html(rows: list[dict], metric: str) -> str:
    if not rows:
        return ""
    body = "".join(
        f"<tr><td>{html.escape(r['dataset'])}</td><td>{html.escape(r['baseline'])}</td><td>{html.escape(r['system'])}</td>"
        f"<td>{r['n']}</td><td>{_fmt(r['baseline_score'])}</td>"
        f"<td>{_fmt(r['system_score'])}</td><td>{r['delta']:+.4f}</td>"
        f"<td{' class=sig' if (r['p_randomization'] or 1) < 0.05 else ''}>{_fmt_p(r['p_randomization'])}</td>"
        f"<td{' class=sig' if (r['p_ttest'] or 1) < 0.05 else ''}>{_fmt_p(r['p_ttest'])}</td></tr>"
        for r in rows if r["n"])
    return ("<h2>Paired significance tests</h2><p class=\"note\">Per-query scores on the queries both runs "
            "scored; two-sided p-values of a paired randomisation test (10,000 sign flips) and a paired t-test "
            "(scipy.stats.ttest_rel). Bold: p &lt; 0.05.</p><table><tr><th>dataset</th><th>baseline run</th>"
            f"<th>system run</th><th>queries</th><th>{html.escape(metric)} baseline</th><th>{html.escape(metric)} system</th>"
            f"<th>Δ</th><th>p (randomisation)</th><th>p (t-test)</th></tr>{body}</table>")


def _comparison_md(rows: list[dict], metric: str) -> str:
    if not rows:
        return ""
    lines = ["## Paired significance tests", "",
             "Two-sided p-values over per-query scores: paired randomisation test (10,000 sign flips) and paired "
             "t-test (scipy.stats.ttest_rel).", "",
             f"| dataset | baseline run | system run | queries | {metric} baseline | {metric} system | Δ | "
             "p (randomisation) | p (t-test) |",
             "|---|---|---|---:|---:|---:|---:|---:|---:|"]
    lines += [f"| {r['dataset']} | {r['baseline']} | {r['system']} | {r['n']} | {_fmt(r['baseline_score'])} | "
              f"{_fmt(r['system_score'])} | {r['delta']:+.4f} | {_fmt_p(r['p_randomization'])} | {_fmt_p(r['p_ttest'])} |"
              for r in rows if r["n"]]
    return "\n".join(lines)


# ---------------------------------------------------------------------- driver
def write_report(run_dirs: Sequence, output_dir, names: Sequence[str] | None = None, metric: str = "ndcg@10") -> Path:
    """Write ``index.html``, ``report.md``, ``comparisons.json`` and ``plots/*.png`` to ``output_dir``;
    return the HTML path."""
    from eval.metrics import parse_metric
    from eval.report_template import PAGE
    from retriever.io import write_text_atomic

    parse_metric(metric)
    paths = [Path(p) for p in run_dirs]
    if not paths:
        raise ValueError("give at least one run folder")
    labels = list(names) if names else _unique_names(paths)
    runs = [load_run(p, n) for p, n in zip(paths, labels)]
    out = Path(output_dir)
    plots = out / "plots"
    plots.mkdir(parents=True, exist_ok=True)

    charts = [("Per-dataset scores", plot_datasets(runs, metric, plots / "datasets.png")),
              ("Training loss", plot_loss(runs, plots / "loss.png")),
              (f"Checkpoint {metric} by step", plot_eval_curves(runs, metric, plots / "eval_curves.png"))]
    charts = [(title, p) for title, p in charts if p is not None]
    compared = comparisons(runs, metric)

    stamp = _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    subtitle = f"{len(runs)} run(s): " + ", ".join(f"{html.escape(r.name)} ({html.escape(str(r.path))})" for r in runs)
    figure_html = "".join(f"<h2>{html.escape(title)}</h2><img src=\"plots/{p.name}\" alt=\"{html.escape(title)}\">"
                          for title, p in charts)
    page = PAGE.substitute(
        title="negatron report", subtitle=f"{subtitle} — generated {stamp}", metric=html.escape(metric),
        main_table=html_table(runs, metric) if any(r.results for r in runs) else "<p>No evaluation results found.</p>",
        runs_table=html_details(runs), charts=figure_html, comparisons=_comparison_html(compared, metric))
    html_path = out / "index.html"
    write_text_atomic(html_path, page)

    md = ["# negatron report", "", f"Generated {stamp}. Runs: " + ", ".join(f"`{r.name}` ({r.path})" for r in runs), "",
          f"## Results ({metric})", "", "Best per column in bold.", "", markdown_table(runs, metric), ""]
    md += [f"## {title}\n\n![{title}](plots/{p.name})\n" for title, p in charts]
    md += [_comparison_md(compared, metric), ""]
    write_text_atomic(out / "report.md", "\n".join(md))
    write_text_atomic(out / "comparisons.json", json.dumps(compared, indent=2) + "\n")
    return html_path

