"""The bi-encoder: any Hugging Face ``AutoModel`` with pooling, optional L2 normalisation,
shared or separate query/document towers, prefixes and max lengths.

Saved in sentence-transformers format, so ``SentenceTransformer(path).encode(texts)`` reproduces
negatron's document embeddings (``prompt_name="query"`` its query embeddings).
"""

from __future__ import annotations

import itertools
import json
import logging
from dataclasses import dataclass
from contextlib import nullcontext
from pathlib import Path
from typing import Literal, Sequence

import numpy as np
import torch
from torch import nn

from index.openvino_backend import BULK_TOKENS, OpenVINOTower, openvino_tower, resolve_backend
from retriever.io import atomic_dir
from retriever.memory import release_freed_memory
from retriever.resolve import install_hint, resolve_model

logger = logging.getLogger(__name__)

Pooling = Literal["cls", "mean", "last-token"]
Kind = Literal["query", "document"]
_ST_POOLING = {"cls": "cls", "mean": "mean", "last-token": "lasttoken"}
_FROM_ST_POOLING = {v: k for k, v in _ST_POOLING.items()}
TOWER_FILE = "negatron.json"
PAD_MULTIPLE = 8  # encode batches pad to a multiple of this many tokens (see BiEncoder._pad)


@dataclass
class TokenColumns:
    """Tokenised texts as flat int32 columns (``input_ids``, ``attention_mask``, ...) and the row
    offsets into them: row ``i`` is ``columns[name][offsets[i]:offsets[i + 1]]``."""

    columns: dict[str, np.ndarray]
    offsets: np.ndarray

    def __post_init__(self) -> None:
        self.lengths = np.diff(self.offsets)

    def __len__(self) -> int:
        return len(self.offsets) - 1


TRIM_EVERY_BATCHES = 64


def pool(hidden: torch.Tensor, mask: torch.Tensor, pooling: str) -> torch.Tensor:
    if pooling == "mean":
        m = mask.unsqueeze(-1).to(hidden.dtype)
        return (hidden * m).sum(1) / m.sum(1).clamp(min=1e-9)
    if pooling == "cls":
        return hidden[:, 0]
    if pooling == "last-token":
        # Last non-padding position; works for left and right padding alike.
        last = mask.shape[1] - 1 - mask.flip(1).argmax(1)
        return hidden[torch.arange(hidden.shape[0], device=hidden.device), last]
    raise ValueError(f"unknown pooling {pooling!r}; choose cls, mean or last-token")


