"""ImageNet-format data sets: the layout, an index of the images, reading their bytes,
and the crop-and-resize transforms of the ImageNet recipes (pure CPU: numpy, Pillow, torch).

Layouts (the one torchvision's ``ImageFolder`` reads, any number of classes and sizes)::

    root/train/<class>/*.jpg|jpeg|png        root/val/<class>/...            (a folder per split)
    root/train-0000.tar, root/train-0001.tar, ...   or   root/train/*.tar     (uncompressed tar shards
                                                      whose members are <class>/<file>)

Nothing is decoded when a split is scanned: :class:`ImageSet` holds the classes, the
labels and where each image's bytes are (a file, or an offset into a shard), so a data set
of any size costs memory for its index only. Images are ordered class by class (class
names sorted, as ``ImageFolder`` sorts them) and within a class by natural file name.

The transforms are those of the FFCV ResNet-50 recipe (libffcv/ffcv-imagenet,
``train_imagenet.py``): torchvision's RandomResizedCrop box, FFCV's centre crop of
ratio 224/256 for evaluation, and the progressive training resolution.
"""

from __future__ import annotations

import io
import math
import os
import re
import tarfile
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

import numpy as np
import torch

from fastgraph.core.errors import DataError

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")
COMPRESSED_SUFFIXES = (".tar.gz", ".tgz", ".tar.xz", ".txz", ".tar.bz2", ".tbz2", ".tar.zst")
# Magic bytes of the compressions a shard named .tar may still carry.
_COMPRESSION_MAGIC = {b"\x1f\x8b": "gzip", b"\xfd7zXZ": "xz", b"BZh": "bzip2", b"\x28\xb5\x2f\xfd": "zstd"}
SPLITS = ("train", "val")
# Pillow's JPEG draft mode decodes at 1/2, 1/4 or 1/8 scale in the DCT domain; it is used
# when the crop shrinks by at least this factor (see decode_crop).
DRAFT_MIN_SHRINK = 2.0


def _natural_key(name: str) -> tuple:
    # Digits compare as numbers ("2.jpg" before "10.jpg"); re.split with a capture group
    # alternates text and digits, so ints and strs never meet at one tuple position.
    return tuple(int(t) if t.isdigit() else t for t in re.split(r"(\d+)", name))


def _is_image(name: str) -> bool:
    return not name.startswith(".") and name.lower().endswith(IMAGE_SUFFIXES)


