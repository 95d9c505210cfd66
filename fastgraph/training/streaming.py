"""ImageNet-format training data, streamed from disk instead of resident on the device.

A recipe with ``[data] format = "imagefolder"`` trains on ``root/<train_split>/<class>/*.jpg``
and evaluates on ``root/<test_split>/...`` (folders or uncompressed tar shards, any number
of classes and image sizes; ``fastgraph.data.imagenet``). Every epoch the training images
are decoded in worker processes and augmented with RandomResizedCrop and a random flip at
the epoch's resolution: low resolution first, ramped up linearly, and a higher resolution
for the test centre crop (progressive resizing, the FFCV ResNet-50 recipe:
``libffcv/ffcv-imagenet`` ``train_imagenet.py``, ``get_resolution``). What the trainer
needs of the data, it asks :class:`StreamedData` for, as it asks
:class:`fastgraph.training.batches.DeviceData` for CIFAR-10: the augmenter of a run, the
test batches, and the images the recipe's data passes and the pass checks see.

Timing: the training images are read and decoded while training runs, so their cost is
part of the counted time, as it is for every ImageNet record (only the scan of the
folders is not counted).
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass

import torch

from fastgraph.core.errors import DataError, UserError
from fastgraph.core.timing import Timer


@dataclass
class StreamedData:
    """An ImageNet-format training and test set, indexed, nothing decoded.

    train, test: :class:`fastgraph.data.imagenet.ImageSet` of the two splits (or their
        class-balanced subsets). classes: the class names, sorted (torchvision's
        ImageFolder order). mean, std: float32 (1, 3, 1, 1) on the device, 0..255 units;
        channel_mean, channel_std: the same as Python floats. cfg: the recipe's ``[data]``
        section. device: where batches go.
    """

    train: object
    test: object
    classes: tuple[str, ...]
    mean: torch.Tensor
    std: torch.Tensor
    channel_mean: tuple[float, ...]
    channel_std: tuple[float, ...]
    cfg: dict
    device: torch.device

    def resolution(self, epoch: int) -> int:
        """Training resolution (pixels, square) of epoch ``epoch`` (0-based): ``min_res``
        until ``start_ramp``, ``max_res`` from ``end_ramp``, linear in between, rounded to
        a multiple of ``res_step`` (see ``fastgraph.data.imagenet.progressive_resolution``)."""
        from fastgraph.data.imagenet import progressive_resolution

        c = self.cfg
        return progressive_resolution(epoch, min_res=c["min_res"], max_res=c["max_res"],
                                      start_ramp=c["start_ramp"], end_ramp=c["end_ramp"], step=c["res_step"])

    @property
    def workers(self) -> int:
        """Decoding processes per stream: the recipe's ``workers``, at most one per CPU core
        (more only queue for the same cores)."""
        return min(self.cfg["workers"], os.cpu_count() or 1)

    @property
    def train_size(self) -> int:
        """Number of training images."""
        return len(self.train)

    def fingerprint(self) -> str:
        """SHA-1 (hex) of both splits' class names, image files (relative paths or shard
        members) and labels; nothing is decoded. What a checkpoint records, so a resume on
        another folder is refused."""
        digest = hashlib.sha1()
        for split in (self.train, self.test):
            digest.update("\0".join((*split.classes, *split.files)).encode())
            digest.update(split.labels.tobytes())
        return digest.hexdigest()

    def augmenter(self, *, batch_size: int, seed: int, out_dtype: torch.dtype, channels_last: bool,
                  positions: torch.Tensor | None, augment: dict):
        """The training batches of a run: a :class:`fastgraph.data.imagenet_stream.TrainStream`
        with the interface of :class:`fastgraph.training.augmentation.DeviceAugmenter`;
        of the recipe's ``[augment]`` section only ``flip`` applies ("random" or "none")."""
        from fastgraph.data.imagenet_stream import TrainStream

        c = self.cfg
        return TrainStream(self.train, batch_size=batch_size, device=self.device, seed=seed,
                           resolution=self.resolution, mean=self.channel_mean, std=self.channel_std,
                           out_dtype=out_dtype, channels_last=channels_last, positions=positions,
                           scale=tuple(c["scale"]), ratio=tuple(c["ratio"]), flip=augment["flip"] == "random",
                           workers=self.workers)

    def test_batches(self, batch_size: int, res: int | None = None):
        """The test images in order, centre-cropped at ``res`` (default the recipe's
        ``test_res``): a :class:`fastgraph.data.imagenet_stream.TestStream` yielding uint8
        (b, 3, res, res) and int64 (b,) on the device."""
        from fastgraph.data.imagenet_stream import TestStream

        c = self.cfg
        return TestStream(self.test, batch_size=batch_size, device=self.device,
                          res=res or c["test_res"], crop_ratio=c["crop_ratio"], workers=self.workers)

    def pass_images(self, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        """``n`` training images (a class-balanced pick), centre-cropped at the first
        epoch's resolution and normalised: float32 (n, 3, r, r) and int64 (n,) on the device."""
        from fastgraph.data.imagenet_stream import TestStream

        c = self.cfg
        stream = TestStream(self.train, batch_size=n, device=self.device, res=self.resolution(0),
                            crop_ratio=c["crop_ratio"], workers=0)
        images, labels = stream.first(min(n, len(self.train)))
        return (images.float() - self.mean) / self.std, labels


def load_streamed_data(path: str | None, cfg: dict, device: torch.device, timer: Timer, *, batch_size: int,
                       subset: int | None = None, test_subset: int | None = None) -> StreamedData:
    """Index the ImageNet-format folder (or tar shards) at ``path`` for the recipe's ``[data]``
    section ``cfg``, taking class-balanced subsets, inside ``timer``'s not-counted "data
    index" phase.

    Raises:
        UserError: no ``path`` given, a subset out of range, fewer training images than one
            batch, or test classes that are not the training classes.
        DataError: see :func:`fastgraph.data.imagenet.scan_imagenet`.
    """
    from fastgraph.data.imagenet import scan_imagenet
    from fastgraph.training.batches import balanced_subset

    if path is None:
        raise UserError("this recipe streams an ImageNet-format folder: pass --data ROOT (with "
                        f"ROOT/{cfg['train_split']}/<class>/*.jpg and ROOT/{cfg['test_split']}/...)")
    with timer.phase("data index", counted=False):
        train = scan_imagenet(path, cfg["train_split"])
        test = scan_imagenet(path, cfg["test_split"])
    if train.classes != test.classes:
        missing = sorted(set(train.classes) ^ set(test.classes))
        raise DataError(f"{path}: the {cfg['train_split']} and {cfg['test_split']} splits have different "
                        f"classes ({', '.join(missing[:5])}{'...' if len(missing) > 5 else ''} in one only)")
    if subset:
        train = train.subset(balanced_subset(torch.from_numpy(train.labels), subset).numpy())
    if test_subset:
        test = test.subset(balanced_subset(torch.from_numpy(test.labels), test_subset, "test").numpy())
    if len(train) < batch_size:
        raise UserError(f"{len(train)} training images are fewer than one batch of {batch_size}: "
                        "raise --subset or lower --batch-size")
    mean, std = tuple(float(m) for m in cfg["mean"]), tuple(float(s) for s in cfg["std"])
    return StreamedData(train, test, train.classes,
                        mean=torch.tensor(mean, device=device).view(1, 3, 1, 1),
                        std=torch.tensor(std, device=device).view(1, 3, 1, 1),
                        channel_mean=mean, channel_std=std, cfg=cfg, device=device)
