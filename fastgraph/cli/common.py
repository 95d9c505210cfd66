"""What the ``fastgraph`` subcommands share beyond the library: argparse option types and
the data location a command reads."""

from __future__ import annotations

import argparse
import math
from collections.abc import Callable
from pathlib import Path


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


def data_input(data: str | None) -> Path:
    """The CIFAR-10 file or folder a command reads: ``--data`` when given, else where
    :func:`fastgraph.data.load_cifar10` looks (``$FASTGRAPH_DATA``, then
    ``~/.cache/fastgraph/cifar10``). Named among a command's inputs to
    :func:`fastgraph.core.outputs.check_outputs`, so no output overwrites the data, however
    it was found. Whether it exists is not checked here: the loader says so when it reads."""
    from fastgraph.data import default_data_dir

    return Path(data) if data is not None else default_data_dir()
