"""Decode-once cache of CIFAR-10 arrays, keyed by the source's path, size, mtime and ctime.

Decoding 60,000 JPEGs takes seconds; reading the decoded uint8 arrays back takes a
fraction of one. The cache is an uncompressed ``.npz`` (numpy's zip of ``.npy``
arrays; zip's CRC-32 makes a flipped byte or a truncated file fail to load, so a corrupt
cache is detected and rebuilt instead of returning wrong pixels). It is written to a
temporary file and renamed into place, so an interrupted decode never leaves a partial
cache behind.

Where: next to the source (``<source>.fastgraph-cache.npz``) when its folder is
writable, else in the cache dir (``$FASTGRAPH_CACHE``, else ``~/.cache/fastgraph``) as
``cifar10-<hash of the resolved source path>.npz``. A folder whose mode bits grant no
write permission counts as read-only even for root, so a shared data set marked
read-only is never written beside.

One process decodes at a time per cache file; the others wait and then read its result.
The lock is a file created exclusively beside the cache, holding the decoder's PID and
host name, removed when it is done. No kernel lock is taken, so nothing of it passes to
the decoder's forked workers: a worker that outlives its killed parent holds nothing. A
lock whose holder is gone (killed mid-decode) is taken over; a live holder is waited for
at most :data:`LOCK_WAIT_SECONDS`, after which the waiter decodes as well (each result is
renamed into place whole, so the cache stays valid either way).
"""

from __future__ import annotations

import contextlib
import glob
import hashlib
import json
import os
import socket
import stat
import time
import warnings
import zipfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import NamedTuple

import numpy as np

# Bump when the arrays' layout or the key's meaning changes, so old caches rebuild.
FORMAT_VERSION = 1
CACHE_SUFFIX = ".fastgraph-cache.npz"
LOCK_WAIT_SECONDS = 900.0  # longest wait for a live decoder (a full JPEG decode takes ~10 s on 2 cores)
LOCK_POLL_SECONDS = 0.1  # how often a waiter looks at the lock again
# A lock file naming no holder this long after it was last written is abandoned: a holder
# writes its PID right after creating the file (earlier versions of fastgraph left empty ones).
LOCK_UNNAMED_SECONDS = 10.0


class Arrays(NamedTuple):
    """Decoded CIFAR-10 as numpy arrays.

    train_images/test_images: uint8 (N, 3, 32, 32), contiguous NCHW, pixel values 0..255.
    train_labels/test_labels: int64 (N,), class indices into ``classes``.
    classes: tuple of class names.
    """

    train_images: np.ndarray
    train_labels: np.ndarray
    test_images: np.ndarray
    test_labels: np.ndarray
    classes: tuple[str, ...]


