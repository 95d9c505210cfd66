"""DeviceAugmenter epochs on real CIFAR-10: the same seed gives the same epochs at any batch
size, every image once per epoch, and airbench's alternating flip across epochs."""

from __future__ import annotations

import torch

from fastgraph.data import CIFAR10_MEAN, CIFAR10_STD
from fastgraph.training.augmentation import DeviceAugmenter

N = 1_000  # real training images; batches of 96 leave a partial batch of 40 to drop


def _augmenter(cifar10, batch_size, *, flip="random", pad_mode="zeros", cutout=0):
    return DeviceAugmenter(cifar10.train_images[:N], cifar10.train_labels[:N], batch_size=batch_size,
                           pad=4, pad_mode=pad_mode, flip=flip, cutout=cutout, mean=CIFAR10_MEAN,
                           std=CIFAR10_STD, seed=7)


def _epoch(augmenter, epoch):
    xs, ys = zip(*augmenter.epoch(epoch), strict=True)
    return torch.cat(xs), torch.cat(ys)


def test_epochs_do_not_depend_on_the_batch_size(cifar10):
    """airbench94.py's CifarLoader and Page's Transform draw crops and flips for the whole
    dataset each epoch, so a seed fixes the epochs whatever the batch; the dropped partial
    batch must not shift the generator."""
    whole, partial = _augmenter(cifar10, 100, cutout=8), _augmenter(cifar10, 96, cutout=8)
    for epoch in range(3):
        (x100, y100), (x96, y96) = _epoch(whole, epoch), _epoch(partial, epoch)
        assert x96.shape == (960, 3, 32, 32) and x100.shape == (1000, 3, 32, 32)
        assert torch.equal(x96, x100[:960]) and torch.equal(y96, y100[:960])


def test_every_image_once_per_epoch_and_the_flip_alternates(cifar10):
    """No shift, so each output is its image or that image's mirror: every image appears once
    per epoch (batch 100 divides N), and each is mirrored exactly on alternate epochs."""
    augmenter = DeviceAugmenter(cifar10.train_images[:N], cifar10.train_labels[:N], batch_size=100,
                                pad=0, pad_mode="reflect", flip="alternate", cutout=0,
                                mean=CIFAR10_MEAN, std=CIFAR10_STD, seed=3)
    plain = _augmenter(cifar10, N, flip="none", pad_mode="reflect")
    plain.pad = 0
    reference, _ = next(plain.epoch(0))  # all N images, unflipped, in some order
    # Fingerprints: a fixed random projection of each image (float64; distinct real images
    # differ by far more than the rounding of the product).
    weights = torch.rand(3 * 32 * 32, 1, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    keys = (reference.flatten(1).double() @ weights).T  # (1, N)
    mirrored = []
    for epoch in range(3):
        x, _ = _epoch(augmenter, epoch)
        direct = ((x.flatten(1).double() @ weights) - keys).abs() < 1e-6  # (N, N) output == image
        mirror = ((x.flip(-1).flatten(1).double() @ weights) - keys).abs() < 1e-6
        found = direct | mirror
        assert torch.equal(found.sum(0), torch.ones(N, dtype=torch.int64))  # each image once
        assert torch.equal(found.sum(1), torch.ones(N, dtype=torch.int64))
        mirrored.append(mirror.any(0))  # per image of ``reference``: shown mirrored this epoch
    assert 0.4 < mirrored[0].double().mean() < 0.6  # a random half starts mirrored
    assert torch.equal(mirrored[1], ~mirrored[0]) and torch.equal(mirrored[2], mirrored[0])
