"""Checking a pass's options (private: not a pass, not registered)."""

from __future__ import annotations

from fastgraph.core.errors import UserError


class PassOptionError(UserError, ValueError):
    """A pass option out of its range (the message names the pass, the option and the value).

    A ``UserError``, so the CLI prints it as one line and exits 2; also a ``ValueError``,
    which is what Python callers expect from a bad argument.
    """


def require(ok: bool, pass_name: str, message: str) -> None:
    """Raise :class:`PassOptionError` ``"<pass_name>: <message>"`` unless ``ok``."""
    if not ok:
        raise PassOptionError(f"{pass_name}: {message}")
