"""A JSONL output that survives a kill: rows go to ``<name>.partial`` as they are made, the file takes its
final name only when complete, and a re-run with the same inputs keeps the rows already written.

Long jobs that write one row per query (STAR's up-front mining of 503k MS MARCO queries over 8.8M passages
takes hours on a CPU) would otherwise start again from nothing after a kill. What the rows depend on is
described by a ``fingerprint`` (model checkpoint hash, corpus, settings, the query list); rows of a partial
file are kept only when its fingerprint is equal, so a re-run never mixes rows of two different jobs.

Files beside the output ``<name>``: ``<name>.partial`` (complete lines; a torn last line from a kill is
cut off), ``<name>.partial.json`` (the fingerprint, written before the first row) and, for a job that
carries state between rows (a sampler's random state, running statistics), ``<name>.partial.state.json``:
that state and the row count it belongs to, written after each fsync of the rows. A job with state keeps
exactly the rows its last state covers. With ``done_marker`` (a torchrun rank's block of a job, which its
other blocks wait for), :meth:`ResumableJsonl.finish` leaves ``<name>.done.json`` (fingerprint and final
state) beside the finished file, so a re-run after a kill skips a block that was already finished.
"""

from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path
from typing import Callable, Iterator

from retriever.io import write_text_atomic

logger = logging.getLogger(__name__)


