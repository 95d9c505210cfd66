"""What people read on a console: numbers with their units, tables that fit the terminal
they are printed on (80 columns included), and the progress bar of long work.

Cells wrap at spaces and fold long words rather than cut them with an ellipsis, and
number columns keep the width of their widest number, so no digit is ever hidden or
split. Nothing is drawn off a terminal: JSON and captured output stay as they are.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager

from rich.console import Console
from rich.table import Table


def si(value: float | None, unit: str = "") -> str:
    """``value`` with an SI prefix (1.23 G, 456 M); '-' for None."""
    if value is None:
        return "-"
    for factor, prefix in ((1e15, "P"), (1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(value) >= factor:
            return f"{value / factor:.3g} {prefix}{unit}"
    return f"{value:.3g} {unit}".rstrip()


def seconds(value: float | None) -> str:
    """Seconds in the unit that reads best (ms below one second)."""
    if value is None:
        return "-"
    return f"{value * 1e3:.3g} ms" if value < 1 else f"{value:.3g} s"


def _min_width(header: str, cells: list[str], number: bool) -> int:
    """Narrowest a column may get: its longest header word, and in a number column its
    longest word, so a number ("2.27") may move its unit to the next line but never splits."""
    words = header.split() + [w for cell in cells for w in cell.split()] * number
    return max(map(len, words))


def number(value: float | None) -> str:
    """A plain number of 3 significant digits and no exponent (1234 -> "1234", 0.0123 ->
    "0.0123"), for a column whose header carries the unit; '-' for None."""
    if value is None:
        return "-"
    return f"{value:.0f}" if abs(value) >= 100 else f"{value:.3g}"


def fitting_table(title: str, columns: dict[str, str], rows: list[list[str]], *,
                  compact: bool = False) -> Table:
    """A table that folds to the console width; ``columns`` maps header -> justify.

    Only the first column (the names) may fold inside a word, rather than end in an
    ellipsis: every other column keeps the width of its longest word (a number,
    "compute"), and no header is folded inside a word; rich otherwise shrinks every
    column alike and folds "2.27" into "2.2 / 7". Cells wrap at spaces.
    ``compact``: no vertical rules and one space between columns, for the per-node tables
    of ten or more columns (give their numbers as :func:`number` with the unit in the header).
    """
    from rich import box

    style = {"box": box.SIMPLE_HEAD, "padding": (0, 0), "show_edge": False} if compact else {}
    t = Table(title=title, title_justify="left", expand=False, pad_edge=False, **style)
    for i, (header, justify) in enumerate(columns.items()):
        t.add_column(header, justify=justify, overflow="fold", no_wrap=False,
                     min_width=_min_width(header, [row[i] for row in rows], justify == "right" or i > 0))
    for row in rows:
        t.add_row(*row)
    return t


_terminal_claims = []  # the live displays drawing now (at most one is ever drawn)


@contextmanager
def claim_terminal() -> Iterator[bool]:
    """Claim the terminal for one live display; yields whether this caller may draw.

    Two live displays at once (training's epoch bar and, inside it, the bar of the pass
    checks) would redraw over each other: only the outermost claimant draws, the inner
    ones stay silent.
    """
    first = not _terminal_claims
    _terminal_claims.append(True)
    try:
        yield first
    finally:
        _terminal_claims.pop()


@contextmanager
def progress(description: str, total: float | None = None) -> Iterator[Callable[..., None]]:
    """A transient progress bar on stderr, drawn only when stderr is a terminal and no
    other live display is drawing (see :func:`claim_terminal`).

    Yields ``update(**fields)``, rich's ``Progress.update`` for the one task: ``advance=n``
    or ``completed=n`` in the units of ``total`` (None: a pulsing bar with no end), and
    ``note="..."`` for a short text after the bar. Safe to call from other threads. Off a
    terminal (tests, pipes, CI logs) nothing at all is written, so JSON and captured
    output stay as they are.
    """
    from rich.progress import BarColumn, Progress, TaskProgressColumn, TextColumn, TimeElapsedColumn

    console = Console(stderr=True)
    columns = (TextColumn("{task.description}"), BarColumn(), TaskProgressColumn(),
               TextColumn("{task.fields[note]}"), TimeElapsedColumn())
    with claim_terminal() as mine:
        with Progress(*columns, console=console, transient=True,
                      disable=not (mine and console.is_terminal)) as bar:
            task = bar.add_task(description, total=total, note="")
            yield lambda **fields: bar.update(task, **fields)