@dataclass(frozen=True, eq=False)  # an index of arrays has no single truth value to compare
class ImageSet:
    """One split of an ImageNet-format data set, indexed; nothing decoded.

    source: the split folder, or the first tar shard.
    classes: class names, sorted (torchvision ``ImageFolder`` order); label i is classes[i].
    labels: int64 (N,) class index of each image, non-decreasing (class by class).
    Image i's bytes come from :meth:`read`: a file read, or a seek into an uncompressed
    shard. An ImageSet pickles small (paths and offsets), so worker processes get it cheaply.
    """

    source: Path
    classes: tuple[str, ...]
    labels: np.ndarray
    # Where each image is: files[i] is a path relative to ``source`` (a folder), or, for
    # shards, member names with the shard index, byte offset and size of each image.
    files: tuple[str, ...] = field(repr=False)
    shards: tuple[Path, ...] = field(default=(), repr=False)
    shard_of: np.ndarray | None = field(default=None, repr=False)  # int32 (N,)
    offsets: np.ndarray | None = field(default=None, repr=False)  # int64 (N,) bytes
    sizes: np.ndarray | None = field(default=None, repr=False)  # int64 (N,) bytes

    def __len__(self) -> int:
        return len(self.labels)

    def read(self, i: int) -> bytes:
        """Encoded bytes of image ``i``.

        Raises:
            DataError: the file or shard cannot be read, or the shard is shorter than its
                index says (it changed after the scan); the message names it.
        """
        if not self.shards:
            path = self.source / self.files[i]
            try:
                return path.read_bytes()
            except OSError as exc:
                raise DataError(f"{path}: cannot read ({exc.strerror or exc}); check or replace it") from None
        shard = self.shards[int(self.shard_of[i])]
        size = int(self.sizes[i])
        try:
            # A shard is opened per read: no file offset is shared between the worker
            # processes that fork with an open handle, and an open costs microseconds
            # next to a decode's milliseconds.
            with open(shard, "rb") as f:
                f.seek(int(self.offsets[i]))
                data = f.read(size)
        except OSError as exc:
            raise DataError(f"{shard}: cannot read ({exc.strerror or exc}); check or replace it") from None
        if len(data) != size:
            raise DataError(f"{self.name(i)}: shard ends inside this image (truncated after it was "
                            "indexed); rebuild or re-copy the shard")
        return data

    def name(self, i: int) -> str:
        """Image ``i`` for messages: its path, or ``shard.tar:member``."""
        if not self.shards:
            return str(self.source / self.files[i])
        return f"{self.shards[int(self.shard_of[i])]}:{self.files[i]}"

    def subset(self, rows) -> ImageSet:
        """The images ``rows`` (int indices, any order, duplicates dropped) as an ImageSet
        with the same classes, in this set's order (class by class).

        Raises:
            IndexError: an index outside ``range(len(self))``.
        """
        rows = np.unique(np.asarray(rows, dtype=np.int64))
        if len(rows) and (rows[0] < 0 or rows[-1] >= len(self)):
            raise IndexError(f"subset indices must lie in range({len(self)})")
        pick = (lambda a: None if a is None else a[rows])  # noqa: E731 - four arrays alike
        return ImageSet(source=self.source, classes=self.classes, labels=self.labels[rows],
                        files=tuple(self.files[i] for i in rows.tolist()), shards=self.shards,
                        shard_of=pick(self.shard_of), offsets=pick(self.offsets), sizes=pick(self.sizes))


def _compression(path: Path) -> str | None:
    """The compression a shard is under (from its name or first bytes), None for a plain tar."""
    name = path.name.lower()
    for suffix in COMPRESSED_SUFFIXES:
        if name.endswith(suffix):
            return suffix.lstrip(".")
    try:
        with open(path, "rb") as f:
            head = f.read(6)
    except OSError as exc:
        raise DataError(f"{path}: cannot read ({exc.strerror or exc}); check or replace it") from None
    return next((kind for magic, kind in _COMPRESSION_MAGIC.items() if head.startswith(magic)), None)


def _shard_paths(root: Path, split: str) -> list[Path]:
    """Tar shards of ``split``: ``root/<split>-*.tar*`` and ``root/<split>/*.tar*``, natural order."""
    found = [p for p in root.glob(f"{split}-*") if p.is_file()]
    split_dir = root / split
    if split_dir.is_dir():
        found += [p for p in split_dir.iterdir() if p.is_file() and not p.name.startswith(".")]
    tars = (".tar", *COMPRESSED_SUFFIXES)
    return sorted((p for p in found if p.name.lower().endswith(tars)), key=lambda p: _natural_key(p.name))


def _scan_shards(shard_paths: list[Path]) -> ImageSet:
    entries = []  # (class, member name, shard index, offset, size)
    for k, shard in enumerate(shard_paths):
        kind = _compression(shard)
        if kind is not None:
            raise DataError(f"{shard}: {kind}-compressed shard; reading images at random needs an "
                            "uncompressed tar: decompress it (e.g. `gunzip`/`unxz`, keeping the .tar)")
        try:
            with tarfile.open(shard, "r:") as tar:
                for member in tar:
                    if not member.isfile():
                        continue
                    parts = PurePosixPath(member.name.removeprefix("./")).parts
                    if len(parts) < 2 or not _is_image(parts[-1]) or any(p.startswith(".") for p in parts):
                        continue
                    entries.append((parts[-2], member.name, k, member.offset_data, member.size))
        except (tarfile.TarError, EOFError, OSError) as exc:
            reason = " ".join(str(exc).split()) or type(exc).__name__
            raise DataError(f"{shard}: truncated or corrupt tar shard ({reason}); "
                            "rebuild or re-copy it") from None
    if not entries:
        raise DataError(f"{shard_paths[0]}: no images in the shards of this split (expected members "
                        "<class>/<file>.jpg)")
    classes = tuple(sorted({e[0] for e in entries}))
    index = {c: i for i, c in enumerate(classes)}
    entries.sort(key=lambda e: (index[e[0]], _natural_key(PurePosixPath(e[1]).name), e[2]))
    return ImageSet(
        source=shard_paths[0], classes=classes,
        labels=np.array([index[e[0]] for e in entries], np.int64),
        files=tuple(e[1] for e in entries), shards=tuple(shard_paths),
        shard_of=np.array([e[2] for e in entries], np.int32),
        offsets=np.array([e[3] for e in entries], np.int64),
        sizes=np.array([e[4] for e in entries], np.int64))


