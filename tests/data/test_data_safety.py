"""Data that cannot hurt the user: `fastgraph data download` refuses hostile archives (links,
huge members, too much in all) and never replaces a folder or file already there; the decode
cache leaves no temporary file when its write is interrupted; and its lock cannot deadlock
after the process holding it is killed, forked workers or not."""

from __future__ import annotations

import hashlib
import io
import os
import signal
import socket
import subprocess
import sys
import tarfile
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from fastgraph.data import cache
from fastgraph.data import download as dl
from support import cli_error

pytestmark = pytest.mark.usefixtures("isolated_cache")


# ---------------------------------------------------------------------- hostile archives


def _file(name: str, size: int = 10) -> tuple[tarfile.TarInfo, bytes]:
    info = tarfile.TarInfo(name)
    info.size = size
    return info, b"x" * size


def _link(name: str, target: str, kind: bytes) -> tuple[tarfile.TarInfo, None]:
    info = tarfile.TarInfo(name)
    info.type, info.linkname = kind, target
    return info, None


def _fifo(name: str) -> tuple[tarfile.TarInfo, None]:
    info = tarfile.TarInfo(name)
    info.type = tarfile.FIFOTYPE
    return info, None


def _serve(server, members, name: str = "hostile.tar.gz") -> tuple[str, str]:
    """Write a tar.gz of ``members`` ((TarInfo, bytes or None) pairs) where ``server`` serves it;
    return (its URL, its md5)."""
    root, base = server
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as tar:
        for info, data in members:
            tar.addfile(info, io.BytesIO(data) if data is not None else None)
    (root / name).write_bytes(buffer.getvalue())
    return f"{base}/{name}", hashlib.md5(buffer.getvalue()).hexdigest()


def _download(capsys, dest: Path, url: str, md5: str) -> str:
    return cli_error(capsys, "data", "download", str(dest), "--url", url, "--md5", md5)


TOP = "cifar-10-batches-py"
FIRST = _file(f"{TOP}/data_batch_1")
HOSTILE = {  # a good first member, then the bad one
    "symlink-inside": [FIRST, _link(f"{TOP}/data_batch_2", "data_batch_1", tarfile.SYMTYPE)],
    "symlink-outside": [FIRST, _link(f"{TOP}/passwd", "/etc/passwd", tarfile.SYMTYPE)],
    "hardlink": [FIRST, _link(f"{TOP}/data_batch_2", f"{TOP}/data_batch_1", tarfile.LNKTYPE)],
    "fifo": [FIRST, _fifo(f"{TOP}/pipe")],
    "parent-path": [FIRST, _file("../escaped")],
}


@pytest.mark.parametrize("kind", list(HOSTILE))
def test_download_refuses_links_and_special_members(tmp_path, server, capsys, kind):
    url, md5 = _serve(server, HOSTILE[kind])
    dest = tmp_path / "data"
    line = _download(capsys, dest, url, md5)
    bad = HOSTILE[kind][-1][0].name
    assert url in line and bad in line, line
    assert list(dest.iterdir()) == []  # nothing extracted, no temporary file or folder left
    assert not (tmp_path / "escaped").exists()


def test_download_refuses_a_member_over_the_size_cap(tmp_path, server, capsys, monkeypatch):
    monkeypatch.setattr(dl, "MAX_MEMBER_BYTES", 1000)
    url, md5 = _serve(server, [_file(f"{TOP}/small", 1000), _file(f"{TOP}/big", 1001)])
    dest = tmp_path / "data"
    line = _download(capsys, dest, url, md5)
    assert f"{TOP}/big" in line and "1001" in line and "1000" in line, line
    assert list(dest.iterdir()) == []


