"""`fastgraph data download|info` through ``fastgraph.cli.main``: downloads from a local
HTTP server on 127.0.0.1, and bad inputs that must end in exit code 2 and one line."""

from __future__ import annotations

import hashlib

import pytest
from cifar_builders import make_tar, write_batches, write_imagefolder

from fastgraph.cli.main import main
from fastgraph.data import load_cifar10

pytestmark = pytest.mark.usefixtures("isolated_cache")


def _one_line_error(capsys, *names: str) -> str:
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("fastgraph: error: ")
    for name in names:
        assert name in lines[0]
    return lines[0]


@pytest.fixture
def archive(tmp_path, sample):
    """A cifar-10-python.tar.gz built from written batch files: (path, its md5, batch md5s)."""
    md5 = write_batches(tmp_path / "src" / "cifar-10-batches-py", sample)
    path = make_tar(tmp_path / "src", tmp_path / "www-src.tar.gz")
    return path, hashlib.md5(path.read_bytes()).hexdigest(), md5


def test_download_verifies_and_extracts(tmp_path, server, archive, sample, capsys):
    root, base = server
    path, archive_md5, batch_md5 = archive
    (root / "cifar-10-python.tar.gz").write_bytes(path.read_bytes())
    dest = tmp_path / "data"
    url = f"{base}/cifar-10-python.tar.gz"
    rc = main(["data", "download", str(dest), "--url", url, "--md5", archive_md5])
    out = capsys.readouterr().out
    assert rc == 0
    assert str(dest / "cifar-10-batches-py") in out
    assert sorted(p.name for p in dest.iterdir()) == ["cifar-10-batches-py"]  # no temp files left
    ds = load_cifar10(dest, checksums=batch_md5)
    assert ds.train_images.numpy().tobytes() == sample.train_images.tobytes()
    assert ds.test_labels.tolist() == sample.test_labels.tolist()


def test_download_rejects_and_deletes_corrupt_archive(tmp_path, server, archive, capsys):
    root, base = server
    path, archive_md5, _ = archive
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    (root / "cifar-10-python.tar.gz").write_bytes(bytes(data))
    dest = tmp_path / "data"
    url = f"{base}/cifar-10-python.tar.gz"
    assert main(["data", "download", str(dest), "--url", url, "--md5", archive_md5]) == 2
    line = _one_line_error(capsys, url, archive_md5, "deleted")
    assert hashlib.md5(bytes(data)).hexdigest() in line
    assert list(dest.iterdir()) == []  # the download is gone, nothing extracted


def test_download_with_wrong_md5_flag(tmp_path, server, archive, capsys):
    root, base = server
    path, _, _ = archive
    (root / "a.tar.gz").write_bytes(path.read_bytes())
    url = f"{base}/a.tar.gz"
    assert main(["data", "download", str(tmp_path / "d"), "--url", url, "--md5", "0" * 32]) == 2
    _one_line_error(capsys, f"{base}/a.tar.gz", "0" * 32)
    assert list((tmp_path / "d").iterdir()) == []


def test_download_missing_url(tmp_path, server, capsys):
    _, base = server
    assert main(["data", "download", str(tmp_path / "d"), "--url", f"{base}/nope.tar.gz"]) == 2
    _one_line_error(capsys, f"{base}/nope.tar.gz", "download failed")


def test_info_prints_counts(tmp_path, sample, capsys):
    src = write_imagefolder(tmp_path / "d", sample)
    assert main(["data", "info", "--data", str(src)]) == 0
    out = capsys.readouterr().out
    assert "decoded, cache written" in out and str(src) in out
    assert str(len(sample.train_labels)) in out and str(len(sample.test_labels)) in out
    assert main(["data", "info", "--data", str(src)]) == 0
    assert "read from cache" in capsys.readouterr().out


def test_info_missing_path(tmp_path, capsys):
    missing = tmp_path / "nowhere"
    assert main(["data", "info", "--data", str(missing)]) == 2
    _one_line_error(capsys, str(missing), "fastgraph data download")


def test_info_default_location_from_env(tmp_path, monkeypatch, capsys):
    missing = tmp_path / "env-data"
    monkeypatch.setenv("FASTGRAPH_DATA", str(missing))
    assert main(["data", "info"]) == 2
    _one_line_error(capsys, str(missing), "FASTGRAPH_DATA")


@pytest.mark.parametrize("suffix", [".tar.xz", ".tar.gz", ".tar"])
def test_info_truncated_archive(tmp_path, sample, capsys, suffix):
    archive = make_tar(write_imagefolder(tmp_path / "d", sample), tmp_path / f"c{suffix}")
    data = archive.read_bytes()
    archive.write_bytes(data[: len(data) // 2])
    assert main(["data", "info", "--data", str(archive)]) == 2
    _one_line_error(capsys, str(archive), "truncated or corrupt archive")


def test_info_corrupt_batch_file(tmp_path, sample, capsys):
    folder = tmp_path / "cifar-10-batches-py"
    write_batches(folder, sample)
    data = (folder / "data_batch_1").read_bytes()
    (folder / "data_batch_1").write_bytes(data[:-100])
    assert main(["data", "info", "--data", str(tmp_path)]) == 2
    _one_line_error(capsys, str(folder / "data_batch_1"), "md5", "re-download")


@pytest.mark.parametrize("shards", [False, True])
def test_info_indexes_an_imagenet_format_folder_without_decoding(tmp_path, capsys, shards):
    import re

    from imagenet_builders import write_imagenet_folder

    root = write_imagenet_folder(tmp_path / "imagenet", classes=3, per_class_train=5, per_class_val=2,
                                 shards=shards)
    before = sorted(root.rglob("*"))
    assert main(["data", "info", "--data", str(root)]) == 0
    out = capsys.readouterr().out
    layout = "tar shards" if shards else "folders"
    # split, images, classes, images per class, layout
    assert re.search(rf"train\W+15\W+3\W+5\W+{layout}", out), out
    assert re.search(rf"val\W+6\W+3\W+2\W+{layout}", out), out
    assert sorted(root.rglob("*")) == before  # indexed only: no cache written beside the images
