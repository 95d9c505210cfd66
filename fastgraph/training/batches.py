"""The images a training works on, resident on the device: the uint8 training and test
sets (or class-balanced subsets), the normalised images the recipe's data passes and the
pass checks see, and the real batches the compile warm-up runs.

The upload is timed as a phase that is not counted (see ``fastgraph.training.loop``).
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable
from dataclasses import dataclass

import torch

from fastgraph.core.errors import UserError
from fastgraph.core.pass_manager import VERIFY_IMAGES
from fastgraph.core.timing import Timer


def balanced_subset(labels: torch.Tensor, n: int, what: str = "training") -> torch.Tensor:
    """Indices (sorted, int64) of ``n`` images, as equal a number per class as possible,
    each class's taken in order from its start (the first N images of a class-sorted
    folder would otherwise all be one class).

    Raises:
        UserError: ``n`` < 1 or more than there are images.
    """
    total = len(labels)
    if not 1 <= n <= total:
        raise UserError(f"--subset/--test-subset must be between 1 and {total} {what} images, got {n}")
    classes = torch.unique(labels)
    per_class = [torch.nonzero(labels == c).flatten() for c in classes]
    quota = [n // len(classes) + (1 if i < n % len(classes) else 0) for i in range(len(classes))]
    taken = [idx[:q] for idx, q in zip(per_class, quota, strict=True)]
    short = n - sum(len(t) for t in taken)
    if short:  # a class ran out: fill from the remaining images in order
        rest = torch.cat([idx[q:] for idx, q in zip(per_class, quota, strict=True)]).sort().values
        taken.append(rest[:short])
    return torch.cat(taken).sort().values


@dataclass
class DeviceData:
    """CIFAR-10 on the training device.

    train_images, test_images: uint8 (N, 3, 32, 32); train_labels, test_labels: int64 (N,).
    mean, std: float32 (1, 3, 1, 1) per-channel statistics, 0..255 units; channel_mean,
    channel_std: the same as Python floats (what the augmenter takes). classes: the class names.
    """

    train_images: torch.Tensor
    train_labels: torch.Tensor
    test_images: torch.Tensor
    test_labels: torch.Tensor
    mean: torch.Tensor
    std: torch.Tensor
    channel_mean: tuple[float, ...]
    channel_std: tuple[float, ...]
    classes: tuple[str, ...] = ()

    @property
    def train_size(self) -> int:
        """Number of training images."""
        return len(self.train_labels)

    def fingerprint(self) -> str:
        """SHA-1 (hex) of the class names and every image and label byte, train and test:
        what a checkpoint records, so a resume on other data is refused."""
        digest = hashlib.sha1("\0".join(self.classes).encode())
        for t in (self.train_images, self.train_labels, self.test_images, self.test_labels):
            digest.update(t.cpu().contiguous().numpy().tobytes())
        return digest.hexdigest()

    def pass_images(self, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The first training images of each class in turn, ``n`` in all: float32 normalised
        (n, 3, 32, 32) and int64 (n,) on the device (see :func:`pass_images`)."""
        rows = balanced_subset(self.train_labels.cpu(), n).to(self.train_labels.device)
        return (self.train_images[rows].float() - self.mean) / self.std, self.train_labels[rows]

    def augmenter(self, *, batch_size: int, seed: int, out_dtype: torch.dtype, channels_last: bool,
                  positions: torch.Tensor | None, augment: dict):
        """The training batches of a run: a :class:`fastgraph.training.augmentation.DeviceAugmenter`
        over these images with the recipe's ``[augment]`` section."""
        from fastgraph.training.augmentation import DeviceAugmenter

        return DeviceAugmenter(
            self.train_images, self.train_labels, batch_size=batch_size, pad=augment["pad"],
            pad_mode=augment["pad_mode"], flip=augment["flip"], cutout=augment["cutout"],
            mean=self.channel_mean, std=self.channel_std, seed=seed, out_dtype=out_dtype,
            channels_last=channels_last, positions=positions)

    def test_batches(self, batch_size: int):
        """The test images in batches (see :class:`fastgraph.training.evaluation.TensorBatches`)."""
        from fastgraph.training.evaluation import TensorBatches

        return TensorBatches(self.test_images, self.test_labels, batch_size)


def load_device_data(path: str | None, device: torch.device, timer: Timer, *, batch_size: int,
                     subset: int | None = None, test_subset: int | None = None) -> DeviceData:
    """Load CIFAR-10 from ``path`` (see ``fastgraph.data.load_cifar10``), take the subsets,
    and upload them to ``device`` inside ``timer``'s not-counted "data upload" phase.

    Raises:
        UserError: a subset out of range, fewer training images than one batch of
            ``batch_size``; DataError: see ``load_cifar10``.
    """
    from fastgraph.data import CIFAR10_MEAN, CIFAR10_STD, load_cifar10

    ds = load_cifar10(path)
    train_idx = balanced_subset(ds.train_labels, subset) if subset else torch.arange(len(ds.train_labels))
    test_idx = (balanced_subset(ds.test_labels, test_subset, "test") if test_subset
                else torch.arange(len(ds.test_labels)))
    if len(train_idx) < batch_size:
        raise UserError(f"{len(train_idx)} training images are fewer than one batch of "
                        f"{batch_size}: raise --subset or lower --batch-size")
    with timer.phase("data upload", counted=False):
        images = (ds.train_images[train_idx].to(device), ds.train_labels[train_idx].to(device),
                  ds.test_images[test_idx].to(device), ds.test_labels[test_idx].to(device))
    return DeviceData(*images, mean=torch.tensor(CIFAR10_MEAN, device=device).view(1, 3, 1, 1),
                      std=torch.tensor(CIFAR10_STD, device=device).view(1, 3, 1, 1),
                      channel_mean=CIFAR10_MEAN, channel_std=CIFAR10_STD, classes=ds.classes)


def pass_images(data, pass_options: Iterable[dict]) -> tuple[torch.Tensor, torch.Tensor]:
    """Training images for the recipe's data passes and the exact-pass check: float32
    normalised (N, 3, H, W) on the device and their int64 labels (N,), as many as the
    largest ``images`` option among ``pass_options`` asks for (at least the pass manager's
    ``VERIFY_IMAGES``, at most all), a class-balanced pick (an ImageFolder copy of CIFAR-10
    is sorted by class: the first 5,000 images would be airplanes only).

    ``data``: a :class:`DeviceData` or a :class:`fastgraph.training.streaming.StreamedData`
    (both answer ``train_size`` and ``pass_images(n)``).
    """
    wanted = [o["images"] for o in pass_options
              if isinstance(o.get("images"), int) and not isinstance(o["images"], bool)]
    return data.pass_images(min(max([VERIFY_IMAGES, *wanted]), data.train_size))


def warm_up_batches(augmenter, steps: int = 3) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The first ``steps`` batches of an epoch of ``augmenter``
    (:class:`fastgraph.training.augmentation.DeviceAugmenter`): real images in the training
    batches' dtype, layout and shape, with their labels; its generator left as it was."""
    state = augmenter.state_dict()
    try:
        return list(augmenter.epoch(0, steps=steps))
    finally:
        augmenter.load_state_dict(state)
