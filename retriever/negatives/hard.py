"""Hard negatives taken from the training data (``neg`` in FlagEmbedding JSONL, the third column of
MS MARCO triples, ``negative_passages`` in Tevatron), ``per_query`` of them per query, on top of the
in-batch negatives."""

from __future__ import annotations

import numpy as np
from pydantic import Field

from retriever.data import TrainingExample
from retriever.negatives.base import NegativeStrategy, StrategyOptions, register_strategy


class HardNegativesOptions(StrategyOptions):
    per_query: int = Field(1, gt=0, description="hard negatives drawn for each query in a batch")


@register_strategy("hard")
class HardNegatives(NegativeStrategy):
    """Draw ``per_query`` of an example's negatives each epoch: a random subset when it has more, all of
    them (then repeats, in random order) when it has fewer, as Tevatron does."""

    Options = HardNegativesOptions

    def negatives_for(self, example: TrainingExample, rng: np.random.Generator) -> list[str]:
        pool = example.negatives
        if not pool:
            raise ValueError(f"query {example.query_id or example.query[:60]!r} has no hard negatives; "
                             "use negatives.strategy: inbatch, or mine negatives first (negatron mine)")
        n = self.options.per_query
        if len(pool) >= n:
            picks = rng.choice(len(pool), size=n, replace=False)
        else:
            picks = np.resize(rng.permutation(len(pool)), n)
        return [pool[i] for i in picks]
