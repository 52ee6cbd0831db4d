"""Commands contributed by the ``retriever`` package (``register(app)`` is called by retriever.cli)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import List, Optional

import typer


def train_command(
    config: Path = typer.Option(..., "--config", help="training config YAML (see configs/)"),
    output: Path = typer.Option(..., "--output", help="run folder: checkpoints, logs, final model"),
    overrides: Optional[List[str]] = typer.Option(None, "--set", help="override a config key: section.key=value"),
    resume: bool = typer.Option(False, "--resume", help="continue from the newest checkpoint in --output"),
) -> None:
    """Train a bi-encoder from a YAML config (torchrun-aware)."""
    from retriever.config import ConfigError, load_config
    from retriever.data import DataError

    try:
        from retriever.pipeline import is_pipeline, run_pipeline

        if is_pipeline(config):  # a `pipeline:` file: stages run in order, each from the previous model
            final = run_pipeline(config, output, overrides or [], resume=resume)
        else:
            cfg = load_config(config, overrides or [])
            from retriever.trainer import train

            final = train(cfg, output, resume=resume)
    except (ConfigError, DataError, ValueError, OSError) as exc:
        typer.secho(f"error: {exc}", fg=typer.colors.RED, err=True)
        raise typer.Exit(2) from None
    if os.environ.get("RANK", "0") == "0":  # one line under torchrun, not one per process
        typer.echo(f"final model: {final}")


def quickstart_command(
    data: Optional[Path] = typer.Option(None, "--data", help="a BEIR folder instead of the built-in stdlib task"),
    output: Path = typer.Option(Path("runs/quickstart"), "--output", help="run folder: model, metrics, summary"),
    model: str = typer.Option("sentence-transformers/all-MiniLM-L6-v2", "--model", help="model to fine-tune"),
    epochs: int = typer.Option(1, "--epochs", min=1, help="passes over the train split (with --max-steps 0)"),
    max_steps: int = typer.Option(40, "--max-steps", min=0, help="optimizer steps; 0 trains --epochs full epochs"),
    batch_size: int = typer.Option(32, "--batch-size", min=2, help="queries per step (in-batch negatives)"),
    learning_rate: float = typer.Option(5e-5, "--lr", help="peak learning rate"),
    negatives: str = typer.Option("inbatch", "--negatives", help="inbatch or tasb (topic-aware batches)"),
    eval_split: str = typer.Option("test", "--eval-split", help="split to evaluate on; tune with dev, never test"),
    max_queries: Optional[int] = typer.Option(None, "--max-queries", min=1, help="smoke runs: queries per split"),
    max_docs: Optional[int] = typer.Option(None, "--max-docs", min=1, help="smoke runs: corpus size"),
) -> None:
    """Fine-tune all-MiniLM-L6-v2 on a built-in task (stdlib docstring → code) and show before/after figures."""
    from retriever.config import ConfigError
    from retriever.data import DataError
    from retriever.quickstart import QuickstartOptions, run_quickstart

    opts = QuickstartOptions(output=output, data=data, model=model, epochs=epochs, max_steps=max_steps,
                             batch_size=batch_size, learning_rate=learning_rate, negatives=negatives, eval_split=eval_split,
                             max_queries=max_queries,
                             max_docs=max_docs)
    try:
        run_quickstart(opts)
    except (ConfigError, DataError, ValueError, OSError) as exc:
        typer.secho(f"error: {exc}", fg=typer.colors.RED, err=True)
        raise typer.Exit(2) from None


def register(app: typer.Typer) -> None:
    app.command("train", help="Train a bi-encoder from a YAML config.")(train_command)
    app.command("quickstart", help="Fine-tune MiniLM on a built-in stdlib code-search task; before/after figures.")(
        quickstart_command)
