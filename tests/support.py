"""Plain helpers shared by tests (import as ``from support import ...``); fixtures live in conftest.py."""

from __future__ import annotations

import os
import runpy
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SHARED_ARCHIVE = REPO.parent / "shared" / "data" / "cifar10-jpeg" / "cifar10-jpeg.tar.xz"
EXAMPLES = REPO / "examples"
EXAMPLE_FILES = sorted(p.name for p in EXAMPLES.glob("*.py"))


def real_data_path() -> Path | None:
    """Where real CIFAR-10 is: $FASTGRAPH_DATA, else the shared JPEG archive, else None."""
    env = os.environ.get("FASTGRAPH_DATA")
    if env:
        return Path(env)
    return SHARED_ARCHIVE if SHARED_ARCHIVE.exists() else None


def build_example(name: str):
    """The ``nn.Module`` that ``examples/<name>`` builds (``build_model()``)."""
    return runpy.run_path(str(EXAMPLES / name))["build_model"]()


def cli_error(capsys, *argv) -> str:
    """Run the CLI (``capsys`` is pytest's fixture); assert exit 2 and exactly one line on
    stderr; return that line."""
    from fastgraph.cli import main

    assert main(list(argv)) == 2
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("fastgraph: error: ")
    return lines[0]
