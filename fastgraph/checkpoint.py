"""Training checkpoints: one file per training, written atomically.

``<dir>/checkpoint.pt`` holds everything a stopped training needs to continue as if it
had never stopped: the model, optimiser and EMA states, the RNG states of torch (CPU and
CUDA) and of the augmentation generator, where in the schedule it stopped (run, epoch,
step), the results so far, and what it was started with (recipe, model file, options), so
``--resume`` refuses a checkpoint of a different training. The file is written to a
temporary name in the same folder, flushed to disk, then renamed over the old one
(``os.replace`` is atomic), so a crash mid-write never leaves a torn checkpoint.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from fastgraph.errors import UserError

FILE_NAME = "checkpoint.pt"
FORMAT = 1


def checkpoint_path(directory: str | os.PathLike) -> Path:
    """The checkpoint file inside ``directory``."""
    return Path(directory).expanduser() / FILE_NAME


def save_checkpoint(directory: str | os.PathLike, state: dict) -> Path:
    """Write ``state`` (tensors, numbers, strings, lists, dicts) to ``<directory>/checkpoint.pt``.

    Raises:
        UserError: the folder cannot be created or written.
    """
    path = checkpoint_path(directory)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(tmp, "wb") as f:
            torch.save({"format": FORMAT, **state}, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        raise UserError(f"cannot write checkpoint {path}: {exc.strerror or exc}") from None
    return path


def check_writable(directory: str | os.PathLike) -> None:
    """Raise ``UserError`` now, not after the first epoch, when ``directory`` cannot hold checkpoints."""
    path = checkpoint_path(directory)
    probe = path.with_name(f".{path.name}.{os.getpid()}.probe")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as exc:
        raise UserError(f"cannot write checkpoints to {path.parent}: {exc.strerror or exc}") from None


def load_checkpoint(directory: str | os.PathLike) -> dict:
    """Read ``<directory>/checkpoint.pt`` (tensors land on the CPU).

    Raises:
        UserError: no checkpoint there, or a file that is not a fastgraph checkpoint.
    """
    path = checkpoint_path(directory)
    if not path.is_file():
        raise UserError(f"no checkpoint to resume from: {path} does not exist")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # truncated, not a torch file, or foreign pickled objects
        raise UserError(f"cannot read checkpoint {path}: {type(exc).__name__}: "
                        f"{str(exc).strip().splitlines()[0] if str(exc).strip() else ''}") from None
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise UserError(f"{path} is not a fastgraph training checkpoint (format {FORMAT})")
    return state
