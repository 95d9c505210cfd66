"""Batches of an ImageNet-format data set streamed from disk: training (random resized
crop + flip at a resolution that may change by epoch) and evaluation (centre crop).

The data set is never held in memory. ``torch.utils.data.DataLoader`` worker processes
(persistent between epochs, ``prefetch_factor`` batches each in flight, pinned memory on
CUDA) read the images a batch needs and decode them; the main process uploads the batch
and normalises it on the device. Two decoders:

- "cpu": the workers decode with Pillow (:func:`fastgraph.data.imagenet.decode_crop`,
  JPEG draft mode when the crop shrinks 2x or more) and return uint8 (b, r, r, 3) crops.
- "gpu" (CUDA with torchvision): the workers read the JPEG header only (Pillow reads the
  size without decoding), draw the crop boxes and return the raw bytes; the main process
  decodes the batch with nvJPEG (``torchvision.io.decode_jpeg(list, device="cuda")``),
  crops each image, resizes it with ``F.interpolate(mode="bilinear", antialias=True)``
  and mirrors it. Images nvJPEG does not take (PNG, CMYK or grey JPEG) are decoded by the
  workers as on the CPU path. This is the split of NVIDIA DALI's "mixed" decoder.

Randomness is a function of (seed, epoch) for the order of an epoch and of (seed, epoch,
image index) for an image's crop and flip, never of a generator's running state: batches
are the same whatever the worker count, ``skip`` resumes inside an epoch exactly, and each
rank of a data-parallel run (``positions``) sees exactly its part of the global batch.
"""

from __future__ import annotations

import importlib.util
import multiprocessing
import os
import sys
from collections.abc import Callable, Iterator
from typing import NamedTuple

import numpy as np
import torch

from fastgraph.core.errors import DataError, UserError
from fastgraph.data.imagenet import (
    ImageSet,
    center_crop_box,
    decode_crop,
    image_header,
    random_resized_crop_box,
    resize_crop,
)

DECODERS = ("auto", "cpu", "gpu")
_MASK64 = (1 << 64) - 1


def _seed_of(*words: int) -> int:
    """A 63-bit generator seed mixed from ``words`` (numpy's SeedSequence hash)."""
    state = np.random.SeedSequence([int(w) & _MASK64 for w in words]).generate_state(2, np.uint32)
    return (int(state[0]) << 31) ^ int(state[1])


def epoch_order(seed: int, epoch: int, n: int) -> np.ndarray:
    """int64 (n,): the permutation of image indices an epoch of :class:`TrainStream` reads,
    a function of (seed, epoch) alone."""
    g = torch.Generator().manual_seed(_seed_of(seed, epoch, 0))
    return torch.randperm(n, generator=g).numpy()


def image_draw(seed: int, epoch: int, index: int, width: int, height: int, *,
               scale: tuple[float, float] = (0.08, 1.0), ratio: tuple[float, float] = (3 / 4, 4 / 3),
               flip: bool = True) -> tuple[tuple[int, int, int, int], bool]:
    """The crop box ``(left, top, w, h)`` and the flip of image ``index`` (``width`` x
    ``height`` pixels) in epoch ``epoch``: :func:`random_resized_crop_box` then a fair coin
    (when ``flip``), from a generator seeded by (seed, epoch, index) alone."""
    g = torch.Generator().manual_seed(_seed_of(seed, epoch, 1, index))
    box = random_resized_crop_box(width, height, g, scale, ratio)
    mirrored = bool(flip) and torch.rand(1, generator=g).item() < 0.5
    return box, mirrored


def gpu_decode_available() -> bool:
    """Whether torchvision (with ``decode_jpeg`` on CUDA) imports; a broken install counts as absent."""
    if importlib.util.find_spec("torchvision") is None:
        return False
    try:  # a torchvision built for another torch fails at import with a RuntimeError
        from torchvision.io import decode_jpeg  # noqa: F401
    except Exception:  # noqa: BLE001 - any failure to import means: not available
        return False
    return True