def cache_dir() -> Path:
    """The cache folder: ``$FASTGRAPH_CACHE``, else ``~/.cache/fastgraph``."""
    env = os.environ.get("FASTGRAPH_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "fastgraph"


def source_key(source: Path, kind: str, extra: str = "") -> str:
    """A string that changes whenever the source's content may have changed.

    A file is identified by its resolved path, size, mtime and ctime (ns); a folder by its
    resolved path and the same of every file inside it, through symlinked sub-folders
    too (as the decoder reads them). ``kind`` (the decoder) and ``extra`` (e.g. the md5
    table used) are part of the key too, so a cache built under other checks is not reused.
    """
    source = source.resolve()
    if source.is_dir():
        digest = hashlib.sha1()
        seen: set[str] = set()
        for root, dirs, files in os.walk(source, followlinks=True):
            real = os.path.realpath(root)
            if real in seen:  # a symlink back up the tree: walk each folder once
                dirs.clear()
                continue
            seen.add(real)
            dirs.sort()
            for name in sorted(files):
                p = os.path.join(root, name)
                digest.update(f"{os.path.relpath(p, source)}\0{_stamp(p)}\n".encode())
        content = digest.hexdigest()
    else:
        content = _stamp(source)
    return json.dumps(
        {"format": FORMAT_VERSION, "kind": kind, "source": str(source), "content": content,
         "extra": extra},
        sort_keys=True,
    )


def _stamp(path: str | Path) -> str:
    """Size, mtime and ctime (ns) of ``path``'s target, or of the link itself when broken."""
    try:
        st = os.stat(path)
    except OSError:
        st = os.lstat(path)  # a dangling or looping symlink: the decoder names it if it reads it
    # ctime too: copying with `cp -p`/`rsync -a`, or a download that sets the server's
    # mtime, gives another file of the same size the old mtime, but every write, rename
    # or utime sets ctime to now, and no user call can set it back.
    return f"{st.st_size}:{st.st_mtime_ns}:{st.st_ctime_ns}"


def _marked_writable(folder: Path) -> bool:
    # os.access alone says yes to root for any folder on a read-write mount; the mode
    # bits say whether the owner meant the folder to stay untouched.
    try:
        mode = folder.stat().st_mode
    except OSError:
        return False
    return bool(mode & (stat.S_IWUSR | stat.S_IWGRP | stat.S_IWOTH)) and os.access(folder, os.W_OK)


def candidate_paths(source: Path) -> list[Path]:
    """Where the cache of ``source`` may live, in order of preference."""
    source = source.resolve()
    fallback = cache_dir() / f"cifar10-{hashlib.sha1(str(source).encode()).hexdigest()[:16]}.npz"
    beside = source.parent / (source.name + CACHE_SUFFIX)
    return [beside, fallback] if _marked_writable(source.parent) else [fallback]


def read(path: Path, key: str) -> Arrays | None:
    """The arrays cached at ``path`` under ``key``; None if absent, stale or corrupt."""
    if not path.is_file():
        return None
    try:
        with np.load(path, allow_pickle=False) as z:
            if str(z["key"]) != key:
                return None
            arrays = Arrays(
                z["train_images"], z["train_labels"], z["test_images"], z["test_labels"],
                tuple(str(c) for c in z["classes"]),
            )
    except (OSError, ValueError, EOFError, KeyError, zipfile.BadZipFile):
        return None  # truncated or corrupt (zip CRC, bad header): rebuild
    ok = (
        arrays.train_images.dtype == np.uint8 and arrays.test_images.dtype == np.uint8
        and arrays.train_images.ndim == 4 and arrays.test_images.ndim == 4
        and arrays.train_images.shape[1:] == (3, 32, 32)
        and arrays.test_images.shape[1:] == (3, 32, 32)
        and arrays.train_labels.shape == (len(arrays.train_images),)
        and arrays.test_labels.shape == (len(arrays.test_images),)
    )
    return arrays if ok else None


def write(path: Path, key: str, arrays: Arrays) -> None:
    """Write ``arrays`` to ``path`` atomically (temporary file in the same folder, then rename).

    The temporary file is :func:`temporary_path`'s; one left by a writer of this machine
    that was killed mid-write is removed first (:func:`remove_orphans`): a full CIFAR-10
    cache is about 185 MB.

    Raises OSError if the folder cannot be written.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_orphans(path)
    tmp = temporary_path(path)
    fd = os.open(tmp, os.O_CREAT | os.O_TRUNC | os.O_WRONLY, 0o600)
    try:
        with os.fdopen(fd, "wb") as f:
            np.savez(
                f, key=np.array(key), train_images=arrays.train_images,
                train_labels=arrays.train_labels, test_images=arrays.test_images,
                test_labels=arrays.test_labels, classes=np.array(arrays.classes),
            )
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)  # mkstemp makes it owner-only; the cache is as public as its source
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def temporary_path(path: Path) -> Path:
    """Where a write of ``path`` goes before its atomic rename: ``.<name>.<host>.<pid>.tmp``
    in the same folder, named by this machine and process so that a file left by a killed
    writer can be told from one still being written (see :func:`remove_orphans`)."""
    return path.with_name(f".{path.name}.{socket.gethostname()}.{os.getpid()}.tmp")


def remove_orphans(path: Path) -> None:
    """Remove :func:`temporary_path` files of ``path`` whose writer, a process of this
    machine, is gone (killed mid-write by SIGKILL or power loss: no clean-up of its own
    ran). Another machine's (a shared folder) are left alone: their liveness cannot be
    seen from here."""
    host = socket.gethostname()
    for tmp in path.parent.glob(f".{glob.escape(path.name)}.*.tmp"):
        writer_host, _, pid = tmp.name[len(path.name) + 2:-len(".tmp")].rpartition(".")
        if writer_host == host and pid.isdigit() and int(pid) != os.getpid() and not process_alive(int(pid)):
            with contextlib.suppress(OSError):
                tmp.unlink()


def process_alive(pid: int) -> bool:
    """Whether process ``pid`` exists on this machine and has not exited.

    A zombie (exited, not yet reaped by its parent) counts as gone. Where this cannot be
    told safely (not POSIX: ``os.kill`` there would terminate the process), it counts as alive.
    """
    if pid <= 0:
        return False
    if os.name != "posix":
        return True
    try:
        os.kill(pid, 0)  # signal 0: existence and permission check only
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # another user's process
    try:
        with open(f"/proc/{pid}/stat") as f:
            state = f.read().rpartition(")")[2].split()[0]  # the name in parentheses may hold spaces
    except (OSError, IndexError):
        return True  # no /proc (macOS): kill(0) found it
    return state not in ("Z", "X")


def lock_path(cache_file: Path) -> Path:
    """The lock file of ``cache_file``: present while a process decodes into it."""
    return cache_file.with_name(cache_file.name + ".lock")


def _lock_is_stale(lock: Path) -> bool:
    """Whether the lock file's holder is gone (the file itself being gone counts as stale)."""
    try:
        text = lock.read_text()
        age = time.time() - lock.stat().st_mtime
    except (OSError, UnicodeDecodeError):
        return not lock.exists()
    pid_text, _, host = text.partition("\n")
    if not pid_text.strip().isdigit():
        return age > LOCK_UNNAMED_SECONDS
    if host.strip() and host.strip() != socket.gethostname():
        return False  # another machine's process: its liveness cannot be seen from here
    return not process_alive(int(pid_text))


@contextlib.contextmanager
def _locked(path: Path, wait: float = LOCK_WAIT_SECONDS) -> Iterator[None]:
    """Hold the decode lock of cache file ``path`` while the body runs (see the module docstring).

    Waits, polling every :data:`LOCK_POLL_SECONDS`, while a live process holds it, at most
    ``wait`` seconds; takes over a lock whose holder is gone; runs the body without a lock
    when the folder cannot be written or the wait ran out.
    """
    lock = lock_path(path)
    deadline = time.monotonic() + wait
    owned = False
    with contextlib.suppress(OSError):
        path.parent.mkdir(parents=True, exist_ok=True)
    while True:
        try:
            fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            if _lock_is_stale(lock):
                # Two waiters may both take over the same stale lock and decode twice; the
                # atomic rename of each result keeps the cache whole.
                try:
                    lock.unlink(missing_ok=True)
                    continue
                except OSError:
                    pass  # cannot be removed: wait as for a live holder
            if time.monotonic() > deadline:
                break
            time.sleep(LOCK_POLL_SECONDS)
            continue
        except OSError:
            break  # a read-only folder: the cache goes elsewhere, no lock needed
        with os.fdopen(fd, "w") as f:
            f.write(f"{os.getpid()}\n{socket.gethostname()}\n")
        owned = True
        break
    try:
        yield
    finally:
        if owned:
            with contextlib.suppress(OSError):
                if lock.read_text().partition("\n")[0] == str(os.getpid()):
                    lock.unlink()


def load_or_build(source: Path, key: str, build: Callable[[], Arrays]) -> tuple[Arrays, Path | None, bool]:
    """Cached arrays of ``source`` under ``key``, decoding with ``build()`` on a miss.

    Returns (arrays, cache path or None when no location was writable, whether it was a
    cache hit). Errors raised by ``build`` (e.g. DataError) propagate; a cache that cannot
    be written only warns.
    """
    candidates = candidate_paths(source)
    for path in candidates:
        arrays = read(path, key)
        if arrays is not None:
            return arrays, path, True
    first = candidates[0]
    with _locked(first):
        arrays = read(first, key)  # another process may have built it while we waited
        if arrays is not None:
            return arrays, first, True
        arrays = build()
        for path in candidates:
            try:
                write(path, key, arrays)
                return arrays, path, False
            except OSError as exc:
                last = exc
        warnings.warn(f"could not write the CIFAR-10 cache ({last}); the next load decodes again",
                      stacklevel=3)
        return arrays, None, False