def _scan_folder(split_dir: Path) -> ImageSet:
    classes = tuple(sorted(p.name for p in split_dir.iterdir() if p.is_dir() and not p.name.startswith(".")))
    if not classes:
        raise DataError(f"{split_dir}: no class folders (expected {split_dir}/<class>/*.jpg)")
    files, labels = [], []
    for label, cls in enumerate(classes):
        # os.scandir's entries know their type from the directory listing: no stat per image
        # (ImageNet's train split has 1.28 million)
        with os.scandir(split_dir / cls) as entries:
            names = sorted((e.name for e in entries if _is_image(e.name) and e.is_file()), key=_natural_key)
        if not names:
            raise DataError(f"{split_dir / cls}: empty class folder (no .jpg/.jpeg/.png images); "
                            "add its images or remove the folder")
        files += [f"{cls}/{n}" for n in names]
        labels += [label] * len(names)
    return ImageSet(source=split_dir, classes=classes, labels=np.array(labels, np.int64), files=tuple(files))


def scan_imagenet(root: str | os.PathLike, split: str) -> ImageSet:
    """Index one split of an ImageNet-format data set (see the module docstring); decodes nothing.

    Args:
        root: the folder holding ``<split>/`` (class folders or tar shards) or ``<split>-*.tar``.
        split: "train", "val", or any other split name.
    Returns:
        ImageSet: classes sorted, images class by class then by natural file name.
    Raises:
        DataError (one line naming the path): ``root`` or the split missing, no class
            folders, an empty class folder, a compressed shard (.tar.gz, ...: random access
            needs an uncompressed tar), a truncated or corrupt shard, shards without images.
    """
    root = Path(root).expanduser()
    if not root.is_dir():
        raise DataError(f"{root}: no such folder (expected an ImageNet-format folder with {split}/)")
    shards = _shard_paths(root, split)
    split_dir = root / split
    has_classes = split_dir.is_dir() and any(p.is_dir() and not p.name.startswith(".")
                                             for p in split_dir.iterdir())
    if has_classes:
        return _scan_folder(split_dir)
    if shards:
        return _scan_shards(shards)
    if split_dir.is_dir():
        return _scan_folder(split_dir)  # raises: no class folders
    raise DataError(f"{root}: no {split}/ folder or {split}-*.tar shards "
                    f"(expected {root}/{split}/<class>/*.jpg)")


def is_imagenet_layout(path: str | os.PathLike) -> bool:
    """Whether ``path`` is a folder with train and val splits (folders or tar shards).

    CIFAR-10's ImageFolder copy has train/ and test/, so it is not taken for one.
    """
    root = Path(path).expanduser()
    if not root.is_dir():
        return False
    return all((root / s).is_dir() or bool(_shard_paths(root, s)) for s in SPLITS)


