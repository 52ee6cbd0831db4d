"""Pluggable negative sources. ``register_strategy("name")`` adds one; ``get_strategy("name")`` looks it
up. Shipped: ``inbatch`` and ``hard``. See :mod:`retriever.negatives.base` for the hook contract."""

from retriever.negatives.base import (NegativeStrategy, StrategyOptions, available_strategies, get_strategy,
                                      register_strategy)
from retriever.negatives.hard import HardNegatives
from retriever.negatives.inbatch import InBatchNegatives
from retriever.negatives.star import STARNegatives  # noqa: E402  (registers "star")
from retriever.negatives.adore import ADORENegatives  # noqa: E402  (registers "adore")
from retriever.negatives.gist import GISTNegatives  # noqa: E402  (registers "gist")
from retriever.negatives.ance import ANCENegatives  # noqa: E402  (registers "ance")
from retriever.negatives.ar2 import AR2Strategy  # noqa: E402  (registers "ar2")
from retriever.negatives.tasb import TASBStrategy  # noqa: E402  (registers "tasb")

__all__ = ["NegativeStrategy", "StrategyOptions", "register_strategy", "get_strategy", "available_strategies",
           "InBatchNegatives", "HardNegatives", "STARNegatives", "ADORENegatives", "GISTNegatives", "ANCENegatives",
           "AR2Strategy", "TASBStrategy"]