def _resolve_decoder(decode: str, device: torch.device) -> str:
    if decode not in DECODERS:
        raise UserError(f"decode={decode!r}: choose one of {', '.join(DECODERS)}")
    if decode == "cpu":
        return "cpu"
    usable = device.type == "cuda" and gpu_decode_available()
    if decode == "gpu" and not usable:
        raise UserError("decode='gpu' needs a CUDA device and torchvision (nvJPEG through "
                        "torchvision.io.decode_jpeg); use decode='cpu' or 'auto'")
    return "gpu" if usable else "cpu"


def default_workers() -> int:
    """Decoding processes by default: ``min(8, os.cpu_count())``."""
    return min(8, os.cpu_count() or 1)


def _mp_context():
    # fork starts workers in milliseconds without re-importing torch; they run Pillow, numpy
    # and torch's CPU ops on the ImageSet, never CUDA, so a parent that has initialised CUDA
    # is no obstacle. macOS frameworks are not fork-safe, and where fork is missing
    # (Windows) DataLoader's default start method is used.
    if sys.platform.startswith("linux") and "fork" in multiprocessing.get_all_start_methods():
        return multiprocessing.get_context("fork")
    return None


class _Key(NamedTuple):
    """One batch for a worker: image indices, the epoch (None: evaluation centre crop),
    the output side in pixels, and the evaluation crop ratio."""

    rows: np.ndarray
    epoch: int | None
    res: int
    crop_ratio: float


class _BatchDecoder(torch.utils.data.Dataset):
    """Runs in the worker processes: ``decoder[key]`` is one batch, read and decoded.

    CPU mode returns uint8 (b, res, res, 3). GPU mode returns a dict: the JPEG bytes of
    the images nvJPEG takes concatenated in one uint8 tensor with their lengths, rows,
    boxes and flips, and the crops of the other images decoded here (uint8 (m, res, res, 3)).
    """

    def __init__(self, images: ImageSet, *, seed: int, scale, ratio, flip: bool, gpu: bool):
        self.images, self.seed, self.scale, self.ratio, self.flip = images, seed, scale, ratio, flip
        self.gpu = gpu

    def __len__(self) -> int:  # keys come from the plan, not from an index range
        return len(self.images)

    def _box(self, key: _Key, k: int, width: int, height: int):
        if key.epoch is None:
            return center_crop_box(width, height, key.res, key.crop_ratio), False
        return image_draw(self.seed, key.epoch, k, width, height, scale=self.scale, ratio=self.ratio,
                          flip=self.flip)

    def __getitem__(self, key: _Key):
        # A DataError goes back as its one-line message: DataLoader would re-raise it from a
        # worker with the worker's traceback folded into the message.
        try:
            return self._decode(key)
        except DataError as exc:
            return str(exc)

    def _decode(self, key: _Key):
        if not self.gpu:
            out = np.empty((len(key.rows), key.res, key.res, 3), np.uint8)
            for j, k in enumerate(key.rows.tolist()):
                data, name = self.images.read(k), self.images.name(k)
                width, height, _, _ = image_header(data, name)
                box, mirrored = self._box(key, k, width, height)
                out[j] = decode_crop(data, box, key.res, mirrored, name)
            return torch.from_numpy(out)
        blobs, rows, boxes, flips, cpu_rows, cpu = [], [], [], [], [], []
        for j, k in enumerate(key.rows.tolist()):
            data, name = self.images.read(k), self.images.name(k)
            width, height, fmt, mode = image_header(data, name)
            box, mirrored = self._box(key, k, width, height)
            if fmt == "JPEG" and mode == "RGB":
                blobs.append(np.frombuffer(data, np.uint8))
                rows.append(j)
                boxes.append(box)
                flips.append(mirrored)
            else:
                cpu_rows.append(j)
                cpu.append(decode_crop(data, box, key.res, mirrored, name))
        return {
            "blob": torch.from_numpy(np.concatenate(blobs) if blobs else np.empty(0, np.uint8)),
            "lengths": torch.tensor([len(b) for b in blobs], dtype=torch.int64),
            "rows": torch.tensor(rows, dtype=torch.int64),
            "boxes": torch.tensor(boxes, dtype=torch.int64).reshape(-1, 4),
            "flips": torch.tensor(flips, dtype=torch.bool),
            "cpu_rows": torch.tensor(cpu_rows, dtype=torch.int64),
            "cpu": torch.from_numpy(np.stack(cpu) if cpu else np.empty((0, key.res, key.res, 3), np.uint8)),
        }


