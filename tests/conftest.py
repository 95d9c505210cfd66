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
def data_path() -> str:
    """Where real CIFAR-10 is, as the string a ``--data`` option takes."""
    path = real_data_path()
    if path is None:
        pytest.skip("real CIFAR-10 not found: set FASTGRAPH_DATA or put ../shared beside the checkout")
    return str(path)


@pytest.fixture(scope="session")
def cifar10(data_path):
    """The full real CIFAR-10 (decoded once, then read from the cache)."""
    from fastgraph.data import load_cifar10

    return load_cifar10(data_path)


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


@pytest.fixture(scope="module")
def one_thread():
    """One intra-op thread for a test module: on a shared 2-core machine two OpenMP threads
    that spin-wait on a busy neighbour run small convolutions many times slower."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)
