"""``negatron mine`` as a job: it survives a kill and splits over torchrun ranks.

Rows go to ``<output>.partial`` as they are mined, with the statistics so far saved beside them
(:class:`retriever.resumable_jsonl.ResumableJsonl`); a re-run with the same inputs and settings continues
after the last saved query. Under torchrun (``WORLD_SIZE`` > 1) rank ``r`` mines the ``r``-th contiguous
block of the queries into ``<output>.rank<r>-of-<w>`` (itself resumable; a finished block is kept with a
``.done.json`` beside it), and rank 0 concatenates the blocks in order and merges the statistics. Random
sampling is seeded per query position (:func:`mining.miner.mine`), so the file is the same on any number of
ranks and after any number of kills.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Sequence

from mining.miner import MiningConfig, mine, stats_path_for
from mining.stats import MiningStats
from retriever.io import atomic_write
from retriever.resumable_jsonl import ResumableJsonl


def run_mining_job(output: Path, training: Sequence, docs, retriever, config: MiningConfig, *, fingerprint: dict,
                   settings: dict, scorer=None, seconds: dict | None = None, rank: int = 0, world: int = 1,
                   barrier=None, console=None) -> tuple[Path, Path, MiningStats] | None:
    """Mine ``training`` into ``output`` (and ``<output>.stats.json``). Returns ``(output, stats path,
    stats)`` on rank 0, ``None`` on the other ranks. ``barrier``: waits for every rank (world > 1)."""
    lo, hi = chunk_block(len(training), config.query_batch_size, rank, world)
    part = output if world == 1 else block_path(output, rank, world)
    stats = _mine_block(part, training, lo, hi, docs, retriever, config, scorer, {**fingerprint, "block": [rank, world, lo, hi]},
                        settings, seconds or {}, world, console, show_progress=rank == 0)
    if world == 1:
        return output, stats_path_for(output), stats
    barrier()
    if rank != 0:
        return None
    parts = [block_path(output, r, world) for r in range(world)]
    done = [part.with_name(part.name + ".done.json") for part in parts]
    unseen = [str(path) for path in parts + done if not path.exists()]
    if unseen:  # ranks on other machines wrote them where this one cannot read
        raise FileNotFoundError(f"rank 0 cannot see the other ranks' blocks ({', '.join(unseen[:3])}): under "
                                "torchrun on several machines, --output must be on a filesystem every rank shares")
    merged = MiningStats.merged([json.loads(d.read_text())["state"]["stats"] for d in done])
    with atomic_write(output, "wb") as fh:  # the blocks in rank order: the queries' order
        for part in parts:
            with open(part, "rb") as src:
                shutil.copyfileobj(src, fh, 1 << 20)
    merged.settings["ranks"] = world
    stats_path = merged.write(stats_path_for(output))
    for path in parts + done:
        path.unlink(missing_ok=True)
    return output, stats_path, merged


def chunk_block(n: int, chunk: int, rank: int, world: int) -> tuple[int, int]:
    """Rank ``rank``'s contiguous block ``[lo, hi)`` of ``n`` queries, on ``chunk`` boundaries: every chunk is the
    chunk one process would encode (query embeddings, and so near-ties in the ranking, depend on which queries
    share a padded batch)."""
    chunks = -(-n // chunk)
    return rank * chunks // world * chunk, min(n, (rank + 1) * chunks // world * chunk)


def block_path(output: Path, rank: int, world: int) -> Path:
    """Where torchrun rank ``rank`` of ``world`` writes its block of ``output``."""
    return output.with_name(f"{output.name}.rank{rank}-of-{world}")


def _mine_block(part: Path, training, lo: int, hi: int, docs, retriever, config: MiningConfig, scorer,
                fingerprint: dict, settings: dict, seconds: dict, world: int, console, show_progress: bool):
    stats = MiningStats(num_negatives=config.num_negatives)
    done = [0]  # queries of the block consumed, the kept rows' included
    out = ResumableJsonl(part, fingerprint, state=lambda: {"queries_done": done[0], "stats": stats.state()},
                         done_marker=world > 1)
    finished = out.finished()
    if finished is not None:  # a killed run had finished this block
        return MiningStats.from_state(finished["stats"])
    kept = sum(1 for _ in out.kept_rows())
    if out.resumed_state:  # a killed run of the same job: continue after its last saved query
        done[0] = int(out.resumed_state["queries_done"])
        stats = MiningStats.from_state(out.resumed_state["stats"])
        if console is not None:
            console.print(f"continuing the interrupted run: {kept:,} rows for the first {done[0]:,} of "
                          f"{hi - lo:,} queries are kept in {out.partial} (delete it to start anew)")
    out.open()
    stats.settings = {**settings, "resumed_after_queries": done[0] or None}
    stats.seconds.update(seconds)

    # the state is saved at chunk ends only, so a resumed run's chunks are the uninterrupted run's chunks
    start = lo + done[0]
    try:
        for mined in mine(training[start:hi], docs, retriever, config, scorer=scorer, stats=stats,
                          show_progress=show_progress, first_position=start):
            done[0] += 1
            if mined.negative_ids:  # a query left without negatives gets no row
                out.write(mined.to_row(docs))
            if done[0] % config.query_batch_size == 0:
                out.checkpoint()
    except BaseException:
        out.close()  # the rows so far stay for the next run
        raise
    stats.settings["rows_written"] = out.rows  # in the state a done marker keeps
    out.finish()
    if world == 1:
        stats.write(stats_path_for(part))
    return stats
