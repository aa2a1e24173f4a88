"""A bar of the bytes a stage's weights have loaded, for `p2pserve run` and `p2pserve worker`.

The engine reports (``load_stage(progress=...)``: bytes done, bytes in all) and knows
nothing of terminals; this draws it with rich on stderr, on a terminal only: in a pipe or
a log nothing is printed (rich's ``TTY_COMPATIBLE=1`` or ``FORCE_COLOR`` force a terminal).
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Callable, Iterator


@contextmanager
def loading_bar(description: str, console=None) -> Iterator[Callable[[int, int], None]]:
    """``with loading_bar("loading layers 0-15") as progress: load_stage(..., progress=progress)``.

    ``console``: a ``rich.console.Console`` (default: stderr's). The bar pulses until the
    first report gives it a total; ``progress`` may be called from any thread."""
    from rich.console import Console
    from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TimeRemainingColumn

    console = console or Console(stderr=True)
    if not console.is_terminal:
        yield _ignore
        return
    # narrow enough for 80 columns with a description of up to ~35 characters
    with Progress(TextColumn("{task.description}"), BarColumn(bar_width=24), DownloadColumn(), TimeRemainingColumn(),
                  console=console) as bar:
        task = bar.add_task(description, total=None)

        def progress(done: int, total: int) -> None:
            bar.update(task, completed=done, total=total)

        yield progress


def _ignore(done: int, total: int) -> None:
    pass
