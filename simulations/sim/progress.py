"""Progress bars for long simulations (rich); imports rich and the standard library only."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager

__all__ = ["progress_bar"]

_STEPS = 1000


@contextmanager
def progress_bar(description: str, enabled: bool) -> Iterator[Callable[[float], None]]:
    """Yield a callback taking the fraction done (0..1); a bar on stderr when ``enabled``."""
    if not enabled:
        yield lambda _fraction: None
        return
    from rich.progress import (
        BarColumn,
        Progress,
        TaskProgressColumn,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    with Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        TaskProgressColumn(),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        transient=False,
    ) as progress:
        task = progress.add_task(description, total=_STEPS)

        def tick(fraction: float) -> None:
            progress.update(task, completed=round(fraction * _STEPS))

        yield tick
        progress.update(task, completed=_STEPS)
