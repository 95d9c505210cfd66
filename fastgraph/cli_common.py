"""What the ``fastgraph`` subcommands share: option types, the device, output files, provenance.

Every failure here is the user's to fix and raises :class:`~fastgraph.errors.UserError`
(or argparse's one-line usage error), so the CLI prints one line and exits 2. torch is
imported inside the functions: building the parser stays fast.
"""

from __future__ import annotations

import argparse
import json
import subprocess
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path

from fastgraph.errors import UserError


def positive(kind: type = int) -> Callable[[str], int | float]:
    """An argparse ``type`` that parses ``kind`` (int or float) and accepts only values > 0.

    Raises ``argparse.ArgumentTypeError`` (argparse's one-line usage error, exit 2).
    """

    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not a{'n' if kind is int else ''} {kind.__name__}: "
                                             f"{text!r}") from None
        if not value > 0:
            raise argparse.ArgumentTypeError(f"must be > 0, got {text}")
        return value

    return parse


def resolve_device(name: str | None):
    """The ``torch.device`` for ``--device NAME``: ``None`` or ``"auto"`` mean CUDA when
    available, else the CPU.

    Raises:
        UserError: an unknown device string, CUDA asked for without a GPU, or a device
            type other than cpu and cuda.
    """
    import torch

    if name is None or name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise UserError(f"--device: unknown device {name!r} (use auto, cpu, cuda or cuda:N)") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"--device {name}: CUDA is not available in this PyTorch build/machine")
    if device.type not in ("cpu", "cuda"):
        raise UserError(f"--device {name}: only cpu and cuda are supported")
    return device


def device_name(device) -> str:
    """The GPU's name for a CUDA ``torch.device``, else ``"cpu"``."""
    import torch

    return torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"


def output_path(path: str | Path, option: str) -> Path:
    """``path`` (``~`` expanded) with its parent folders created, before any slow work.

    Raises:
        UserError: the folders cannot be created (the message names ``option``).
    """
    file = Path(path).expanduser()
    try:
        file.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UserError(f"cannot write {option} {file}: {exc.strerror or exc}") from None
    return file


@contextmanager
def output_file(path: str | Path, option: str) -> Iterator[Path]:
    """``with output_file(args.out, "--out") as path:`` write to ``path``.

    Creates the parent folders first; an ``OSError`` (no permission, no such folder,
    disk full) while creating or writing becomes a one-line ``UserError`` naming
    ``option`` and the file.
    """
    file = output_path(path, option)
    try:
        yield file
    except OSError as exc:
        raise UserError(f"cannot write {option} {file}: {exc.strerror or exc}") from None


def write_json(path: str | Path, record: dict, option: str = "--json") -> Path:
    """Write ``record`` as indented JSON to ``path`` (see :func:`output_file` for errors)."""
    with output_file(path, option) as file:
        file.write_text(json.dumps(record, indent=2) + "\n")
    return file


def git_commit(start: str | Path | None = None) -> str | None:
    """``git rev-parse HEAD`` of the repository holding ``start`` (default: this package), else None."""
    where = start or Path(__file__).resolve().parent
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=where, capture_output=True, text=True,
                             timeout=10, check=False)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None if out.returncode == 0 else None


def environment(device: str) -> dict:
    """fastgraph and torch versions, device name, commit and UTC date, for a JSON record.

    ``device`` is a device string (``"cpu"``, ``"cuda:0"``); a CPU is described with its
    processor and torch's intra-op thread count.
    """
    import platform

    import torch

    import fastgraph

    if device.startswith("cuda"):
        name = torch.cuda.get_device_name(torch.device(device))
    else:
        name = f"CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"
    return {"fastgraph": fastgraph.__version__, "torch": torch.__version__, "device": name,
            "commit": git_commit(), "date": datetime.now(UTC).isoformat(timespec="seconds")}
