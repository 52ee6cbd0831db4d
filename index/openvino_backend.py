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
_MEMORY: "weakref.WeakKeyDictionary[torch.nn.Module, tuple]" = weakref.WeakKeyDictionary()  # tower -> (state, {throughput: runner})
_FAILED: "weakref.WeakSet[torch.nn.Module]" = weakref.WeakSet()
_LOCKS: "weakref.WeakKeyDictionary[torch.nn.Module, threading.Lock]" = weakref.WeakKeyDictionary()
_LOCK = threading.Lock()  # guards _LOCKS only: one tower's conversion never blocks another's encoding


def openvino_available() -> bool:
    return importlib.util.find_spec("openvino") is not None


BULK_TOKENS = 262_144  # about 1,000 documents of 256 tokens: enough work to repay a conversion (~4 s, MiniLM)
BULK_TEXTS = 1_024     # the same for a corpus whose token counts are not known yet


def _cpu_without_native_bf16() -> bool:
    from retriever.modeling import bf16_supported  # modeling imports this module

    return not bf16_supported("cpu")


def resolve_backend(backend: str | None, device: torch.device | str, bf16: bool, bulk: bool = False) -> str:
    """``"torch"`` or ``"openvino"`` for an inference request.

    ``auto`` (the default) picks OpenVINO on a CPU, when the package is installed, for bf16 requests
    (native bf16 hardware; see :func:`retriever.modeling.bf16_supported`) and for ``bulk`` fp32 work on a
    CPU without native bf16, where fp32 is the machine's default rather than a request for the torch
    reference: on a Zen 3, OpenVINO fp32 encoded 1.07-1.35x torch fp32 at cosine 0.9999999 (docs/benchmarks.md).
    Small fp32 requests, and fp32 on CPUs with native bf16 (someone turned bf16 off), stay in torch, whose
    fp32 embeddings are the reference. ``openvino`` forces it (bf16 or fp32 as asked), ``torch`` never
    uses it."""
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
    if backend == "auto" and cpu and openvino_available() and (bf16 or (bulk and _cpu_without_native_bf16())):
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
    request per call). :meth:`map` keeps ``jobs`` batches in flight at once (one per stream of a
    throughput-compiled model)."""

    def __init__(self, compiled, input_names: list[str], jobs: int = 1):
        self.compiled = compiled
        self.input_names = input_names
        self.jobs = max(1, int(jobs))

    def _inputs(self, batch: dict[str, torch.Tensor]) -> dict[str, np.ndarray]:
        return {name: np.ascontiguousarray(batch[name].cpu().numpy()) for name in self.input_names}

    def __call__(self, **batch: torch.Tensor):
        request = self.compiled.create_infer_request()
        result = request.infer(self._inputs(batch))
        return (torch.from_numpy(np.asarray(result[self.compiled.output(0)], dtype=np.float32).copy()),)

    def map(self, items):
        """For ``(key, batch)`` pairs, yield ``(key, last_hidden_state)`` as each finishes (not in input
        order), with up to ``jobs`` requests running at once; the generator's own thread does the
        caller's work between them, so padding, pooling and writing overlap inference."""
        import queue

        import openvino as ov

        if self.jobs == 1:
            for key, batch in items:
                yield key, self(**batch)[0]
            return
        finished: "queue.SimpleQueue" = queue.SimpleQueue()
        pool = ov.AsyncInferQueue(self.compiled, self.jobs)
        # the request is reused as soon as the callback returns: copy its output out first
        pool.set_callback(lambda request, key: finished.put(
            (key, np.array(request.get_output_tensor(0).data, dtype=np.float32))))

        def drain():
            while not finished.empty():
                done_key, hidden = finished.get()
                yield done_key, torch.from_numpy(hidden)

        try:
            for key, batch in items:
                pool.start_async(self._inputs(batch), key)  # blocks while every request is busy
                yield from drain()
        finally:
            pool.wait_all()  # an abandoned generator must not leave requests writing into freed memory
        yield from drain()


def release_compiled(model: torch.nn.Module) -> int:
    """Drop the compiled OpenVINO models of ``model`` and its submodules (the disk cache stays); returns
    how many were dropped. A trainer calls it once its strategy has encoded what it needs up front: the
    first optimizer step makes them stale, yet they and their request buffers would stay resident
    through all of training (~100 MiB for a small model, more for a large one)."""
    dropped = 0
    for module in model.modules():
        hit = _MEMORY.pop(module, None)
        if hit is not None:
            dropped += len(hit[1])
    if dropped:
        release_freed_memory()
    return dropped


def openvino_tower(tower: torch.nn.Module, example: dict[str, torch.Tensor], bf16: bool = True,
                   throughput: bool = False) -> OpenVINOTower | None:
    """The OpenVINO version of ``tower`` for the current weights, or ``None`` (after one warning per
    tower) when the tower cannot be converted: callers then run it in torch.

    ``throughput=True`` compiles for bulk encoding (OpenVINO's THROUGHPUT hint: the cores split into
    streams, each running its own batch; :meth:`OpenVINOTower.map` keeps them all busy): with 2
    threads, 2 single-thread streams encoded all-MiniLM-L6-v2 1.1-1.4x faster than one 2-thread
    stream on an AMX Xeon (docs/benchmarks.md), because MiniLM's small GEMMs and its per-token
    LayerNorm/GELU/softmax do not split well over threads. The default compiles for latency (one
    stream using every thread), which one short query at a time needs. One conversion serves both."""
    import openvino as ov

    if tower in _FAILED:
        return None
    weights = (_weights_state(tower), torch.get_num_threads(), bf16)
    with _LOCK:
        lock = _LOCKS.setdefault(tower, threading.Lock())
    with lock:
        hit = _MEMORY.get(tower)
        runners = hit[1] if hit is not None and hit[0] == weights else {}  # changed weights: recompile every mode
        if throughput in runners:
            return runners[throughput]
        threads = weights[1]
        try:
            model = _convert(tower, example, _weights_hash(tower))  # the second mode reads the disk cache
            config = {"INFERENCE_NUM_THREADS": threads, "PERFORMANCE_HINT": "THROUGHPUT" if throughput else "LATENCY",
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
        jobs = compiled.get_property("OPTIMAL_NUMBER_OF_INFER_REQUESTS") if throughput else 1
        runner = OpenVINOTower(compiled, names, jobs)
        runners[throughput] = runner
        _MEMORY[tower] = (weights, runners)
        return runner
