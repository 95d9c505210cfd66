"""Training checkpoints: one file per training, written atomically.

``<dir>/checkpoint.pt`` holds everything a stopped training needs to continue as if it
had never stopped: the model, optimiser and EMA states, the RNG states of torch (CPU and
CUDA) and of the augmentation generator, where in the schedule it stopped (run, epoch,
step), the results so far and the seconds of its timed phases, and what it was started
with (recipe, model file and its traced graph's digest, data fingerprint, options), so
``--resume`` refuses a checkpoint of a different training. The file is written to a
temporary name in the same folder, flushed to disk, then renamed over the old one
(``os.replace`` is atomic), so a crash mid-write never leaves a torn checkpoint; a write
that fails or is interrupted removes its temporary file, and one left by a killed process
of this machine is removed by the next save into that folder.

A file that is not such a checkpoint (another program's, a plain ``state_dict``, one
missing a key) is a one-line :class:`~fastgraph.core.errors.UserError` naming the file and
what is missing, never a ``KeyError`` deep in the trainer.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path

import torch

from fastgraph.core.errors import UserError

FILE_NAME = "checkpoint.pt"
FORMAT = 1
_NUMBER = (int, float)
# What ``fastgraph train`` writes and ``--resume`` reads: key -> the type(s) its value has.
RESUME_KEYS: dict[str, type | tuple[type, ...]] = {
    "settings": Mapping, "recipe": Mapping, "run": int, "completed": list, "epoch": int,
    "step_in_epoch": int, "step": int, "finished_run": bool, "model": Mapping, "optimizers": list,
    "ema": (Mapping, type(None)), "scaler": (Mapping, type(None)), "augment": Mapping, "rng": Mapping,
    "counted_seconds": _NUMBER, "epoch_seconds": _NUMBER, "partial": Mapping, "epochs": list,
}
_TYPE_NAMES = {Mapping: "dict", type(None): "None"}
# What export reads from a training checkpoint: the weights and the recipe that rebuilds their graph.
WEIGHTS_KEYS = {key: RESUME_KEYS[key] for key in ("model", "recipe")}


def checkpoint_path(directory: str | os.PathLike) -> Path:
    """The checkpoint file inside ``directory``."""
    return Path(directory).expanduser() / FILE_NAME


def save_checkpoint(directory: str | os.PathLike, state: dict) -> Path:
    """Write ``state`` (tensors, numbers, strings, lists, dicts) to ``<directory>/checkpoint.pt``.

    The temporary file is removed whatever stops the write (an error, Ctrl-C, SIGTERM's
    second signal); temporary files of writers that were killed are removed first.

    Raises:
        UserError: the folder cannot be created or written.
    """
    from fastgraph.data.cache import remove_orphans, temporary_path

    path = checkpoint_path(directory)
    tmp = temporary_path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        remove_orphans(path)
        with open(tmp, "wb") as f:
            torch.save({"format": FORMAT, **state}, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as exc:
        tmp.unlink(missing_ok=True)
        if isinstance(exc, OSError):
            raise UserError(f"cannot write checkpoint {path}: {exc.strerror or exc}") from None
        raise
    return path


def check_writable(directory: str | os.PathLike) -> None:
    """Raise ``UserError`` now, not after the first epoch, when ``directory`` cannot hold checkpoints.

    ``directory`` must be a folder, or not exist yet inside an existing folder: as for every
    output of fastgraph, a mistyped parent folder is reported, not created. Nothing is
    created here (the first checkpoint creates ``directory``), so a training that fails
    before it leaves no empty folder behind.
    """
    folder = Path(directory).expanduser()
    if folder.exists() and not folder.is_dir():
        raise UserError(f"cannot write checkpoints to {folder}: it is a file, not a folder")
    where = folder if folder.is_dir() else folder.parent
    if not where.is_dir():
        what = "is not a folder" if where.exists() else "does not exist"
        raise UserError(f"cannot write checkpoints to {folder}: {where} {what}")
    probe = where / f".{FILE_NAME}.{os.getpid()}.probe"
    try:
        try:
            probe.write_bytes(b"")
        finally:
            probe.unlink(missing_ok=True)
    except OSError as exc:
        raise UserError(f"cannot write checkpoints to {folder}: {exc.strerror or exc}") from None


def load_checkpoint(directory: str | os.PathLike) -> dict:
    """Read ``<directory>/checkpoint.pt`` (tensors land on the CPU) and check it can be resumed.

    Raises:
        UserError: no checkpoint there, a file ``torch.load`` cannot read with
            ``weights_only=True`` (corrupt, cut short, or holding pickled objects other than
            tensors and containers), or one that is not a complete fastgraph training
            checkpoint (see :func:`check_state`).
    """
    path = checkpoint_path(directory)
    if not path.is_file():
        raise UserError(f"no checkpoint to resume from: {path} does not exist")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # truncated, not a torch file, or foreign pickled objects
        raise UserError(f"{path} is not a readable fastgraph checkpoint ({_unreadable(exc)}): it is "
                        "corrupt, cut short, or was not written by `fastgraph train --checkpoint`") from None
    return check_state(state, path)


def _unreadable(exc: Exception) -> str:
    """Why ``torch.load`` failed, in a few words. Not torch's advice for pickled objects, to
    load with ``weights_only=False``: that runs whatever code the file holds."""
    text = str(exc)
    if "WeightsUnpickler error:" in text:
        text = text.split("WeightsUnpickler error:", 1)[1]
    first = next((line.strip() for line in text.splitlines() if line.strip()), "")
    first = first.split(". ")[0].rstrip(".")[:200]
    return f"{type(exc).__name__}: {first}" if first else type(exc).__name__


def check_state(state: object, path: Path, keys: Mapping[str, type | tuple[type, ...]] = RESUME_KEYS) -> dict:
    """``state`` when it is a fastgraph training checkpoint holding ``keys`` with their types.

    Args:
        state: what ``torch.load`` returned for ``path``.
        path: the file, named in the errors.
        keys: key -> type(s); :data:`RESUME_KEYS` (everything ``--resume`` needs) or
            :data:`WEIGHTS_KEYS` (what export needs).

    Raises:
        UserError: not a dict, no ``format`` key (naming a few of the keys it has), another
            format, keys missing (all of them named), or a value of the wrong type.
    """
    if not isinstance(state, Mapping):
        raise UserError(f"checkpoint {path} holds a {type(state).__name__}, not a fastgraph training "
                        "checkpoint")
    if "format" not in state:
        held = ", ".join(str(k) for k in list(state)[:5]) + (", ..." if len(state) > 5 else "")
        raise UserError(f"{path} is not a fastgraph training checkpoint: it has no 'format' key "
                        f"(it holds {held or 'nothing'})")
    if state["format"] != FORMAT:
        raise UserError(f"{path} is a format {state['format']!r} checkpoint; this fastgraph reads "
                        f"format {FORMAT}")
    missing = sorted(k for k in keys if k not in state)
    if missing:
        raise UserError(f"checkpoint {path} is incomplete: it has no {', '.join(map(repr, missing))} "
                        "(written by another program, or cut short?)")
    for key, kind in keys.items():
        if not isinstance(state[key], kind) or (kind is int and isinstance(state[key], bool)):
            kinds = kind if isinstance(kind, tuple) else (kind,)
            wanted = " or ".join(_TYPE_NAMES.get(k, k.__name__) for k in kinds)
            raise UserError(f"checkpoint {path} is malformed: its {key!r} is a {type(state[key]).__name__}, "
                            f"not {wanted}")
    return dict(state)
