"""STAR: static hard negatives mined once by a warm-up model, plus random corpus negatives.

Zhan et al., "Optimizing Dense Retrieval Model Training with Hard Negatives", SIGIR 2021. Static hard
negatives alone make training unstable (they are a biased sample of the corpus); STAR mixes in random
negatives and reuses every document of the batch as a negative of every query, so each query sees
``batch × (1 + hard + random)`` candidates for the cost of encoding them once.

Hard negatives come, in order of preference, from the training data itself (a mined FlagEmbedding
JSONL, e.g. ``negatron mine`` output), from ``mined`` (such a JSONL, matched by query text), or are
mined up front: the warm-up model (default: the model being trained, before its first step; loaded on
the training device) encodes the corpus into a FAISS index and keeps, for every training query, ranks
``[range_min, range_max)`` (default the top 200, as DRhard) minus positives; each batch draws
``hard_per_query`` of them at random. Positives are never negatives: they are excluded by id and by
text, and the collator masks every copy of a query's positives in the batch.

The mined pool is static by definition (mined once, by the starting model), so it is written to
``<run>/star-hard-negatives.jsonl`` (atomically; one ``{"query", "neg_rows"}`` line a query, rows of the corpus
in file order, which the file's fingerprint pins) and read back by a resumed run (a fresh run mines anew): re-mining there would use the
resumed weights and change the negatives. Mining itself survives a kill: rows are appended to
``star-hard-negatives.jsonl.partial`` as they come, and a re-run of the folder with the same warm-up weights,
corpus, options and queries keeps them and mines only the rest.

``loss: pairwise`` trains with DRhard's pairwise loss over (s⁺, s⁻) pairs
(:class:`retriever.losses.pairwise.PairwiseLoss`); the default ``infonce`` is negatron's listwise
InfoNCE over the same candidates (the trainer's ``training.loss``).
"""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path
from typing import Any, Literal

import numpy as np
from pydantic import Field, model_validator

from retriever.data import Corpus, TrainingExample, iter_training_jsonl
from retriever.negatives.base import NegativeStrategy, StrategyOptions, register_strategy
from retriever.negatives.corpus_index import (IndexOptions, KeyedRows, build_index, corpus_path, example_queries,
                                              text_key, training_queries)

logger = logging.getLogger(__name__)
POOL_FILE = "star-hard-negatives.jsonl"


class STAROptions(StrategyOptions):
    hard_per_query: int = Field(1, ge=0, description="static hard negatives per query per batch")
    random_per_query: int = Field(1, ge=0, description="random corpus negatives per query per batch")
    mined: str | None = Field(None, description="mined training JSONL supplying hard negatives (by query text)")
    warmup_model: str | None = Field(None, description="model that mines up front (default: the starting model)")
    corpus: str | None = Field(None, description="corpus for random negatives and mining (default: the data's)")
    range_min: int = Field(0, ge=0, description="first retrieval rank kept when mining up front")
    range_max: int = Field(200, gt=0, description="ranks >= range_max are not mined (DRhard: the top 200)")
    mine_pool: int | None = Field(None, gt=0, description="hard negatives kept per query when mining up front, "
                                  "best-ranked first (default: every rank of the window; batches sample from it)")
    index: IndexOptions = Field(default_factory=IndexOptions, description="FAISS settings of the warm-up index "
                                "(factory, nprobe, ef_search, train_sample, gpu; default factory auto)")
    loss: Literal["infonce", "pairwise"] = Field("infonce", description="infonce: listwise InfoNCE (the trainer's "
                                                 "training.loss); pairwise: DRhard's STAR loss over (s+, s-) pairs")

    @model_validator(mode="after")
    def _check(self) -> "STAROptions":
        if self.hard_per_query + self.random_per_query == 0:
            raise ValueError("STAR needs hard_per_query or random_per_query > 0")
        if self.range_min >= self.range_max:
            raise ValueError(f"range_min ({self.range_min}) must be below range_max ({self.range_max})")
        return self


