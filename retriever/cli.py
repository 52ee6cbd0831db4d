"""The one `negatron` command. Each package contributes its subcommands through ``register(app)``;
heavy imports (torch, faiss) happen inside the commands so ``negatron --help`` stays instant."""

from __future__ import annotations

import importlib
import logging
import os

import typer

app = typer.Typer(
    name="negatron",
    help="Train, index and evaluate dense retrievers.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_show_locals=False,
)

# Order here is the order in `negatron --help`.
COMMAND_MODULES = ("retriever.commands", "index.cli", "mining.cli", "eval.cli")


def _register_all() -> None:
    for name in COMMAND_MODULES:
        if importlib.util.find_spec(name) is None:
            continue
        importlib.import_module(name).register(app)


def main() -> None:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    logging.basicConfig(level=os.environ.get("NEGATRON_LOG_LEVEL", "WARNING"), format="%(levelname)s %(name)s: %(message)s")
    _register_all()
    app()


if __name__ == "__main__":
    main()
