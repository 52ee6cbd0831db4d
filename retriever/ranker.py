"""The cross-encoder ranker: a Hugging Face ``AutoModelForSequenceClassification`` with one logit that
reads a query and a document together and scores the pair.

Python API (stable, used by AR2, the miner's scorer and the rerank commands):

- ``Ranker.load(path_or_name, max_length=None, device=None, seed=0) -> Ranker`` loads
  (a) a sentence-transformers ``CrossEncoder`` folder (v4+ ``modules.json`` layout or the older plain
  Hugging Face layout), (b) any ``AutoModelForSequenceClassification`` folder with one label, or
  (c) a plain encoder (BERT / MiniLM, also a sentence-transformers bi-encoder folder such as
  all-MiniLM-L6-v2) to which a fresh one-logit head is added (initialised from ``seed``).
- ``ranker.logits(queries, documents) -> Tensor [N]``: raw logits with gradients, for training.
- ``ranker.score(pairs, batch_size=None, bf16=None) -> np.ndarray [N]``: inference in token-length-sorted
  batches under bf16 autocast where the hardware computes bf16 natively; the checkpoint's activation is
  applied, so the scores equal ``CrossEncoder(path).predict(pairs)``.
- ``ranker.save(path)``: sentence-transformers ``CrossEncoder`` format, written atomically.

Activation: negatron trains listwise (a softmax over candidates), which fixes only score differences, so
the rankers it saves carry ``torch.nn.Identity`` (``predict`` returns the logits). A loaded CrossEncoder
keeps its own activation (most published ones: Sigmoid), so thresholds mean what its model card says.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from torch import nn

from retriever.io import atomic_dir
from index.openvino_backend import OpenVINOTower, openvino_tower, resolve_backend
from retriever.modeling import PAD_MULTIPLE, autocast, bf16_supported
from retriever.resolve import install_hint, resolve_model

ST_CONFIG = "config_sentence_transformers.json"
ACTIVATIONS = {
    "torch.nn.modules.linear.Identity": "identity",
    "torch.nn.Identity": "identity",
    "torch.nn.modules.activation.Sigmoid": "sigmoid",
    "torch.nn.Sigmoid": "sigmoid",
}
_ACTIVATION_PATH = {"identity": "torch.nn.modules.linear.Identity", "sigmoid": "torch.nn.modules.activation.Sigmoid"}
DEFAULT_MAX_LENGTH = 512


def default_score_batch_size(device: torch.device | str) -> int:
    """Pairs per forward pass: 32 on CPUs (pairs are ~8x longer than a query, so the encoder's 16 is
    too small to amortise the per-call overhead), 128 on GPUs."""
    return 128 if torch.device(device).type == "cuda" else 32


def _weights_root(folder: Path) -> Path:
    """The folder holding the Hugging Face ``config.json`` (a bi-encoder keeps it at its root or in the
    folder of its Transformer module)."""
    if (folder / "config.json").exists():
        return folder
    modules = folder / "modules.json"
    if modules.exists():
        for module in json.loads(modules.read_text()):
            candidate = folder / module.get("path", "")
            if (candidate / "config.json").exists():
                return candidate
    raise FileNotFoundError(f"{folder} holds no config.json: pass a Hugging Face model or a sentence-transformers "
                            "CrossEncoder folder")


def _checkpoint_kind(root: Path, config) -> tuple[str, str]:
    """('cross-encoder', activation) for a sequence-classification checkpoint, ('encoder', 'identity')
    for a plain encoder that needs a fresh head."""
    architectures = getattr(config, "architectures", None) or []
    st_config = root / ST_CONFIG
    st = json.loads(st_config.read_text()) if st_config.exists() else {}
    is_classifier = any(a.endswith("ForSequenceClassification") for a in architectures)
    if not is_classifier and st.get("model_type") != "CrossEncoder":
        return "encoder", "identity"
    if config.num_labels != 1:
        raise ValueError(f"{root}: the classifier has {config.num_labels} labels; a ranker needs one score per pair "
                         "(num_labels=1)")
    path = st.get("activation_fn") or getattr(config, "sbert_ce_default_activation_function", None)
    if path is None:
        return "cross-encoder", "sigmoid"  # sentence-transformers' default for one label
    if path not in ACTIVATIONS:
        raise ValueError(f"{root}: activation {path!r} is not supported by negatron's ranker; use "
                         f"{', '.join(sorted(set(_ACTIVATION_PATH.values())))}")
    return "cross-encoder", ACTIVATIONS[path]


class Ranker(nn.Module):
    """A cross-encoder: ``logits(queries, docs)`` for training, ``score(pairs)`` for inference."""

    def __init__(self, model: nn.Module, tokenizer, max_length: int = DEFAULT_MAX_LENGTH, activation: str = "identity",
                 source: str = ""):
        super().__init__()
        if activation not in _ACTIVATION_PATH:
            raise ValueError(f"unknown activation {activation!r}; choose {', '.join(_ACTIVATION_PATH)}")
        self.model, self.tokenizer = model, tokenizer
        self.max_length, self.activation, self.source = int(max_length), activation, source
        self.fresh_head = False  # True when load() added an untrained head to a plain encoder

    # ------------------------------------------------------------------ loading
    @classmethod
    def load(cls, name_or_path: str | Path, max_length: int | None = None, device: str | torch.device | None = None,
             seed: int = 0) -> "Ranker":
        from transformers import AutoConfig, AutoModelForSequenceClassification, AutoTokenizer
        from transformers.utils import logging as hf_logging

        source = resolve_model(str(name_or_path))
        folder = Path(source)
        if not folder.exists():
            raise FileNotFoundError(f"ranker {name_or_path!r} not found locally; {install_hint(str(name_or_path))}")
        root = _weights_root(folder)
        config = AutoConfig.from_pretrained(root)
        kind, activation = _checkpoint_kind(folder if (folder / ST_CONFIG).exists() else root, config)
        verbosity = hf_logging.get_verbosity()
        hf_logging.set_verbosity_error()  # the fresh head's "newly initialized" report is expected here
        try:
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(seed)  # a fresh head is a function of the seed, not of the caller's RNG
                model = AutoModelForSequenceClassification.from_pretrained(root, num_labels=1)
        finally:
            hf_logging.set_verbosity(verbosity)
        tokenizer = AutoTokenizer.from_pretrained(root)
        length = max_length or _saved_max_length(folder, root, tokenizer, config)
        ranker = cls(model, tokenizer, max_length=length, activation=activation, source=str(folder))
        ranker.fresh_head = kind == "encoder"
        return ranker.to(device or "cpu")

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    # ------------------------------------------------------------------ scoring
    def tokenize(self, queries: Sequence[str], documents: Sequence[str]) -> dict[str, torch.Tensor]:
        enc = self.tokenizer(list(queries), list(documents), padding=True, truncation=True,
                             max_length=self.max_length, return_tensors="pt")
        return {k: v.to(self.device) for k, v in enc.items()}

    def logits(self, queries: Sequence[str], documents: Sequence[str]) -> torch.Tensor:
        """Raw logits ``[N]`` of the pairs ``(queries[i], documents[i])``, with gradients."""
        if len(queries) != len(documents):
            raise ValueError(f"{len(queries)} queries but {len(documents)} documents")
        return self.model(**self.tokenize(queries, documents)).logits.view(-1)

    def forward(self, queries: Sequence[str], documents: Sequence[str]) -> torch.Tensor:  # noqa: D401
        return self.logits(queries, documents)

    def _activate(self, logits: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(logits) if self.activation == "sigmoid" else logits

    @torch.inference_mode()
    def score(self, pairs: Sequence[tuple[str, str]], batch_size: int | None = None, bf16: bool | None = None,
              show_progress: bool = False, backend: str | None = None) -> np.ndarray:
        """Scores of ``(query, document)`` pairs, in input order (float32).

        Pairs are tokenised once, sorted by token length and batched, so each batch pads to its own
        longest pair (rounded up to a multiple of 8: fewer shapes for the kernels to compile); bf16 by
        default where native (``bf16=None``), fp32 with ``bf16=False``. ``backend`` as in
        :meth:`retriever.modeling.BiEncoder.encode`: ``auto`` runs bf16 CPU scoring through OpenVINO
        (compiled for throughput when there is more than one batch), everything else through torch."""
        n = len(pairs)
        if n == 0:
            return np.zeros(0, dtype=np.float32)
        device = self.device
        batch_size = batch_size or default_score_batch_size(device)
        bf16 = bf16_supported(device) if bf16 is None else bf16
        was_training = self.model.training
        self.model.eval()
        enc = self.tokenizer([q for q, _ in pairs], [d for _, d in pairs], truncation=True, max_length=self.max_length)
        lengths = np.fromiter((len(ids) for ids in enc["input_ids"]), dtype=np.int64, count=n)
        order = np.argsort(-lengths, kind="stable")
        out = np.empty(n, dtype=np.float32)
        batches = [order[start:start + batch_size] for start in range(0, n, batch_size)]

        def pad(rows):
            batch = self.tokenizer.pad({k: [enc[k][i] for i in rows] for k in enc.keys()},
                                       pad_to_multiple_of=PAD_MULTIPLE, return_tensors="pt")
            return {k: v.to(device) for k, v in batch.items()}

        run = self.model
        if resolve_backend(backend, device, bf16) == "openvino":
            # the longest and the shortest pair: an example with padding, so the traced graph keeps the mask
            run = openvino_tower(self.model, pad([order[0], order[-1]]), bf16, throughput=len(batches) > 1) \
                or self.model
        bar = None
        if show_progress:
            from tqdm.auto import tqdm

            bar = tqdm(total=n, desc="rerank", unit="pair")

        def finished():
            if isinstance(run, OpenVINOTower):
                yield from run.map((rows, pad(rows)) for rows in batches)  # out of order: rows travel along
                return
            for rows in batches:
                with autocast(device, bf16):
                    yield rows, self.model(**pad(rows)).logits

        try:
            for rows, logits in finished():
                out[rows] = self._activate(logits.float().view(-1)).cpu().numpy()
                if bar is not None:
                    bar.update(len(rows))
        finally:
            self.model.train(was_training)
            if bar is not None:
                bar.close()
        return out

    # ------------------------------------------------------------------ saving
    def save(self, path: str | Path) -> Path:
        """Write the ranker in sentence-transformers ``CrossEncoder`` format (atomically)."""
        path = Path(path)
        with atomic_dir(path) as tmp:
            self.save_into(tmp)
        return path

    def save_into(self, folder: Path) -> None:
        from retriever.st_format import package_version

        folder = Path(folder)
        self.model.config.architectures = [type(self.model).__name__]
        self.model.save_pretrained(folder)
        self.tokenizer.model_max_length = self.max_length
        self.tokenizer.save_pretrained(folder)
        (folder / "modules.json").write_text(json.dumps(
            [{"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.base.modules.transformer.Transformer"}],
            indent=2) + "\n")
        (folder / "sentence_bert_config.json").write_text(json.dumps({
            "transformer_task": "sequence-classification",
            "modality_config": {"text": {"method": "forward", "method_output_name": "logits"}},
            "module_output_name": "scores", "max_seq_length": self.max_length}, indent=2) + "\n")
        (folder / ST_CONFIG).write_text(json.dumps({
            "__version__": {"sentence_transformers": package_version("sentence-transformers"),
                            "transformers": package_version("transformers"), "pytorch": package_version("torch")},
            "activation_fn": _ACTIVATION_PATH[self.activation], "model_type": "CrossEncoder",
            "default_prompt_name": None, "prompts": {}}, indent=2) + "\n")


def _saved_max_length(folder: Path, root: Path, tokenizer, config) -> int:
    """``max_seq_length`` of a sentence-transformers folder, else the tokenizer's limit, capped by the
    model's position embeddings."""
    limit = getattr(config, "max_position_embeddings", None) or DEFAULT_MAX_LENGTH
    for candidate in (folder / "sentence_bert_config.json", root / "sentence_bert_config.json"):
        if candidate.exists():
            value = json.loads(candidate.read_text()).get("max_seq_length")
            if value:
                return int(min(value, limit))
    tok_max = getattr(tokenizer, "model_max_length", None)
    if isinstance(tok_max, int) and 0 < tok_max < 10**6:
        return int(min(tok_max, limit))
    return int(min(DEFAULT_MAX_LENGTH, limit))


def rerank(ranker: Ranker, queries: dict[str, str], candidates: dict[str, list[str]], doc_text, *,
           batch_size: int | None = None, bf16: bool | None = None, show_progress: bool = False
           ) -> dict[str, dict[str, float]]:
    """Score each query's candidate documents with ``ranker``; ``doc_text(doc_id) -> str``.

    All pairs of all queries go through one length-sorted :meth:`Ranker.score` call, so batches are full
    and pad little. Returns ``{query_id: {doc_id: score}}`` (a run, higher is better)."""
    owners, pairs = [], []
    for qid, doc_ids in candidates.items():
        if qid not in queries:
            continue
        for d in doc_ids:
            owners.append((qid, d))
            pairs.append((queries[qid], doc_text(d)))
    scores = ranker.score(pairs, batch_size=batch_size, bf16=bf16, show_progress=show_progress)
    run: dict[str, dict[str, float]] = {}
    for (qid, d), s in zip(owners, scores):
        run.setdefault(qid, {})[d] = float(s)
    return run