@register_strategy("star")
class STARNegatives(NegativeStrategy):
    Options = STAROptions

    @classmethod
    def uses_trainer_loss(cls, options: STAROptions) -> bool:
        return options.loss == "infonce"  # pairwise runs its own loss in micro_step

    def __init__(self, options=None):
        super().__init__(options)
        self.corpus: Corpus | None = None
        # query-text key -> hard negatives as int32 refs: a corpus row (>= 0), or -(1 + i) for the i-th text
        # of ``self._texts`` (a mined file's passages that are not in the corpus); texts are read from the
        # corpus when a batch is collated. MS MARCO, 503k queries x 200 mined: 0.4 GB, not ~40 GB of str.
        self.pool = KeyedRows(np.int32)
        self._texts = None
        self.mined_up_front = 0
        self.pairwise = None

    def prepare(self, trainer: Any) -> None:
        from retriever.losses.pairwise import PairwiseLoss

        self.corpus = Corpus(corpus_path(trainer, self.options.corpus))
        self.pairwise = PairwiseLoss(trainer.config.training.temperature) if self.options.loss == "pairwise" else None
        self.setup(trainer.train_examples, trainer.model, trainer.output_dir, device=trainer.device,
                   resuming=getattr(trainer, "resume_from", None) is not None)

    def micro_step(self, trainer: Any, batch, scale: float) -> float | None:
        if self.pairwise is None:
            return None
        from retriever.step import plain_step

        return plain_step(trainer.model, batch, self.pairwise, self, bf16=trainer.bf16, scale=scale,
                          dist_ctx=trainer.dist)

    def setup(self, examples, model, work_dir: Path, device=None, resuming: bool = False) -> None:
        """Collect hard negatives for ``examples``: a ``mined`` file's (by query text), else the example's
        own (used as they are at collate time), else mined up front with the warm-up model."""
        from retriever.example_table import StringPacker

        pool, packer = KeyedRows(np.int32), StringPacker()
        seen = self._read_mined(examples, pool, packer) if self.options.mined else set()
        missing, missing_keys = [], set()
        for i, (query, has_negatives) in enumerate(example_queries(examples)):
            key = text_key(query)
            if key not in seen and not has_negatives:
                missing.append(i)
                missing_keys.add(key)
                seen.add(key)  # one mining query per distinct query text
        if self.options.hard_per_query and missing:
            pool_file = Path(work_dir) / POOL_FILE
            if resuming and pool_file.exists():  # a fresh run over an old folder mines anew
                self._load_pool(pool_file, missing_keys, pool)
            else:
                self._mine(examples, missing, model, Path(work_dir) / "star-warmup-index", device, pool_file, pool)
                # the warm-up index (1.2x the fp16 matrix) is freed, but glibc keeps its many list buffers
                # in the heap: hand them back before hours of training (measured at 8.8M: 1.2 GB kept)
                from retriever.memory import release_freed_memory

                release_freed_memory()
        self.pool = pool.freeze()
        self._texts = packer.freeze() if len(packer) else None
        logger.info("STAR: hard-negative pools of %d queries, %d refs in %.1f MiB", len(self.pool),
                    len(self.pool.values), self.pool.nbytes / 2**20)

    def _read_mined(self, examples, pool: KeyedRows, packer) -> set[int]:
        """A mined JSONL's negatives by query text, minus every passage whose text is a positive of that query
        (in any training example with that text): refs into the corpus where the file names ids. Returns the
        keys of the queries the file gave negatives."""
        positives = KeyedRows()
        for ex in examples:
            positives.add(text_key(ex.query), (text_key(t.strip()) for t in ex.positives))
        positives.freeze(unique=True)
        found: set[int] = set()
        for ex in iter_training_jsonl(self.options.mined, self.corpus):
            if not ex.negatives:
                continue
            own = positives.get(text_key(ex.query))
            own = set(own.tolist()) if own is not None else set()
            own.update(text_key(t.strip()) for t in ex.positives)
            rows = self.corpus.rows(ex.negative_ids) if len(ex.negative_ids) == len(ex.negatives) \
                else np.full(len(ex.negatives), -1, np.int64)
            refs = [int(r) if r >= 0 else -1 - packer.add(t)
                    for t, r in zip(ex.negatives, rows) if text_key(t.strip()) not in own]
            pool.add(text_key(ex.query), refs)
            found.add(text_key(ex.query))
        self.corpus.release_pages()  # the file's negatives were looked up by id
        return found

    def _load_pool(self, path: Path, wanted: set[int] | None, pool: KeyedRows) -> int:
        """Pool lines of ``path`` (those of ``wanted`` query keys; all when None) into ``pool``: a pool this
        folder mined before (a resumed run, a finished pool, another rank's block). Returns the lines read."""
        n = 0
        with open(path, encoding="utf-8") as fh:
            for lineno, line in enumerate(fh, 1):
                try:
                    key, rows = self._pool_rows(json.loads(line))
                except (ValueError, KeyError, TypeError) as exc:
                    raise ValueError(f"{path}:{lineno}: not a STAR pool line ({exc}); delete the file to mine "
                                     "again with the starting model") from None
                if wanted is None or key in wanted:
                    if len(rows) and (rows.min() < 0 or rows.max() >= len(self.corpus)):
                        raise ValueError(f"{path}:{lineno}: negatives not in {self.corpus.path}; delete the file to "
                                         "mine again with the starting model")
                    pool.add(key, rows)
                    n += 1
        logger.info("STAR: read the mined pool of %d queries from %s", n, path)
        return n

    def _pool_rows(self, row: dict) -> tuple[int, np.ndarray]:
        """A pool line's query key and corpus rows: ``neg_rows`` (written since 2026-12-07) or ``neg_ids``."""
        key = text_key(row["query"])
        if "neg_rows" in row:
            return key, np.asarray(row["neg_rows"], dtype=np.int64).reshape(-1)
        rows = self.corpus.rows(row["neg_ids"])
        return key, np.where(rows < 0, len(self.corpus), rows)  # an unknown id fails the range check

    def _mine(self, examples, indices: list[int], model, folder: Path, device, pool_file: Path | None,
              pool: KeyedRows) -> None:
        """Mine ``examples[indices]`` into ``pool``, streaming it by id to ``pool_file``. A run killed while
        mining (hours for 503k MS MARCO queries on a CPU) leaves ``<pool>.partial``; the next run of the same
        folder with the same warm-up weights, corpus, options and queries keeps those rows, reuses the warm-up
        index, and mines only the rest (:class:`retriever.resumable_jsonl.ResumableJsonl`). Under torchrun each
        rank mines a contiguous block of the queries into its own file, every rank then reads the others'
        blocks (each needs the whole pool), and rank 0 joins them into ``pool_file``."""
        from index.encode import _rank_world, model_fingerprint
        from mining.miner import MiningConfig

        from retriever.io import write_text_atomic
        from retriever.modeling import BiEncoder
        from retriever.resumable_jsonl import ResumableJsonl, fingerprint_texts

        warmup = model
        if self.options.warmup_model:  # on the training device: encoding the corpus is the costly part
            warmup = BiEncoder.from_pretrained(self.options.warmup_model)
            if device is not None:
                warmup.to(device)
        window = self.options.range_max - self.options.range_min
        config = MiningConfig(k=self.options.range_max, range_min=self.options.range_min,
                              range_max=self.options.range_max, num_negatives=self.options.mine_pool or window,
                              sampling="top", score_positives=False)
        stat = Path(self.corpus.path).stat()
        fingerprint = {
            "warmup_document": model_fingerprint(warmup, "document"),
            "warmup_query": model_fingerprint(warmup, "query"),
            "corpus": [str(Path(self.corpus.path).resolve()), stat.st_size, stat.st_mtime_ns, len(self.corpus)],
            "mining": {"range_min": self.options.range_min, "range_max": self.options.range_max,
                       "mine_pool": self.options.mine_pool, "index": self.options.index.model_dump(mode="json")},
            # the queries and their positives (mining drops a query's positives from its pool): corpus rows
            # where the examples hold them (no passage read for 503k queries), else ids or texts
            "queries": [len(indices), fingerprint_texts(lambda: (
                f"{q.text}\t{_positives_signature(q)}" for q in training_queries(examples, indices, self.corpus)))],
        }
        rank, world = _rank_world()
        mined_before = pool_file is not None and ResumableJsonl(pool_file, fingerprint, done_marker=True).finished() is not None
        if _every_rank(mined_before):  # decided together: the ranks then all read, or all mine
            logger.info("STAR: %s was mined by the same warm-up model from the same corpus, options and queries; "
                        "reading it", pool_file)
            self._read_rows(pool_file, pool)  # a run killed after its mining (e.g. in training) is re-run
            return
        if world == 1 or pool_file is None:
            self._mine_block(examples, indices, warmup, folder, config, pool_file, fingerprint, pool, world)
            return
        from mining.job import chunk_block

        lo, hi = chunk_block(len(indices), config.query_batch_size, rank, world)
        parts = [pool_file.with_name(f"{pool_file.name}.rank{r}-of-{world}") for r in range(world)]
        self._mine_block(examples, indices[lo:hi], warmup, folder, config, parts[rank],
                         {**fingerprint, "block": [rank, world, lo, hi]}, pool, world)
        _wait_for_all_ranks()  # every block is finished
        if not _every_rank(all(part.exists() for part in parts)):  # fail together, never hang in a barrier
            raise RuntimeError(f"STAR under torchrun: a rank cannot see the other ranks' blocks of {pool_file}; "
                               "the run folder must be on a filesystem every rank shares (or mine first with "
                               "`negatron mine` and pass the file as negatives.options.mined)")
        for r, part in enumerate(parts):
            if r != rank:
                self._read_rows(part, pool)
        _wait_for_all_ranks()  # every rank has read every block
        if rank == 0:
            from retriever.io import atomic_write

            with atomic_write(pool_file, "wb") as fh:  # blocks in rank order: the queries' order
                for part in parts:
                    with open(part, "rb") as src:
                        shutil.copyfileobj(src, fh, 1 << 20)
            write_text_atomic(pool_file.with_name(pool_file.name + ".done.json"),
                              json.dumps({"fingerprint": json.loads(json.dumps(fingerprint)), "state": None}) + "\n")
            for part in parts:
                part.unlink(missing_ok=True)
                part.with_name(part.name + ".done.json").unlink(missing_ok=True)

    def _read_rows(self, path: Path, pool: KeyedRows) -> int:
        n = self._load_pool(path, None, pool)
        self.mined_up_front += n
        return n

    def _mine_block(self, examples, indices: list[int], warmup, folder: Path, config, out_file: Path | None,
                    fingerprint: dict, pool: KeyedRows, world: int) -> None:
        """Mine ``examples[indices]`` into ``pool`` and ``out_file`` (resumable). Under torchrun every rank
        calls this (the index build is collective), each with its own block and file."""
        from mining.miner import DenseRetriever, mine

        from retriever.resumable_jsonl import ResumableJsonl

        out = ResumableJsonl(out_file, fingerprint, done_marker=True) if out_file is not None else None
        if out is not None and out.finished() is not None:  # this rank's block was finished before a kill
            self._read_rows(out_file, pool)
            indices = []
        elif out is not None:
            # keep whole chunks only: the rest is mined again in the chunk one process would have encoded
            # (query embeddings, and so near-ties in the ranking, depend on which queries share a padded batch)
            whole = out.complete_rows() // config.query_batch_size * config.query_batch_size
            done = set()
            for row in out.kept_rows(limit=whole):
                key, rows = self._pool_rows(row)
                pool.add(key, rows)
                done.add(key)
            if done:
                logger.info("STAR: %d of %d queries were mined by the interrupted run in %s; mining the rest",
                            len(done), len(indices), out.partial)
                indices = [i for i in indices if text_key(examples[i].query) not in done]
            self.mined_up_front += len(done)
        logger.info("STAR: mining hard negatives for %d queries with the warm-up model", len(indices))
        # the warm-up index is built by every rank together (a collective under torchrun), or by none; one this
        # folder already holds, built from the same embeddings with the same factory, is loaded instead (a run
        # killed after building it, e.g. 15 min of IVF at 8.8M on a CPU, before any mined row was synced)
        if _any_rank(bool(indices)):
            dense, _ = build_index(warmup, self.corpus, folder, options=self.options.index, reuse_index=True)
        if not indices:
            if out is not None and out.finished() is None:  # killed after the last row, before the rename
                out.open().finish()
            return
        if out is not None:
            out.open()
        try:
            queries = training_queries(examples, indices, self.corpus)
            for mined in mine(queries, self.corpus, DenseRetriever(dense, warmup), config):
                rows = mined.negative_rows if mined.negative_rows is not None \
                    else self.corpus.rows(list(mined.negative_ids))
                pool.add(text_key(mined.query.text), rows)
                if out is not None:  # rows: writing ids would read 100 id strings a query, at random over 8.8M
                    out.write({"query": mined.query.text, "neg_rows": rows.tolist()})
                self.mined_up_front += 1
        except BaseException:
            if out is not None:
                out.close()  # the rows so far stay for the next run
            raise
        if out is not None:
            out.finish()

    def _text(self, ref: int) -> str:
        return self.corpus[int(ref)].full_text if ref >= 0 else self._texts[-1 - int(ref)]

    def hard_texts(self, query: str) -> list[str]:
        """The texts of ``query``'s stored hard-negative pool (empty when it uses its example's own)."""
        refs = self.pool.get(text_key(query))
        return [] if refs is None else [self._text(r) for r in refs]

    def _random(self, example: TrainingExample, rng: np.random.Generator, n: int) -> list[str]:
        positives = set(example.positive_ids)
        texts = {t.strip() for t in example.positives}
        out: list[str] = []
        while len(out) < n:
            doc = self.corpus[int(rng.integers(len(self.corpus)))]
            if doc.id not in positives and doc.full_text.strip() not in texts:
                out.append(doc.full_text)
        return out

    def negatives_for(self, example: TrainingExample, rng: np.random.Generator) -> list[str]:
        if self.corpus is None:
            raise RuntimeError("STARNegatives.prepare() must run before batches are collated")
        out: list[str] = []
        n_hard = self.options.hard_per_query
        if n_hard:
            refs = self.pool.get(text_key(example.query))
            if refs is not None:  # positives by text were dropped when the pool was built; by id here (cheap)
                if example.positive_ids:
                    refs = refs[~np.isin(refs, self.corpus.rows(example.positive_ids))]
                texts = None
            else:
                positives = {t.strip() for t in example.positives}
                texts = [t for t in example.negatives if t.strip() not in positives]
            size = len(refs) if texts is None else len(texts)
            if not size:
                raise ValueError(f"query {example.query_id or example.query[:60]!r} has no hard negatives "
                                 "(every mined candidate was a positive); raise range_max or mine_pool")
            picks = rng.choice(size, size=n_hard, replace=size < n_hard)
            out += [self._text(refs[i]) for i in picks] if texts is None else [texts[i] for i in picks]
        return out + self._random(example, rng, self.options.random_per_query)


def _wait_for_all_ranks() -> None:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def _positives_signature(q) -> str:
    if q.positive_rows is not None:
        return "rows:" + "|".join(map(str, q.positive_rows.tolist()))
    return "|".join(q.positive_ids or q.positive_texts or ())


def _every_rank(flag: bool) -> bool:
    """``flag`` and-ed over the torchrun ranks."""
    return not _any_rank(not flag)


def _any_rank(flag: bool) -> bool:
    """``flag`` or-ed over the torchrun ranks (the flag itself in a single process)."""
    import torch.distributed as dist

    from retriever.distributed import context_from_group, gather_objects

    if not (dist.is_available() and dist.is_initialized()):
        return flag
    return any(gather_objects(flag, context_from_group()))
