"""The full real CIFAR-10 (``cifar10`` fixture: $FASTGRAPH_DATA or the shared JPEG archive),
and ``normalize`` on it."""

from __future__ import annotations

import os

import pytest
import torch

from fastgraph.data import CIFAR10_MEAN, CIFAR10_STD, CLASSES, cache, load_cifar10, normalize


def test_full_load(cifar10):
    ds = cifar10
    assert ds.train_images.shape == (50000, 3, 32, 32) and ds.test_images.shape == (10000, 3, 32, 32)
    assert ds.train_images.dtype == torch.uint8 and ds.train_labels.dtype == torch.int64
    assert ds.train_images.is_contiguous() and ds.test_images.is_contiguous()
    assert ds.classes == CLASSES
    assert ds.train_labels.bincount().tolist() == [5000] * 10
    assert ds.test_labels.bincount().tolist() == [1000] * 10
    # Per-channel moments from a 256-bin histogram: exact, and no float copy of 150M pixels.
    values = torch.arange(256, dtype=torch.float64)
    hists = [torch.bincount(ds.train_images[:, c].reshape(-1), minlength=256).double() for c in range(3)]
    mean = torch.stack([(h * values).sum() / h.sum() for h in hists])
    std = torch.stack([((h * (values - m) ** 2).sum() / h.sum()).sqrt()
                       for h, m in zip(hists, mean, strict=True)])
    print(f"train mean pixel {mean.tolist()}, std {std.tolist()} (0..255)")
    # The JPEG re-encoding moves the statistics slightly; the original's are CIFAR10_MEAN/STD.
    assert torch.allclose(mean, torch.tensor(CIFAR10_MEAN, dtype=torch.float64), atol=2.0)
    assert torch.allclose(std, torch.tensor(CIFAR10_STD, dtype=torch.float64), atol=2.0)
    # Not all one class per split slice by accident: each class's images differ on average.
    per_class = torch.stack([ds.test_images[ds.test_labels == c].float().mean() for c in range(10)])
    assert per_class.std() > 2


def test_cached_reload_is_equal(cifar10):
    again = load_cifar10(cifar10.source)
    assert again.from_cache
    print(f"cached load of {cifar10.source}: {again.load_seconds:.3f} s")
    assert torch.equal(again.train_images, cifar10.train_images)
    assert torch.equal(again.test_labels, cifar10.test_labels)
    if not cache._marked_writable(cifar10.source.resolve().parent):
        assert again.cache_path.parent == cache.cache_dir()
        assert not os.path.exists(str(cifar10.source) + cache.CACHE_SUFFIX)


def test_normalize_real_images(cifar10):
    x = normalize(cifar10.train_images[::25])
    assert x.dtype == torch.float32 and x.shape == (2000, 3, 32, 32)
    per_channel = x.transpose(0, 1).reshape(3, -1)
    assert per_channel.mean(1).abs().max() < 0.05
    assert (per_channel.std(1) - 1).abs().max() < 0.05
    half = normalize(cifar10.test_images[:64], dtype=torch.float16)
    assert half.dtype == torch.float16
    torch.testing.assert_close(half.float(), normalize(cifar10.test_images[:64]), atol=4e-3, rtol=1e-3)


def test_normalize_values_and_shape_check():
    x = torch.tensor([0, 255], dtype=torch.uint8).view(2, 1, 1, 1).expand(2, 3, 2, 2)
    y = normalize(x)
    for c in range(3):
        assert y[0, c, 0, 0].item() == pytest.approx(-CIFAR10_MEAN[c] / CIFAR10_STD[c], rel=1e-6)
        assert y[1, c, 1, 1].item() == pytest.approx((255 - CIFAR10_MEAN[c]) / CIFAR10_STD[c], rel=1e-6)
    with pytest.raises(ValueError, match="expects"):
        normalize(torch.zeros(2, 1, 32, 32, dtype=torch.uint8))
