"""One rich progress display per long stage (encode queries, encode corpus, ...).

Each stage shows what it has really done: ``done/total``, items per second, elapsed time and an
ETA, and it is advanced by the code that does the work (``update(n)`` after each batch, the same
call a tqdm bar takes), so it ends at its true total whatever backend ran the model (a forward
hook on the torch tower never fires when OpenVINO runs the batch instead). On a console that is
not a terminal rich prints each stage once, when it ends: one readable line in a log file.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator


class _Stage:
    """The handle a stage yields: ``update(n)`` advances it by ``n`` items."""

    def __init__(self, progress, task):
        self._progress, self._task = progress, task

    def update(self, n: int = 1) -> None:
        self._progress.advance(self._task, n)


class _NoStage:
    def update(self, n: int = 1) -> None:
        pass


def _rate_column(unit: str):
    from rich.progress import ProgressColumn
    from rich.text import Text

    class RateColumn(ProgressColumn):
        def render(self, task) -> Text:
            speed = task.finished_speed or task.speed or (task.completed / task.elapsed if task.elapsed else None)
            return Text(f"{speed:,.0f} {unit}/s" if speed else f"- {unit}/s", style="progress.data.speed")

    return RateColumn()


class ProgressDisplay:
    """Opens one rich progress bar per :meth:`stage`; ``enabled=False`` displays nothing.

    ``console`` defaults to a stderr console, so tables and result lines on stdout stay clean."""

    def __init__(self, console=None, enabled: bool = True):
        self.console = console
        self.enabled = enabled

    @contextmanager
    def stage(self, description: str, total: int, unit: str = "docs") -> Iterator[_Stage | _NoStage]:
        if not self.enabled or total <= 0:
            yield _NoStage()
            return
        from rich.console import Console
        from rich.progress import (BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn,
                                   TimeRemainingColumn)

        console = self.console or Console(stderr=True)
        columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), _rate_column(unit),
                   TimeElapsedColumn(), TextColumn("ETA"), TimeRemainingColumn())
        with Progress(*columns, console=console) as progress:
            yield _Stage(progress, progress.add_task(description, total=total))


NO_PROGRESS = ProgressDisplay(enabled=False)


class StepBar:
    """The training loops' display: the same rich columns as a stage, started at ``initial`` (a resumed
    run), with the latest loss beside it. Takes tqdm's ``update`` / ``set_postfix`` / ``close`` calls."""

    def __init__(self, description: str, total: int, initial: int = 0, unit: str = "steps", enabled: bool = True):
        self._progress = self._task = None
        self._description = description
        if not enabled or total <= 0:
            return
        from rich.console import Console
        from rich.progress import (BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn,
                                   TimeRemainingColumn)

        columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), _rate_column(unit),
                   TimeElapsedColumn(), TextColumn("ETA"), TimeRemainingColumn())
        self._progress = Progress(*columns, console=Console(stderr=True))
        self._task = self._progress.add_task(description, total=total, completed=initial)
        self._progress.start()

    def update(self, n: int = 1) -> None:
        if self._progress is not None:
            self._progress.advance(self._task, n)

    def set_postfix(self, **values) -> None:
        if self._progress is not None:
            info = " ".join(f"{k} {v}" for k, v in values.items())
            self._progress.update(self._task, description=f"{self._description} ({info})")

    def close(self) -> None:
        if self._progress is not None:
            self._progress.stop()
            self._progress = None
