"""The FUSE binding itself (zramfs._fuse) on a real mount, with the real data path."""
from __future__ import annotations

import errno
import json
import mmap
import os
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from conftest import ROOT, is_mounted, requires_fuse, run, stop_daemon

pytestmark = requires_fuse


@pytest.fixture
def served(tmp_path: Path) -> Iterator[tuple[Path, subprocess.Popen]]:
    """The test server mounted on a fresh directory, and its process; its log is
    `tmp_path / "server.log"`."""
    mnt = Path(tempfile.mkdtemp(prefix="zramfs-fuse-"))
    log = tmp_path / "server.log"
    with open(log, "w") as err:
        proc = subprocess.Popen([sys.executable, str(ROOT / "tests/fuse_server.py"), str(mnt)],
                                stdout=subprocess.PIPE, stderr=err, text=True)
    try:
        with proc.stdout:
            assert proc.stdout.readline().strip() == "READY", log.read_text()
        yield mnt, proc
    finally:
        stop_daemon(proc, mnt)
        if not is_mounted(mnt):
            mnt.rmdir()


@pytest.fixture
def server(served: tuple[Path, subprocess.Popen], tmp_path: Path) -> Iterator[Path]:
    """The mounted test server's directory; the server must outlive the test."""
    mnt, proc = served
    yield mnt
    assert proc.poll() is None, (tmp_path / "server.log").read_text()


def stats(mnt: Path) -> dict:
    return json.loads((mnt / "stats").read_text())


def test_handler_exception_is_eio_and_the_mount_lives(server: Path, tmp_path: Path) -> None:
    for _ in range(3):
        with pytest.raises(OSError) as e:
            (server / "fail").read_bytes()
        assert e.value.errno == errno.EIO
    assert "ValueError: a bug in a handler" in (tmp_path / "server.log").read_text()
    assert sorted(os.listdir(server)) == ["disk", "fail", "hog", "stats"]
    with open(server / "disk", "r+b") as f:
        f.write(b"still here")
        f.seek(0)
        assert f.read(10) == b"still here"


def test_large_requests_arrive(server: Path) -> None:
    """A 4 MiB direct write or read arrives as sixteen 256 KiB requests (max_io)."""
    fd = os.open(server / "disk", os.O_RDWR | os.O_DIRECT)
    try:
        buf = mmap.mmap(-1, 4 << 20)
        buf[:] = os.urandom(4 << 20)
        assert os.pwritev(fd, [buf], 0) == 4 << 20
        back = mmap.mmap(-1, 4 << 20)
        assert os.preadv(fd, [back], 0) == 4 << 20
        assert back[:] == buf[:]
    finally:
        os.close(fd)
    s = stats(server)
    assert s["max_write_size"] == 256 << 10 and s["max_read_size"] == 256 << 10
    assert s["data_writes"] >= 16 and s["data_reads"] >= 16
    assert s["data_ops_with_gil"] == 0


def test_device_io_does_not_need_the_gil(server: Path) -> None:
    """While a handler holds the GIL for 2 s, 1 MiB direct reads and writes go on."""
    hog = threading.Thread(target=lambda: (server / "hog").read_bytes())
    fd = os.open(server / "disk", os.O_RDWR | os.O_DIRECT)
    buf = mmap.mmap(-1, 1 << 20)
    try:
        hog.start()
        time.sleep(0.3)                                  # the hog is holding the GIL now
        done = 0
        started = time.monotonic()
        while time.monotonic() - started < 1.0:
            os.pwritev(fd, [buf], (done % 32) << 20)
            os.preadv(fd, [buf], (done % 32) << 20)
            done += 1
        hog_still_running = hog.is_alive()
    finally:
        os.close(fd)
        hog.join()
    assert hog_still_running, "the hog ended early: the test proved nothing"
    assert done >= 20, done


def test_fusermount_u_ends_the_server(served: tuple[Path, subprocess.Popen],
                                      tmp_path: Path) -> None:
    """An unmount from outside ends the server's loop: the process exits by itself, cleanly,
    without a signal (fusermount alone only guarantees the mount is gone)."""
    mnt, proc = served
    run("fusermount3", "-u", str(mnt))
    assert not is_mounted(mnt)
    assert proc.wait(timeout=10) == 0, (tmp_path / "server.log").read_text()
