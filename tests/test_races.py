"""Races through a real mount: torn reads, reset/hot_add/hot_remove/compact against I/O, and
shutdown with I/O in flight (docs/design.md, hazards 1 and 2)."""
from __future__ import annotations

import errno
import mmap
import os
import random
import signal
import subprocess
import threading
import time

from conftest import PAGE, PUNCH_HOLE, Daemon, fallocate, race, requires_fuse, zramfs_daemon

ALLOWED_ERRNOS = {errno.EIO, errno.EBUSY, errno.ENOENT, errno.ENODEV, errno.EINVAL,
                  errno.ENOSPC}


def test_readers_never_see_a_mixed_page(daemon: Daemon) -> None:
    name = daemon.device("1M")
    patterns = [bytes([i]) * 1000 + random.Random(i).randbytes(96) + bytes([i]) * 3000
                for i in range(1, 9)]
    allowed = set(patterns) | {bytes(PAGE)}
    stop = threading.Event()
    bad: list[bytes] = []
    reads = [0]

    def writer() -> None:
        fd = os.open(daemon.dev(name), os.O_WRONLY | os.O_DIRECT)
        buf = mmap.mmap(-1, PAGE)
        try:
            i = 0
            while not stop.is_set():
                buf[:] = patterns[i % len(patterns)]
                os.pwritev(fd, [buf], PAGE)
                i += 1
        finally:
            os.close(fd)

    def reader() -> None:
        fd = os.open(daemon.dev(name), os.O_RDONLY | os.O_DIRECT)
        buf = mmap.mmap(-1, PAGE)
        try:
            for _ in range(3000):
                os.preadv(fd, [buf], PAGE)
                reads[0] += 1
                if buf[:] not in allowed:
                    bad.append(buf[:])
                    return
        finally:
            os.close(fd)

    race(stop, [writer], [reader] * 3)
    assert not bad, f"a reader saw a page that was never written ({len(bad)} times)"
    assert reads[0] == 9000


def test_twins_written_read_and_discarded_through_the_mount(daemon: Daemon) -> None:
    """Dedup on: writers put a few patterns on pages that readers read and a discarder
    punches, so a page is written while its twin is read, and a shared object is freed by one
    page while another reads it. Readers see one whole pattern or zeros; the statistics add
    up once everything has stopped."""
    name = daemon.hot_add()
    daemon.write(name, "dedup", "1")
    daemon.write(name, "disksize", "1M")
    npages = 32
    patterns = [(bytes([i]) * 7 + b"twin" + bytes([i + 1]) * 5) * 256 for i in range(1, 5)]
    allowed = set(patterns) | {bytes(PAGE)}
    stop = threading.Event()
    bad: list[int] = []

    def writer(seed: int) -> None:
        rng = random.Random(seed)
        fd = os.open(daemon.dev(name), os.O_WRONLY | os.O_DIRECT)
        buf = mmap.mmap(-1, PAGE)
        try:
            while not stop.is_set():
                buf[:] = rng.choice(patterns)
                os.pwritev(fd, [buf], rng.randrange(npages) * PAGE)
        finally:
            os.close(fd)

    def discarder() -> None:
        rng = random.Random(9)
        while not stop.is_set():
            fallocate(daemon.dev(name), PUNCH_HOLE, rng.randrange(npages) * PAGE, PAGE)

    def reader() -> None:
        rng = random.Random()
        fd = os.open(daemon.dev(name), os.O_RDONLY | os.O_DIRECT)
        buf = mmap.mmap(-1, PAGE)
        try:
            for _ in range(3000):
                page = rng.randrange(npages)
                os.preadv(fd, [buf], page * PAGE)
                if buf[:] not in allowed:
                    bad.append(page)
                    return
        finally:
            os.close(fd)

    race(stop, [lambda: writer(1), lambda: writer(2), discarder], [reader] * 2)
    assert not bad, f"a reader saw a page that was never written (pages {bad})"
    with open(daemon.dev(name), "rb") as f:
        stored = sum(1 for _ in range(npages) if any(f.read(PAGE)))
    dup, saved, entries = map(int, daemon.read(name, "dedup_stat").split())
    orig, compr = daemon.mm_stat(name)[:2]
    assert orig == stored * PAGE and dup + entries == stored and entries <= len(patterns)
    assert compr <= entries * PAGE and saved <= dup * PAGE   # the shared objects once each
    daemon.write(name, "reset", "1")