def test_download_caps_the_total_it_extracts(tmp_path, server, capsys, monkeypatch):
    monkeypatch.setattr(dl, "MAX_TOTAL_BYTES", 2500)
    url, md5 = _serve(server, [_file(f"{TOP}/part_{i}", 1000) for i in range(4)])
    dest = tmp_path / "data"
    line = _download(capsys, dest, url, md5)
    assert f"{TOP}/part_2" in line and "2500" in line, line
    assert list(dest.iterdir()) == []


def test_download_caps_the_number_of_members(tmp_path, server, capsys, monkeypatch):
    monkeypatch.setattr(dl, "MAX_MEMBERS", 3)
    url, md5 = _serve(server, [_file(f"{TOP}/part_{i}") for i in range(5)])
    dest = tmp_path / "data"
    line = _download(capsys, dest, url, md5)
    assert "3" in line and "members" in line, line
    assert list(dest.iterdir()) == []


def test_download_never_replaces_what_is_there(tmp_path, server, capsys):
    dest = tmp_path / "data"
    (dest / TOP).mkdir(parents=True)
    (dest / TOP / "mine.txt").write_text("the user's")
    (dest / "readme.html").write_text("the user's too")
    url, md5 = _serve(server, [_file(f"{TOP}/data_batch_1")])
    line = _download(capsys, dest, url, md5)
    assert str(dest / TOP) in line and "already exists" in line, line
    assert (dest / TOP / "mine.txt").read_text() == "the user's"
    assert sorted(p.name for p in (dest / TOP).iterdir()) == ["mine.txt"]
    url, md5 = _serve(server, [_file("readme.html")], name="other.tar.gz")
    line = _download(capsys, dest, url, md5)
    assert str(dest / "readme.html") in line and "already exists" in line, line
    assert (dest / "readme.html").read_text() == "the user's too"
    assert sorted(p.name for p in dest.iterdir()) == [TOP, "readme.html"]  # no temporary files


def test_download_of_the_official_archive_checks_the_folder_before_the_network(tmp_path, capsys):
    dest = tmp_path / "data"
    (dest / TOP).mkdir(parents=True)
    line = cli_error(capsys, "data", "download", str(dest))
    assert str(dest / TOP) in line and "already exists" in line, line


def test_download_into_a_fresh_folder_still_works(tmp_path, server, capsys):
    url, md5 = _serve(server, [_file(f"{TOP}/data_batch_1", 2000), _file("readme.html")])
    dest = tmp_path / "data"
    from fastgraph.cli.main import main

    assert main(["data", "download", str(dest), "--url", url, "--md5", md5]) == 0
    assert sorted(p.name for p in dest.iterdir()) == [TOP, "readme.html"]
    assert (dest / TOP / "data_batch_1").stat().st_size == 2000


# ---------------------------------------------------------------------- cache writes and lock


def _arrays(n: int = 4) -> cache.Arrays:
    images = np.zeros((n, 3, 32, 32), np.uint8)
    labels = np.arange(n, dtype=np.int64) % 10
    return cache.Arrays(images, labels, images.copy(), labels.copy(), tuple(f"c{i}" for i in range(10)))


@pytest.fixture
def source(tmp_path) -> Path:
    path = tmp_path / "src.tar"
    path.write_bytes(b"stands in for an archive")
    return path


def _lock_file(source: Path) -> Path:
    return cache.lock_path(cache.candidate_paths(source)[0])


def _load_in_thread(source: Path, build, timeout: float) -> tuple[list, threading.Thread]:
    """``cache.load_or_build(source, "key", build)`` in a daemon thread (so that a lock that
    never comes free fails the test instead of hanging it), joined for ``timeout`` seconds:
    (a list that holds its result once it returns, the thread)."""
    result = []
    thread = threading.Thread(target=lambda: result.append(cache.load_or_build(source, "key", build)),
                              daemon=True)
    thread.start()
    thread.join(timeout)
    return result, thread


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def _zombie_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    os.waitid(os.P_PID, proc.pid, os.WEXITED | os.WNOWAIT)  # exited, not reaped
    return proc.pid