def bf16_supported(device: torch.device | str) -> bool:
    """bf16 autocast on CUDA GPUs with bf16 units and on CPUs with native bf16 (AVX512-BF16 / AMX).

    On AVX2-only CPUs oneDNN emulates bf16 and autocast is several times *slower* than fp32
    (measured, docs/benchmarks.md), so those default to fp32."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    if device.type == "cpu":
        try:
            return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
        except (AttributeError, RuntimeError):
            return False
    return False


def default_batch_size(device: torch.device | str) -> int:
    """Encoding batch size: 16 on CPUs (measured fastest for MiniLM on 2 cores among 4-64,
    docs/benchmarks.md), 128 on GPUs (which need wide batches to fill)."""
    return 128 if torch.device(device).type == "cuda" else 16


def set_attention_dropout(module: nn.Module, p: float) -> int:
    """Set the dropout applied to attention probabilities in every attention layer of ``module`` to ``p``
    (the modules only: the config, and so a saved checkpoint, keeps its own value). Returns how many
    layers were set.

    Why: PyTorch's fused CPU attention kernel cannot drop attention probabilities, so with dropout > 0
    every training step falls back to the unfused path that materialises a batch x heads x seq x seq
    score tensor and draws a Bernoulli mask over it. For all-MiniLM-L6-v2 at batch 32 x 256 tokens that
    mask alone was 37 % of a bf16 step on an AMX Xeon, and a step without it was 1.74x faster
    (docs/benchmarks.md). Covers the BERT family (BERT, RoBERTa, XLM-R, ELECTRA, MPNet, DistilBERT:
    an ``nn.Dropout`` named ``dropout`` in a ``*SelfAttention`` module) and attention modules that keep
    the rate as a float ``attention_dropout`` (Llama-style decoders, ModernBERT)."""
    changed = 0
    for sub in module.modules():
        name = type(sub).__name__
        if name.endswith("SelfAttention") and isinstance(getattr(sub, "dropout", None), nn.Dropout):
            sub.dropout.p = float(p)
            changed += 1
        elif name.endswith("Attention") and isinstance(getattr(sub, "attention_dropout", None), float):
            sub.attention_dropout = float(p)
            changed += 1
    return changed


def apply_attention_dropout(modules: Sequence[nn.Module], p: float | None) -> None:
    """:func:`set_attention_dropout` on each of ``modules`` unless ``p`` is None (keep the checkpoint's
    rate); warns when none of them has an attention layer it recognises."""
    if p is None:
        return
    if not sum(set_attention_dropout(module, p) for module in modules):
        logger.warning("model.attention_dropout=%s: no attention layer of %s found to set; the checkpoint's own "
                       "rate applies", p, type(modules[0]).__name__)


def autocast(device: torch.device | str, bf16: bool):
    """bf16 autocast on CPU and CUDA; a no-op when disabled."""
    device_type = torch.device(device).type
    if not bf16 or device_type not in {"cpu", "cuda"}:
        return nullcontext()
    return torch.autocast(device_type=device_type, dtype=torch.bfloat16)


class BiEncoder(nn.Module):
    def __init__(
        self,
        query_model: nn.Module,
        tokenizer,
        *,
        doc_model: nn.Module | None = None,
        pooling: Pooling = "mean",
        normalize: bool = True,
        query_prefix: str = "",
        doc_prefix: str = "",
        query_max_length: int = 64,
        doc_max_length: int = 256,
        name: str | None = None,
    ):
        super().__init__()
        if pooling not in _ST_POOLING:
            raise ValueError(f"unknown pooling {pooling!r}; choose cls, mean or last-token")
        self.query_model = query_model
        self.doc_model = doc_model  # None: one tower shared by queries and documents
        self.tokenizer = tokenizer
        self.pooling = pooling
        self.normalize = normalize
        self.query_prefix = query_prefix
        self.doc_prefix = doc_prefix
        self.query_max_length = query_max_length
        self.doc_max_length = doc_max_length
        self.name = name

    # ------------------------------------------------------------------ loading
    @classmethod
    def from_pretrained(
        cls,
        name_or_path: str | Path,
        *,
        pooling: Pooling | None = None,
        normalize: bool | None = None,
        shared: bool = True,
        query_prefix: str | None = None,
        doc_prefix: str | None = None,
        query_max_length: int | None = None,
        doc_max_length: int | None = None,
    ) -> "BiEncoder":
        """Load a negatron/sentence-transformers folder, a plain HF model, a packaged model or a hub id.

        Settings saved with the model are the defaults; keyword arguments override them.
        ``shared=False`` on a single-tower checkpoint starts two towers from the same weights.

        Queries and documents are both truncated at the model's sentence-transformers
        ``max_seq_length`` (the query tower's for queries, with separate towers), and prefixes are its
        ``query``/``document`` prompts, so encoding equals ``SentenceTransformer.encode_query`` /
        ``encode_document`` (what MTEB runs). A plain HF model gets the length ST would give it
        (the tokenizer's ``model_max_length``, capped by the position embeddings). A shorter query
        length is a training setting: pass ``query_max_length`` (the trainer does, from its config).
        """
        source = resolve_model(name_or_path, require=True)
        path = Path(source)
        meta = json.loads((path / TOWER_FILE).read_text()) if (path / TOWER_FILE).exists() else {}
        try:
            if meta.get("shared") is False:
                q_model, tok, found = _load_tower(path / "query")
                d_model, _, doc_found = _load_tower(path / "document")
            else:
                q_model, tok, found = _load_tower(path if path.exists() else source)
                d_model, doc_found = None, found
        except OSError as exc:
            raise OSError(f"cannot load model {name_or_path!r}: {exc}. {install_hint(str(name_or_path))}") from exc
        # The lengths are the ones sentence-transformers reads (max_seq_length), never an older
        # negatron.json's query_max_length: otherwise ST and negatron would encode queries differently.
        query_length = found.get("max_seq_length") or meta.get("doc_max_length") or 256
        doc_length = doc_found.get("max_seq_length") or meta.get("doc_max_length") or 256
        found.update({k: v for k, v in meta.items() if k not in {"shared", "query_max_length", "doc_max_length"}})
        if d_model is None and not shared:
            import copy

            d_model = copy.deepcopy(q_model)
        pick = lambda value, key, default: value if value is not None else found.get(key, default)  # noqa: E731
        return cls(
            q_model,
            tok,
            doc_model=d_model,
            pooling=pick(pooling, "pooling", "mean"),
            normalize=pick(normalize, "normalize", True),
            query_prefix=pick(query_prefix, "query_prefix", ""),
            doc_prefix=pick(doc_prefix, "doc_prefix", ""),
            query_max_length=query_max_length if query_max_length is not None else query_length,
            doc_max_length=doc_max_length if doc_max_length is not None else doc_length,
            name=str(name_or_path),
        )

    # ------------------------------------------------------------------ forward
    @property
    def shared(self) -> bool:
        return self.doc_model is None

    @property
    def dim(self) -> int:
        return int(self.query_model.config.hidden_size)

    @property
    def device(self) -> torch.device:
        return next(self.query_model.parameters()).device

    def tower(self, kind: Kind) -> nn.Module:
        return self.query_model if kind == "query" or self.doc_model is None else self.doc_model

    def tokenize(self, texts: Sequence[str], kind: Kind):
        prefix = self.query_prefix if kind == "query" else self.doc_prefix
        max_length = self.query_max_length if kind == "query" else self.doc_max_length
        return self.tokenizer([prefix + t for t in texts], padding=True, truncation=True,
                              max_length=max_length, return_tensors="pt")

    def embed(self, batch, kind: Kind) -> torch.Tensor:
        """Embeddings for a tokenised batch, with gradients (training path)."""
        batch = {k: v.to(self.device) for k, v in batch.items()}
        out = self.tower(kind)(**batch)
        hidden = out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]
        emb = pool(hidden, batch["attention_mask"], self.pooling)
        if self.normalize:
            emb = nn.functional.normalize(emb.float(), dim=-1)
        return emb

    def forward(self, batch, kind: Kind) -> torch.Tensor:  # noqa: D401
        return self.embed(batch, kind)

    @torch.inference_mode()
    def encode(self, texts: Sequence[str], kind: Kind = "document", batch_size: int | None = None,
               bf16: bool | None = None, show_progress: bool = False, progress=None,
               backend: str | None = None) -> np.ndarray:
        """Float32 ``[len(texts), dim]`` embeddings in input order.

        Tokenises once, sorts by token length (each batch pads to its longest member, so sorting nearly
        removes padding) and runs the tower under ``inference_mode``. ``batch_size=None`` picks
        :func:`default_batch_size` for the device. ``bf16=None`` enables bf16 autocast where the
        hardware computes bf16 natively (see :func:`bf16_supported`); ``bf16=False`` gives fp32
        reference embeddings. ``progress`` is an open bar to advance, ``progress.update(n)`` per batch
        (else ``show_progress`` opens a :class:`retriever.progress.ProgressDisplay` stage).
        ``backend`` (``auto``, ``torch``, ``openvino``; default ``$NEGATRON_ENCODE_BACKEND`` or
        ``auto``): ``auto`` runs bf16 CPU inference, and bulk fp32 inference on CPUs without native bf16,
        through OpenVINO when it is installed (see :func:`index.openvino_backend.resolve_backend`),
        everything else through torch.
        """
        out = np.empty((len(texts), self.dim), dtype=np.float32)
        if not len(texts):
            return out
        device = self.device
        batch_size = batch_size or default_batch_size(device)
        bf16 = bf16_supported(device) if bf16 is None else bf16
        prefix = self.query_prefix if kind == "query" else self.doc_prefix
        max_length = self.query_max_length if kind == "query" else self.doc_max_length
        enc = self._tokenize_compact([prefix + t for t in texts], max_length)
        order = np.argsort(-enc.lengths, kind="stable")
        tower = self.tower(kind)
        run = tower
        batches = [order[start:start + batch_size] for start in range(0, len(texts), batch_size)]
        if resolve_backend(backend, device, bf16, bulk=int(enc.lengths.sum()) >= BULK_TOKENS) == "openvino":
            # longest and shortest text: an example with padding, so the traced graph keeps the mask;
            # several batches are bulk work: compiled for throughput, every core its own batch
            run = openvino_tower(tower, self._pad(enc, [order[0], order[-1]]), bf16,
                                 throughput=len(batches) > 1) or tower
        was_training = tower.training
        tower.eval()
        own_bar = None
        if progress is None and show_progress:
            from retriever.progress import ProgressDisplay

            own_bar = ProgressDisplay().stage(f"encode {kind}s", len(texts), "texts")
            progress = own_bar.__enter__()

        def padded():
            for idx in batches:
                yield idx, {k: v.to(device, non_blocking=True) for k, v in self._pad(enc, idx).items()}

        def finished():
            if isinstance(run, OpenVINOTower):
                # the batch's mask travels with its key: batches finish out of order
                for (idx, mask), hidden in run.map(((idx, batch["attention_mask"]), batch) for idx, batch in padded()):
                    yield idx, mask, hidden
                return
            for idx, batch in padded():
                outputs = run(**batch)
                hidden = outputs.last_hidden_state if hasattr(outputs, "last_hidden_state") else outputs[0]
                yield idx, batch["attention_mask"], hidden

        try:
            with autocast(device, bf16):
                for done, (idx, mask, hidden) in enumerate(finished(), 1):
                    emb = pool(hidden.float(), mask, self.pooling)
                    if self.normalize:
                        emb = nn.functional.normalize(emb, dim=-1)
                    out[idx] = emb.cpu().numpy()
                    if progress is not None:
                        progress.update(len(idx))
                    if done % TRIM_EVERY_BATCHES == 0:
                        # batches of falling length leave freed gaps on the heap that glibc keeps resident;
                        # without this a 100k-text call grew ~100 MiB a shard (an mmap threshold instead
                        # made the tiny rehearsal model 1.7x slower)
                        release_freed_memory(collect=False)
        finally:
            tower.train(was_training)
            if own_bar is not None:
                own_bar.__exit__(None, None, None)
        return out

    def _tokenize_compact(self, texts: list[str], max_length: int, chunk: int = 256) -> "TokenColumns":
        """Token columns of ``texts`` packed into one flat int32 buffer per column plus row offsets,
        tokenised ``chunk`` texts at a time. The tokenizer's own output for all texts at once (Python
        lists, Rust encodings, allocator arenas) held 350 MiB for SciFact's 5,183 documents; one small
        array per text (300k objects for a 100k-document shard) interleaved with each batch's tensors
        on the heap and kept freed pages pinned, so a long encode grew shard after shard."""
        parts: dict[str, list[np.ndarray]] = {}
        lengths: list[np.ndarray] = []
        for start in range(0, len(texts), chunk):
            enc = self.tokenizer(texts[start:start + chunk], truncation=True, max_length=max_length)
            lengths.append(np.fromiter((len(r) for r in enc["input_ids"]), dtype=np.int64, count=len(enc["input_ids"])))
            for name in ("input_ids", "attention_mask", "token_type_ids"):
                if name in enc:
                    parts.setdefault(name, []).append(np.fromiter(itertools.chain.from_iterable(enc[name]), dtype=np.int32))
        offsets = np.zeros(len(texts) + 1, dtype=np.int64)
        if lengths:
            np.cumsum(np.concatenate(lengths), out=offsets[1:])
        columns = TokenColumns({name: np.concatenate(p) for name, p in parts.items()}, offsets)
        del parts
        if len(texts) > chunk:
            release_freed_memory()
        return columns

    def _pad(self, enc: "TokenColumns", idx) -> dict[str, torch.Tensor]:
        """A padded batch of the rows ``idx`` (the tokenizer's padding side and pad values)."""
        idx = np.asarray(idx, dtype=np.int64)
        starts, lens = enc.offsets[idx], enc.lengths[idx]
        # widths rounded up to a multiple of PAD_MULTIPLE: far fewer distinct shapes, so oneDNN and OpenVINO
        # compile and cache far fewer kernels (-60 MiB resident for MiniLM on the AMX Xeon, no slower)
        width = -(-int(lens.max()) // PAD_MULTIPLE) * PAD_MULTIPLE
        left = getattr(self.tokenizer, "padding_side", "right") == "left"
        values = {"input_ids": self.tokenizer.pad_token_id or 0, "attention_mask": 0,
                  "token_type_ids": getattr(self.tokenizer, "pad_token_type_id", 0)}
        # flat positions of every real token, and where each lands in the [rows, width] batch
        col = np.arange(width)[None, :]
        valid = col < lens[:, None]
        src = (starts[:, None] + col)[valid]
        dst = (col + (width - lens[:, None]) if left else np.broadcast_to(col, valid.shape))[valid]
        row = np.broadcast_to(np.arange(len(idx))[:, None], valid.shape)[valid]
        batch = {}
        for name, flat in enc.columns.items():
            arr = np.full((len(idx), width), values[name], dtype=np.int64)
            arr[row, dst] = flat[src]
            batch[name] = torch.from_numpy(arr)
        return batch

    # ------------------------------------------------------------------ saving
    def save(self, path: str | Path) -> Path:
        """Write a sentence-transformers folder (two of them, ``query/`` and ``document/``, for
        separate towers) atomically, plus ``negatron.json`` with the settings ST has no slot for.

        ST keeps one ``max_seq_length`` per tower, and it is ``doc_max_length`` here: a query length
        used in training (often 64) is recorded as ``train_query_max_length`` but not applied when
        the folder is loaded again, so ``SentenceTransformer(path)`` and negatron encode every query
        alike, however long."""
        path = Path(path)
        meta = {
            "shared": self.shared,
            "pooling": self.pooling,
            "normalize": self.normalize,
            "query_prefix": self.query_prefix,
            "doc_prefix": self.doc_prefix,
            "doc_max_length": self.doc_max_length,
            "train_query_max_length": self.query_max_length,
        }
        with atomic_dir(path) as tmp:
            if self.shared:
                self._save_tower(self.query_model, tmp)
            else:
                self._save_tower(self.query_model, tmp / "query")
                self._save_tower(self.doc_model, tmp / "document")
            (tmp / TOWER_FILE).write_text(json.dumps(meta, indent=2) + "\n")
        return path

    def _save_tower(self, model: nn.Module, folder: Path) -> None:
        from retriever.st_format import write_classic

        model.save_pretrained(folder)
        self.tokenizer.save_pretrained(folder)
        write_classic(folder, self.dim, self.pooling, self.normalize, self.doc_max_length,
                      self.query_prefix, self.doc_prefix)


_ST_MODULES = {"Transformer", "Pooling", "Normalize"}  # what BiEncoder reproduces of a sentence-transformers pipeline


def _load_tower(source: str | Path):
    """(model, tokenizer, settings) from a sentence-transformers folder or a plain HF model.

    ``settings["max_seq_length"]`` is the length sentence-transformers truncates at: the folder's
    saved one, or for a plain HF model what ST would wrap it with (the tokenizer's
    ``model_max_length`` capped by ``max_position_embeddings``)."""
    from transformers import AutoModel, AutoTokenizer

    from retriever.st_format import read_classic

    path = Path(source)
    classic = read_classic(path) if (path / "modules.json").exists() else None
    if classic is not None:  # the common pipeline, without importing sentence-transformers (see st_format)
        model, tokenizer = AutoModel.from_pretrained(str(path)), AutoTokenizer.from_pretrained(str(path))
        return model, tokenizer, classic
    if (path / "modules.json").exists():
        from sentence_transformers import SentenceTransformer

        st = SentenceTransformer(str(path), device="cpu")
        settings: dict = {"max_seq_length": st.max_seq_length, "normalize": False}
        for module in st:
            kind = type(module).__name__
            if kind == "Pooling":
                settings["pooling"] = _FROM_ST_POOLING.get(str(module.pooling_mode), "mean")
            elif kind == "Normalize":
                settings["normalize"] = True
            elif kind not in _ST_MODULES:
                logger.warning("%s: sentence-transformers module %s is not reproduced by negatron; its "
                               "embeddings will differ from SentenceTransformer.encode", path, kind)
        # encode_query / encode_document: the "query" prompt; the first of document, passage, corpus
        prompts = st.prompts or {}
        settings["query_prefix"] = prompts.get("query") or ""
        settings["doc_prefix"] = next((prompts[k] for k in ("document", "passage", "corpus") if k in prompts), "") or ""
        return st[0].auto_model, st.tokenizer, settings
    model = AutoModel.from_pretrained(str(source))
    tokenizer = AutoTokenizer.from_pretrained(str(source))
    limits = [n for n in (getattr(tokenizer, "model_max_length", None),
                          getattr(model.config, "max_position_embeddings", None)) if n and 0 < n < 1_000_000]
    return model, tokenizer, {"max_seq_length": min(limits)} if limits else {}