class _Plan(torch.utils.data.Sampler):
    """The keys of the batches to make next; set before each pass over the loader (the
    persistent workers keep running, the main process re-iterates this)."""

    def __init__(self):
        self.keys: list[_Key] = []

    def __iter__(self):
        return iter(self.keys)

    def __len__(self) -> int:
        return len(self.keys)


def gpu_decode_batch(item: dict, res: int, device: torch.device) -> torch.Tensor:
    """Finish a GPU-mode batch on ``device``: nvJPEG-decode the JPEG bytes in one batched
    call, crop, resize (bilinear, antialiased), mirror; place the worker-decoded rows.

    Returns uint8 (b, 3, res, res) on ``device``.
    """
    from torchvision.io import ImageReadMode, decode_jpeg

    b = len(item["rows"]) + len(item["cpu_rows"])
    out = torch.empty((b, 3, res, res), dtype=torch.uint8, device=device)
    if len(item["rows"]):
        blobs = list(torch.split(item["blob"], item["lengths"].tolist()))
        decoded = decode_jpeg(blobs, mode=ImageReadMode.RGB, device=device)
        for img, row, box, mirrored in zip(decoded, item["rows"].tolist(), item["boxes"].tolist(),
                                           item["flips"].tolist(), strict=True):
            out[row] = resize_crop(img.float(), box, res, mirrored).round_().clamp_(0, 255).to(torch.uint8)
    if len(item["cpu_rows"]):
        rows = item["cpu_rows"].to(device)
        out[rows] = item["cpu"].to(device, non_blocking=True).permute(0, 3, 1, 2)
    return out


