"""CIFAR-10 (Krizhevsky, 2009) as uint8 tensors, decoded once and cached.

Sources: the original python-format release (``cifar-10-batches-py/`` or
``cifar-10-python.tar.gz``, md5-checked), or the ImageFolder layout
(``train/<class>/*.png|jpg``, ``test/<class>/...``) as a folder or a
``.tar``/``.tar.gz``/``.tar.xz`` archive. Where: an explicit path, else
``$FASTGRAPH_DATA``, else ``~/.cache/fastgraph/cifar10`` (where ``fastgraph data
download`` puts it). Every problem with the data raises ``fastgraph.core.errors.DataError``
with one line naming the file and what to do.

ImageNet-format folders and tar shards are streamed from disk instead
(:mod:`fastgraph.data.imagenet`, :mod:`fastgraph.data.imagenet_stream`).

May import: ``core`` only.
"""

from __future__ import annotations

import hashlib
import json
import os
import tarfile
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import torch

from fastgraph.core.errors import DataError
from fastgraph.core.verification import spread_indices  # re-exported: data users pick images with it
from fastgraph.data import cache, imagefolder, pickled
from fastgraph.data.imagenet import ImageSet, is_imagenet_layout, progressive_resolution, scan_imagenet
from fastgraph.data.imagenet_stream import TestStream, TrainStream

__all__ = [
    "CIFAR10",
    "CIFAR10_MEAN",
    "CIFAR10_STD",
    "CLASSES",
    "ImageSet",
    "TestStream",
    "TrainStream",
    "default_data_dir",
    "is_imagenet_layout",
    "load_cifar10",
    "normalize",
    "progressive_resolution",
    "resolve_data_path",
    "scan_imagenet",
    "spread_indices",
]

CLASSES: tuple[str, ...] = imagefolder.CANONICAL
# Per-channel (R, G, B) mean and population standard deviation of the 50,000 original
# CIFAR-10 training images over all pixels, in 0..255 units. Rounded to 0..1 units these
# are the (0.4914, 0.4822, 0.4465) / (0.2470, 0.2435, 0.2616) of airbench
# (KellerJordan/cifar10-airbench) and Page's cifar10-fast.
CIFAR10_MEAN: tuple[float, float, float] = (125.30691805, 122.95039414, 113.86538318)
CIFAR10_STD: tuple[float, float, float] = (62.99321928, 62.08870764, 66.70489964)


@dataclass(frozen=True, eq=False)  # tensors have no single truth value to compare
class CIFAR10:
    """CIFAR-10 in memory.

    train_images: uint8 (50000, 3, 32, 32) CPU tensor, contiguous NCHW, values 0..255.
    train_labels: int64 (50000,) class indices into ``classes``.
    test_images: uint8 (10000, 3, 32, 32); test_labels: int64 (10000,).
    Images are in source order: batch order for the python format, class by class
    (then file name) for the ImageFolder layout.
    classes: the 10 class names. source: the file or folder read. cache_path: the
    decoded cache used or written (None if none could be written). from_cache: whether
    this load read the cache. load_seconds: wall time of ``load_cifar10``.
    """

    train_images: torch.Tensor
    train_labels: torch.Tensor
    test_images: torch.Tensor
    test_labels: torch.Tensor
    classes: tuple[str, ...]
    source: Path
    cache_path: Path | None = None
    from_cache: bool = False
    load_seconds: float = 0.0


def default_data_dir() -> Path:
    """``$FASTGRAPH_DATA`` if set, else ``~/.cache/fastgraph/cifar10``."""
    env = os.environ.get("FASTGRAPH_DATA")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "fastgraph" / "cifar10"


def resolve_data_path(path: str | os.PathLike | None = None) -> Path:
    """Where to read CIFAR-10 from: ``path`` if given, else ``default_data_dir()``.

    Raises DataError (one line, naming the path) when it does not exist.
    """
    p = Path(path).expanduser() if path is not None else default_data_dir()
    if not p.exists():
        how = "pass an existing path" if path is not None else "set FASTGRAPH_DATA or pass --data"
        raise DataError(f"{p}: no such file or directory; run `fastgraph data download` ({how})")
    return p


def _archive_kind(path: Path) -> str:
    # Peek at the first regular file only: listing a .tar.xz means decompressing it all.
    try:
        with tarfile.open(path, "r:*") as tar:
            for member in tar:
                if member.isfile():
                    return "pickled-archive" if pickled.is_pickled_member(member.name) else "imagefolder"
    except imagefolder.ARCHIVE_ERRORS as exc:
        reason = " ".join(str(exc).split()) or type(exc).__name__
        raise DataError(f"{path}: truncated or corrupt archive ({reason}); re-download it with "
                        "`fastgraph data download`") from None
    raise DataError(f"{path}: empty archive; re-download it with `fastgraph data download`")


