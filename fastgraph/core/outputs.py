"""Output files and provenance: paths checked before slow work, one-line errors when a
write fails, and the header every JSON report starts with (schema, versions, commit,
date, device).

Every failure here is the user's to fix and raises :class:`~fastgraph.core.errors.UserError`.
"""

from __future__ import annotations

import errno
import json
import os
import subprocess
import tempfile
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path

from fastgraph.core.errors import UserError


def output_path(path: str | Path, option: str, *, folder: bool = False) -> Path:
    """``path`` (``~`` expanded), checked before any slow work to be writable as ``option``'s output.

    A file output must not be an existing folder, and the folder it goes in must already
    exist: a mistyped folder is reported, not created. A folder output (``folder=True``,
    e.g. ``fastgraph profile --out``) must be a folder or not exist yet, inside an existing
    folder; the command creates it when it writes, so a command that fails leaves nothing.
    Writing is tested by creating and removing a hidden probe file, because permission
    bits do not bind root and a read-only mount shows only when written to.

    Raises:
        UserError: naming ``option`` and the path: a folder where a file is wanted (or a
            file where a folder is), a missing parent folder or a parent that is a file,
            or no permission to write.
    """
    file = Path(path).expanduser()
    if folder and file.exists() and not file.is_dir():
        raise UserError(f"{option} {file}: is a file, not a folder")
    if not folder and file.is_dir():
        raise UserError(f"{option} {file}: is a folder; give a file name")
    parent = file.parent
    if not parent.is_dir():
        what = "is not a folder" if parent.exists() else "does not exist"
        raise UserError(f"{option} {file}: {parent} {what}")
    where = file if folder and file.is_dir() else parent
    try:
        fd, probe = tempfile.mkstemp(dir=where, prefix=".fastgraph-probe-")
        os.close(fd)
        os.unlink(probe)
        if not folder and file.exists() and not os.access(file, os.W_OK):
            raise PermissionError(errno.EACCES, os.strerror(errno.EACCES))
    except OSError as exc:
        raise UserError(f"cannot write {option} {file}: {exc.strerror or exc}") from None
    return file


def check_outputs(outputs: Mapping[str, str | Path | None], *,
                  inputs: Mapping[str, str | Path | None] | None = None,
                  folders: tuple[str, ...] = ()) -> dict[str, Path]:
    """Check a command's outputs before any slow work; return ``{option: Path}`` for those given.

    Args:
        outputs: option -> path (None: not given), e.g. ``{"--out": args.out, "--json": args.json}``.
        inputs: what -> path of the files the command reads, e.g. ``{"model file": args.model}``:
            no output may overwrite one of them.
        folders: the options in ``outputs`` whose output is a folder (see :func:`output_path`).

    Raises:
        UserError: one output is not writable (see :func:`output_path`), names an input,
            or names the same file as another output.
    """
    checked: dict[str, Path] = {}
    claimed: dict[str, str] = {}  # real path -> the option or input that names it
    for what, path in (inputs or {}).items():
        if path is not None:
            claimed[os.path.realpath(Path(path).expanduser())] = f"the {what}"
    for option, path in outputs.items():
        if path is None:
            continue
        file = output_path(path, option, folder=option in folders)
        owner = claimed.get(os.path.realpath(file))
        if owner is not None:
            named = owner if owner.startswith("the ") else f"also {owner}'s output"
            raise UserError(f"{option} {file} is {named}: give another name")
        claimed[os.path.realpath(file)] = option
        checked[option] = file
    return checked


@contextmanager
def output_file(path: str | Path, option: str) -> Iterator[Path]:
    """``with output_file(args.out, "--out") as path:`` write to ``path``.

    Checks ``path`` first (see :func:`output_path`); an ``OSError`` (no permission, disk
    full) while writing becomes a one-line ``UserError`` naming ``option`` and the file.
    """
    file = output_path(path, option)
    try:
        yield file
    except OSError as exc:
        raise UserError(f"cannot write {option} {file}: {exc.strerror or exc}") from None


SCHEMA_VERSION = 1  # of every JSON report; raised when a key changes meaning or goes


def report_header() -> dict:
    """What every JSON report starts with: ``schema`` (:data:`SCHEMA_VERSION`), fastgraph
    and torch versions, the git commit of this checkout (or None) and the UTC date."""
    import torch

    from fastgraph.core.version import __version__

    return {"schema": SCHEMA_VERSION, "fastgraph": __version__, "torch": torch.__version__,
            "commit": git_commit(), "date": datetime.now(UTC).isoformat(timespec="seconds")}


def write_json(path: str | Path, record: dict, option: str = "--json") -> Path:
    """Write ``record`` as indented JSON to ``path`` (see :func:`output_file` for errors),
    after :func:`report_header` (the record's own keys win) and with ``device`` always
    present (``"none"`` for a report that ran nothing, such as a pure roofline)."""
    record = {**report_header(), "device": "none", **record}
    with output_file(path, option) as file:
        file.write_text(json.dumps(record, indent=2) + "\n")
    return file


def git_commit(start: str | Path | None = None) -> str | None:
    """``git rev-parse HEAD`` of the repository holding ``start`` (default: this package), else None.

    ``FASTGRAPH_GIT_COMMIT``, when set, is returned instead: the commit of a checkout copied
    without its own git history (an exported tree, a container image), which git cannot tell.
    """
    if os.environ.get("FASTGRAPH_GIT_COMMIT"):
        return os.environ["FASTGRAPH_GIT_COMMIT"]
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

    from fastgraph.core.version import __version__

    if device.startswith("cuda"):
        name = torch.cuda.get_device_name(torch.device(device))
    else:
        name = f"CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"
    return {**report_header(), "fastgraph": __version__, "device": name}