def test_control_ops_against_io_cycles(daemon: Daemon) -> None:
    """reset, disksize, compact, hot_add/hot_remove loop while others open, write and close.
    The daemon stays up, every error is a kernel errno, and memory returns after reset."""
    name = daemon.device("64M")
    baseline = daemon.rss()
    stop = threading.Event()
    errors: list[str] = []
    done = {"io": 0, "reset": 0, "hot": 0}

    def guarded(kind: str, fn) -> None:
        while not stop.is_set():
            try:
                fn()
                done[kind] += 1
            except OSError as e:
                if e.errno not in ALLOWED_ERRNOS:
                    errors.append(f"{kind}: {e!r}")
                    return

    def io() -> None:
        with open(daemon.dev(name), "r+b", buffering=0) as f:
            f.seek(random.randrange(0, 60) << 20)
            f.write(os.urandom(PAGE) * 64)

    def control() -> None:
        daemon.write(name, "compact", "1")
        daemon.write(name, "reset", "1")
        daemon.write(name, "disksize", "64M")

    def hot() -> None:
        other = daemon.device("8M")
        with open(daemon.dev(other), "r+b") as f:
            f.write(b"x" * PAGE * 8)
        # close() returns before the kernel's RELEASE reaches the daemon (FUSE sends it on
        # its own): until then the device is open, and hot_remove is EBUSY, as the kernel's.
        deadline = time.monotonic() + 5
        while True:
            try:
                daemon.hot_remove(other)
                return
            except OSError as e:
                if e.errno != errno.EBUSY or time.monotonic() > deadline:
                    raise
                time.sleep(0.01)

    threads = [threading.Thread(target=guarded, args=(k, fn))
               for k, fn in (("io", io), ("io", io), ("reset", control), ("hot", hot))]
    for t in threads:
        t.start()
    time.sleep(8)
    stop.set()
    for t in threads:
        t.join()
    assert not errors, errors
    assert daemon.alive()
    assert all(done.values()), done
    if daemon.read(name, "initstate") == "0\n":
        daemon.write(name, "disksize", "64M")
    daemon.write(name, "reset", "1")
    assert daemon.mm_stat(name) == [0] * 9
    assert sorted(os.listdir(daemon.mnt / "dev")) == [name]
    assert daemon.rss() < baseline + (32 << 20), (daemon.rss(), baseline)


@requires_fuse
def test_sigterm_with_io_in_flight(tmp_path) -> None:
    """Shutdown drains the requests in flight and exits 0; the writer sees errors; nothing
    hangs. (fio holds the device open: only --force-after makes the daemon go under it.)"""
    with zramfs_daemon("--force-after", "0") as daemon:
        name = daemon.device("512M")
        fio = subprocess.Popen(
            ["fio", "--name=load", f"--filename={daemon.dev(name)}", "--rw=randwrite",
             "--bs=64k", "--ioengine=libaio", "--direct=1", "--iodepth=16", "--numjobs=2",
             "--size=256M", "--time_based", "--runtime=60", "--offset_increment=256M"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=tmp_path)
        try:
            deadline = time.monotonic() + 20
            while daemon.mm_stat(name)[0] < 16 << 20 and time.monotonic() < deadline:
                time.sleep(0.05)
            assert daemon.mm_stat(name)[0] >= 16 << 20, "fio never got going"
            daemon.proc.send_signal(signal.SIGTERM)
            assert daemon.proc.wait(30) == 0, daemon.log.read_text()
            assert fio.wait(30) != 0                  # its writes failed once we went
        finally:
            if fio.poll() is None:
                fio.kill()
                fio.wait()
        log = daemon.log.read_text()
        assert "Traceback" not in log, log
        assert "zram0: reset" in log and "stopped" in log
