"""CIFAR-10 in the ImageFolder layout: ``train/<class>/*.png|jpg`` and ``test/<class>/...``.

The source is a folder or a ``.tar``/``.tar.gz``/``.tar.xz`` archive, either with the
split folders at the top or inside one top-level folder. This is the layout
torchvision's ``ImageFolder`` reads; images are ordered class by class (classes in
CIFAR-10's canonical order when those are the names, else sorted), and within a class
by file name in numeric order (``2.png`` before ``10.png``).

Decoding uses Pillow in worker processes (one per core): per image the cost is Python
overhead around a tiny decode, so threads would serialise on the GIL. On a terminal a
transient progress bar follows it (archive bytes read, images decoded).
"""

from __future__ import annotations

import io
import lzma
import multiprocessing
import os
import re
import tarfile
import zlib
from concurrent.futures import Future, ProcessPoolExecutor
from pathlib import Path, PurePosixPath

import numpy as np

from fastgraph.core.console import progress
from fastgraph.core.errors import DataError
from fastgraph.data.cache import Arrays

SPLITS = ("train", "test")
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")
ARCHIVE_SUFFIXES = (".tar", ".tar.gz", ".tgz", ".tar.xz", ".txz")
CHUNK = 2000  # images per worker task: large enough to amortise pickling, small enough to overlap
# Canonical CIFAR-10 class order (batches.meta of the original release).
CANONICAL = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")
# Errors a truncated or corrupt archive raises while being read.
ARCHIVE_ERRORS = (tarfile.TarError, EOFError, zlib.error, lzma.LZMAError, OSError)


def _natural_key(name: str) -> tuple:
    # re.split with a capture group alternates text and digits, so ints and strs never
    # meet at the same tuple position.
    return tuple(int(t) if t.isdigit() else t for t in re.split(r"(\d+)", name))


def _decode_chunk(items: list[tuple[str, bytes]]) -> np.ndarray | str:
    """Decode (display name, encoded bytes) pairs to uint8 (n, 32, 32, 3), or an error line."""
    from PIL import Image, UnidentifiedImageError

    out = np.empty((len(items), 32, 32, 3), np.uint8)
    for i, (name, data) in enumerate(items):
        try:
            with Image.open(io.BytesIO(data)) as im:
                if im.size != (32, 32):
                    return (f"{name}: image is {im.size[0]}x{im.size[1]} pixels, CIFAR-10 needs "
                            "32x32; replace or remove it")
                out[i] = np.asarray(im.convert("RGB"))
        except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as exc:
            reason = " ".join(str(exc).split())
            return f"{name}: cannot decode image ({reason}); the file is corrupt: re-download or replace it"
    return out


class _Decoder:
    """Feeds images to worker processes as they are read, so reading overlaps decoding."""

    def __init__(self, workers: int, update=None):
        self.meta: list[tuple[str, str, str]] = []  # (split, class, file name) per image
        self.folders: list[tuple[str, str, str]] = []  # (split, class, display name) per class folder seen
        self.parts: list[Future | np.ndarray | str] = []
        self.pending: list[tuple[str, bytes]] = []
        self.update = update or (lambda **_: None)  # progress: see fastgraph.core.console.progress
        self.decoded = 0
        self.pool = None
        if workers > 1 and "fork" in multiprocessing.get_all_start_methods():
            # fork: workers need only Pillow and numpy, and start without re-importing torch.
            self.pool = ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("fork"))
            # Fork the workers now, before the progress bar starts its refresh thread:
            # forking a process that runs threads can copy a held lock into the child.
            self.pool.submit(int).result()

    def add(self, split: str, cls: str, fname: str, display: str, data: bytes) -> None:
        self.meta.append((split, cls, fname))
        self.pending.append((display, data))
        if len(self.pending) >= CHUNK:
            self._flush()

    def _flush(self) -> None:
        if self.pending:
            chunk, self.pending = self.pending, []
            if self.pool is None:
                self.parts.append(_decode_chunk(chunk))
                self._done(len(chunk))
            else:
                future, n = self.pool.submit(_decode_chunk, chunk), len(chunk)
                future.add_done_callback(lambda _: self._done(n))
                self.parts.append(future)

    def _done(self, n: int) -> None:
        self.decoded += n
        self.update(note=f"{self.decoded:,} images decoded")

    def finish(self) -> np.ndarray:
        """All images as uint8 (N, 32, 32, 3) in the order added; raises DataError."""
        self._flush()
        parts = [p.result() if isinstance(p, Future) else p for p in self.parts]
        self.close()
        for p in parts:
            if isinstance(p, str):
                raise DataError(p)
        return np.concatenate(parts) if parts else np.empty((0, 32, 32, 3), np.uint8)

    def close(self) -> None:
        if self.pool is not None:
            self.pool.shutdown(wait=True, cancel_futures=True)
            self.pool = None