@pytest.mark.parametrize("holder", ["dead", "zombie", "empty-and-old"])
def test_a_stale_lock_is_taken_over(source, holder):
    lock = _lock_file(source)
    lock.parent.mkdir(parents=True, exist_ok=True)
    if holder == "empty-and-old":  # what an older fastgraph left behind
        lock.write_text("")
        os.utime(lock, (time.time() - 3600, time.time() - 3600))
    else:
        pid = _dead_pid() if holder == "dead" else _zombie_pid()
        lock.write_text(f"{pid}\n{socket.gethostname()}\n")
    built = []
    result, thread = _load_in_thread(source, lambda: built.append(1) or _arrays(), timeout=30)
    assert not thread.is_alive(), "waited on a lock whose holder is gone"
    arrays, path, hit = result[0]
    assert built == [1] and not hit and path == cache.candidate_paths(source)[0]
    assert not lock.exists()  # released


def test_a_live_holder_is_waited_for_and_its_cache_read(source):
    lock = _lock_file(source)
    lock.parent.mkdir(parents=True, exist_ok=True)
    holder = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        lock.write_text(f"{holder.pid}\n{socket.gethostname()}\n")
        built = []
        result, thread = _load_in_thread(source, lambda: built.append(1) or _arrays(), timeout=1.0)
        assert thread.is_alive() and result == []  # waiting for the decoder
        cache.write(cache.candidate_paths(source)[0], "key", _arrays(6))  # the holder finishes
        lock.unlink()
        thread.join(30)
        assert not thread.is_alive()
    finally:
        holder.kill()
        holder.wait()
    arrays, _, hit = result[0]
    assert hit and built == [] and len(arrays.train_labels) == 6


# The process that holds the cache lock forks a worker (as the ImageFolder decoder's pool
# does) and is then killed; the worker lives on.
HOLDER = """
import os, sys, time
from pathlib import Path
from fastgraph.data import cache

source, ready = Path(sys.argv[1]), Path(sys.argv[2])


def build():
    worker = os.fork()
    if worker == 0:
        time.sleep(60)
        os._exit(0)
    ready.write_text(str(worker))
    time.sleep(60)


cache.load_or_build(source, "key", build)
"""


def test_a_killed_decoder_with_a_live_forked_worker_does_not_block_the_next_load(tmp_path, source):
    script, ready = tmp_path / "holder.py", tmp_path / "ready"
    script.write_text(HOLDER)
    holder = subprocess.Popen([sys.executable, str(script), str(source), str(ready)])
    worker = None
    try:
        deadline = time.monotonic() + 60
        while not ready.exists() or not ready.read_text():
            assert holder.poll() is None and time.monotonic() < deadline
            time.sleep(0.02)
        worker = int(ready.read_text())
        holder.send_signal(signal.SIGKILL)
        holder.wait()
        result, thread = _load_in_thread(source, _arrays, timeout=20)
        assert not thread.is_alive(), "the killed decoder's forked worker still holds the lock"
        _, _, hit = result[0]
        assert not hit
    finally:
        if holder.poll() is None:
            holder.kill()
            holder.wait()
        if worker is not None:
            try:
                os.kill(worker, signal.SIGKILL)
            except ProcessLookupError:
                pass


def test_an_interrupted_cache_write_leaves_no_temporary_file_and_frees_the_lock(source, monkeypatch):
    def half_then_interrupt(f, **arrays):
        f.write(b"PK half a zip")
        raise KeyboardInterrupt

    monkeypatch.setattr(np, "savez", half_then_interrupt)
    with pytest.raises(KeyboardInterrupt):
        cache.load_or_build(source, "key", _arrays)
    folder = cache.candidate_paths(source)[0].parent
    assert sorted(p.name for p in folder.iterdir()) == [source.name]  # no .tmp, no lock
    monkeypatch.undo()
    _, _, hit = cache.load_or_build(source, "key", _arrays)
    assert not hit
