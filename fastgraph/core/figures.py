"""Figure files: a path refused before slow work when matplotlib cannot write its format,
and a figure written to it with a one-line error when it cannot be."""

from __future__ import annotations

from pathlib import Path

from fastgraph.core.errors import UserError


def check_figure_path(path: str | Path, option: str) -> Path:
    """``path`` for a figure, refused before any slow work when matplotlib cannot write its format.

    The format is the file's suffix (``.png``, ``.pdf``, ``.svg``...); matplotlib would
    append ``.png`` to a name without one, writing a file other than the one asked for.

    Raises:
        UserError: no suffix, or a suffix matplotlib has no format for (the message lists them).
    """
    from matplotlib.backend_bases import FigureCanvasBase

    path = Path(path)
    formats = FigureCanvasBase.get_supported_filetypes()
    if path.suffix.lower().lstrip(".") not in formats:
        got = f"suffix {path.suffix!r}" if path.suffix else "no suffix"
        raise UserError(f"{option} {path}: {got}; name the image format with one of "
                        f"{', '.join('.' + f for f in sorted(formats))}")
    return path



def save_figure(fig, path: str | Path, what: str) -> Path:
    """Write matplotlib ``fig`` to ``path`` in the format of its suffix; return the path.

    Raises:
        UserError: naming ``what`` and the path: a suffix matplotlib has no format for
            (see :func:`check_figure_path`) or the file cannot be written.
    """
    path = check_figure_path(path, what)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(path, format=path.suffix.lower().lstrip("."))
    except OSError as exc:
        raise UserError(f"cannot write {what} {path}: {exc.strerror or exc}") from None
    return path