def _split_class_file(parts: tuple[str, ...]) -> tuple[str, str, str, str] | None:
    """(top folder or '', split, class, file) for an image path inside the layout, else None."""
    if any(p.startswith(".") or p == "__MACOSX" for p in parts):
        return None
    if not parts[-1].lower().endswith(IMAGE_SUFFIXES):
        return None
    if len(parts) == 3 and parts[0] in SPLITS:
        return ("", *parts)
    if len(parts) == 4 and parts[1] in SPLITS:
        return parts  # type: ignore[return-value]
    return None


def _class_folder(parts: tuple[str, ...]) -> tuple[str, str] | None:
    """(split, class) for a class folder's path inside the layout, else None."""
    if any(p.startswith(".") or p == "__MACOSX" for p in parts):
        return None
    if len(parts) == 2 and parts[0] in SPLITS:
        return parts  # type: ignore[return-value]
    if len(parts) == 3 and parts[1] in SPLITS:
        return parts[1], parts[2]
    return None


def _read_archive(path: Path, dec: _Decoder) -> set[str]:
    tops: set[str] = set()
    try:
        # The raw file is opened here so that its position tracks the compressed bytes read.
        with open(path, "rb") as raw, tarfile.open(fileobj=raw, mode="r:*") as tar:
            for member in tar:
                dec.update(completed=raw.tell())
                if member.isdir():
                    folder = _class_folder(PurePosixPath(member.name.removeprefix("./")).parts)
                    if folder is not None:
                        dec.folders.append((*folder, f"{path}:{member.name.rstrip('/')}/"))
                if not member.isfile():
                    continue
                parsed = _split_class_file(PurePosixPath(member.name.removeprefix("./")).parts)
                if parsed is None:
                    continue
                top, split, cls, fname = parsed
                tops.add(top)
                f = tar.extractfile(member)
                dec.add(split, cls, fname, f"{path}:{member.name}", f.read())
    except ARCHIVE_ERRORS as exc:
        reason = " ".join(str(exc).split()) or type(exc).__name__
        raise DataError(f"{path}: truncated or corrupt archive ({reason}); "
                        "re-download or rebuild it") from None
    return tops


def image_root(folder: Path) -> Path:
    """``folder`` itself, or its one sub-folder when that holds the split folders."""
    if all((folder / s).is_dir() for s in SPLITS):
        return folder
    subdirs = [p for p in folder.iterdir() if p.is_dir() and not p.name.startswith(".")]
    if len(subdirs) == 1 and any((subdirs[0] / s).is_dir() for s in SPLITS):
        return subdirs[0]
    return folder


