"""The sentence-transformers folder of a Transformer → Pooling → (Normalize) pipeline, read and written
without importing ``sentence_transformers``.

Importing that package pulls in scikit-learn, SciPy and its whole training stack: 260 MiB of resident
memory and 3.5-5 s per process on top of torch and transformers (measured on the 2-vCPU AMX Xeon, docs/scaling.md), paid by every ``negatron``
command that loads or saves a model, by every torchrun rank, and at every checkpoint. The folder itself is
a few JSON files. Written here in the classic layout (``sentence_transformers.models.*``, the layout of
all-MiniLM-L6-v2 and all-mpnet-base-v2), which every sentence-transformers release from 2.x to 6.x loads;
read here only when a folder is exactly that pipeline in that layout. Anything else (Dense layers,
lower-casing, model or tokenizer arguments, the 6.x layout, a hub id) is left to ``SentenceTransformer``
itself: :func:`read_classic` returns ``None``. tests/test_st_format.py holds both directions against
the real package.
"""

from __future__ import annotations

import importlib.metadata
import json
from pathlib import Path

# negatron pooling -> the classic Pooling config's flag
POOLING_FLAGS = {"cls": "pooling_mode_cls_token", "mean": "pooling_mode_mean_tokens",
                 "last-token": "pooling_mode_lasttoken"}
_OTHER_FLAGS = ("pooling_mode_max_tokens", "pooling_mode_mean_sqrt_len_tokens", "pooling_mode_weightedmean_tokens")
_CLASSIC = "sentence_transformers.models."
_KNOWN_TRANSFORMER_KEYS = {"max_seq_length", "do_lower_case"}


def write_classic(folder: Path, dim: int, pooling: str, normalize: bool, max_seq_length: int,
                  query_prefix: str, doc_prefix: str) -> None:
    """The sentence-transformers files beside a ``save_pretrained`` model and tokenizer in ``folder``."""
    modules = [{"idx": 0, "name": "0", "path": "", "type": _CLASSIC + "Transformer"},
               {"idx": 1, "name": "1", "path": "1_Pooling", "type": _CLASSIC + "Pooling"}]
    if normalize:
        modules.append({"idx": 2, "name": "2", "path": "2_Normalize", "type": _CLASSIC + "Normalize"})
        (folder / "2_Normalize").mkdir(exist_ok=True)
    _dump(folder / "modules.json", modules)
    _dump(folder / "sentence_bert_config.json", {"max_seq_length": max_seq_length, "do_lower_case": False})
    (folder / "1_Pooling").mkdir(exist_ok=True)
    flags = {flag: mode == pooling for mode, flag in POOLING_FLAGS.items()}
    _dump(folder / "1_Pooling" / "config.json", {"word_embedding_dimension": dim, **flags,
                                                  **{flag: False for flag in _OTHER_FLAGS}, "include_prompt": True})
    _dump(folder / "config_sentence_transformers.json", {
        "__version__": {name: package_version(dist) for name, dist in (("sentence_transformers", "sentence-transformers"),
                                                                 ("transformers", "transformers"), ("pytorch", "torch"))},
        "prompts": {"query": query_prefix, "document": doc_prefix},
        "default_prompt_name": None,
        "similarity_fn_name": "cosine" if normalize else "dot",
    })
    (folder / "README.md").write_text(
        "---\nlibrary_name: sentence-transformers\npipeline_tag: sentence-similarity\ntags:\n- sentence-transformers\n"
        "- feature-extraction\n- negatron\n---\n\n# Bi-encoder trained with negatron\n\n"
        f"{dim}-dimensional {'normalised ' if normalize else ''}embeddings, {pooling} pooling, documents truncated at "
        f"{max_seq_length} tokens. Query prompt: {query_prefix!r}; document prompt: {doc_prefix!r}.\n\n"
        "```python\nfrom sentence_transformers import SentenceTransformer\n\nmodel = SentenceTransformer(\"path/to/this/folder\")\n"
        "queries = model.encode([\"...\"], prompt_name=\"query\")\ndocuments = model.encode([\"...\"], prompt_name=\"document\")\n"
        "```\n\nThe training run's own settings are in `negatron.json` and the run folder's `config.yaml`.\n",
        encoding="utf-8")


def read_classic(folder: Path) -> dict | None:
    """``{"max_seq_length", "pooling", "normalize", "query_prefix", "doc_prefix"}`` of a classic
    Transformer → Pooling → (Normalize) folder, or ``None`` where only ``SentenceTransformer`` can say."""
    try:
        modules = json.loads((folder / "modules.json").read_text(encoding="utf-8"))
        kinds = [m["type"] for m in modules]
        if kinds[:2] != [_CLASSIC + "Transformer", _CLASSIC + "Pooling"] or modules[0]["path"] != "" \
                or kinds[2:] not in ([], [_CLASSIC + "Normalize"]):
            return None
        transformer = json.loads((folder / "sentence_bert_config.json").read_text(encoding="utf-8"))
        pooling = json.loads((folder / modules[1]["path"] / "config.json").read_text(encoding="utf-8"))
        st_config = folder / "config_sentence_transformers.json"
        config = json.loads(st_config.read_text(encoding="utf-8")) if st_config.exists() else {}
    except (OSError, ValueError, KeyError, TypeError):
        return None
    if set(transformer) - _KNOWN_TRANSFORMER_KEYS or transformer.get("do_lower_case") \
            or not isinstance(transformer.get("max_seq_length"), int):
        return None
    modes = [mode for mode, flag in POOLING_FLAGS.items() if pooling.get(flag)]
    if len(modes) != 1 or any(pooling.get(flag) for flag in _OTHER_FLAGS) or not pooling.get("include_prompt", True):
        return None
    if config.get("default_prompt_name") or set(config) - {"__version__", "prompts", "default_prompt_name",
                                                           "similarity_fn_name", "model_type"}:
        return None
    prompts = config.get("prompts") or {}
    return {"max_seq_length": transformer["max_seq_length"], "pooling": modes[0], "normalize": len(kinds) == 3,
            "query_prefix": prompts.get("query") or "",
            "doc_prefix": next((prompts[k] for k in ("document", "passage", "corpus") if k in prompts), "") or ""}


def _dump(path: Path, obj) -> None:
    path.write_text(json.dumps(obj, indent=2) + "\n", encoding="utf-8")


def package_version(dist: str) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None