def _detect(path: Path) -> tuple[str, Path]:
    """(decoder kind, the file or folder it reads) for a user-given location."""
    if path.is_file():
        if not path.name.lower().endswith(imagefolder.ARCHIVE_SUFFIXES):
            raise DataError(f"{path}: not a CIFAR-10 folder or .tar/.tar.gz/.tar.xz archive; "
                            "pass one, or run `fastgraph data download`")
        return _archive_kind(path), path
    for folder in (path / pickled.FOLDER, path):
        if folder.is_dir() and any((folder / n).exists() for n in pickled.FILES):
            return "pickled-folder", folder
    if (path / pickled.ARCHIVE).is_file():
        return "pickled-archive", path / pickled.ARCHIVE
    root = imagefolder.image_root(path)
    if any((root / s).is_dir() for s in imagefolder.SPLITS):
        return "imagefolder", path
    raise DataError(f"{path}: no CIFAR-10 here (expected {pickled.FOLDER}/, {pickled.ARCHIVE}, or "
                    f"train/ and test/ class folders); run `fastgraph data download {path}`")


def load_cifar10(path: str | os.PathLike | None = None, *, checksums: Mapping[str, str] | None = None,
                 workers: int | None = None) -> CIFAR10:
    """Load CIFAR-10, decoding on the first call and reading the cache afterwards.

    Args:
        path: folder or archive (see the module docstring); None -> ``$FASTGRAPH_DATA``
            -> ``~/.cache/fastgraph/cifar10``.
        checksums: python format only: file name -> md5 hex to check instead of the
            published md5s (for files you wrote yourself).
        workers: ImageFolder decoding processes; default one per core.
    Returns:
        CIFAR10 with uint8 (N, 3, 32, 32) images and int64 (N,) labels.
    Raises:
        DataError: missing, truncated or corrupt file or archive, md5 mismatch, missing
            split or classes, wrong image size, undecodable image (one line naming it).
    """
    t0 = time.perf_counter()
    kind, source = _detect(resolve_data_path(path))
    if kind == "pickled-folder":
        def build():
            return pickled.read_folder(source, checksums)
    elif kind == "pickled-archive":
        def build():
            return pickled.read_archive(source, checksums)
    else:
        def build():
            return imagefolder.read_imagefolder(source, workers)
    extra = "" if kind == "imagefolder" else hashlib.sha1(
        json.dumps(dict(checksums if checksums is not None else pickled.PUBLISHED_MD5),
                   sort_keys=True).encode()).hexdigest()
    arrays, cache_path, hit = cache.load_or_build(source, cache.source_key(source, kind, extra), build)
    return CIFAR10(
        torch.from_numpy(arrays.train_images), torch.from_numpy(arrays.train_labels),
        torch.from_numpy(arrays.test_images), torch.from_numpy(arrays.test_labels),
        arrays.classes, source, cache_path, hit, time.perf_counter() - t0,
    )


def normalize(images_uint8: torch.Tensor, mean: tuple[float, ...] = CIFAR10_MEAN,
              std: tuple[float, ...] = CIFAR10_STD, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Per-channel standardisation ``(x - mean) / std`` of uint8 images.

    Args:
        images_uint8: (N, C, H, W) (or (C, H, W)) pixel values in 0..255, any device.
        mean, std: per-channel values in 0..255 units (default: CIFAR-10 training set).
        dtype: result dtype; the arithmetic runs in float32 and is cast at the end.
    Returns:
        Tensor of ``dtype``, same shape and device.
    Raises:
        ValueError: the channel dimension does not match ``mean``/``std``.
    """
    channel_dim = images_uint8.dim() - 3
    if channel_dim < 0 or images_uint8.shape[channel_dim] != len(mean) or len(mean) != len(std):
        raise ValueError(f"normalize expects (N, {len(mean)}, H, W) images, got {tuple(images_uint8.shape)}")
    shape = (len(mean), 1, 1)
    m = torch.tensor(mean, dtype=torch.float32, device=images_uint8.device).view(shape)
    s = torch.tensor(std, dtype=torch.float32, device=images_uint8.device).view(shape)
    return ((images_uint8.to(torch.float32) - m) / s).to(dtype)