def _read_folder(folder: Path, dec: _Decoder) -> None:
    root = image_root(folder)
    for split in SPLITS:
        split_dir = root / split
        if not split_dir.is_dir():
            continue
        # Hidden folders (.ipynb_checkpoints, .AppleDouble) are no classes, as in an archive.
        for cls_dir in sorted(p for p in split_dir.iterdir() if p.is_dir() and not p.name.startswith(".")):
            dec.folders.append((split, cls_dir.name, f"{cls_dir}/"))
            for f in sorted(cls_dir.iterdir(), key=lambda p: _natural_key(p.name)):
                if f.name.startswith(".") or not f.name.lower().endswith(IMAGE_SUFFIXES):
                    continue
                try:
                    data = f.read_bytes()
                except OSError as exc:
                    raise DataError(f"{f}: cannot read ({exc.strerror}); check or replace it") from None
                dec.add(split, cls_dir.name, f.name, str(f), data)


def class_order(names: set[str]) -> tuple[str, ...]:
    """CIFAR-10's canonical order when ``names`` are its classes, else sorted."""
    return CANONICAL if names == set(CANONICAL) else tuple(sorted(names))


def _check_classes(source: Path, per_split: dict[str, set[str]], folders: list[tuple[str, str, str]]) -> None:
    layout = "train/<class>/*.png|jpg and test/<class>/*.png|jpg"
    # An empty class folder would silently drop its class and shift the later labels;
    # torchvision's ImageFolder refuses one too.
    for split, cls, display in folders:
        if cls not in per_split[split]:
            raise DataError(f"{display}: empty class folder (no .png/.jpg/.jpeg images); add its "
                            "images or remove the folder")
    for split, names in per_split.items():
        if not names:
            raise DataError(f"{source}: no {split}/ images found (expected {layout})")
    for split, other in (("test", "train"), ("train", "test")):
        missing = per_split[other] - per_split[split]
        if missing:
            raise DataError(f"{source}: {split}/ has no images of class(es) {', '.join(sorted(missing))} "
                            f"that {other}/ has; every class needs images in both splits")


def read_imagefolder(source: Path, workers: int | None = None) -> Arrays:
    """Decode an ImageFolder CIFAR-10 (folder or tar archive) to arrays.

    Args:
        source: folder with ``train/`` and ``test/`` (possibly inside one sub-folder), or
            a ``.tar``/``.tar.gz``/``.tar.xz`` archive of such a tree.
        workers: decoding processes; default one per available core.
    Returns:
        Arrays: uint8 (N, 3, 32, 32) images, int64 (N,) labels, class names.
    Raises:
        DataError: truncated/corrupt archive, missing split or classes, an empty class
            folder, an image that is not 32x32 or cannot be decoded (each names the file).
    """
    if workers is None:
        workers = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    dec = _Decoder(workers)
    # A folder's size is unknown until listed: its bar only counts images.
    total = None if source.is_dir() else source.stat().st_size
    try:  # whatever goes wrong (a DataError, Ctrl-C), the worker processes are shut down
        with progress(f"decoding {source.name} (once)", total=total) as dec.update:
            if source.is_dir():
                _read_folder(source, dec)
            else:
                tops = _read_archive(source, dec)
                if len(tops) > 1:
                    raise DataError(f"{source}: archive holds train/ and test/ under several top-level "
                                    f"folders ({', '.join(sorted(t or '.' for t in tops))}); keep one")
            per_split = {s: {c for sp, c, _ in dec.meta if sp == s} for s in SPLITS}
            _check_classes(source, per_split, dec.folders)
            images = dec.finish()
    finally:
        dec.close()
    classes = class_order(per_split["train"])
    index = {c: i for i, c in enumerate(classes)}
    labels = np.array([index[c] for _, c, _ in dec.meta], np.int64)
    out = []
    for split in SPLITS:
        rows = [i for i, (s, _, _) in enumerate(dec.meta) if s == split]
        rows.sort(key=lambda i: (labels[i], _natural_key(dec.meta[i][2])))
        rows = np.array(rows, np.int64)
        out += [np.ascontiguousarray(images[rows].transpose(0, 3, 1, 2)), labels[rows]]
    return Arrays(*out, classes)
