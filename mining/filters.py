"""False-negative filters and negative sampling for one query's ranked candidate list.

Every candidate is dropped by at most one filter, the first that rejects it, applied in this order
(cheapest first, so the scorer only reads survivors):

1. ``excluded``      -- a positive, or an id the caller excluded (matched by id and by exact text);
2. ``rank_window``   -- retrieval rank outside ``range_min <= rank < range_max`` (0-based positions
                        in the retriever's list, positives included, so rank 0 is the top hit);
3. ``margin``        -- positive-aware margin (NV-Retriever's TopK-PercPos / TopK-MarginPos): drop a
                        candidate scoring above ``pos - |pos| * relative_margin`` or above
                        ``pos - absolute_margin``; ``pos`` is the *lowest* positive score of the query
                        under the same retriever (the hardest positive: the conservative choice, as in
                        sentence-transformers). ``|pos|`` keeps the threshold below ``pos`` when scores
                        are negative; for positive scores it equals ``pos * (1 - relative_margin)``;
4. ``scorer``        -- a stronger scorer (cross-encoder, or a guide bi-encoder as in RocketQA's
                        denoising) rates the candidate above ``scorer_threshold``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Literal, Sequence

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

FILTER_NAMES = ("excluded", "rank_window", "margin", "scorer")
Sampling = Literal["top", "random"]


def margin_threshold(pos_score: float | None, relative_margin: float | None = None,
                     absolute_margin: float | None = None) -> float | None:
    """Highest score a negative may have, or None when no margin applies (no margin or no positive score).

    With both margins the stricter (lower) threshold wins.
    """
    if pos_score is None or not np.isfinite(pos_score):
        return None
    limits = []
    if relative_margin is not None:
        limits.append(pos_score - abs(pos_score) * relative_margin)
    if absolute_margin is not None:
        limits.append(pos_score - absolute_margin)
    return min(limits) if limits else None


class MarginFilter(BaseModel):
    """The margin filter options of ``negatron mine`` (filter 3), as one reusable options model.

    Strategies that mine their own negatives (ANCE, AR2) inherit from it so their configs take the same
    ``relative_margin`` / ``absolute_margin`` keys with the same meaning; :func:`keep_negatives` applies
    them together with the positive exclusion.
    """

    model_config = ConfigDict(extra="forbid")

    relative_margin: float | None = Field(None, ge=0, lt=1, description="drop candidates scoring above "
                                          "pos - |pos| * relative_margin (NV-Retriever TopK-PercPos)")
    absolute_margin: float | None = Field(None, ge=0, description="drop candidates scoring above pos - absolute_margin")

    @property
    def has_margin(self) -> bool:
        return self.relative_margin is not None or self.absolute_margin is not None

    def threshold(self, pos_score: float | None) -> float | None:
        return margin_threshold(pos_score, self.relative_margin, self.absolute_margin)


def positive_mask(doc_ids: Sequence[str], texts: Sequence[str] | None, positive_ids, positive_texts) -> np.ndarray:
    """True where a candidate is a positive: the same id, or the same text (stripped) under another id.

    Exact duplicates under different ids are common (MS MARCO) and are as relevant as the positive they
    copy, so they must never become negatives; the text test runs for every query whose candidates'
    ``texts`` are given, whatever the number of positive ids.
    """
    ids = set(positive_ids)
    mask = np.fromiter((d in ids for d in doc_ids), dtype=bool, count=len(doc_ids))
    wanted = {t.strip() for t in positive_texts}
    if wanted and texts is not None:
        if len(texts) != len(doc_ids):
            raise ValueError(f"{len(doc_ids)} candidate ids but {len(texts)} texts")
        mask |= np.fromiter((t.strip() in wanted for t in texts), dtype=bool, count=len(doc_ids))
    return mask


def keep_negatives(doc_ids: Sequence[str], scores: np.ndarray, *, texts: Sequence[str] | None,
                   positive_ids=(), positive_texts=(), pos_score: float | None = None,
                   margins: MarginFilter | None = None, range_min: int = 0,
                   range_max: int | None = None) -> FilterResult:
    """One query's candidates (rank order) minus positives (by id and text), the rank window and the
    margin filter: the shared filter of ``negatron mine``, the mining service, ANCE and AR2.

    ``pos_score`` is the lowest positive score under the retriever that produced ``scores`` (needed only
    when ``margins`` sets a margin; without it the margin is skipped, as in ``negatron mine``).
    """
    margins = margins or MarginFilter()
    excluded = positive_mask(doc_ids, texts, positive_ids, positive_texts)
    return filter_candidates(doc_ids, scores, exclude_mask=excluded, range_min=range_min, range_max=range_max,
                             pos_score=pos_score, relative_margin=margins.relative_margin,
                             absolute_margin=margins.absolute_margin)


@dataclass
class FilterResult:
    """Candidates that survived every filter (positions into the input list) and the drop counts."""

    kept: np.ndarray
    dropped: dict[str, int] = field(default_factory=lambda: dict.fromkeys(FILTER_NAMES, 0))
    scorer_scores: dict[int, float] = field(default_factory=dict)  # position -> scorer score, for all scored


def filter_candidates(
    doc_ids: Sequence[str],
    scores: np.ndarray,
    *,
    exclude_ids: frozenset[str] | set[str] = frozenset(),
    exclude_texts: frozenset[str] | set[str] = frozenset(),
    texts: Sequence[str] | None = None,
    exclude_mask: np.ndarray | None = None,
    range_min: int = 0,
    range_max: int | None = None,
    pos_score: float | None = None,
    relative_margin: float | None = None,
    absolute_margin: float | None = None,
    scorer: Callable[[np.ndarray], np.ndarray] | None = None,
    scorer_threshold: float | None = None,
) -> FilterResult:
    """Apply the filters to one query's candidates, given in rank order (position = rank).

    ``scorer(positions) -> scores`` is called once with the positions that passed filters 1-3.
    ``texts`` (aligned with ``doc_ids``) is needed for ``exclude_texts``: without them the text test
    cannot run, so a caller that passes ``exclude_texts`` must pass ``texts`` (ValueError otherwise).
    ``exclude_mask`` (bool per candidate, e.g. :func:`positive_mask`) is OR-ed into filter 1.
    """
    n = len(doc_ids)
    scores = np.asarray(scores, dtype=np.float32)
    if scores.shape != (n,):
        raise ValueError(f"{n} candidate ids but scores of shape {scores.shape}")
    result = FilterResult(kept=np.arange(0))
    alive = np.ones(n, dtype=bool)

    def drop(name: str, mask: np.ndarray) -> None:
        hit = alive & mask
        result.dropped[name] += int(hit.sum())
        alive[hit] = False

    excluded = np.fromiter((d in exclude_ids for d in doc_ids), dtype=bool, count=n) if exclude_ids else np.zeros(n, bool)
    if exclude_texts:
        if texts is None:  # silently skipping the text test let duplicates of a positive through
            raise ValueError("exclude_texts needs the candidates' texts (pass texts=)")
        excluded |= np.fromiter((t.strip() in exclude_texts for t in texts), dtype=bool, count=n)
    if exclude_mask is not None:
        excluded |= np.asarray(exclude_mask, dtype=bool)
    drop("excluded", excluded)

    ranks = np.arange(n)
    upper = n if range_max is None else range_max
    drop("rank_window", (ranks < range_min) | (ranks >= upper))

    limit = margin_threshold(pos_score, relative_margin, absolute_margin)
    if limit is not None:
        drop("margin", scores > limit)

    if scorer is not None and alive.any():
        positions = np.flatnonzero(alive)
        rated = np.asarray(scorer(positions), dtype=np.float32)
        result.scorer_scores = {int(p): float(s) for p, s in zip(positions, rated)}
        if scorer_threshold is not None:
            too_high = np.zeros(n, dtype=bool)
            too_high[positions] = rated > scorer_threshold
            drop("scorer", too_high)

    result.kept = np.flatnonzero(alive)
    return result


def sample_negatives(kept: np.ndarray, num_negatives: int, sampling: Sampling = "top",
                     rng: np.random.Generator | None = None) -> np.ndarray:
    """Pick ``num_negatives`` of the kept positions: the best-ranked (``top``) or uniformly at random
    without replacement (``random``, seeded through ``rng``), returned in rank order."""
    if num_negatives < 0:
        raise ValueError("num_negatives must be >= 0")
    kept = np.asarray(kept)
    if sampling == "top" or len(kept) <= num_negatives:
        return kept[:num_negatives]
    if sampling != "random":
        raise ValueError(f"unknown sampling {sampling!r}; choose top or random")
    rng = rng if rng is not None else np.random.default_rng()
    return np.sort(rng.choice(kept, size=num_negatives, replace=False))


# --------------------------------------------------------------------------- scorers
class CrossEncoderScorer:
    """Scores (query, passage) pairs with a cross-encoder through :class:`retriever.ranker.Ranker`: any
    sentence-transformers ``CrossEncoder`` folder or a ``negatron train-ranker`` output, with the scores
    ``CrossEncoder.predict`` gives (the checkpoint's activation: sigmoid for most published rerankers, so
    thresholds lie in [0, 1]; raw logits for negatron-trained rankers).

    ``score_many`` scores several queries' passages in one token-length-sorted pass (the miner sends a
    whole chunk of queries at once, so batches are full); bf16 autocast where native; ``device``
    defaults to the GPU when there is one. ``teacher=True`` (``--scorer ranker:R``) makes the miner write
    these scores as the rows' ``pos_scores``/``neg_scores`` (teacher scores for distillation).
    """

    kind = "cross-encoder"

    def __init__(self, model_name_or_path: str, device: str | None = None, batch_size: int | None = None,
                 max_length: int | None = None, bf16: bool | None = None, teacher: bool = False):
        import torch

        from retriever.ranker import Ranker

        self.name = str(model_name_or_path)
        device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        self.model = Ranker.load(model_name_or_path, max_length=max_length, device=device)
        self.batch_size, self.bf16, self.teacher = batch_size, bf16, teacher

    def score(self, query: str, passages: Sequence[str]) -> np.ndarray:
        return self.score_many([(query, passages)])[0]

    def score_many(self, requests: Sequence[tuple[str, Sequence[str]]]) -> list[np.ndarray]:
        """One score array per ``(query, passages)`` request, from a single batched pass."""
        pairs = [(q, p) for q, passages in requests for p in passages]
        flat = self.model.score(pairs, batch_size=self.batch_size, bf16=self.bf16)
        out, start = [], 0
        for _, passages in requests:
            out.append(flat[start:start + len(passages)])
            start += len(passages)
        return out


class BiEncoderScorer:
    """A guide bi-encoder (RocketQA-style denoising, GISTEmbed's guide): cosine / dot product of
    its own query and passage embeddings."""

    kind = "bi-encoder"

    def __init__(self, model_name_or_path: str, device: str | None = None, batch_size: int | None = None, bf16: bool | None = None):
        from retriever.modeling import BiEncoder

        self.name = str(model_name_or_path)
        self.model = BiEncoder.from_pretrained(model_name_or_path)
        if device:
            self.model.to(device)
        self.batch_size = batch_size
        self.bf16 = bf16

    def score(self, query: str, passages: Sequence[str]) -> np.ndarray:
        if not passages:
            return np.zeros(0, dtype=np.float32)
        from index.encode import encode_texts

        q = encode_texts(self.model, [query], kind="query", batch_size=1, bf16=self.bf16)
        d = encode_texts(self.model, list(passages), kind="document", batch_size=self.batch_size, bf16=self.bf16)
        return (d @ q[0]).astype(np.float32)


def load_scorer(model: str, scorer_type: Literal["cross-encoder", "bi-encoder", "ranker"], device: str | None = None):
    """``ranker`` is a cross-encoder whose scores also become the mined rows' teacher scores."""
    if scorer_type in ("cross-encoder", "ranker"):
        return CrossEncoderScorer(model, device=device, teacher=scorer_type == "ranker")
    if scorer_type == "bi-encoder":
        return BiEncoderScorer(model, device=device)
    raise ValueError(f"unknown scorer type {scorer_type!r}; choose cross-encoder, ranker or bi-encoder")
