"""Readers for the hard-negative files MS MARCO users already have, streamed into id-based example tables.

* sentence-transformers' ``msmarco-hard-negatives.jsonl.gz``: one line per training query,
  ``{"qid": 3, "pos": [pids], "neg": {"bm25": [pids], "msmarco-distilbert-base-v3": [pids], ...}}``,
  with its cross-encoder score file ``cross-encoder-ms-marco-MiniLM-L-6-v2-scores.pkl.gz``
  (a pickled dict ``qid -> {pid: score}``, both ints). The sentence-transformers MS MARCO recipe keeps a
  negative only when its cross-encoder score is below the query's lowest positive score minus a margin
  (``ce_score_margin``, 3.0 there): :func:`table_from_st_hard_negatives` applies the same rule.
* Tevatron's ``msmarco-passage-aug`` (``query_id``, ``query``, ``positive_passages``/``negative_passages``
  of ``{docid, title, text}``) and FlagEmbedding JSONL whose ``pos``/``neg`` are corpus ids: these go
  through :func:`retriever.example_table.table_from_jsonl` with the corpus, which keeps the ids as corpus
  rows and drops the inline copies of the texts. ``.gz`` files are read compressed.

Everything is read line by line; no file is materialised as Python objects holding texts.
"""

from __future__ import annotations

import gzip
import json
import os
import pickle
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Mapping, Sequence

from retriever.data import Corpus, DataError, _require_file, iter_jsonl_objects
from retriever.example_table import ExampleTable, ExampleTableBuilder, open_text

__all__ = ["StHardNegatives", "open_text", "is_st_hard_negatives", "iter_st_hard_negatives",
           "load_cross_encoder_scores", "table_from_st_hard_negatives"]


@dataclass
class StHardNegatives:
    """One line of ``msmarco-hard-negatives.jsonl.gz`` (ids as strings, as in the MS MARCO TSVs)."""

    qid: str
    pos: list[str]
    neg: dict[str, list[str]]  # system name -> passage ids, best first


def is_st_hard_negatives(path: str | os.PathLike) -> bool:
    """True when the first record has the sentence-transformers layout (``qid`` and a ``neg`` dict)."""
    with open_text(Path(path)) as fh:
        for line in fh:
            if line.strip():
                try:
                    obj = json.loads(line)
                except json.JSONDecodeError:
                    return False
                return isinstance(obj, dict) and "qid" in obj and isinstance(obj.get("neg"), dict)
    return False


def iter_st_hard_negatives(path: str | os.PathLike) -> Iterator[StHardNegatives]:
    path = _require_file(Path(path), "hard-negatives file")
    with open_text(path) as fh:
        for lineno, obj in iter_jsonl_objects(path, fh):
            if "qid" not in obj or "pos" not in obj:
                raise DataError(path, lineno, 'expected {"qid": ..., "pos": [...], "neg": {system: [...]}}',
                                "this reader is for sentence-transformers' msmarco-hard-negatives.jsonl.gz")
            neg = obj.get("neg") or {}
            if not isinstance(neg, dict) or not all(isinstance(v, list) for v in neg.values()):
                raise DataError(path, lineno, '"neg" must map each system name to a list of passage ids',
                                'write "neg": {"bm25": [pid, ...]}')
            pos = obj["pos"] if isinstance(obj["pos"], list) else [obj["pos"]]
            yield StHardNegatives(str(obj["qid"]), [str(p) for p in pos], {k: [str(p) for p in v] for k, v in neg.items()})


def load_cross_encoder_scores(path: str | os.PathLike) -> Mapping:
    """``cross-encoder-ms-marco-MiniLM-L-6-v2-scores.pkl.gz``: ``{qid: {pid: score}}``.

    A pickle cannot be streamed: this loads the whole dict (the published file, ~503k queries with ~50
    scored passages each, takes a few GB as Python objects). Pass ``qids`` to
    :func:`table_from_st_hard_negatives` through ``max_examples`` to bound a trial run.
    """
    path = _require_file(Path(path), "cross-encoder scores file")
    opener = gzip.open if path.name.endswith(".gz") else open
    try:
        with opener(path, "rb") as fh:
            scores = pickle.load(fh)  # noqa: S301 - a file the user names, as sentence-transformers loads it
    except (pickle.UnpicklingError, EOFError, OSError) as exc:
        raise DataError(path, None, f"cannot unpickle the score file ({exc})", "give the .pkl.gz the sentence-transformers recipe uses") from None
    if not isinstance(scores, dict):
        raise DataError(path, None, f"expected a dict qid -> {{pid: score}}, found {type(scores).__name__}", "give the cross-encoder score file")
    return scores


