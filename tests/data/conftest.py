"""Fixtures for the data tests: a few hundred real CIFAR-10 images, a private cache, and a local
HTTP server to download from."""

from __future__ import annotations

import functools
import http.server
import threading
import warnings
from pathlib import Path

import numpy as np
import pytest
from cifar_builders import Sample

from fastgraph.data import CLASSES

TRAIN_PER_CLASS = 30
TEST_PER_CLASS = 10


def _pick(images, labels, per_class: int):
    images, labels = images.numpy(), labels.numpy()
    rows = [np.flatnonzero(labels == c)[:per_class] for c in range(len(CLASSES))]
    # Classes interleaved, as in the python-format batches (an ImageFolder loader must
    # regroup them class by class, which the tests then check).
    order = np.stack(rows, 1).reshape(-1)
    return images[order].copy(), labels[order].copy()


@pytest.fixture(scope="session")
def sample(request) -> Sample:
    """300 train + 100 test real CIFAR-10 images (class-interleaved), from the ``cifar10``
    fixture; synthetic images (said so in a warning) only when real data is absent."""
    try:
        ds = request.getfixturevalue("cifar10")
    except pytest.skip.Exception:
        warnings.warn("real CIFAR-10 absent: data tests run on SYNTHETIC images", stacklevel=1)
        rng = np.random.default_rng(0)

        def synth(n):
            coarse = rng.integers(0, 256, (n, 3, 4, 4), dtype=np.uint8)
            noise = rng.integers(0, 32, (n, 3, 32, 32), dtype=np.uint8)
            return (coarse.repeat(8, 2).repeat(8, 3) // 2 + noise).astype(np.uint8)

        n_train, n_test = TRAIN_PER_CLASS * 10, TEST_PER_CLASS * 10
        return Sample(synth(n_train), np.arange(n_train, dtype=np.int64) % 10,
                      synth(n_test), np.arange(n_test, dtype=np.int64) % 10, False)
    train = _pick(ds.train_images, ds.train_labels, TRAIN_PER_CLASS)
    test = _pick(ds.test_images, ds.test_labels, TEST_PER_CLASS)
    return Sample(*train, *test, True)


@pytest.fixture
def isolated_cache(tmp_path, monkeypatch) -> Path:
    """A private $FASTGRAPH_CACHE so tests never read or write the user's cache."""
    path = tmp_path / "fastgraph-cache"
    monkeypatch.setenv("FASTGRAPH_CACHE", str(path))
    return path


class _Quiet(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):  # keep test output clean
        pass


@pytest.fixture
def server(tmp_path):
    """A static file server on 127.0.0.1 (a free port) serving ``tmp_path / 'www'``."""
    root = tmp_path / "www"
    root.mkdir()
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(_Quiet, directory=root))
    thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        yield root, f"http://127.0.0.1:{httpd.server_address[1]}"
    finally:
        httpd.shutdown()
        httpd.server_close()
        thread.join(timeout=5)
