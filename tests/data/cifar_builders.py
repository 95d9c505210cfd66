"""Builders that write CIFAR-10 images in each source format the loader reads:
python-format batches, ImageFolder PNGs, and tar archives of either."""

from __future__ import annotations

import hashlib
import pickle
import tarfile
from pathlib import Path
from typing import NamedTuple

import numpy as np
from PIL import Image

from fastgraph.data import CLASSES


class Sample(NamedTuple):
    """Images uint8 (N, 3, 32, 32) and int64 labels, in the order a loader must return them."""

    train_images: np.ndarray
    train_labels: np.ndarray
    test_images: np.ndarray
    test_labels: np.ndarray
    real: bool


def write_batches(folder: Path, s: Sample) -> dict[str, str]:
    """Write ``s`` as the seven python-format files in ``folder``; return their md5s."""
    folder.mkdir(parents=True, exist_ok=True)
    flat = s.train_images.reshape(len(s.train_images), -1)
    parts = np.array_split(np.arange(len(flat)), 5)
    docs = {f"data_batch_{i + 1}": (flat[p], s.train_labels[p]) for i, p in enumerate(parts)}
    docs["test_batch"] = (s.test_images.reshape(len(s.test_images), -1), s.test_labels)
    md5 = {}
    for name, (data, labels) in docs.items():
        doc = {b"batch_label": name.encode(), b"labels": [int(v) for v in labels], b"data": data,
               b"filenames": [f"{i}.png".encode() for i in range(len(data))]}
        (folder / name).write_bytes(pickle.dumps(doc, protocol=2))
    meta = {b"label_names": [c.encode() for c in CLASSES], b"num_cases_per_batch": len(parts[0]),
            b"num_vis": 3072}
    (folder / "batches.meta").write_bytes(pickle.dumps(meta, protocol=2))
    for f in folder.iterdir():
        md5[f.name] = hashlib.md5(f.read_bytes()).hexdigest()
    return md5


def class_major(images: np.ndarray, labels: np.ndarray):
    """Stable sort by class: the order an ImageFolder loader returns."""
    order = np.argsort(labels, kind="stable")
    return images[order], labels[order]


def write_imagefolder(root: Path, s: Sample, classes=CLASSES, suffix: str = ".png") -> Path:
    """Write ``s`` as ``root/{train,test}/<class>/<rank>.png`` (unpadded numbers, so
    ``10.png`` must sort after ``9.png``). Returns ``root``."""
    for split, images, labels in (("train", s.train_images, s.train_labels),
                                  ("test", s.test_images, s.test_labels)):
        rank = {}
        for img, label in zip(images, labels, strict=True):
            cls_dir = root / split / classes[label]
            cls_dir.mkdir(parents=True, exist_ok=True)
            k = rank.setdefault(int(label), 0)
            rank[int(label)] = k + 1
            Image.fromarray(img.transpose(1, 2, 0)).save(cls_dir / f"{k}{suffix}")
    return root


def make_tar(src: Path, archive: Path, top: str | None = None) -> Path:
    """Pack the contents of ``src`` into ``archive`` (compression from its suffix), under
    one top-level folder ``top`` if given."""
    mode = {".gz": "w:gz", ".xz": "w:xz", ".tar": "w"}[archive.suffix]
    with tarfile.open(archive, mode, dereference=True) as tar:
        for item in sorted(src.iterdir()):
            tar.add(item, arcname=f"{top}/{item.name}" if top else item.name)
    return archive
