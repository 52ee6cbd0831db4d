"""Checkpoints for exact resume, written atomically.

Layout of ``<output>/checkpoints/step-<N>/``::

    model/              BiEncoder.save (sentence-transformers format, loadable as a model)
    trainer_state.pt    optimizer, scheduler, RNG states (python, numpy, torch, cuda), strategy state
    position.json       step, epoch, step_in_epoch, order_seed (human-readable data position)

The folder is built under a temporary name and renamed into place, so a kill leaves either the previous
checkpoints or a complete new one. Saving never consumes random numbers from the training stream.
"""

from __future__ import annotations

import json
import random
import re
import shutil
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Iterator

import numpy as np
import torch

from retriever.io import atomic_dir

CHECKPOINT_DIR = "checkpoints"
_NAME = re.compile(r"^step-(\d+)$")


@dataclass
class Position:
    """Where the data stream stands after optimizer step ``step``."""

    step: int
    epoch: int
    step_in_epoch: int
    order_seed: int


def rng_state() -> dict:
    return {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


@contextmanager
def preserved_rng() -> Iterator[None]:
    """Whatever the block draws (model construction inside a save), the RNG streams are restored after."""
    state = rng_state()
    try:
        yield
    finally:
        set_rng_state(state)


def checkpoint_path(output_dir: str | Path, step: int) -> Path:
    return Path(output_dir) / CHECKPOINT_DIR / f"step-{step:07d}"


def list_checkpoints(output_dir: str | Path) -> list[Path]:
    """Complete checkpoints, oldest first (temporary folders of an interrupted save are ignored)."""
    folder = Path(output_dir) / CHECKPOINT_DIR
    found = [p for p in folder.glob("step-*") if _NAME.match(p.name) and (p / "position.json").exists()]
    return sorted(found, key=lambda p: int(_NAME.match(p.name).group(1)))


def save_checkpoint(output_dir: str | Path, position: Position, model, optimizer, scheduler, strategy,
                    rng_states: list[dict], keep_last: int) -> Path:
    """Write checkpoint ``step-<N>`` (``rng_states``: one :func:`rng_state` per process, in rank order)
    and delete all but the newest ``keep_last``."""
    target = checkpoint_path(output_dir, position.step)
    with preserved_rng():
        state = {"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(), "rng": rng_states,
                 "strategy": strategy.state_dict()}
        with atomic_dir(target) as tmp:
            model.save(tmp / "model")
            torch.save(state, tmp / "trainer_state.pt")
            (tmp / "position.json").write_text(json.dumps(asdict(position), indent=2) + "\n")
    for old in list_checkpoints(output_dir)[:-keep_last]:
        shutil.rmtree(old, ignore_errors=True)
    return target


def load_position(checkpoint: Path) -> Position:
    return Position(**json.loads((checkpoint / "position.json").read_text()))


def load_strategy_state(checkpoint: Path) -> dict:
    """The strategy state saved in a checkpoint, for a strategy's ``prepare`` on resume (TAS-B restores
    its clusters before the first batch). Memory-mapped: the optimizer state beside it is not read."""
    state = torch.load(checkpoint / "trainer_state.pt", map_location="cpu", weights_only=False, mmap=True)
    return state["strategy"]


def load_trainer_state(checkpoint: Path, optimizer, scheduler, strategy, rank: int = 0) -> None:
    """Restore optimizer, scheduler and strategy; restore this process's RNG streams last."""
    state = torch.load(checkpoint / "trainer_state.pt", map_location="cpu", weights_only=False)
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    strategy.load_state_dict(state["strategy"])
    set_rng_state(state["rng"][rank % len(state["rng"])])
