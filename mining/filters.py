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
    ``texts`` (aligned with ``doc_ids``) is needed only for ``exclude_texts``.
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

    excluded = np.fromiter((d in exclude_ids for d in doc_ids), dtype=bool, count=n)
    if exclude_texts and texts is not None:
        excluded |= np.fromiter((t.strip() in exclude_texts for t in texts), dtype=bool, count=n)
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
    """Scores (query, passage) pairs with a sentence-transformers CrossEncoder.

    ``activation`` defaults to the model's own (sigmoid for most rerankers, so thresholds are in [0, 1]).
    """

    kind = "cross-encoder"

    def __init__(self, model_name_or_path: str, device: str | None = None, batch_size: int = 32, max_length: int | None = None):
        from sentence_transformers import CrossEncoder

        from retriever.resolve import resolve_model

        self.name = str(model_name_or_path)
        self.model = CrossEncoder(resolve_model(model_name_or_path), device=device or "cpu", max_length=max_length)
        self.batch_size = batch_size

    def score(self, query: str, passages: Sequence[str]) -> np.ndarray:
        if not passages:
            return np.zeros(0, dtype=np.float32)
        pairs = [(query, p) for p in passages]
        return np.asarray(self.model.predict(pairs, batch_size=self.batch_size, show_progress_bar=False,
                                             convert_to_numpy=True), dtype=np.float32)


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


def load_scorer(model: str, scorer_type: Literal["cross-encoder", "bi-encoder"], device: str | None = None):
    if scorer_type == "cross-encoder":
        return CrossEncoderScorer(model, device=device)
    if scorer_type == "bi-encoder":
        return BiEncoderScorer(model, device=device)
    raise ValueError(f"unknown scorer type {scorer_type!r}; choose cross-encoder or bi-encoder")
