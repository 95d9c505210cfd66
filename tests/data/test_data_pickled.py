"""The python-format loader (cifar-10-batches-py/ and cifar-10-python.tar.gz) on batch
files written from real CIFAR-10 images."""

from __future__ import annotations

import hashlib
import os
import pickle

import numpy as np
import pytest
import torch
from cifar_builders import make_tar, write_batches

from fastgraph.core.errors import DataError
from fastgraph.data import CLASSES, load_cifar10, pickled

pytestmark = pytest.mark.usefixtures("isolated_cache")


def _assert_equal(ds, s):
    assert ds.train_images.dtype == torch.uint8 and ds.train_labels.dtype == torch.int64
    assert ds.train_images.shape == (len(s.train_images), 3, 32, 32)
    assert ds.train_images.is_contiguous() and ds.test_images.is_contiguous()
    np.testing.assert_array_equal(ds.train_images.numpy(), s.train_images)
    np.testing.assert_array_equal(ds.train_labels.numpy(), s.train_labels)
    np.testing.assert_array_equal(ds.test_images.numpy(), s.test_images)
    np.testing.assert_array_equal(ds.test_labels.numpy(), s.test_labels)
    assert ds.classes == CLASSES


def test_folder_round_trip(tmp_path, sample):
    md5 = write_batches(tmp_path / "cifar-10-batches-py", sample)
    # Given the folder itself, and given its parent (where `data download` extracts to).
    for where in (tmp_path / "cifar-10-batches-py", tmp_path):
        _assert_equal(load_cifar10(where, checksums=md5), sample)


def test_archive_round_trip(tmp_path, sample):
    md5 = write_batches(tmp_path / "src" / "cifar-10-batches-py", sample)
    archive = make_tar(tmp_path / "src", tmp_path / "cifar-10-python.tar.gz")
    ds = load_cifar10(archive, checksums=md5)
    _assert_equal(ds, sample)
    assert ds.source == archive
    # A folder holding only the archive is read through it too.
    (tmp_path / "only").mkdir()
    os.replace(archive, tmp_path / "only" / "cifar-10-python.tar.gz")
    _assert_equal(load_cifar10(tmp_path / "only", checksums=md5), sample)


def test_published_md5_rejects_written_file(tmp_path, sample):
    folder = tmp_path / "cifar-10-batches-py"
    write_batches(folder, sample)
    with pytest.raises(DataError) as err:
        load_cifar10(folder)  # default: the published md5s of the official release
    msg = str(err.value)
    assert str(folder / "data_batch_1") in msg and pickled.PUBLISHED_MD5["data_batch_1"] in msg
    assert "\n" not in msg and "fastgraph data download" in msg


def test_md5_mismatch_names_the_changed_file(tmp_path, sample):
    folder = tmp_path / "cifar-10-batches-py"
    md5 = write_batches(folder, sample)
    data = bytearray((folder / "data_batch_3").read_bytes())
    data[len(data) // 2] ^= 0xFF
    (folder / "data_batch_3").write_bytes(bytes(data))
    with pytest.raises(DataError, match=r"data_batch_3: md5 .* does not match"):
        load_cifar10(folder, checksums=md5)


def test_corrupt_batch_with_matching_md5_is_named(tmp_path, sample):
    folder = tmp_path / "cifar-10-batches-py"
    md5 = write_batches(folder, sample)
    good = (folder / "test_batch").read_bytes()
    (folder / "test_batch").write_bytes(good[: len(good) // 2])  # truncated pickle
    md5["test_batch"] = hashlib.md5((folder / "test_batch").read_bytes()).hexdigest()
    with pytest.raises(DataError, match=r"test_batch: not a readable CIFAR-10 batch"):
        load_cifar10(folder, checksums=md5)


def test_wrong_data_shape_is_named(tmp_path, sample):
    folder = tmp_path / "cifar-10-batches-py"
    md5 = write_batches(folder, sample)
    doc = {b"data": np.zeros((4, 1024), np.uint8), b"labels": [0, 1, 2, 3]}
    (folder / "data_batch_2").write_bytes(pickle.dumps(doc, protocol=2))
    md5["data_batch_2"] = hashlib.md5((folder / "data_batch_2").read_bytes()).hexdigest()
    with pytest.raises(DataError, match=r"data_batch_2: b'data' is \(4, 1024\)"):
        load_cifar10(folder, checksums=md5)


class _RunsCode:
    def __reduce__(self):
        return (os.system, ("touch pwned",))


def test_pickle_that_would_run_code_is_refused(tmp_path, sample, monkeypatch):
    folder = tmp_path / "cifar-10-batches-py"
    md5 = write_batches(folder, sample)
    (folder / "batches.meta").write_bytes(pickle.dumps({b"label_names": _RunsCode()}))
    md5["batches.meta"] = hashlib.md5((folder / "batches.meta").read_bytes()).hexdigest()
    monkeypatch.chdir(tmp_path)
    with pytest.raises(DataError, match=r"batches.meta: .*refusing to load (posix|os)\.system"):
        load_cifar10(folder, checksums=md5)
    assert not (tmp_path / "pwned").exists()


def test_missing_batch_file_is_named(tmp_path, sample):
    folder = tmp_path / "cifar-10-batches-py"
    md5 = write_batches(folder, sample)
    (folder / "data_batch_5").unlink()
    with pytest.raises(DataError, match=r"data_batch_5: missing; run `fastgraph data download`"):
        load_cifar10(folder, checksums=md5)
