"""Run MTEB retrieval tasks on a negatron BiEncoder, offline.

* :class:`BiEncoderForMteb` wraps a BiEncoder as an mteb encoder: queries go through the query
  tower and prefix, documents through the document tower and prefix (mteb joins title + text).
* :func:`local_beir_task` turns a BEIR folder into an ``AbsTaskRetrieval`` whose ``TaskMetadata``
  is built declaratively and whose data comes from the folder, so nothing is downloaded.
* Registered tasks (``SciFact``, ``NFCorpus``, ...) run when their data is in the local Hugging Face
  cache; otherwise :class:`MtebDataMissing` says so (no traceback from the CLI).

Results are mteb's own ``TaskResult`` JSON, one file per task, in the output folder.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any, Sequence

import numpy as np

logger = logging.getLogger(__name__)


class MtebDataMissing(RuntimeError):
    """A registered mteb task whose dataset is not in the local Hugging Face cache."""


def _wrapper_class():
    from mteb.models.abs_encoder import AbsEncoder
    from mteb.models.model_meta import ModelMeta, ScoringFunction
    from mteb.types import PromptType

    class BiEncoderForMteb(AbsEncoder):
        def __init__(self, model, batch_size: int | None = None, bf16: bool | None = None, name: str | None = None):
            self.model = model
            self.batch_size = batch_size
            self.bf16 = bf16
            label = name or str(model.name or "negatron-model")
            # mteb keys results by an "org/name" model name
            label = label if "/" in label and not label.startswith("/") else f"negatron/{Path(label).name}"
            self.mteb_model_meta = ModelMeta.create_empty(overwrites={
                "name": label, "revision": "local", "embed_dim": model.dim,
                "similarity_fn_name": ScoringFunction.COSINE if model.normalize else ScoringFunction.DOT_PRODUCT,
                "max_tokens": model.doc_max_length, "framework": ["PyTorch"]})

        def encode(self, inputs, *, task_metadata, hf_split: str, hf_subset: str,
                   prompt_type: PromptType | None = None, **kwargs: Any) -> np.ndarray:
            from index.encode import encode_texts

            texts: list[str] = []
            for batch in inputs:
                texts.extend(batch["text"])
            kind = "query" if prompt_type == PromptType.query else "document"
            return encode_texts(self.model, texts, kind, self.batch_size, self.bf16)

    return BiEncoderForMteb


def mteb_model(model, batch_size: int | None = None, bf16: bool | None = None, name: str | None = None):
    """An mteb encoder around a BiEncoder (or a model path/name)."""
    from eval.beir import load_model

    return _wrapper_class()(load_model(model), batch_size=batch_size, bf16=bf16, name=name)


def local_beir_task(data_dir, split: str = "test", name: str | None = None):
    """An mteb retrieval task over a local BEIR folder (nDCG@10 main score, English, text-to-text)."""
    from datasets import Dataset
    from mteb.abstasks.retrieval import AbsTaskRetrieval
    from mteb.abstasks.task_metadata import TaskMetadata

    from retriever.data import load_beir

    folder = Path(data_dir)
    task_name = name or f"Local{folder.name}"
    split_name = split

    class LocalBeirRetrieval(AbsTaskRetrieval):
        ignore_identical_ids = True
        metadata = TaskMetadata(
            name=task_name,
            dataset={"path": str(folder.resolve()), "revision": "local"},
            description=f"Local BEIR folder {folder.resolve()} evaluated offline.",
            reference=None,
            type="Retrieval",
            category="t2t",
            modalities=["text"],
            eval_splits=[split_name],
            eval_langs=["eng-Latn"],
            main_score="ndcg_at_10",
            date=None,
            domains=None,
            task_subtypes=None,
            license=None,
            annotations_creators=None,
            dialect=None,
            sample_creation=None,
            bibtex_citation=None,
        )

        def load_data(self, num_proc: int | None = None, **kwargs: Any) -> None:
            if self.data_loaded:
                return
            from eval.beir import check_qrels

            # dangling qrels: warned about once, then scored by mteb as it scores them (relevant, never retrieved)
            data = load_beir(folder, split_name, check_ids=False)
            check_qrels(Path(folder) / "qrels" / f"{split_name}.tsv", data.qrels, data.queries, data.corpus)
            docs = list(data.corpus)
            corpus = Dataset.from_dict({"id": [d.id for d in docs], "title": [d.title for d in docs],
                                        "text": [d.text for d in docs]})
            queries = Dataset.from_dict({"id": list(data.queries), "text": list(data.queries.values())})
            self.dataset = {"default": {split_name: {"corpus": corpus, "queries": queries,
                                                     "relevant_docs": data.qrels, "top_ranked": None}}}
            self.data_loaded = True

    return LocalBeirRetrieval()


def _registered_tasks(names: Sequence[str]):
    import mteb

    tasks = []
    for name in names:
        try:
            tasks.append(mteb.get_task(name))
        except (KeyError, ValueError) as exc:
            raise ValueError(f"unknown mteb task {name!r} ({exc}); see `mteb.get_tasks()` for names") from None
    return tasks


def _load_offline(task) -> None:
    """Load a registered task's data from the local HF cache only."""
    import datasets
    from huggingface_hub import constants

    saved = (os.environ.get("HF_HUB_OFFLINE"), os.environ.get("HF_DATASETS_OFFLINE"),
             constants.HF_HUB_OFFLINE, datasets.config.HF_DATASETS_OFFLINE)
    os.environ["HF_HUB_OFFLINE"] = os.environ["HF_DATASETS_OFFLINE"] = "1"
    constants.HF_HUB_OFFLINE = datasets.config.HF_DATASETS_OFFLINE = True
    try:
        task.load_data()
    except Exception as exc:  # datasets/hub raise many types for "not cached"; all mean the same here
        repo = task.metadata.dataset.get("path")
        raise MtebDataMissing(
            f"mteb task {task.metadata.name}: its dataset {repo} is not in the local Hugging Face cache "
            f"({type(exc).__name__}). Download it once on a machine with network access "
            f"(`python -c \"import mteb; mteb.get_task('{task.metadata.name}').load_data()\"`) and copy "
            f"~/.cache/huggingface here, or pass the BEIR folder with --data instead.") from None
    finally:
        for key, value in zip(("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"), saved[:2]):
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
        constants.HF_HUB_OFFLINE, datasets.config.HF_DATASETS_OFFLINE = saved[2], saved[3]


