"""Mining statistics: what each filter dropped, where the kept negatives sit in the ranking,
which queries came up short. Written as ``<output>.stats.json`` and printed as a rich table."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from mining.filters import FILTER_NAMES
from retriever.io import write_text_atomic

# Rank histogram bucket edges (0-based ranks; the last bucket is open-ended).
RANK_EDGES = (0, 10, 20, 30, 50, 100, 200, 500, 1000)


@dataclass
class MiningStats:
    queries: int = 0
    candidates: int = 0
    negatives: int = 0
    dropped: dict[str, int] = field(default_factory=lambda: dict.fromkeys(FILTER_NAMES, 0))
    short_queries: list[str] = field(default_factory=list)  # fewer than num_negatives negatives
    margin_unavailable: int = 0  # queries with no positive score, so no margin could apply
    # kept negatives per RANK_EDGES bucket, counted as they come (not a list of ranks: 2.5M ints on MS MARCO)
    rank_counts: list[int] = field(default_factory=lambda: [0] * len(RANK_EDGES), repr=False)
    num_negatives: int = 0
    settings: dict = field(default_factory=dict)
    seconds: dict[str, float] = field(default_factory=dict)

    def add(self, query_id: str, candidates: int, dropped: dict[str, int], kept_ranks, margin_applied: bool) -> None:
        self.queries += 1
        self.candidates += candidates
        for name, count in dropped.items():
            self.dropped[name] = self.dropped.get(name, 0) + int(count)
        kept_ranks = np.asarray(kept_ranks, dtype=np.int64)
        for bucket in np.searchsorted(RANK_EDGES, kept_ranks, side="right") - 1:
            self.rank_counts[int(bucket)] += 1
        self.negatives += len(kept_ranks)
        if len(kept_ranks) < self.num_negatives:
            self.short_queries.append(str(query_id))
        if not margin_applied:
            self.margin_unavailable += 1

    def rank_histogram(self) -> dict[str, int]:
        return {(f"{lo}+" if hi is None else f"{lo}-{hi - 1}"): count
                for lo, hi, count in zip(RANK_EDGES, RANK_EDGES[1:] + (None,), self.rank_counts)}

    def state(self) -> dict:
        """Everything counted so far, JSON-able: a resumed mining job continues from it."""
        return asdict(self)

    @classmethod
    def from_state(cls, state: dict) -> "MiningStats":
        return cls(**state)

    @classmethod
    def merged(cls, states: list[dict]) -> "MiningStats":
        """One job's statistics from its blocks' (torchrun ranks, in order): counts add up, each timing is
        the slowest block's (they ran side by side), settings are the first block's with the rows summed."""
        out = cls.from_state(states[0])
        for state in states[1:]:
            other = cls.from_state(state)
            out.queries += other.queries
            out.candidates += other.candidates
            out.negatives += other.negatives
            out.margin_unavailable += other.margin_unavailable
            for name, count in other.dropped.items():
                out.dropped[name] = out.dropped.get(name, 0) + count
            out.short_queries.extend(other.short_queries)
            out.rank_counts = [a + b for a, b in zip(out.rank_counts, other.rank_counts)]
            for step, secs in other.seconds.items():
                out.seconds[step] = max(out.seconds.get(step, 0.0), secs)
            out.settings["rows_written"] = out.settings.get("rows_written", 0) + other.settings.get("rows_written", 0)
        return out

    def to_dict(self) -> dict:
        data = asdict(self)
        data.pop("rank_counts")
        data["rank_histogram"] = self.rank_histogram()
        data["queries_with_fewer_negatives"] = len(self.short_queries)
        return data

    def write(self, path: str | Path) -> Path:
        path = Path(path)
        write_text_atomic(path, json.dumps(self.to_dict(), indent=2) + "\n")
        return path

    def table(self):
        from rich.table import Table

        table = Table(title="hard-negative mining", show_header=True)
        table.add_column("what")
        table.add_column("count", justify="right")
        table.add_column("share", justify="right")
        total = max(self.candidates, 1)
        table.add_row("queries", f"{self.queries:,}", "")
        table.add_row("candidates retrieved", f"{self.candidates:,}", "100.0%")
        for name, count in self.dropped.items():
            table.add_row(f"dropped: {name}", f"{count:,}", f"{100 * count / total:.1f}%")
        table.add_row("negatives written", f"{self.negatives:,}", f"{100 * self.negatives / total:.1f}%")
        short = len(self.short_queries)
        table.add_row(f"queries with < {self.num_negatives} negatives", f"{short:,}",
                      f"{100 * short / max(self.queries, 1):.1f}%")
        if self.margin_unavailable:
            table.add_row("queries without a positive score (no margin)", f"{self.margin_unavailable:,}", "")
        for label, count in self.rank_histogram().items():
            if count:
                table.add_row(f"kept at rank {label}", f"{count:,}", f"{100 * count / max(self.negatives, 1):.1f}%")
        for step, secs in self.seconds.items():
            table.add_row(f"time: {step}", f"{secs:.1f} s", "")
        return table
