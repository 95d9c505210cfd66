"""Download the official CIFAR-10 archive, verify its md5, and extract it.

The archive is streamed to a temporary file in the destination folder while its md5
is computed; a mismatch deletes it. Extraction goes to a temporary folder that is
renamed into place, so an interrupted download or extraction never leaves a partial
``cifar-10-batches-py/`` that a later load would take for the real thing.
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
from pathlib import Path

from rich.console import Console
from rich.progress import (
    BarColumn,
    DownloadColumn,
    Progress,
    TextColumn,
    TimeRemainingColumn,
    TransferSpeedColumn,
)

from fastgraph.data.imagefolder import ARCHIVE_ERRORS
from fastgraph.data.pickled import ARCHIVE_MD5, URL
from fastgraph.errors import DataError

BLOCK = 1 << 20  # bytes per read: few Python calls, smooth progress


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
        DataError: the download failed, its md5 differs (the file is deleted), or the
            archive cannot be extracted.
    """
    console = console or Console(stderr=True)
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
        try:
            with tarfile.open(tmp, "r:*") as tar:
                tar.extractall(staging, filter="data")  # "data": no absolute paths, links out, devices
        except ARCHIVE_ERRORS as exc:
            raise DataError(f"{url}: the archive cannot be extracted ({' '.join(str(exc).split())}); "
                            "run `fastgraph data download` again") from None
        placed = []
        for item in sorted(staging.iterdir()):
            target = dest / item.name
            if target.is_dir() and not target.is_symlink():
                shutil.rmtree(target)
            elif target.exists() or target.is_symlink():
                target.unlink()
            os.replace(item, target)
            placed.append(target)
        return placed
    finally:
        with contextlib.suppress(OSError):
            tmp.unlink()
        if staging is not None:
            shutil.rmtree(staging, ignore_errors=True)
