"""What the ``fastgraph`` subcommands share beyond the library: argparse option types."""

from __future__ import annotations

import argparse
import math
from collections.abc import Callable


def positive(kind: type = int) -> Callable[[str], int | float]:
    """An argparse ``type`` that parses ``kind`` (int or float) and accepts only values > 0;
    a float must also be finite (``inf``, ``nan`` and ``1e400`` are refused).

    Raises ``argparse.ArgumentTypeError`` (argparse's one-line usage error, exit 2).
    """

    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not a{'n' if kind is int else ''} {kind.__name__}: "
                                             f"{text!r}") from None
        if not value > 0 or not math.isfinite(value):  # an infinite epoch count never ends
            raise argparse.ArgumentTypeError(f"must be a finite number > 0, got {text}")
        return value

    return parse
