"""The decode-once cache: hits, invalidation on a changed source, corrupt caches, atomic
writes, and the fallback to $FASTGRAPH_CACHE beside a read-only source."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch
from cifar_builders import make_tar, write_batches, write_imagefolder
from PIL import Image

from fastgraph.core.errors import DataError
from fastgraph.data import cache, load_cifar10


def _same(a, b):
    for name in ("train_images", "train_labels", "test_images", "test_labels"):
        assert torch.equal(getattr(a, name), getattr(b, name)), name
    assert a.classes == b.classes


def test_second_load_reads_the_cache(tmp_path, sample, isolated_cache):
    src = write_imagefolder(tmp_path / "d", sample)
    first = load_cifar10(src)
    assert not first.from_cache
    assert first.cache_path == tmp_path / ("d" + cache.CACHE_SUFFIX)  # beside a writable source
    second = load_cifar10(src)
    assert second.from_cache and second.cache_path == first.cache_path
    _same(first, second)
    assert second.load_seconds < first.load_seconds
    assert not isolated_cache.exists()  # nothing written to the cache dir


def test_changed_source_invalidates(tmp_path, sample, isolated_cache):
    src = write_imagefolder(tmp_path / "d", sample)
    before = load_cifar10(src)
    target = src / "train" / "airplane" / "0.png"
    pixels = np.asarray(Image.open(target)).copy()
    pixels[0, 0] = 255 - pixels[0, 0]
    Image.fromarray(pixels).save(target)
    after = load_cifar10(src)
    assert not after.from_cache
    assert torch.equal(after.train_images[0], torch.from_numpy(pixels.transpose(2, 0, 1).copy()))
    assert not torch.equal(after.train_images[0], before.train_images[0])
    assert load_cifar10(src).from_cache


def test_replaced_archive_invalidates(tmp_path, sample, isolated_cache):
    src = write_imagefolder(tmp_path / "d", sample)
    archive = make_tar(src, tmp_path / "c.tar")
    assert not load_cifar10(archive).from_cache
    assert load_cifar10(archive).from_cache
    (src / "test" / "truck" / "9.png").unlink()
    make_tar(src, archive)
    ds = load_cifar10(archive)
    assert not ds.from_cache and len(ds.test_labels) == len(sample.test_labels) - 1


@pytest.mark.parametrize("damage", ["truncate", "flip"])
def test_corrupt_cache_is_rebuilt(tmp_path, sample, isolated_cache, damage):
    md5 = write_batches(tmp_path / "cifar-10-batches-py", sample)
    good = load_cifar10(tmp_path, checksums=md5)
    path = good.cache_path
    data = bytearray(path.read_bytes())
    if damage == "truncate":
        data = data[: len(data) // 2]
    else:
        data[len(data) // 3] ^= 0xFF  # inside the image array: caught by zip's CRC-32
    path.write_bytes(bytes(data))
    rebuilt = load_cifar10(tmp_path, checksums=md5)
    assert not rebuilt.from_cache
    _same(good, rebuilt)
    assert load_cifar10(tmp_path, checksums=md5).from_cache


def test_failed_decode_leaves_no_cache(tmp_path, sample, isolated_cache):
    src = write_imagefolder(tmp_path / "d", sample)
    (src / "test" / "cat" / "0.png").write_bytes(b"broken")
    with pytest.raises(DataError):
        load_cifar10(src)
    assert not any(p.name.startswith("d.") for p in tmp_path.iterdir() if p.suffix != ".lock")
    assert not isolated_cache.exists() or not any(isolated_cache.glob("*.npz*"))


def test_other_checksums_do_not_reuse_the_cache(tmp_path, sample, isolated_cache):
    md5 = write_batches(tmp_path / "cifar-10-batches-py", sample)
    assert not load_cifar10(tmp_path, checksums=md5).from_cache
    with pytest.raises(DataError, match="data_batch_1: md5"):
        load_cifar10(tmp_path)  # the published md5s still apply: no shortcut through the cache


def test_read_only_source_caches_in_cache_dir(tmp_path, sample, isolated_cache):
    ro = tmp_path / "ro"
    ro.mkdir()
    archive = make_tar(write_imagefolder(tmp_path / "d", sample), ro / "c.tar.gz")
    os.chmod(ro, 0o555)  # marked read-only; honoured even when the tests run as root
    try:
        first = load_cifar10(archive)
        assert first.cache_path.parent == isolated_cache
        assert sorted(os.listdir(ro)) == ["c.tar.gz"]
        second = load_cifar10(archive)
        assert second.from_cache and second.cache_path == first.cache_path
        _same(first, second)
    finally:
        os.chmod(ro, 0o755)


def test_cache_write_is_atomic(tmp_path, sample):
    # A write that fails part-way (here: a folder in the way of the final name) leaves
    # neither a cache nor a temporary file behind.
    md5 = write_batches(tmp_path / "cifar-10-batches-py", sample)
    from fastgraph.data import pickled

    arrays = pickled.read_folder(tmp_path / "cifar-10-batches-py", md5)
    target = tmp_path / "out" / "c.npz"
    target.mkdir(parents=True)
    with pytest.raises(OSError):
        cache.write(target, "k", arrays)
    assert os.listdir(tmp_path / "out") == ["c.npz"] and target.is_dir()
    target.rmdir()
    cache.write(target, "k", arrays)
    assert cache.read(target, "k") is not None and cache.read(target, "other") is None


def test_a_killed_writers_temporary_file_is_removed_and_a_live_ones_kept(tmp_path, sample):
    # A writer killed mid-write (SIGKILL: no clean-up runs) leaves up to a whole cache
    # behind; the next write removes it, but not the file of a writer still running, nor
    # one of another machine sharing the folder.
    import socket
    import subprocess
    import sys

    md5 = write_batches(tmp_path / "cifar-10-batches-py", sample)
    from fastgraph.data import pickled

    arrays = pickled.read_folder(tmp_path / "cifar-10-batches-py", md5)
    target = tmp_path / "out" / "c.npz"
    target.parent.mkdir()
    host = socket.gethostname()
    exited = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                            text=True, check=True)
    killed = target.with_name(f".c.npz.{host}.{int(exited.stdout)}.tmp")
    running = target.with_name(f".c.npz.{host}.{os.getppid()}.tmp")
    elsewhere = target.with_name(f".c.npz.other-machine.{int(exited.stdout)}.tmp")
    for leftover in (killed, running, elsewhere):
        leftover.write_bytes(b"part of a cache")
    cache.write(target, "k", arrays)
    assert sorted(p.name for p in target.parent.iterdir()) == sorted(["c.npz", running.name, elsewhere.name])
    assert cache.read(target, "k") is not None


def test_archive_replaced_with_same_size_and_mtime_invalidates(tmp_path, sample, isolated_cache):
    # `cp -p`, `rsync -a` or a download that keeps the server's mtime: another archive of
    # the same size (tar pads to 512-byte blocks) arrives with the old mtime.
    src = write_imagefolder(tmp_path / "d", sample)
    archive = make_tar(src, tmp_path / "c.tar")
    before = load_cifar10(archive)
    st = archive.stat()
    target = src / "train" / "airplane" / "0.png"
    pixels = np.asarray(Image.open(target)).copy()
    pixels[0, 0] = 255 - pixels[0, 0]
    Image.fromarray(pixels).save(target)
    make_tar(src, tmp_path / "other.tar")
    assert (tmp_path / "other.tar").stat().st_size == st.st_size
    os.replace(tmp_path / "other.tar", archive)
    os.utime(archive, ns=(st.st_atime_ns, st.st_mtime_ns))
    after = load_cifar10(archive)
    assert not after.from_cache
    assert torch.equal(after.train_images[0], torch.from_numpy(pixels.transpose(2, 0, 1).copy()))
    assert not torch.equal(after.train_images[0], before.train_images[0])


def test_changed_image_in_a_symlinked_class_folder_invalidates(tmp_path, sample, isolated_cache):
    src = write_imagefolder(tmp_path / "d", sample)
    elsewhere = tmp_path / "airplane-images"
    os.replace(src / "train" / "airplane", elsewhere)
    (src / "train" / "airplane").symlink_to(elsewhere, target_is_directory=True)
    (elsewhere / "loop").symlink_to(src, target_is_directory=True)  # a cycle must not hang the key
    before = load_cifar10(src)
    target = elsewhere / "0.png"
    pixels = np.asarray(Image.open(target)).copy()
    pixels[0, 0] = 255 - pixels[0, 0]
    Image.fromarray(pixels).save(target)
    after = load_cifar10(src)
    assert not after.from_cache
    assert not torch.equal(after.train_images[0], before.train_images[0])


def test_dangling_symlink_in_the_folder_is_named_or_skipped(tmp_path, sample, isolated_cache):
    src = write_imagefolder(tmp_path / "d", sample)
    (src / "train" / "notes.txt").symlink_to(tmp_path / "gone.txt")  # not an image: not read
    assert len(load_cifar10(src).train_labels) == len(sample.train_labels)
    link = src / "train" / "cat" / "999.png"
    link.symlink_to(tmp_path / "gone.png")
    with pytest.raises(DataError) as err:
        load_cifar10(src)
    msg = str(err.value)
    assert msg.startswith(f"{link}: cannot read (No such file or directory)") and "\n" not in msg
