"""Builders of small ImageNet-format data sets (``train/<class>/*.jpg``, ``val/<class>/*.jpg``,
or the same as tar shards) for tests and benchmarks: real CIFAR-10 images upscaled to
ImageNet-like sizes and aspect ratios, synthetic class-distinct images without real data."""

from __future__ import annotations

import functools
import io
import tarfile
import warnings
from pathlib import Path

import numpy as np
from PIL import Image

from support import real_data_path

JPEG_QUALITY = 90  # as FFCV writes its ImageNet JPEGs


@functools.lru_cache(maxsize=1)
def _cifar():
    """Real CIFAR-10 (decoded once, then from the cache), or None without real data."""
    path = real_data_path()
    if path is None:
        return None
    from fastgraph.data import load_cifar10

    return load_cifar10(path)


def _sources(classes: int, per_split: dict[str, int], seed: int) -> tuple[tuple[str, ...], dict]:
    """Class names and, per split, uint8 (n_class, k, 32, 32, 3) source images."""
    ds = _cifar()
    if ds is not None and classes <= len(ds.classes):
        names = ds.classes[:classes]
        out = {}
        for split, k in per_split.items():
            images, labels = ((ds.train_images, ds.train_labels) if split == "train"
                              else (ds.test_images, ds.test_labels))
            labels = labels.numpy()
            rows = [np.flatnonzero(labels == c)[:k] for c in range(classes)]
            if any(len(r) < k for r in rows):
                raise ValueError(f"CIFAR-10 has fewer than {k} {split} images of a class")
            out[split] = np.stack([images[r].numpy().transpose(0, 2, 3, 1) for r in rows])
        return names, out
    warnings.warn("real CIFAR-10 absent: ImageNet-format tests run on SYNTHETIC images", stacklevel=2)
    rng = np.random.default_rng(seed + 1)
    names = tuple(f"class{c:02d}" for c in range(classes))
    base = rng.integers(0, 256, (classes, 1, 4, 4, 3), dtype=np.uint8)  # a coarse pattern per class
    out = {}
    for split, k in per_split.items():
        noise = rng.integers(0, 48, (classes, k, 32, 32, 3), dtype=np.uint8)
        out[split] = (np.repeat(np.repeat(base, 8, 2), 8, 3) // 4 * 3 + noise // 2).astype(np.uint8)
    return names, out


def _upscale(img: np.ndarray, size: tuple[int, int], rng: np.random.Generator) -> bytes:
    """A 32x32 image blown up past ``size`` (w, h), a random ``size`` window of it, as JPEG bytes."""
    w, h = size
    side = int(max(w, h) * rng.uniform(1.0, 1.3))
    big = Image.fromarray(img).resize((side, side), Image.Resampling.BICUBIC)
    left, top = int(rng.integers(0, side - w + 1)), int(rng.integers(0, side - h + 1))
    buf = io.BytesIO()
    big.crop((left, top, left + w, top + h)).save(buf, "JPEG", quality=JPEG_QUALITY)
    return buf.getvalue()


def write_imagenet_folder(root: Path, *, classes: int = 3, per_class_train: int = 24, per_class_val: int = 8,
                          sizes: tuple[int, int] = (40, 96), shards: bool = False, seed: int = 0) -> Path:
    """Write a small ImageNet-format data set under ``root``; return ``root``.

    Images are real CIFAR-10 images of the first ``classes`` classes (train images for
    train/, test images for val/) when real data is present (``support.real_data_path``),
    else synthetic class-distinct ones (with a warning). Each is upscaled and cut to a
    random width and height in ``sizes`` (pixels, so the aspect ratio varies too) at a
    random place, then saved as a JPEG (quality 90) named ``<k>.jpg`` (unpadded numbers, so
    ``10.jpg`` must sort after ``9.jpg``). ``shards``: instead of folders, two uncompressed
    tar shards per split (``root/train-0000.tar``, ...) with members ``<class>/<k>.jpg``.
    The same arguments write byte-identical images.
    """
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    names, sources = _sources(classes, {"train": per_class_train, "val": per_class_val}, seed)
    rng = np.random.default_rng(seed)
    for split, images in sources.items():
        members = []
        for c, name in enumerate(names):
            for k, img in enumerate(images[c]):
                size = (int(rng.integers(sizes[0], sizes[1] + 1)), int(rng.integers(sizes[0], sizes[1] + 1)))
                members.append((f"{name}/{k}.jpg", _upscale(img, size, rng)))
        if not shards:
            for member, data in members:
                (root / split / member).parent.mkdir(parents=True, exist_ok=True)
                (root / split / member).write_bytes(data)
            continue
        # Interleave the members over two shards, so a class spans both.
        for s in range(2):
            with tarfile.open(root / f"{split}-{s:04d}.tar", "w") as tar:
                for member, data in members[s::2]:
                    info = tarfile.TarInfo(member)
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
    return root
