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
    with pytest.raises(DataError, match=r"data_batch_2: b'data' is uint8 \(4, 1024\)"):
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


def _rewrite(folder, name, md5, edit):
    """Re-pickle batch file ``name`` through ``edit(dict) -> dict`` and record its new md5."""
    doc = pickle.loads((folder / name).read_bytes(), encoding="bytes")
    (folder / name).write_bytes(pickle.dumps(edit(doc), protocol=2))
    md5[name] = hashlib.md5((folder / name).read_bytes()).hexdigest()


def test_batches_resaved_with_str_keys_load(tmp_path, sample):
    # Loaded with encoding="latin1" (as torchvision does) and pickled again, the fields
    # carry str keys: 'data', 'labels', 'label_names'.
    folder = tmp_path / "cifar-10-batches-py"
    md5 = write_batches(folder, sample)
    for name in pickled.FILES:
        _rewrite(folder, name, md5, lambda doc: {k.decode(): v for k, v in doc.items()})
    _assert_equal(load_cifar10(folder, checksums=md5), sample)


@pytest.mark.parametrize("labels, got", [
    (lambda n: [0.5] * n, "float64"),  # int64 casting would make every label 0
    (lambda n: ["cat"] * n, "<U3"),
    (lambda n: [[0, 1]] + [0] * (n - 1), "object"),
    (lambda n: [2**70] * n, "object"),
], ids=["float", "str", "ragged", "too-large"])
def test_labels_that_are_not_integers_are_named(tmp_path, sample, labels, got):
    folder = tmp_path / "cifar-10-batches-py"
    md5 = write_batches(folder, sample)
    _rewrite(folder, "data_batch_4", md5, lambda doc: {**doc, b"labels": labels(len(doc[b"labels"]))})
    with pytest.raises(DataError) as err:
        load_cifar10(folder, checksums=md5)
    msg = str(err.value)
    assert msg.startswith(f"{folder / 'data_batch_4'}: b'labels' is not ") and got in msg
    assert "\n" not in msg


def test_labels_out_of_range_are_named(tmp_path, sample):
    folder = tmp_path / "cifar-10-batches-py"
    md5 = write_batches(folder, sample)
    _rewrite(folder, "test_batch", md5,
             lambda doc: {**doc, b"labels": [3] * (len(doc[b"labels"]) - 1) + [10]})
    with pytest.raises(DataError, match=r"test_batch: b'labels' run from 3 to 10, outside the 10 classes"):
        load_cifar10(folder, checksums=md5)


def test_cifar100_batch_is_named(tmp_path, sample):
    folder = tmp_path / "cifar-10-batches-py"
    md5 = write_batches(folder, sample)

    def as_cifar100(doc):
        return {b"data": doc[b"data"], b"fine_labels": doc[b"labels"], b"coarse_labels": doc[b"labels"]}

    _rewrite(folder, "data_batch_1", md5, as_cifar100)
    with pytest.raises(DataError, match=r"data_batch_1: not a CIFAR-10 batch \(keys b'data', b'fine_labels', "
                                        r"b'coarse_labels'; .*a CIFAR-100 batch\?\)"):
        load_cifar10(folder, checksums=md5)


def test_wrong_data_dtype_is_named(tmp_path, sample):
    folder = tmp_path / "cifar-10-batches-py"
    md5 = write_batches(folder, sample)
    _rewrite(folder, "data_batch_2", md5, lambda doc: {**doc, b"data": doc[b"data"].astype(np.float32)})
    with pytest.raises(DataError, match=r"data_batch_2: b'data' is float32 \(\d+, 3072\), expected uint8"):
        load_cifar10(folder, checksums=md5)