def _score(scores: Mapping | None, qid: str, pid: str):
    if scores is None:
        return None
    per_query = scores.get(int(qid)) if qid.isdigit() and int(qid) in scores else scores.get(qid)
    if per_query is None:
        return None
    value = per_query.get(int(pid)) if pid.isdigit() and int(pid) in per_query else per_query.get(pid)
    return None if value is None else float(value)


def table_from_st_hard_negatives(path: str | os.PathLike, queries: Mapping[str, str], corpus: Corpus,
                                 systems: Sequence[str] | None = None, ce_scores: Mapping | None = None,
                                 ce_score_margin: float | None = 3.0, max_negatives: int | None = None,
                                 max_examples: int | None = None) -> ExampleTable:
    """Examples (query text, positive and negative corpus rows) from ``msmarco-hard-negatives.jsonl.gz``.

    ``systems``: which systems' negatives to use (default all), merged in the file's order, duplicates
    and positives dropped. With ``ce_scores``, every passage carries its cross-encoder score and
    negatives scoring above ``min(positive scores) - ce_score_margin`` are dropped (likely false
    negatives; ``None`` keeps them all). Queries without text in ``queries`` are skipped, as in the recipe.
    """
    path = Path(path)
    b = ExampleTableBuilder(corpus)
    for record in iter_st_hard_negatives(path):
        if max_examples is not None and len(b) >= max_examples:
            break
        if record.qid not in queries:
            continue
        pos_rows = corpus.rows(record.pos)
        if (pos_rows < 0).any():
            missing = [p for p, r in zip(record.pos, pos_rows.tolist()) if r < 0]
            raise DataError(path, None, f"query {record.qid}'s positives {missing[:3]} are not in {corpus.path}",
                            "use the MS MARCO collection.tsv these ids come from")
        chosen = list(systems) if systems is not None else list(record.neg)
        if systems is not None and len(b) == 0 and not any(s in record.neg for s in chosen):
            raise DataError(path, None, f"none of the systems {chosen} is in the file (its first query has "
                            f"{sorted(record.neg)})", "fix `systems`")
        pos_scores = [_score(ce_scores, record.qid, p) for p in record.pos]
        threshold = None
        if ce_scores is not None and ce_score_margin is not None and all(s is not None for s in pos_scores):
            threshold = min(pos_scores) - ce_score_margin
        seen, negs, neg_scores = set(record.pos), [], []
        for system in chosen:
            for pid in record.neg.get(system, []):
                if pid in seen:
                    continue
                seen.add(pid)
                score = _score(ce_scores, record.qid, pid)
                if threshold is not None and (score is None or score > threshold):
                    continue
                negs.append(pid)
                neg_scores.append(score)
        if max_negatives is not None:
            negs, neg_scores = negs[:max_negatives], neg_scores[:max_negatives]
        neg_rows = corpus.rows(negs)
        keep = [i for i, r in enumerate(neg_rows.tolist()) if r >= 0]  # a pid absent from the collection: skipped
        have_scores = ce_scores is not None and all(s is not None for s in pos_scores) and \
            all(neg_scores[i] is not None for i in keep)
        b.add(queries[record.qid], record.qid, pos_rows.tolist(), [int(neg_rows[i]) for i in keep],
              pos_scores if have_scores else None, [neg_scores[i] for i in keep] if have_scores else None)
    if not len(b):
        raise DataError(path, None, "no training examples (no query id of the file is in the queries file)",
                        "pass MS MARCO's queries.train.tsv as the queries")
    return b.build()