def run_mteb(model, tasks: Sequence[str] = (), data_dirs: Sequence = (), output_dir=None, split: str = "test",
             batch_size: int | None = None, bf16: bool | None = None) -> list[dict]:
    """Evaluate on registered mteb ``tasks`` and local BEIR ``data_dirs``; write mteb's result JSON
    (``<output_dir>/<task>.json``) and return one summary dict per task and split."""
    import mteb

    encoder = mteb_model(model, batch_size=batch_size, bf16=bf16)
    task_objs = [local_beir_task(d, split) for d in data_dirs]
    for task in _registered_tasks(tasks):
        _load_offline(task)
        task_objs.append(task)
    # batch_size sizes mteb's data loader only: the encoder re-batches each chunk by length
    result = mteb.evaluate(encoder, task_objs, cache=None, encode_kwargs={"batch_size": 256},
                           show_progress_bar=False)
    summaries = []
    out = Path(output_dir) if output_dir is not None else None
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
    for task_result in result.task_results:
        path = None
        if out is not None:
            path = out / f"{task_result.task_name}.json"
            task_result.to_disk(path)
        for split_name, rows in task_result.scores.items():
            for row in rows:
                summaries.append({"task": task_result.task_name, "split": split_name,
                                  "subset": row.get("hf_subset"), "main_score": float(row["main_score"]),
                                  "ndcg_at_10": row.get("ndcg_at_10"), "path": path})
    return summaries
