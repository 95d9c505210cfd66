"""Shared fixtures. Real CIFAR-10 comes from $FASTGRAPH_DATA, else the JPEG archive in
../shared beside the checkout; tests that need it skip, saying so, when neither exists."""

from __future__ import annotations

import os

import pytest
import torch

# Without a GPU the Triton kernels run in Triton's interpreter. Triton reads the switch
# when the kernels are first imported, so it is set before any test module imports them.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from support import real_data_path


@pytest.fixture(scope="session")
def cifar10():
    """The full real CIFAR-10 (decoded once, then read from the cache)."""
    path = real_data_path()
    if path is None:
        pytest.skip("real CIFAR-10 not found: set FASTGRAPH_DATA or put ../shared beside the checkout")
    from fastgraph.data import load_cifar10

    return load_cifar10(path)


@pytest.fixture(scope="session")
def real_batch(cifar10):
    """64 real CIFAR-10 test images of all ten classes, normalised float32 (64, 3, 32, 32), and
    their int64 labels (the ImageFolder layout stores the test set class by class: take a stride)."""
    from fastgraph.data import normalize

    index = torch.arange(64) * (len(cifar10.test_images) // 64)
    return normalize(cifar10.test_images[index]), cifar10.test_labels[index]


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