class ResumableJsonl:
    """Append rows to ``path``'s partial file; :meth:`finish` renames it into place.

    ``sync_every_s`` (default :attr:`SYNC_EVERY_S`): rows are flushed and fsynced at most this often (and at
    :meth:`finish`), so a kill loses at most that many seconds of rows; a job with ``state`` syncs only at its
    :meth:`checkpoint` calls. ``writer=False`` (the other ranks under torchrun): read the partial
    rows, write nothing. ``state``: called after each fsync; what it returns is saved with the row count and
    comes back as :attr:`resumed_state` (the job continues from there). ``done_marker``: see the module."""

    SYNC_EVERY_S = float(os.environ.get("NEGATRON_SYNC_EVERY_S", "30"))  # the environment: for kill tests

    def __init__(self, path: str | os.PathLike, fingerprint: dict, sync_every_s: float | None = None,
                 writer: bool = True, state: Callable[[], dict] | None = None, done_marker: bool = False):
        self.path = Path(path)
        self.done_file = self.path.with_name(self.path.name + ".done.json") if done_marker else None
        self.partial = self.path.with_name(self.path.name + ".partial")
        self.meta = self.path.with_name(self.path.name + ".partial.json")
        self.state_file = self.path.with_name(self.path.name + ".partial.state.json")
        self.state = state
        self.resumed_state: dict | None = None  # the state the kept rows end at (jobs with ``state``)
        self.rows = 0  # rows in the partial file: kept + written
        self.fingerprint = json.loads(json.dumps(fingerprint))  # as it reads back from the file
        self.sync_every_s = self.SYNC_EVERY_S if sync_every_s is None else sync_every_s
        self.writer = writer
        self._fh = None
        self._synced = time.monotonic()
        self.resumed_rows = 0

    def finished(self) -> dict | None:
        """With ``done_marker``: the final state (``{}`` without ``state``) when an earlier run of the same job
        finished ``path``, else None (then mine as usual: :meth:`kept_rows`, :meth:`open`, ...)."""
        if self.done_file is None or not (self.done_file.exists() and self.path.exists()) or self.partial.exists():
            return None  # a partial beside it: killed between the marker and the rename, the file is older
        try:
            saved = json.loads(self.done_file.read_text())
        except ValueError:
            return None
        if saved.get("fingerprint") != self.fingerprint:
            return None
        return saved.get("state") or {}

    def kept_rows(self, limit: int | None = None) -> Iterator[dict]:
        """The complete rows of an interrupted run with the same fingerprint (none otherwise; at most ``limit``:
        :meth:`open` cuts off the others); a partial file of another fingerprint is removed, with a log line
        saying why."""
        if limit is not None and self.state is not None:
            raise ValueError("a job with state keeps the rows its state covers: no limit")
        if not self.partial.exists() or not self.meta.exists():
            return
        try:
            old = json.loads(self.meta.read_text())
        except ValueError:
            old = None
        if old != self.fingerprint:
            changed = sorted(k for k in set(old or {}) | set(self.fingerprint)
                             if (old or {}).get(k) != self.fingerprint.get(k))
            logger.info("%s: the interrupted run's rows are from other inputs (%s differ); starting anew",
                        self.partial, ", ".join(changed) or "unreadable fingerprint")
            if self.writer:
                self._discard()
            return
        covered = None  # rows the saved state covers (jobs with state)
        if self.state is not None:
            try:
                saved = json.loads(self.state_file.read_text())
                covered, self.resumed_state = int(saved["rows"]), saved["state"]
            except (OSError, ValueError, KeyError, TypeError):
                covered = 0  # killed before the first state: nothing to continue from
            if covered == 0:
                self.resumed_state = None
        caps = [c for c in (covered, limit) if c is not None]
        cap = min(caps) if caps else None
        with open(self.partial, "rb") as fh:
            for lineno, line in enumerate(fh, 1):
                if not line.endswith(b"\n") or (cap is not None and lineno > cap):
                    break  # torn by the kill, or past the last saved state: cut off when writing resumes
                try:
                    row = json.loads(line)
                except ValueError:
                    raise ValueError(f"{self.partial}:{lineno}: not a JSON row; delete {self.partial} and "
                                     f"{self.meta} to start the job anew") from None
                self.resumed_rows += 1
                yield row
        if covered is not None and self.resumed_rows < covered:  # the state is ahead of the rows: trust neither
            logger.warning("%s: %d rows, its state says %d; starting anew", self.partial, self.resumed_rows, covered)
            self.resumed_rows, self.resumed_state = 0, None

    def complete_rows(self) -> int:
        """Complete lines in the partial file (0 without one), without parsing them."""
        if not self.partial.exists():
            return 0
        with open(self.partial, "rb") as fh:
            return sum(1 for line in fh if line.endswith(b"\n"))

    def open(self) -> "ResumableJsonl":
        """Start writing after the kept rows (call after :meth:`kept_rows` is exhausted)."""
        if not self.writer:
            return self
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if self.resumed_rows and self.partial.exists():
            with open(self.partial, "rb+") as fh:  # drop a torn last line, and rows past the saved state
                fh.truncate(_prefix_length(fh, self.resumed_rows))
            self.rows = self.resumed_rows
        else:
            self.resumed_state = None
            self._discard()
            write_text_atomic(self.meta, json.dumps(self.fingerprint, indent=2) + "\n")
            self.partial.write_bytes(b"")
        # backslashreplace: a lone surrogate (valid in JSON text) inside a string becomes its JSON escape
        self._fh = open(self.partial, "a", encoding="utf-8", errors="backslashreplace")
        self._synced = time.monotonic()
        return self

    def write(self, row: dict) -> None:
        if self._fh is None:
            return
        self._fh.write(json.dumps(row, ensure_ascii=False) + "\n")
        self.rows += 1
        if self.state is None and time.monotonic() - self._synced >= self.sync_every_s:
            self._sync()

    def checkpoint(self, force: bool = False) -> None:
        """A job with ``state`` calls this where its state and rows agree (e.g. after a whole chunk of
        queries): rows are fsynced and the state saved, at most every ``sync_every_s`` unless ``force``."""
        if self._fh is not None and (force or time.monotonic() - self._synced >= self.sync_every_s):
            self._sync()

    def finish(self) -> Path:
        """fsync and give the file its final name (atomic rename); the fingerprint file is removed (with
        ``done_marker``, the done file is written first: a kill between the two leaves a complete partial)."""
        if self._fh is not None:
            self._sync()
            self._fh.close()
            self._fh = None
            if self.done_file is not None:
                write_text_atomic(self.done_file, json.dumps(
                    {"fingerprint": self.fingerprint, "state": self.state() if self.state else None}) + "\n")
            os.replace(self.partial, self.path)
            self.meta.unlink(missing_ok=True)
            self.state_file.unlink(missing_ok=True)
        return self.path

    def close(self) -> None:
        """Stop without finishing (an error): the rows written so far stay for the next run. No state is
        saved here: an exception may have struck between a job's state change and its row, so a job with
        state continues from its last synced state (the rows after it are cut off then)."""
        if self._fh is not None:
            self._fh.flush()
            os.fsync(self._fh.fileno())
            self._fh.close()
            self._fh = None

    def _sync(self) -> None:
        self._fh.flush()
        os.fsync(self._fh.fileno())
        if self.state is not None:  # after the rows it covers are on disk
            write_text_atomic(self.state_file, json.dumps({"rows": self.rows, "state": self.state()}) + "\n")
        self._synced = time.monotonic()

    def _discard(self) -> None:
        for path in (self.partial, self.meta, self.state_file, self.done_file):
            if path is not None:
                path.unlink(missing_ok=True)


def _prefix_length(fh, rows: int) -> int:
    """Bytes of the first ``rows`` lines of a binary file handle (each ending in a newline)."""
    fh.seek(0)
    end = 0
    for _ in range(rows):
        end += len(fh.readline())
    return end


def fingerprint_texts(texts: Callable[[], Iterator[str]]) -> str:
    """BLAKE2b of a sequence of texts (the query list a job covers), read once."""
    import hashlib

    h = hashlib.blake2b(digest_size=16)
    for text in texts():
        h.update(text.encode("utf-8", "surrogatepass"))
        h.update(b"\0")
    return h.hexdigest()