def random_resized_crop_box(width: int, height: int, generator: torch.Generator,
                            scale: tuple[float, float] = (0.08, 1.0),
                            ratio: tuple[float, float] = (3 / 4, 4 / 3)) -> tuple[int, int, int, int]:
    """A random crop box ``(left, top, w, h)`` in pixels of a ``width`` x ``height`` image.

    torchvision's ``RandomResizedCrop.get_params`` (Szegedy et al. 2015's "Inception"
    crop): up to 10 tries of an area fraction uniform in ``scale`` and a log-uniform aspect
    ratio w/h in ``ratio``, taking the first box that fits; else the central crop at the
    aspect ratio clamped into ``ratio``. Draws come from ``generator`` (a CPU generator)
    only, so a box depends on the generator's seed alone.
    """
    area = width * height
    log_lo, log_hi = math.log(ratio[0]), math.log(ratio[1])
    for _ in range(10):
        target_area = area * torch.empty(1).uniform_(scale[0], scale[1], generator=generator).item()
        aspect = math.exp(torch.empty(1).uniform_(log_lo, log_hi, generator=generator).item())
        w = int(round(math.sqrt(target_area * aspect)))
        h = int(round(math.sqrt(target_area / aspect)))
        if 0 < w <= width and 0 < h <= height:
            top = int(torch.randint(0, height - h + 1, (1,), generator=generator).item())
            left = int(torch.randint(0, width - w + 1, (1,), generator=generator).item())
            return left, top, w, h
    in_ratio = width / height
    if in_ratio < min(ratio):
        w, h = width, int(round(width / min(ratio)))
    elif in_ratio > max(ratio):
        w, h = int(round(height * max(ratio))), height
    else:
        w, h = width, height
    return (width - w) // 2, (height - h) // 2, w, h


def center_crop_box(width: int, height: int, res: int, crop_ratio: float) -> tuple[int, int, int, int]:
    """The evaluation crop ``(left, top, w, h)``: the central square of side
    ``int(crop_ratio * min(width, height))``, to be resized to ``res`` x ``res``.

    FFCV's ``CenterCropRGBImageDecoder`` (``get_center_crop`` in ffcv/fields/rgb_image.py)
    with ``ratio = 224/256`` is the FFCV ResNet-50 evaluation; it approximates torchvision's
    ``Resize(256)`` + ``CenterCrop(224)`` without resizing the whole image first.

    Raises:
        ValueError: ``res`` < 1 or ``crop_ratio`` outside (0, 1].
    """
    if res < 1 or not 0 < crop_ratio <= 1:
        raise ValueError(f"center crop needs res >= 1 and 0 < crop_ratio <= 1, got {res}, {crop_ratio}")
    side = max(1, int(crop_ratio * min(width, height)))
    return (width - side) // 2, (height - side) // 2, side, side


def progressive_resolution(epoch: float, *, min_res: int, max_res: int, start_ramp: float, end_ramp: float,
                           step: int = 32) -> int:
    """Training resolution (pixels, square) at ``epoch`` under progressive resizing.

    FFCV's ResNet-50 recipe (libffcv/ffcv-imagenet ``train_imagenet.py``, ``get_resolution``):
    ``min_res`` up to epoch ``start_ramp``, ``max_res`` from ``end_ramp`` on, and in between
    the linear interpolation rounded to the nearest multiple of ``step`` (32 there).

    Raises:
        ValueError: ``min_res > max_res``.
    """
    if min_res > max_res:
        raise ValueError(f"progressive resolution needs min_res <= max_res, got {min_res} > {max_res}")
    if epoch <= start_ramp:
        return int(min_res)
    if epoch >= end_ramp:
        return int(max_res)
    interp = float(np.interp(epoch, [start_ramp, end_ramp], [min_res, max_res]))
    return int(np.round(interp / step)) * step


def image_header(data: bytes, name: str) -> tuple[int, int, str, str]:
    """``(width, height, format, mode)`` of an encoded image, read from its header only.

    Raises:
        DataError: not an image Pillow recognises (names ``name``).
    """
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(io.BytesIO(data)) as im:
            return im.size[0], im.size[1], im.format or "", im.mode
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as exc:
        raise _decode_error(name, exc) from None


def _decode_error(name: str, exc: BaseException) -> DataError:
    reason = " ".join(str(exc).split()) or type(exc).__name__
    return DataError(f"{name}: cannot decode image ({reason}); the file is corrupt: "
                     "re-download or replace it")


