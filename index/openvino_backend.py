"""OpenVINO inference for encoding on CPUs.

The same tower, converted from its current torch weights (``openvino.convert_model``, fp32 weights kept)
and compiled for the CPU, which on CPUs with native bf16 (AVX512-BF16, AMX) computes in bf16 by default.
It fuses attention, GELU and LayerNorm and drops the per-op casts of torch's autocast: measured 1.10x
torch bf16 autocast for all-MiniLM-L6-v2 on the whole SciFact corpus with 2 threads (1.28x on a sample),
cosine to the fp32 embeddings 0.99997 (docs/benchmarks.md). Only inference goes through it; training always runs in torch.

Converted models are kept in memory per tower (a tower whose weights changed since, e.g. during
training, is converted again: tensor version counters tell) and on disk under ``NEGATRON_CACHE_DIR``
(default ``~/.cache/negatron``)/``openvino``, where the newest few are kept, so a command run twice on the
same checkpoint converts once.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import shutil
import tempfile
import threading
import warnings
import weakref
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch

from retriever.memory import release_freed_memory

logger = logging.getLogger(__name__)

BACKENDS = ("auto", "torch", "openvino")
ENV = "NEGATRON_ENCODE_BACKEND"  # the default backend of encodings that name none
KEEP_ON_DISK = 4  # converted checkpoints kept in the disk cache (each about the size of the weights)
_MEMORY: "weakref.WeakKeyDictionary[torch.nn.Module, tuple]" = weakref.WeakKeyDictionary()  # tower -> (state, runner)
_FAILED: "weakref.WeakSet[torch.nn.Module]" = weakref.WeakSet()
_LOCKS: "weakref.WeakKeyDictionary[torch.nn.Module, threading.Lock]" = weakref.WeakKeyDictionary()
_LOCK = threading.Lock()  # guards _LOCKS only: one tower's conversion never blocks another's encoding


def openvino_available() -> bool:
    return importlib.util.find_spec("openvino") is not None


def resolve_backend(backend: str | None, device: torch.device | str, bf16: bool) -> str:
    """``"torch"`` or ``"openvino"`` for an inference request.

    ``auto`` (the default) picks OpenVINO on a CPU when bf16 is on (native bf16 hardware; see
    :func:`retriever.modeling.bf16_supported`) and the package is installed; fp32 requests stay in torch,
    whose fp32 embeddings are the reference. ``openvino`` forces it (bf16 or fp32 as asked), ``torch``
    never uses it."""
    backend = backend or os.environ.get(ENV) or "auto"
    if backend not in BACKENDS:
        raise ValueError(f"unknown encode backend {backend!r}; choose {', '.join(BACKENDS)}")
    cpu = torch.device(device).type == "cpu"
    if backend == "openvino":
        if not cpu:
            raise ValueError(f"the openvino backend runs on the CPU; the model is on {device}")
        if not openvino_available():
            raise ImportError("the openvino backend needs the openvino package: pip install 'negatron[openvino]'")
        return "openvino"
    if backend == "auto" and cpu and bf16 and openvino_available():
        return "openvino"
    return "torch"


@contextmanager
def encode_backend(backend: str):
    """Within the block, every encoding that names no backend of its own uses ``backend`` (through
    ``NEGATRON_ENCODE_BACKEND``); the previous setting is restored afterwards."""
    previous = os.environ.get(ENV)
    os.environ[ENV] = backend
    try:
        yield
    finally:
        if previous is None:
            os.environ.pop(ENV, None)
        else:
            os.environ[ENV] = previous


def _cache_root() -> Path:
    return Path(os.environ.get("NEGATRON_CACHE_DIR") or Path.home() / ".cache" / "negatron") / "openvino"


def _weights_state(tower: torch.nn.Module) -> tuple:
    """Cheap change detector: every in-place update of a tensor (optimizer step, ``load_state_dict``)
    bumps its version counter, so this tuple changes whenever the weights may have."""
    return tuple((t.data_ptr(), t._version) for t in tower.state_dict().values())


def _weights_hash(tower: torch.nn.Module) -> str:
    import hashlib

    from index.encode import hash_weights  # index.encode imports this module

    h = hashlib.blake2b(digest_size=8)
    h.update(type(tower).__name__.encode())
    hash_weights(h, tower)
    return h.hexdigest()


def _convert(tower: torch.nn.Module, example: dict[str, torch.Tensor], key: str):
    """The tower as an ``openvino.Model``: read from the disk cache, else converted and cached atomically."""
    import openvino as ov

    root = _cache_root()
    cached = root / key / "model.xml"
    if cached.exists():
        try:
            model = ov.Core().read_model(cached)
            os.utime(cached.parent)  # most recently used
            return model
        except Exception as err:  # a damaged cache entry is rebuilt, not fatal
            logger.warning("openvino cache %s unreadable (%s); converting again", cached.parent, err)
    was_training = tower.training
    tower.eval()
    try:
        from transformers.utils import logging as hf_logging

        verbosity = hf_logging.get_verbosity()
        hf_logging.set_verbosity_error()  # the trace touches config attributes that log notes meant for training
        with torch.no_grad(), warnings.catch_warnings():
            # the tracer's notes on Python-level shape checks: they hold for every padded batch
            warnings.simplefilter("ignore", torch.jit.TracerWarning)
            warnings.simplefilter("ignore", FutureWarning)
            model = ov.convert_model(tower, example_input=dict(example))
    finally:
        hf_logging.set_verbosity(verbosity)
        tower.train(was_training)
    try:
        root.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(dir=root, prefix=f".{key}-"))
        ov.save_model(model, tmp / "model.xml", compress_to_fp16=False)  # keep fp32 weights: bf16 at run time
        shutil.rmtree(root / key, ignore_errors=True)
        os.replace(tmp, root / key)
        entries = sorted((p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")),
                         key=lambda p: p.stat().st_mtime, reverse=True)
        for stale in entries[KEEP_ON_DISK:]:
            shutil.rmtree(stale, ignore_errors=True)
    except OSError as err:  # a read-only home still encodes, it only converts every time
        logger.warning("could not cache the converted model under %s: %s", root, err)
    return model


class OpenVINOTower:
    """Callable like a Hugging Face encoder for inference: ``tower(**batch)`` returns
    ``(last_hidden_state,)`` as a float32 torch tensor. Safe to call from several threads (one infer
    request per call)."""

    def __init__(self, compiled, input_names: list[str]):
        self.compiled = compiled
        self.input_names = input_names

    def __call__(self, **batch: torch.Tensor):
        request = self.compiled.create_infer_request()
        inputs = {name: np.ascontiguousarray(batch[name].cpu().numpy()) for name in self.input_names}
        result = request.infer(inputs)
        return (torch.from_numpy(np.asarray(result[self.compiled.output(0)], dtype=np.float32).copy()),)


def openvino_tower(tower: torch.nn.Module, example: dict[str, torch.Tensor], bf16: bool = True) -> OpenVINOTower | None:
    """The OpenVINO version of ``tower`` for the current weights, or ``None`` (after one warning per
    tower) when the tower cannot be converted: callers then run it in torch."""
    import openvino as ov

    if tower in _FAILED:
        return None
    state = (_weights_state(tower), torch.get_num_threads(), bf16)
    with _LOCK:
        lock = _LOCKS.setdefault(tower, threading.Lock())
    with lock:
        hit = _MEMORY.get(tower)
        if hit is not None and hit[0] == state:
            return hit[1]
        threads = state[1]
        try:
            model = _convert(tower, example, _weights_hash(tower))
            config = {"INFERENCE_NUM_THREADS": threads, "PERFORMANCE_HINT": "LATENCY",
                      "INFERENCE_PRECISION_HINT": "bf16" if bf16 else "f32"}
            compiled = ov.Core().compile_model(model, "CPU", config)
            del model  # the compiled model holds its own (bf16) weights
            release_freed_memory()
        except Exception as err:  # noqa: BLE001 - any conversion failure falls back to torch
            logger.warning("OpenVINO could not convert %s (%s: %s); encoding with torch instead",
                           type(tower).__name__, type(err).__name__, err)
            _FAILED.add(tower)
            return None
        names = [port.get_any_name() for port in compiled.inputs]
        missing = [n for n in names if n not in example]
        if missing:
            logger.warning("OpenVINO model wants inputs %s the tokenizer does not give; encoding with torch", missing)
            _FAILED.add(tower)
            return None
        runner = OpenVINOTower(compiled, names)
        _MEMORY[tower] = (state, runner)
        return runner
