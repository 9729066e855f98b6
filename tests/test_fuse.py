"""The FUSE engine itself (zramfs.fuse._fuse) on a real mount, with the real data path."""
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

from conftest import ROOT, URING_PARAM, Daemon, is_mounted, requires_fuse, run, stop_daemon

pytestmark = requires_fuse


@pytest.fixture
def served(tmp_path: Path, transport: str) -> Iterator[tuple[Path, subprocess.Popen]]:
    """The test server mounted on a fresh directory with each transport, and its process;
    its log is `tmp_path / "server.log"`."""
    if transport == "io_uring":
        URING_PARAM.write_text("Y\n")            # restored by the transport fixture
    mnt = Path(tempfile.mkdtemp(prefix="zramfs-fuse-"))
    log = tmp_path / "server.log"
    with open(log, "w") as err:
        proc = subprocess.Popen([sys.executable, str(ROOT / "tests/fuse_server.py"), str(mnt),
                                 transport], stdout=subprocess.PIPE, stderr=err, text=True)
    try:
        with proc.stdout:
            assert proc.stdout.readline().strip() == "READY", log.read_text()
        # INIT is answered once stats can be read: the transport asked for is serving.
        assert stats(mnt)["transport"] == transport
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
    assert sorted(os.listdir(server)) == ["big", "disk", "fail", "hog", "slow", "stats"]
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


# --- the protocol's edge cases, against the real kernel --------------------------------------

INTERRUPTED_READ = """
import signal, sys
signal.signal(signal.SIGALRM, lambda *_: None)
signal.setitimer(signal.ITIMER_REAL, 0.3)
try:
    print(open(sys.argv[1]).read().strip())
except OSError as e:
    print("errno", e.errno)
"""


def test_a_request_interrupted_by_a_signal(served: tuple[Path, subprocess.Popen],
                                           tmp_path: Path) -> None:
    """A reader waiting on a slow handler gets a signal: the kernel sends INTERRUPT, which the
    engine takes without an answer; the read ends (with its data, or EINTR), the server lives
    and goes on serving, and nothing was logged as a failure."""
    mnt, proc = served
    out = run(sys.executable, "-c", INTERRUPTED_READ, str(mnt / "slow"), timeout=30).stdout
    assert out.strip() in ("slow", f"errno {errno.EINTR}"), out
    assert proc.poll() is None
    assert (mnt / "big").stat().st_size == 4096 and stats(mnt)["data_ops_with_gil"] == 0
    assert "Traceback" not in (tmp_path / "server.log").read_text()


def test_a_reply_larger_than_asked_is_cut_to_the_request(server: Path) -> None:
    """A handler that answers with more than the kernel asked for: the engine sends only what
    fits the kernel's buffer (a longer reply would be refused), so reads see exactly what
    they asked for, and the mount lives."""
    fd = os.open(server / "big", os.O_RDONLY)
    try:
        assert os.pread(fd, 100, 0) == b"x" * 100
        assert os.pread(fd, 4096, 0) == b"x" * 4096
    finally:
        os.close(fd)
    assert (server / "stats").read_text()


def test_forget_storms_and_a_large_readdir(daemon: Daemon) -> None:
    """Two hundred devices: one directory listing takes several READDIRs of the kernel's
    buffer; stat of every attribute, then the kernel's inodes dropped (BATCH_FORGETs by the
    thousand); the tree answers as before, and every device is removed again."""
    names = [daemon.hot_add() for _ in range(200)]
    try:
        listed = os.listdir(daemon.mnt / "sys/block")
        assert sorted(listed) == sorted(names)
        for name in names:
            for attr in os.listdir(daemon.mnt / "sys/block" / name):
                os.stat(daemon.mnt / "sys/block" / name / attr)
        Path("/proc/sys/vm/drop_caches").write_text("2")      # inodes: forgets come now
        assert sorted(os.listdir(daemon.mnt / "dev")) == sorted(names)
        assert daemon.read(names[-1], "initstate") == "0\n"
    finally:
        for name in names:
            daemon.hot_remove(name)
    assert os.listdir(daemon.mnt / "dev") == []


REWRITER = """
import mmap, os, sys
buf = mmap.mmap(-1, 1 << 20)
buf[:] = os.urandom(1 << 20)
fd = os.open(sys.argv[1], os.O_WRONLY | os.O_DIRECT)
for i in range(2048):
    assert os.pwritev(fd, [buf], (i % 64) << 20) == 1 << 20
os.close(fd)
"""


@pytest.mark.parametrize("how", [["fusermount3", "-u"], ["umount", "-l"]])
def test_unmount_while_requests_are_in_flight(served: tuple[Path, subprocess.Popen],
                                              tmp_path: Path, how: list[str]) -> None:
    """An unmount from outside while a writer streams to a device file. fusermount3 -u is
    refused while the file is open (EBUSY) and the writer goes on; umount -l detaches the
    tree at once, the open file keeps being served until the writer is done, and then the
    server ends by itself, cleanly."""
    mnt, proc = served
    # 64 MiB over and over: a few seconds of writes in flight.
    writer = subprocess.Popen([sys.executable, "-c", REWRITER, str(mnt / "disk")],
                              stderr=subprocess.PIPE, text=True)
    try:
        time.sleep(0.5)
        assert writer.poll() is None, "the writer ended before the unmount"
        done = run(*how, str(mnt), check=False)
        if how[0] == "fusermount3":
            assert done.returncode != 0 and is_mounted(mnt)
        else:
            assert done.returncode == 0 and not is_mounted(mnt)
        _, err = writer.communicate(timeout=60)
        assert writer.returncode == 0, err
    finally:
        if writer.poll() is None:
            writer.kill()
            writer.communicate()
    if how[0] == "umount":
        assert proc.wait(timeout=10) == 0, (tmp_path / "server.log").read_text()
    else:
        assert proc.poll() is None
