"""Download the official CIFAR-10 archive, verify its md5, and extract it.

The archive is streamed to a temporary file in the destination folder while its md5
is computed; a mismatch deletes it. Extraction goes to a temporary folder that is
renamed into place, so an interrupted download or extraction never leaves a partial
``cifar-10-batches-py/`` that a later load would take for the real thing.

An archive is untrusted input, md5 or not (``--url`` and ``--md5`` may both come from
elsewhere): only plain files and folders inside the destination are extracted, links of
either kind are refused, and so is a member over :data:`MAX_MEMBER_BYTES`, more than
:data:`MAX_TOTAL_BYTES` in all or more than :data:`MAX_MEMBERS` members. Nothing already in
the destination is replaced or deleted: a file or folder of the same name as one the
archive holds is reported, and the archive is left unextracted.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import tarfile
import tempfile
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path, PurePosixPath

from rich.console import Console
from rich.progress import (
    BarColumn,
    DownloadColumn,
    Progress,
    TextColumn,
    TimeRemainingColumn,
    TransferSpeedColumn,
)

from fastgraph.core.errors import DataError
from fastgraph.data.imagefolder import ARCHIVE_ERRORS
from fastgraph.data.pickled import ARCHIVE_MD5, FOLDER, URL

BLOCK = 1 << 20  # bytes per read: few Python calls, smooth progress
# Caps on what one archive may extract. The official python-format archive holds 8 files,
# 178 MiB in all, the largest 30 MiB; an ImageFolder copy of CIFAR-10 holds 60,000 images
# of a few KiB. Anything far beyond is refused rather than allowed to fill the disk.
MAX_MEMBER_BYTES = 256 * 2**20
MAX_TOTAL_BYTES = 4 * 2**30
MAX_MEMBERS = 200_000
# What the official archive extracts to, known before it is downloaded.
OFFICIAL_TOP = {URL: FOLDER}


def _fetch(url: str, dest: Path, timeout: float, console: Console) -> str:
    """Stream ``url`` into ``dest``; return the md5 hex of what was written."""
    md5 = hashlib.md5()
    with urllib.request.urlopen(url, timeout=timeout) as response, open(dest, "wb") as out:
        total = int(response.headers.get("Content-Length") or 0) or None
        columns = (TextColumn("[bold]{task.description}"), BarColumn(), DownloadColumn(),
                   TransferSpeedColumn(), TimeRemainingColumn())
        with Progress(*columns, console=console, transient=True) as progress:
            task = progress.add_task(Path(url).name or url, total=total)
            while block := response.read(BLOCK):
                out.write(block)
                md5.update(block)
                progress.advance(task, len(block))
    return md5.hexdigest()


def _safe_members(tar: tarfile.TarFile, url: str) -> Iterator[tarfile.TarInfo]:
    """The members of ``tar`` as it is read, each checked before it is extracted.

    Raises:
        DataError: naming the member: a link, not a plain file or folder, a path that
            leaves the folder, over :data:`MAX_MEMBER_BYTES`, past :data:`MAX_TOTAL_BYTES`
            in all, or past :data:`MAX_MEMBERS` members.
    """
    total = count = 0
    for member in tar:
        count += 1
        name = member.name
        if count > MAX_MEMBERS:
            raise DataError(f"{url}: the archive holds more than {MAX_MEMBERS} members; refused")
        if member.issym() or member.islnk():
            kind = "symbolic" if member.issym() else "hard"
            raise DataError(f"{url}: archive member {name} is a {kind} link (to {member.linkname}); "
                            "links are refused")
        if not (member.isfile() or member.isdir()):
            raise DataError(f"{url}: archive member {name} is not a plain file or folder; refused")
        if PurePosixPath(name).is_absolute() or ".." in PurePosixPath(name).parts:
            raise DataError(f"{url}: archive member {name} would land outside the folder; refused")
        if member.size > MAX_MEMBER_BYTES:
            raise DataError(f"{url}: archive member {name} is {member.size} bytes, over the cap of "
                            f"{MAX_MEMBER_BYTES} bytes per member; refused")
        total += member.size
        if total > MAX_TOTAL_BYTES:
            raise DataError(f"{url}: the archive holds more than {MAX_TOTAL_BYTES} bytes (passed at member "
                            f"{name}); refused")
        yield member


def _refuse_existing(target: Path) -> None:
    """Raise when ``target`` exists: a download never replaces or deletes what is there."""
    if target.exists() or target.is_symlink():
        raise DataError(f"{target} already exists; `fastgraph data download` never replaces a file or "
                        f"folder: move it away, or pick another DIR (`fastgraph data info --data "
                        f"{target.parent}` shows what is there)")


def download(dest: Path, url: str = URL, md5: str = ARCHIVE_MD5, timeout: float = 60.0,
             console: Console | None = None) -> list[Path]:
    """Download the archive at ``url`` into ``dest``, check ``md5``, extract it there.

    Args:
        dest: folder to extract into (created if missing).
        url: archive URL (any tar, tar.gz or tar.xz; default the official CIFAR-10 one).
        md5: expected md5 hex of the archive.
        timeout: seconds without data before giving up.
        console: where the progress bar goes (default stderr).
    Returns:
        The top-level paths extracted into ``dest`` (e.g. ``dest/cifar-10-batches-py``).
    Raises:
        DataError: the download failed, its md5 differs (the file is deleted), the archive
            cannot be extracted or holds a member refused (see the module docstring), or
            ``dest`` already holds something of the name of one it extracts (checked
            before the download for the official archive).
    """
    console = console or Console(stderr=True)
    if url in OFFICIAL_TOP:
        _refuse_existing(dest / OFFICIAL_TOP[url])
    try:
        dest.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise DataError(f"{dest}: cannot create the download folder ({exc.strerror}); "
                        "pick another DIR") from None
    fd, tmp_name = tempfile.mkstemp(dir=dest, prefix=".download-", suffix=".part")
    os.close(fd)
    tmp = Path(tmp_name)
    staging = None
    try:
        try:
            got = _fetch(url, tmp, timeout, console)
        except (urllib.error.URLError, OSError, ValueError) as exc:
            reason = getattr(exc, "reason", None) or exc
            raise DataError(f"{url}: download failed ({' '.join(str(reason).split())}); check the "
                            "address and the network, or pass --url") from None
        if got != md5.lower():
            raise DataError(f"{url}: md5 {got} does not match the expected {md5}; the corrupt download "
                            "was deleted: run `fastgraph data download` again")
        staging = Path(tempfile.mkdtemp(dir=dest, prefix=".extract-"))
        # tarfile's "data" filter (Python 3.11.4+) also strips set-uid bits and group/other
        # write permission; the member checks above hold without it.
        safety = {"filter": "data"} if hasattr(tarfile, "data_filter") else {}
        try:
            with tarfile.open(tmp, "r:*") as tar:
                tar.extractall(staging, members=_safe_members(tar, url), **safety)
        except ARCHIVE_ERRORS as exc:
            raise DataError(f"{url}: the archive cannot be extracted ({' '.join(str(exc).split())}); "
                            "run `fastgraph data download` again") from None
        items = sorted(staging.iterdir())
        for item in items:  # all checked before any is moved: nothing half placed
            _refuse_existing(dest / item.name)
        placed = []
        for item in items:
            os.replace(item, dest / item.name)
            placed.append(dest / item.name)
        return placed
    finally:
        with contextlib.suppress(OSError):
            tmp.unlink()
        if staging is not None:
            shutil.rmtree(staging, ignore_errors=True)
