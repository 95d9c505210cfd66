"""The ImageFolder loader on real CIFAR-10 images written as PNG: a folder and each archive type."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from cifar_builders import Sample, class_major, make_tar, write_imagefolder
from PIL import Image

from fastgraph.core.errors import DataError
from fastgraph.data import CLASSES, load_cifar10

pytestmark = pytest.mark.usefixtures("isolated_cache")


def _assert_class_major_equal(ds, s: Sample, classes=CLASSES):
    assert ds.classes == tuple(classes)
    for images, labels, want_images, want_labels in (
        (ds.train_images, ds.train_labels, s.train_images, s.train_labels),
        (ds.test_images, ds.test_labels, s.test_images, s.test_labels),
    ):
        want_images, want_labels = class_major(want_images, want_labels)
        assert images.dtype == torch.uint8 and labels.dtype == torch.int64 and images.is_contiguous()
        np.testing.assert_array_equal(images.numpy(), want_images)  # PNG is lossless
        np.testing.assert_array_equal(labels.numpy(), want_labels)


@pytest.fixture(scope="module")
def tree(tmp_path_factory, sample):
    return write_imagefolder(tmp_path_factory.mktemp("imagefolder") / "cifar", sample)


def test_folder(tree, sample):
    # Files are 0.png ... 29.png: equality with the source order proves numeric sorting.
    _assert_class_major_equal(load_cifar10(tree, workers=2), sample)


def test_folder_decoded_serially_matches(tree, sample):
    _assert_class_major_equal(load_cifar10(tree, workers=1), sample)


@pytest.mark.parametrize("suffix", [".tar", ".tar.gz", ".tar.xz"])
@pytest.mark.parametrize("top", [None, "cifar10-png"])
def test_archive(tree, sample, tmp_path, suffix, top):
    archive = make_tar(tree, tmp_path / f"cifar{suffix}", top=top)
    ds = load_cifar10(archive)
    _assert_class_major_equal(ds, sample)
    assert ds.source == archive


def test_folder_with_one_top_level_folder(tree, sample, tmp_path):
    (tmp_path / "outer").mkdir()
    (tmp_path / "outer" / "inner").symlink_to(tree, target_is_directory=True)
    _assert_class_major_equal(load_cifar10(tmp_path / "outer"), sample)


def test_other_class_names_are_sorted(sample, tmp_path):
    names = ("zebra", "yak", "xerus", "wolf", "vole", "urchin", "toad", "seal", "rat", "quail")
    write_imagefolder(tmp_path / "d", sample, classes=names)
    ds = load_cifar10(tmp_path / "d")
    assert ds.classes == tuple(sorted(names))
    # Class i of the written data is names[i]; the loader's label is its sorted index.
    remap = np.array([sorted(names).index(n) for n in names])
    relabeled = Sample(sample.train_images, remap[sample.train_labels], sample.test_images,
                       remap[sample.test_labels], sample.real)
    _assert_class_major_equal(ds, relabeled, classes=sorted(names))


def test_jpeg_images_decode(sample, tmp_path):
    write_imagefolder(tmp_path / "d", sample, suffix=".jpg")
    ds = load_cifar10(tmp_path / "d")
    want, _ = class_major(sample.train_images, sample.train_labels)
    # JPEG is lossy: close to the source pixels, not equal.
    err = np.abs(ds.train_images.numpy().astype(np.int16) - want).mean()
    assert 0 < err < 12


def test_wrong_image_size_is_named(tree, tmp_path, sample):
    write_imagefolder(tmp_path / "d", sample)
    bad = tmp_path / "d" / "train" / "cat" / "7.png"
    Image.new("RGB", (28, 28)).save(bad)
    with pytest.raises(DataError, match=rf"{bad}: image is 28x28 pixels, CIFAR-10 needs 32x32"):
        load_cifar10(tmp_path / "d")


def test_undecodable_image_is_named(tmp_path, sample):
    write_imagefolder(tmp_path / "d", sample)
    bad = tmp_path / "d" / "test" / "ship" / "3.png"
    bad.write_bytes(bad.read_bytes()[:40])
    with pytest.raises(DataError, match=rf"{bad}: cannot decode image"):
        load_cifar10(tmp_path / "d")


def test_undecodable_archive_member_is_named(tmp_path, sample):
    write_imagefolder(tmp_path / "d", sample)
    (tmp_path / "d" / "train" / "dog" / "11.png").write_bytes(b"not a png")
    archive = make_tar(tmp_path / "d", tmp_path / "c.tar.gz")
    with pytest.raises(DataError, match=rf"{archive}:train/dog/11.png: cannot decode image"):
        load_cifar10(archive)


def test_missing_split_is_named(tmp_path, sample):
    write_imagefolder(tmp_path / "d", sample)
    (tmp_path / "d" / "test").rename(tmp_path / "d" / "val")
    with pytest.raises(DataError, match=r"d: no test/ images found"):
        load_cifar10(tmp_path / "d")


def test_missing_class_is_named(tmp_path, sample):
    write_imagefolder(tmp_path / "d", sample)
    for f in (tmp_path / "d" / "test" / "frog").iterdir():
        f.unlink()
    (tmp_path / "d" / "test" / "frog").rmdir()
    with pytest.raises(DataError, match=r"test/ has no images of class\(es\) frog"):
        load_cifar10(tmp_path / "d")


def test_two_top_level_folders_are_refused(tmp_path, tree):
    (tmp_path / "two").mkdir()
    for name in ("a", "b"):
        (tmp_path / "two" / name).symlink_to(tree, target_is_directory=True)
    archive = make_tar(tmp_path / "two", tmp_path / "two.tar")
    with pytest.raises(DataError, match=r"several top-level folders \(a, b\)"):
        load_cifar10(archive)


def test_not_cifar_is_named(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match=r"empty: no CIFAR-10 here"):
        load_cifar10(tmp_path / "empty")
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(DataError, match=r"notes.txt: not a CIFAR-10 folder or .tar"):
        load_cifar10(tmp_path / "notes.txt")


@pytest.mark.parametrize("packed", [False, True], ids=["folder", "archive"])
def test_empty_class_folder_is_named(tmp_path, sample, packed):
    # Dropping the class would shift every later label by one (9 classes instead of 10).
    src = write_imagefolder(tmp_path / "d", sample)
    for split in ("train", "test"):
        for f in (src / split / "dog").iterdir():
            f.unlink()
    (src / "train" / "dog" / ".DS_Store").write_bytes(b"\0")
    where = make_tar(src, tmp_path / "c.tar") if packed else src
    with pytest.raises(DataError) as err:
        load_cifar10(where)
    msg = str(err.value)
    assert "dog/: empty class folder" in msg and "\n" not in msg
    assert msg.startswith(f"{where}:" if packed else f"{src / 'train' / 'dog'}/:")


@pytest.mark.parametrize("packed", [False, True], ids=["folder", "archive"])
def test_hidden_folders_are_not_classes(tmp_path, sample, packed):
    src = write_imagefolder(tmp_path / "d", sample)
    for split in ("train", "test"):
        hidden = src / split / ".ipynb_checkpoints"
        hidden.mkdir()
        (hidden / "0.png").write_bytes((src / split / "cat" / "0.png").read_bytes())
        (src / split / ".AppleDouble").mkdir()
    ds = load_cifar10(make_tar(src, tmp_path / "c.tar") if packed else src)
    _assert_class_major_equal(ds, sample)
