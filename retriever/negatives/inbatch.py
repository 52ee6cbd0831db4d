"""In-batch negatives: every other query's positive (and hard negatives, when another strategy adds
them) is a negative. Nothing to configure; the base class already does exactly this."""

from __future__ import annotations

from retriever.negatives.base import NegativeStrategy, register_strategy


@register_strategy("inbatch")
class InBatchNegatives(NegativeStrategy):
    """Contrast each query with the other documents of the (global, cross-device) batch."""
