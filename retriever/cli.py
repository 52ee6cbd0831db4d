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
COMMAND_MODULES = ("retriever.commands", "retriever.ranker_commands", "index.cli", "mining.cli", "eval.cli")


# Libraries whose INFO/WARNING chatter (hub retries, load reports) is hidden unless --verbose.
NOISY_LOGGERS = ("transformers", "huggingface_hub", "sentence_transformers", "urllib3", "httpx", "filelock",
                 "datasets", "mteb", "torch", "openvino", "nncf")


def quiet_libraries(verbose: bool = False) -> None:
    """Silence third-party progress bars ("Loading weights", "Writing model shards", hub
    downloads), their warnings and hub retry messages, so a command prints negatron's own progress
    and results only. ``verbose`` (``negatron --verbose`` or ``NEGATRON_VERBOSE=1``) keeps them all."""
    import sys
    import warnings

    if verbose:
        return
    # Read at import by huggingface_hub and transformers (which takes its tqdm switch from the hub's).
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
    for name in NOISY_LOGGERS:
        logging.getLogger(name).setLevel(logging.ERROR)
    # Already imported (tests, or a library imported first): switch them off directly as well.
    if "transformers" in sys.modules:
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()
        hf_logging.disable_progress_bar()
    if "huggingface_hub" in sys.modules:
        from huggingface_hub.utils import disable_progress_bars

        disable_progress_bars()
    for module in ("transformers", "huggingface_hub", "sentence_transformers", "torch", "mteb", "pyserini"):
        warnings.filterwarnings("ignore", module=module)


@app.callback()
def _options(verbose: bool = typer.Option(False, "--verbose", "-v",
                                          help="Show libraries' progress bars, warnings and hub messages.")) -> None:
    quiet_libraries(verbose or os.environ.get("NEGATRON_VERBOSE", "") not in ("", "0"))


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