def resize_crop(image: torch.Tensor, box: tuple[int, int, int, int], res: int, flip: bool) -> torch.Tensor:
    """Crop ``box`` = ``(left, top, w, h)`` of ``image`` (uint8 or float (3, H, W), any device),
    resize it to ``res`` x ``res`` (bilinear, antialiased: torchvision's ``resized_crop``)
    and mirror it left-right if ``flip``. Returns (3, res, res) of ``image``'s dtype
    (uint8 results are rounded and clamped by PyTorch's uint8 kernel)."""
    left, top, w, h = box
    crop = image[None, :, top:top + h, left:left + w]
    out = torch.nn.functional.interpolate(crop, size=(res, res), mode="bilinear", antialias=True,
                                          align_corners=False)[0]
    return out.flip(-1) if flip else out


def decode_crop(data: bytes, box: tuple[int, int, int, int], res: int, flip: bool, name: str,
                *, draft: bool = True) -> np.ndarray:
    """Decode an encoded image, crop ``box`` and resize it to ``res`` x ``res``; mirror if ``flip``.

    Args:
        data: JPEG or PNG bytes (grey, CMYK and palette images become RGB).
        box: ``(left, top, w, h)`` in pixels of the full image (e.g. from
            :func:`random_resized_crop_box` or :func:`center_crop_box`).
        res: output side in pixels.
        flip: mirror left-right after resizing.
        name: the image in error messages (``ImageSet.name``).
        draft: allow Pillow's JPEG draft mode (below).
    Returns:
        uint8 (res, res, 3) RGB array.
    Raises:
        DataError: undecodable or truncated bytes (names ``name``).

    Pillow decodes; the crop and resize are :func:`resize_crop` (PyTorch's antialiased
    bilinear ``interpolate``, whose uint8 kernel is vectorised: about 3x faster than
    Pillow's resize here, and the very function the GPU path runs). When the crop shrinks
    by 2x or more and the image is a JPEG, Pillow's ``draft`` decodes it at 1/2, 1/4 or 1/8
    scale in the DCT domain (libjpeg's scaled IDCT), chosen so the crop keeps at least
    ``res`` pixels a side, and the box is rounded to that grid. This is the trick fast
    ImageNet loaders use: decoding and resizing cost a fraction, and the result differs
    from a full decode + resize by a few grey levels on average (the antialiased resize
    would average those pixels away anyway).
    """
    from PIL import Image, UnidentifiedImageError

    left, top, w, h = box
    try:
        with Image.open(io.BytesIO(data)) as im:
            full_w, full_h = im.size
            if draft and im.format == "JPEG" and min(w, h) / res >= DRAFT_MIN_SHRINK:
                # The smallest decode size whose crop still has >= res pixels a side.
                im.draft("RGB", (math.ceil(full_w * res / w), math.ceil(full_h * res / h)))
            # libjpeg's scaled decode of factor s maps pixel x to x / s (its size is ceil(W / s)).
            s = max(1, round(full_w / im.size[0]))
            pixels = np.array(im if im.mode == "RGB" else im.convert("RGB"), dtype=np.uint8)
            # Pillow hands numpy a read-only buffer; torch warns on (and must not write to) one
            pixels = np.require(pixels, requirements="W")
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as exc:
        raise _decode_error(name, exc) from None
    if s > 1:
        x0, y0 = round(left / s), round(top / s)
        x1 = min(pixels.shape[1], max(x0 + 1, round((left + w) / s)))
        y1 = min(pixels.shape[0], max(y0 + 1, round((top + h) / s)))
        left, top, w, h = x0, y0, x1 - x0, y1 - y0
    # (H, W, 3) seen as (3, H, W) with channels-last strides: the layout of the fast uint8 kernel.
    out = resize_crop(torch.from_numpy(pixels).permute(2, 0, 1), (left, top, w, h), res, flip)
    return np.ascontiguousarray(out.permute(1, 2, 0).numpy())