class _Stream:
    """What both streams share: the worker pool, the plan, the upload."""

    def __init__(self, images: ImageSet, *, device, workers: int | None, decode: str, seed: int,
                 scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3), flip: bool = False):
        self.images = images
        self.device = torch.device(device)
        self.decoder = _resolve_decoder(decode, self.device)
        self.workers = default_workers() if workers is None else int(workers)
        if self.workers < 0:
            raise UserError(f"workers={self.workers}: give 0 (decode in this process) or more")
        self._plan = _Plan()
        dataset = _BatchDecoder(images, seed=seed, scale=tuple(scale), ratio=tuple(ratio), flip=flip,
                                gpu=self.decoder == "gpu")
        extra = {}
        if self.workers > 0:
            extra = {"persistent_workers": True, "prefetch_factor": 2,
                     "multiprocessing_context": _mp_context()}
        self._loader = torch.utils.data.DataLoader(
            dataset, batch_size=None, sampler=self._plan, num_workers=self.workers,
            pin_memory=self.device.type == "cuda", **extra)

    def _batches(self, keys: list[_Key]) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """(uint8 (b, 3, r, r) on the device, maybe channels-last strided; int64 labels (b,))
        per key, in order."""
        if not keys:
            return
        self._plan.keys = keys
        for key, item in zip(keys, self._loader, strict=True):
            if isinstance(item, str):
                raise DataError(item)
            if isinstance(item, dict):
                x = gpu_decode_batch(item, key.res, self.device)
            else:  # (b, r, r, 3) viewed as NCHW: channels-last strides, no copy
                x = item.to(self.device, non_blocking=True).permute(0, 3, 1, 2)
            y = torch.from_numpy(self.images.labels[key.rows]).to(self.device, non_blocking=True)
            yield x, y

    def close(self) -> None:
        """Shut the worker processes down (also done when the stream is garbage-collected)."""
        loader = getattr(self, "_loader", None)
        iterator = getattr(loader, "_iterator", None)
        if iterator is not None and hasattr(iterator, "_shutdown_workers"):
            iterator._shutdown_workers()
        if loader is not None:
            loader._iterator = None

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class TrainStream(_Stream):
    """Training batches of an ImageNet-format split: random resized crop, flip, normalise.

    Args:
        images: the training split (:func:`fastgraph.data.imagenet.scan_imagenet`).
        batch_size: images per global batch; the last partial batch of an epoch is dropped.
        device: where batches go.
        seed: the stream's randomness (see the module docstring).
        resolution: epoch (0-based) -> square training side in pixels, e.g.
            ``functools.partial(progressive_resolution, min_res=160, max_res=192, ...)``.
        mean, std: per-channel (R, G, B) normalisation in 0..255 units.
        out_dtype: dtype of the batches (float32, or the autocast dtype).
        channels_last: batches in channels-last memory format.
        positions: int64 (b,) positions in each global batch this process takes (a rank's
            share: ``fastgraph.training.distributed.batch_positions``); None: all.
        scale, ratio: RandomResizedCrop's area fraction and aspect-ratio ranges.
        flip: mirror each image with probability 1/2.
        workers: decoding processes (default ``min(8, cpu_count)``; 0: in this process).
        decode: "auto" (GPU when the device is CUDA and torchvision imports), "cpu", "gpu".
    Raises:
        DataError: fewer images than one batch.
        UserError: an unknown ``decode``, "gpu" without CUDA + torchvision, negative
            ``workers``, ``positions`` outside the batch.
    """

    def __init__(self, images: ImageSet, *, batch_size: int, device: torch.device, seed: int,
                 resolution: Callable[[int], int], mean, std, out_dtype: torch.dtype = torch.float32,
                 channels_last: bool = False, positions: torch.Tensor | None = None,
                 scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3), flip: bool = True, workers: int | None = None,
                 decode: str = "auto"):
        if len(images) < batch_size:
            raise DataError(f"{images.source}: {len(images)} training images are fewer than one batch "
                            f"of {batch_size}; lower the batch size")
        if positions is not None:
            positions = torch.as_tensor(positions, dtype=torch.int64).cpu()
            if positions.dim() != 1 or len(positions) == 0 or not (
                    0 <= positions.min() and positions.max() < batch_size):
                raise UserError(f"positions must be 1-D indices into a batch of {batch_size}")
        super().__init__(images, device=device, workers=workers, decode=decode, seed=seed,
                         scale=scale, ratio=ratio, flip=flip)
        self.batch_size, self.seed, self.resolution = batch_size, int(seed), resolution
        self.out_dtype, self.channels_last = out_dtype, channels_last
        self.positions = None if positions is None else positions.numpy()
        self.steps_per_epoch = len(images) // batch_size
        self._mean = torch.tensor([float(m) for m in mean], device=self.device).view(1, 3, 1, 1)
        self._inv_std = 1.0 / torch.tensor([float(s) for s in std], device=self.device).view(1, 3, 1, 1)

    def epoch(self, epoch: int, skip: int = 0,
              steps: int | None = None) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Batches of epoch ``epoch`` (0-based), from batch ``skip`` to batch ``steps`` (exclusive;
        None: all :attr:`steps_per_epoch`).

        Yields (x, y): x ``out_dtype`` (b, 3, r, r) normalised, channels-last if asked, on the
        device, with r = ``resolution(epoch)``; y int64 (b,) on the device. b is the batch
        size, or ``len(positions)``. One epoch is read at a time per stream.
        """
        n_steps = self.steps_per_epoch if steps is None else min(steps, self.steps_per_epoch)
        order = epoch_order(self.seed, epoch, len(self.images))
        res = int(self.resolution(epoch))
        keys = []
        for i in range(skip, n_steps):
            rows = order[i * self.batch_size:(i + 1) * self.batch_size]
            if self.positions is not None:  # this rank's images of the global batch
                rows = rows[self.positions]
            keys.append(_Key(rows, epoch, res, 1.0))
        memory_format = torch.channels_last if self.channels_last else torch.contiguous_format
        for x, y in self._batches(keys):
            x = ((x.float() - self._mean) * self._inv_std).to(self.out_dtype)
            yield x.contiguous(memory_format=memory_format), y

    def state_dict(self) -> dict:
        """The seed: the stream keeps no other state (an epoch is a function of it)."""
        return {"seed": self.seed}

    def load_state_dict(self, state: dict) -> None:
        """Check that a checkpoint's stream had this seed.

        Raises:
            UserError: the seeds differ (resuming would see other batches than the run did).
        """
        if int(state.get("seed", self.seed)) != self.seed:
            raise UserError(f"the checkpoint's data stream has seed {state['seed']}, this run {self.seed}: "
                            "resume with the checkpoint's seed")


class TestStream(_Stream):
    """Evaluation batches of an ImageNet-format split, in order: the centre crop of ratio
    ``crop_ratio`` resized to ``res`` (:func:`fastgraph.data.imagenet.center_crop_box`).

    Args:
        images: the split (:func:`fastgraph.data.imagenet.scan_imagenet`).
        batch_size: images per batch; the last batch may be smaller.
        device: where batches go.
        res: output side in pixels (FFCV's ResNet-50 evaluates at 224 to 256).
        crop_ratio: side of the central square over the image's shorter side (224/256).
        workers, decode: as for :class:`TrainStream`.
    Raises:
        UserError: as for :class:`TrainStream`; ValueError: ``res`` < 1 or ``crop_ratio``
            outside (0, 1].
    """

    __test__ = False  # a data stream, not a pytest test class

    def __init__(self, images: ImageSet, *, batch_size: int, device, res: int, crop_ratio: float = 224 / 256,
                 workers: int | None = None, decode: str = "auto"):
        center_crop_box(res, res, res, crop_ratio)  # checks res and crop_ratio
        super().__init__(images, device=device, workers=workers, decode=decode, seed=0)
        self.batch_size, self.res, self.crop_ratio = batch_size, int(res), float(crop_ratio)

    def __len__(self) -> int:
        return len(self.images)

    def _keys(self, rows: np.ndarray) -> list[_Key]:
        return [_Key(rows[i:i + self.batch_size], None, self.res, self.crop_ratio)
                for i in range(0, len(rows), self.batch_size)]

    def _contiguous(self, keys) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        for x, y in self._batches(keys):
            yield x.contiguous(), y

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """(uint8 (b, 3, res, res) on the device, int64 (b,) on the device) in image order."""
        return self._contiguous(self._keys(np.arange(len(self.images))))

    def balanced_order(self) -> np.ndarray:
        """int64 (N,): image indices taking one image of each class in turn (the first of
        every class, then the second, ...), so any prefix holds the classes evenly."""
        labels = self.images.labels
        starts = np.searchsorted(labels, labels, side="left")  # labels are sorted by class
        rank = np.arange(len(labels)) - starts
        return np.lexsort((labels, rank)).astype(np.int64)

    def first(self, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The first ``n`` images of :meth:`balanced_order`: uint8 (n, 3, res, res) and int64
        (n,) labels on the device (for the checks of exact graph rewrites)."""
        batches = list(self._contiguous(self._keys(self.balanced_order()[:n])))
        if not batches:
            return (torch.empty((0, 3, self.res, self.res), dtype=torch.uint8, device=self.device),
                    torch.empty(0, dtype=torch.int64, device=self.device))
        return torch.cat([x for x, _ in batches]), torch.cat([y for _, y in batches])
