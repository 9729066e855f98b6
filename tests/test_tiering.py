"""Tiering: the attribute syntax (here), and writeback, recompression and eviction on a real
mount (below)."""
from __future__ import annotations

import pytest

from zramfs.sysfs.tiering_args import (Recompress, Writeback, parse_idle, parse_recomp_algorithm,
                            parse_recompress, parse_writeback)


@pytest.mark.parametrize("text,want", [
    ("idle", Writeback("idle")),
    ("huge_idle\n", Writeback("huge_idle")),
    ("type=incompressible", Writeback("incompressible")),
    ("page_index=7", Writeback(None, [(7, 7)])),
    ("page_indexes=1-100 page_index=200 page_indexes=300-301",
     Writeback(None, [(1, 100), (200, 200), (300, 301)])),
])
def test_writeback_syntax(text: str, want: Writeback) -> None:
    assert parse_writeback(text) == want


@pytest.mark.parametrize("text", ["", "cold", "type=cold", "page_index=x", "page_indexes=5-1",
                                  "page_indexes=5", "type=idle page_index=1",
                                  "type=idle type=huge", "idle huge"])
def test_writeback_syntax_errors(text: str) -> None:
    with pytest.raises(ValueError):
        parse_writeback(text)


def test_idle_syntax() -> None:
    assert parse_idle("all\n") is None
    assert parse_idle("86400") == 86400
    for bad in ("0", "-5", "soon", ""):
        with pytest.raises(ValueError):
            parse_idle(bad)


def test_recomp_algorithm_syntax() -> None:
    assert parse_recomp_algorithm("algo=zstd priority=1") == (1, "zstd", None)
    assert parse_recomp_algorithm("algo=lz4hc priority=3 level=12") == (3, "lz4hc", 12)
    assert parse_recomp_algorithm("algo=zstd") == (1, "zstd", None)
    for bad in ("priority=1", "algo=zstd priority=4", "algo=zstd priority=0",
                "algo=zstd level=x", "algo=zstd dict=/x"):
        with pytest.raises(ValueError):
            parse_recomp_algorithm(bad)


def test_recompress_syntax() -> None:
    assert parse_recompress("type=idle") == Recompress("idle")
    assert parse_recompress("threshold=3000") == Recompress(None, 3000)
    assert parse_recompress("type=huge algo=zstd max_pages=10") == \
        Recompress("huge", 0, 10, "zstd")
    assert parse_recompress("type=huge_idle priority=2").priority == 2
    for bad in ("", "type=all", "threshold=0", "max_pages=-1", "type=idle colour=red"):
        with pytest.raises(ValueError):
            parse_recompress(bad)


# --- on a real mount -----------------------------------------------------------------------

import errno  # noqa: E402
import mmap  # noqa: E402
import os  # noqa: E402
import random  # noqa: E402
import re  # noqa: E402
import signal  # noqa: E402
import subprocess  # noqa: E402
import threading  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

from conftest import (PAGE, Daemon, is_mounted, race, requires_fuse, run,  # noqa: E402
                      zramfs_daemon)


def errno_of(fn) -> int:
    with pytest.raises(OSError) as e:
        fn()
    return e.value.errno


def backing_file(tmp_path: Path, size: int) -> Path:
    path = tmp_path / "backing"
    with open(path, "wb") as f:
        f.truncate(size)
    return path


def text_pages(n: int, seed: int = 0) -> bytes:
    """Compressible, distinct pages: words with a page number."""
    rng = random.Random(seed)
    words = [b"zram", b"swap", b"page", b"slot", b"idle", b"writeback", b"compressed"]
    out = bytearray()
    for i in range(n):
        page = b"%08d " % i + b" ".join(rng.choice(words) for _ in range(700))
        out += page[:PAGE].ljust(PAGE, b".")
    return bytes(out)


def bd_stat(d: Daemon, name: str) -> list[int]:
    return [int(x) for x in d.read(name, "bd_stat").split()]


def tiered_device(d: Daemon, backing: Path | str, size: str = "64M", **extra: str) -> str:
    name = d.hot_add()
    d.write(name, "backing_dev", str(backing))
    for attr, value in extra.items():
        d.write(name, attr, value)
    d.write(name, "disksize", size)
    return name


@requires_fuse
def test_tiering_attributes_and_errors(daemon: Daemon, tmp_path: Path) -> None:
    name = daemon.hot_add()
    assert daemon.read(name, "backing_dev") == "none\n"
    assert daemon.read(name, "bd_stat") == "       0        0        0\n"
    assert daemon.read(name, "writeback_limit") == "0\n"
    assert daemon.read(name, "writeback_limit_enable") == "0\n"
    assert daemon.read(name, "recomp_algorithm") == ""
    assert errno_of(lambda: daemon.write(name, "backing_dev", str(tmp_path / "no"))) == errno.ENOENT
    assert errno_of(lambda: daemon.write(name, "backing_dev", str(tmp_path))) == errno.EINVAL
    assert errno_of(lambda: daemon.write(name, "idle", "all")) == errno.EINVAL     # not init
    assert errno_of(lambda: daemon.write(name, "recomp_algorithm", "algo=842")) == errno.EINVAL
    daemon.write(name, "recomp_algorithm", "algo=zstd priority=1")
    daemon.write(name, "recomp_algorithm", "algo=lz4hc priority=2 level=12")
    assert daemon.read(name, "recomp_algorithm") == \
        "#1: lzo-rle lzo lz4 lz4hc [zstd] deflate \n#2: lzo-rle lzo lz4 [lz4hc] zstd deflate \n"
    daemon.write(name, "algorithm_params", "algo=zstd level=19")
    path = backing_file(tmp_path, 8 << 20)
    daemon.write(name, "backing_dev", str(path))
    assert daemon.read(name, "backing_dev") == f"{path}\n"
    daemon.write(name, "disksize", "16M")
    assert errno_of(lambda: daemon.write(name, "backing_dev", str(path))) == errno.EBUSY
    assert errno_of(lambda: daemon.write(name, "recomp_algorithm", "algo=zstd")) == errno.EBUSY
    for attr, bad in (("writeback", "cold"), ("writeback", "page_indexes=9-1"),
                      ("idle", "0"), ("recompress", "type=all"), ("writeback_limit", "x")):
        assert errno_of(lambda: daemon.write(name, attr, bad)) == errno.EINVAL, (attr, bad)
    other = daemon.device("8M")
    assert errno_of(lambda: daemon.write(other, "writeback", "huge")) == errno.ENODEV
    assert errno_of(lambda: daemon.write(other, "recompress", "type=huge")) == errno.EINVAL
    daemon.write(name, "reset", "1")                     # reset: no backing device, no recomp
    assert daemon.read(name, "backing_dev") == "none\n"
    assert daemon.read(name, "recomp_algorithm") == ""


@requires_fuse
@pytest.mark.parametrize("kind", ["file", "loop"])
def test_writeback_frees_memory_and_reads_back(daemon: Daemon, tmp_path: Path, kind: str) -> None:
    path = backing_file(tmp_path, 64 << 20)
    backing: str = str(path)
    if kind == "loop":
        backing = run("losetup", "--find", "--show", str(path)).stdout.strip()
        daemon.cleanup.push(f"losetup -d {backing}", lambda: run("losetup", "-d", backing))
    name = tiered_device(daemon, backing)
    data = text_pages(2048) + os.urandom(64 * PAGE) + b"\x01" * (4 * PAGE)
    with open(daemon.dev(name), "r+b") as f:
        f.write(data)
    orig, compr, used, *_ = daemon.mm_stat(name)
    huge = daemon.mm_stat(name)[7]
    assert huge == 64
    daemon.write(name, "writeback", "huge")
    assert bd_stat(daemon, name) == [64, 0, 64]
    assert daemon.mm_stat(name)[7] == 0
    daemon.write(name, "idle", "all")
    daemon.write(name, "writeback", "idle")
    daemon.write(name, "compact", "1")
    orig2, compr2, used2, *_ = daemon.mm_stat(name)
    assert bd_stat(daemon, name)[0] == 2048 + 64            # same-filled pages stay
    assert orig2 == orig and compr2 == 0 and used2 <= 4 * PAGE < used
    # An aligned buffer: FUSE splits direct I/O at the user buffer's page boundaries, and an
    # unaligned one would read the device pages astride them twice.
    buf = mmap.mmap(-1, len(data))
    fd = os.open(daemon.dev(name), os.O_RDONLY | os.O_DIRECT)
    try:
        assert os.preadv(fd, [buf], 0) == len(data)
    finally:
        os.close(fd)
    assert buf[:] == data
    assert bd_stat(daemon, name)[1] == 2048 + 64            # every page read back once
    with open(daemon.dev(name), "r+b") as f:                # overwrite: the block is freed
        f.write(b"y" * PAGE)
    assert bd_stat(daemon, name)[0] == 2048 + 63


@requires_fuse
def test_idle_by_age_page_indexes_limit_and_full(daemon: Daemon, tmp_path: Path) -> None:
    name = tiered_device(daemon, backing_file(tmp_path, 100 * PAGE))
    with open(daemon.dev(name), "r+b") as f:
        f.write(text_pages(50))                         # pages 0..49: old
        f.flush()
        time.sleep(2.5)
        f.seek(100 * PAGE)
        f.write(text_pages(50, seed=1))                 # pages 100..149: new
    daemon.write(name, "idle", "2")                     # not accessed for 2 s: the old ones
    daemon.write(name, "writeback", "type=idle")
    assert bd_stat(daemon, name)[0] == 50
    daemon.write(name, "writeback", "page_indexes=100-109 page_index=120")
    assert bd_stat(daemon, name)[0] == 61
    daemon.write(name, "writeback_limit", "5")
    daemon.write(name, "writeback_limit_enable", "1")
    assert errno_of(lambda: daemon.write(name, "writeback", "page_indexes=110-119")) == errno.EIO
    assert bd_stat(daemon, name)[0] == 66 and daemon.read(name, "writeback_limit") == "0\n"
    daemon.write(name, "writeback_limit_enable", "0")
    daemon.write(name, "writeback_limit", "0")
    with open(daemon.dev(name), "r+b") as f:
        f.seek(200 * PAGE)
        f.write(text_pages(60, seed=2))
    assert errno_of(lambda: daemon.write(name, "writeback", "page_indexes=200-259")) == errno.ENOSPC
    assert bd_stat(daemon, name)[0] == 100              # the device is full
    with open(daemon.dev(name), "rb") as f:
        assert f.read(50 * PAGE) == text_pages(50)
        f.seek(100 * PAGE)
        assert f.read(50 * PAGE) == text_pages(50, seed=1)
        f.seek(200 * PAGE)
        assert f.read(60 * PAGE) == text_pages(60, seed=2)


@requires_fuse
def test_recompress_while_writeback_runs_is_eagain(daemon: Daemon, tmp_path: Path) -> None:
    """One tiering job a time. (A second write to the same attribute file does not get here:
    the kernel holds the file's inode lock across a FUSE direct write, so it waits its turn.)"""
    name = tiered_device(daemon, backing_file(tmp_path, 512 << 20), "512M",
                         recomp_algorithm="algo=zstd priority=1")
    with open(daemon.dev(name), "r+b") as f:
        f.write(os.urandom(256 << 20))                  # huge pages: a long writeback
    outcome: list[object] = []
    first = threading.Thread(target=lambda: outcome.append(daemon.write(name, "writeback", "huge")))
    first.start()
    while bd_stat(daemon, name)[2] == 0 and first.is_alive():
        time.sleep(0.001)                               # until the first is under way
    assert first.is_alive(), "the first writeback ended before it could be raced"
    assert errno_of(lambda: daemon.write(name, "recompress", "type=huge")) == errno.EAGAIN
    first.join()
    assert outcome == [None]
    assert bd_stat(daemon, name)[0] == 65536           # the first one finished its job


def _job(fn) -> tuple[threading.Thread, list]:
    """`fn()` in a thread; its outcome, None or the OSError's errno, in the list."""
    outcome: list = []

    def run() -> None:
        try:
            outcome.append(fn())
        except OSError as e:
            outcome.append(e.errno)
    thread = threading.Thread(target=run)
    thread.start()
    return thread, outcome


@requires_fuse
def test_reset_and_hot_remove_cancel_a_running_writeback(daemon: Daemon, tmp_path: Path) -> None:
    """Hazard 1 for maintenance: a writeback running in worker threads holds the meta, so
    reset (and hot_remove) wait for it instead of freeing the meta under it; they cancel it
    first (its writer gets ECANCELED), so they wait for one batch, not the whole job."""
    for removal in ("reset", "hot_remove"):
        name = tiered_device(daemon, backing_file(tmp_path, 300 << 20), "300M")
        with open(daemon.dev(name), "r+b") as f:
            f.write(os.urandom(256 << 20))
        job, outcome = _job(lambda: daemon.write(name, "writeback", "huge"))
        while bd_stat(daemon, name)[2] == 0 and job.is_alive():
            time.sleep(0.001)
        if removal == "reset":
            daemon.write(name, "reset", "1")
            assert daemon.read(name, "initstate") == "0\n"
        else:
            daemon.hot_remove(name)
            assert not daemon.dev(name).exists()
        job.join()
        assert outcome == [errno.ECANCELED]
        assert daemon.alive()


def _signalled_writer(daemon: Daemon, name: str, attr: str, value: str, moved) -> int:
    """`echo VALUE > ATTR` in a shell, sent SIGTERM once `moved()` says its job is under way
    (the kernel turns the signal into a FUSE INTERRUPT); the shell's exit status."""
    shell = subprocess.Popen(["sh", "-c", f"echo {value} > {daemon.sys(name, attr)}"])
    try:
        while not moved() and shell.poll() is None:
            time.sleep(0.001)
        shell.send_signal(signal.SIGTERM)
        return shell.wait(timeout=120)
    finally:
        if shell.poll() is None:
            shell.kill()
            shell.wait()


@requires_fuse
def test_a_signalled_writer_cancels_its_writeback_or_recompression(daemon: Daemon,
                                                                   tmp_path: Path) -> None:
    """Ctrl-C (here SIGTERM) on `echo ... > recompress` or `> writeback`: the kernel sends a FUSE
    INTERRUPT, the job stops at its next batch, the pages it moved stay moved, every page
    reads back, and the same command again does the rest."""
    name = tiered_device(daemon, backing_file(tmp_path, 300 << 20), "300M",
                         recomp_algorithm="algo=zstd priority=1 level=19",
                         writeback_batch_size="1")
    data = text_pages(16384)
    with open(daemon.dev(name), "r+b") as f:
        f.write(data)
    compr = daemon.mm_stat(name)[1]
    status = _signalled_writer(daemon, name, "recompress", "threshold=1",
                               lambda: daemon.mm_stat(name)[1] != compr)
    assert status == -signal.SIGTERM
    assert "recompress threshold=1: recompression cancelled after" in daemon.log.read_text()
    partly = daemon.mm_stat(name)[1]
    daemon.write(name, "recompress", "threshold=1")             # the rest
    assert daemon.mm_stat(name)[1] < partly < compr
    daemon.write(name, "idle", "all")
    status = _signalled_writer(daemon, name, "writeback", "idle",
                               lambda: bd_stat(daemon, name)[0] > 0)
    assert status == -signal.SIGTERM
    assert 0 < bd_stat(daemon, name)[0] < 16384
    daemon.write(name, "writeback", "idle")                     # the rest, still idle
    assert bd_stat(daemon, name)[0] == 16384
    with open(daemon.dev(name), "rb") as f:
        assert f.read(len(data)) == data


@requires_fuse
def test_recompression_shrinks_and_reads_back(daemon: Daemon, tmp_path: Path) -> None:
    name = daemon.hot_add()
    daemon.write(name, "recomp_algorithm", "algo=zstd priority=1 level=19")
    daemon.write(name, "disksize", "64M")
    data = text_pages(4096) + os.urandom(16 * PAGE)
    with open(daemon.dev(name), "r+b") as f:
        f.write(data)
    _, compr, *_ = daemon.mm_stat(name)
    daemon.write(name, "idle", "all")
    daemon.write(name, "recompress", "type=idle")
    _, compr2, *_, huge, _ = daemon.mm_stat(name)
    assert compr2 < compr * 0.8, (compr, compr2)        # zstd-19 packs text far tighter
    assert huge == 16                                    # random pages stay as they were
    daemon.write(name, "recompress", "type=huge max_pages=4")
    with open(daemon.dev(name), "rb") as f:
        assert f.read(len(data)) == data


@requires_fuse
def test_read_back_under_same_page_overwrite_during_writeback(daemon: Daemon,
                                                             tmp_path: Path) -> None:
    """Hazard 2 with a backing device: readers see one whole version of a page while it is
    written back, overwritten and discarded at once."""
    name = tiered_device(daemon, backing_file(tmp_path, 64 << 20), "8M")
    patterns = [bytes([i]) * 1000 + random.Random(i).randbytes(96) + bytes([i]) * 3000
                for i in range(1, 9)]
    allowed = set(patterns) | {bytes(PAGE)}
    stop = threading.Event()
    bad: list[bytes] = []
    errors: list[str] = []

    def writer() -> None:
        with open(daemon.dev(name), "r+b", buffering=0) as f:
            i = 0
            while not stop.is_set():
                f.seek(PAGE)
                f.write(patterns[i % len(patterns)])
                if i % 97 == 0:
                    os.posix_fadvise(f.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)
                i += 1

    def tierer() -> None:
        while not stop.is_set():
            try:
                daemon.write(name, "writeback", "page_index=1")
                daemon.write(name, "idle", "all")
                daemon.write(name, "writeback", "idle")
            except OSError as e:
                if e.errno != errno.EAGAIN:
                    errors.append(repr(e))
                    return

    def reader() -> None:
        # 3000 reads at least, and on until the tierer has written back more than 10 times
        # (within 30 s): how fast reads go must not decide whether the race was run.
        deadline = time.monotonic() + 30
        with open(daemon.dev(name), "rb", buffering=0) as f:
            reads = 0
            while reads < 3000 or (bd_stat(daemon, name)[2] <= 10
                                   and time.monotonic() < deadline):
                f.seek(PAGE)
                got = f.read(PAGE)
                if got not in allowed:
                    bad.append(got)
                    return
                reads += 1

    race(stop, [writer, tierer], [reader] * 2)
    assert not errors and not bad
    assert bd_stat(daemon, name)[2] > 10                 # writebacks really happened


@requires_fuse
@pytest.mark.slow
def test_eviction_keeps_memory_within_the_limit(daemon: Daemon, tmp_path: Path) -> None:
    """zswap-style: with a 16 MiB mem_limit and a backing file, 256 MiB of compressible data
    goes in, reads back identical, and mem_used_total stays within the limit."""
    name = tiered_device(daemon, backing_file(tmp_path, 320 << 20), "320M",
                         mem_limit="16M", writeback_evict="1")
    chunk = text_pages(4096)                             # 16 MiB, about a third once compressed
    with open(daemon.dev(name), "r+b") as f:
        for i in range(16):
            f.write(chunk[:64] + bytes([i]) * 64 + chunk[128:])
            assert daemon.mm_stat(name)[2] <= 16 << 20
    orig, compr, used, limit, *_ = daemon.mm_stat(name)
    evicted = int(daemon.read(name, "evict_stat"))
    assert orig == 256 << 20 and used <= limit == 16 << 20
    assert evicted > 0 and bd_stat(daemon, name)[0] == evicted
    assert daemon.mm_stat(name)[6] > 0                  # eviction compacted, and says so
    assert int(daemon.read(name, "io_stat").split()[1]) == 0         # no failed writes
    with open(daemon.dev(name), "rb") as f:
        for i in range(16):
            assert f.read(len(chunk)) == chunk[:64] + bytes([i]) * 64 + chunk[128:], i


@requires_fuse
def test_config_sets_up_writeback_and_recompression(tmp_path: Path) -> None:
    backing = backing_file(tmp_path, 16 << 20)
    conf = tmp_path / "zramfs.conf"
    conf.write_text(f"[zram0]\nzram-size = 64\ncompression-algorithm = lz4 zstd(level=9)\n"
                    f"writeback-device = {backing}\nwriteback-interval = 1s\n"
                    f"fs-type = ext4\nmount-point = {tmp_path / 'fs'}\n")
    with zramfs_daemon("--config", str(conf), tmp=tmp_path) as d:
        assert d.read("zram0", "backing_dev") == f"{backing}\n"
        assert d.read("zram0", "recomp_algorithm") == "#1: lzo-rle lzo lz4 lz4hc [zstd] deflate \n"
        (tmp_path / "fs" / "cold").write_bytes(text_pages(256))
        run("sync")
        deadline = time.monotonic() + 20                 # idle after one round, written next
        while bd_stat(d, "zram0")[0] == 0 and time.monotonic() < deadline:
            time.sleep(0.2)
        assert bd_stat(d, "zram0")[0] > 0
        run("sh", "-c", "echo 3 > /proc/sys/vm/drop_caches")
        assert (tmp_path / "fs" / "cold").read_bytes() == text_pages(256)
    assert not is_mounted(tmp_path / "fs")


@requires_fuse
def test_block_state_in_the_debugfs_mirror(daemon: Daemon, tmp_path: Path) -> None:
    """sys/kernel/debug/zram/zramN/block_state, as the kernel prints it: a line per stored
    page, its index, its access time, and its flags (s w h i r n)."""
    backing = tmp_path / "backing"
    backing.write_bytes(bytes(1 << 20))
    name = daemon.hot_add()
    daemon.write(name, "backing_dev", str(backing))
    daemon.write(name, "disksize", "1M")
    state = daemon.mnt / "sys/kernel/debug/zram" / name / "block_state"
    assert state.read_text() == ""
    with open(daemon.dev(name), "r+b", buffering=0) as f:
        f.write(bytes(PAGE))                                     # page 0: same-filled
        f.write(os.urandom(PAGE))                                # page 1: huge
        f.write((b"zram " * PAGE)[:PAGE])                        # page 2: compressed
        f.write((b"swap " * PAGE)[:PAGE])                        # page 3: written back
    daemon.write(name, "writeback", "page_index=3")
    daemon.write(name, "idle", "all")
    lines = state.read_text().splitlines()
    assert [line.split()[0] for line in lines] == ["0", "1", "2", "3"]
    flags = {int(line.split()[0]): line.split()[2] for line in lines}
    assert flags == {0: "s.....", 1: "..hi..", 2: "...i..", 3: ".w...."}   # as the kernel,
    # idle marks neither same-filled nor written-back pages
    assert all(re.fullmatch(r"\s+\d+\s+\d+\.\d{6} [swhirn.]{6}", line) for line in lines)


@requires_fuse
@pytest.mark.parametrize("terminal", [True, False], ids=["pty", "pipe"])
def test_writeback_and_recompress_commands_show_progress(daemon: Daemon, tmp_path: Path,
                                                         terminal: bool) -> None:
    """`zramfs writeback zramN idle` and `zramfs recompress zramN type=idle` go in batches and
    show pages done, memory freed and time left: one line rewritten on a terminal, a line a
    batch in a pipe. What they leave is what the attributes would: every idle page written
    back or recompressed, the data intact, writeback_limit as it was."""
    import pty
    import subprocess
    import sys
    backing = tmp_path / "backing"
    backing.write_bytes(bytes(64 << 20))
    name = daemon.hot_add()
    daemon.write(name, "backing_dev", str(backing))
    daemon.write(name, "recomp_algorithm", "algo=zstd priority=1 level=19")
    daemon.write(name, "disksize", "64M")
    rng = random.Random(7)                # words: zstd -19 shrinks lz4's pages a class or more
    words = [b"zram", b"page", b"swap", b"slot", b"compressed", b"memory", b"device", b"idle"]
    data = b"".join(b" ".join(rng.choice(words) for _ in range(900))[:PAGE].ljust(PAGE, b".")
                    for _ in range(4096))
    with open(daemon.dev(name), "r+b", buffering=0) as f:
        f.write(data)
    daemon.write(name, "idle", "all")
    state = daemon.mnt / "sys/kernel/debug/zram" / name / "block_state"

    def idle_in_memory() -> int:
        return sum(1 for line in state.read_text().splitlines()
                   if "i" in line.split()[2] and not set(line.split()[2]) & set("swrn"))

    def command(*args: str) -> str:
        cmd = [sys.executable, "-m", "zramfs.cli", args[0], "--mountpoint", str(daemon.mnt),
               *args[1:], "--batch", "1000"]
        if not terminal:
            out = subprocess.run(cmd, capture_output=True, text=True, timeout=300,
                                 cwd=Path(__file__).parent.parent)
            assert out.returncode == 0, out.stderr
            return out.stderr
        leader, follower = pty.openpty()
        proc = subprocess.Popen(cmd, stdin=follower, stdout=follower, stderr=follower,
                                cwd=Path(__file__).parent.parent)
        os.close(follower)
        chunks = []
        while True:
            try:
                chunk = os.read(leader, 4096)
            except OSError:
                break
            if not chunk:
                break
            chunks.append(chunk)
        os.close(leader)
        assert proc.wait(300) == 0, b"".join(chunks)
        return b"".join(chunks).decode()

    waiting, compr = idle_in_memory(), daemon.mm_stat(name)[1]
    assert waiting > 3000
    out = command("recompress", name, "type=idle")
    assert f"{name}: recompress type=idle: {waiting}/{waiting} pages" in out, out
    assert daemon.mm_stat(name)[1] < compr and idle_in_memory() == 0
    daemon.write(name, "idle", "all")
    waiting = sum(1 for line in state.read_text().splitlines()
                  if "i" in line.split()[2] and not set(line.split()[2]) & set("sw"))
    out = command("writeback", name, "idle")
    assert f"{name}: writeback idle: {waiting}/{waiting} pages" in out, out
    if terminal:
        assert "\r\x1b[K" in out and out.count("\n") <= 2
    else:
        assert "\r" not in out and out.count("pages, ") >= 3      # a line a batch of 1000
    assert bd_stat(daemon, name)[0] == waiting
    assert daemon.read(name, "writeback_limit_enable") == "0\n"
    with open(daemon.dev(name), "rb", buffering=0) as f:
        assert f.read(4096 * PAGE) == data


@requires_fuse
def test_compressed_writeback(daemon: Daemon, tmp_path: Path) -> None:
    """compressed_writeback (kernel 7.0): before disksize only (EBUSY after); pages go to the
    backing device as they were stored and are decompressed when read back: the data reads
    back identical, from the backing file, with the memory given back."""
    import corpus
    data = corpus.build(8 << 20)
    backing = tmp_path / "backing"
    backing.write_bytes(bytes(16 << 20))
    name = daemon.hot_add()
    assert daemon.read(name, "compressed_writeback") == "0\n"
    daemon.write(name, "backing_dev", str(backing))
    daemon.write(name, "compressed_writeback", "1")
    daemon.write(name, "disksize", "16M")
    assert errno_of(lambda: daemon.write(name, "compressed_writeback", "0")) == errno.EBUSY
    with open(daemon.dev(name), "r+b", buffering=0) as f:
        f.write(data)
    stored = daemon.mm_stat(name)
    daemon.write(name, "idle", "all")
    daemon.write(name, "writeback", "idle")
    after = daemon.mm_stat(name)
    assert bd_stat(daemon, name)[0] > 0.9 * (8 << 20) // PAGE - stored[5]
    assert after[1] < stored[1] // 20 and after[0] == stored[0]        # out of memory, kept
    with open(daemon.dev(name), "rb", buffering=0) as f:
        assert f.read(len(data)) == data
    assert bd_stat(daemon, name)[1] >= bd_stat(daemon, name)[0]        # read from the file
    daemon.write(name, "reset", "1")
    assert daemon.read(name, "compressed_writeback") == "0\n"


@requires_fuse
@pytest.mark.parametrize("batch", ["1", "32", "1024"])
def test_writeback_batch_size(daemon: Daemon, tmp_path: Path, batch: str) -> None:
    """writeback_batch_size (kernel 6.19): 32 by default, 0 is EINVAL; writeback keeps that
    many writes in flight, and whatever the batch, every page lands and reads back, while
    a writer rewrites some of them during the writeback (those stay in memory, new)."""
    import corpus
    data = bytearray(corpus.build(8 << 20))
    backing = tmp_path / "backing"
    backing.write_bytes(bytes(16 << 20))
    loop = run("losetup", "--direct-io=on", "--find", "--show", str(backing)).stdout.strip()
    daemon.cleanup.push(f"losetup -d {loop}", lambda: run("losetup", "-d", loop, check=False))
    name = daemon.hot_add()
    assert daemon.read(name, "writeback_batch_size") == "32\n"
    assert errno_of(lambda: daemon.write(name, "writeback_batch_size", "0")) == errno.EINVAL
    daemon.write(name, "backing_dev", loop)
    daemon.write(name, "disksize", "16M")
    daemon.write(name, "writeback_batch_size", batch)
    with open(daemon.dev(name), "r+b", buffering=0) as f:
        f.write(data)
        stop = threading.Event()

        def rewriter() -> None:
            rng = random.Random(5)
            with open(daemon.dev(name), "r+b", buffering=0) as g:
                while not stop.is_set():
                    page = rng.randrange(len(data) // PAGE)
                    new = rng.randbytes(PAGE)
                    g.seek(page * PAGE)
                    g.write(new)
                    data[page * PAGE:(page + 1) * PAGE] = new
                    time.sleep(0.001)              # a few hundred pages rewritten, not all

        t = threading.Thread(target=rewriter)
        t.start()
        try:
            daemon.write(name, "idle", "all")
            daemon.write(name, "writeback", "idle")
        finally:
            stop.set()
            t.join()
        assert bd_stat(daemon, name)[0] > 1000      # most of the 2048 pages went out
        f.seek(0)
        assert f.read(len(data)) == bytes(data)


@requires_fuse
def test_config_recompression_policy_runs_periodically(tmp_path: Path) -> None:
    """zram-generator's trailing group, `lz4 zstd(level=19) (type=idle)`: zram-generator
    parses it and never applies it; the daemon recompresses idle pages with it every
    recompress-interval (each round marking everything idle for the next)."""
    conf = tmp_path / "zramfs.conf"
    conf.write_text("[zram0]\nzram-size = 64\n"
                    "compression-algorithm = lz4 zstd(level=19) (type=idle)\n"
                    "recompress-interval = 1s\nfs-type = ext4\n"
                    f"mount-point = {tmp_path / 'fs'}\n")
    with zramfs_daemon("--config", str(conf), tmp=tmp_path) as d:
        (tmp_path / "fs" / "cold").write_bytes(text_pages(256))
        run("sync")
        state = d.mnt / "sys/kernel/debug/zram/zram0/block_state"
        deadline = time.monotonic() + 20                 # idle after one round, taken next
        while "r" not in "".join(line.split()[2] for line in state.read_text().splitlines()) \
                and time.monotonic() < deadline:
            time.sleep(0.2)
        flags = [line.split()[2] for line in state.read_text().splitlines()]
        assert any("r" in f for f in flags), "no page was recompressed"
        run("sh", "-c", "echo 3 > /proc/sys/vm/drop_caches")
        assert (tmp_path / "fs" / "cold").read_bytes() == text_pages(256)
    assert not is_mounted(tmp_path / "fs")


@pytest.mark.parametrize("primary,secondary", [("lzo-rle", "deflate"), ("lzo", "zstd"),
                                               ("deflate", "zstd"), ("lz4", "lzo")])
def test_recompression_to_and_from_the_kernels_other_algorithms(
        daemon: Daemon, primary: str, secondary: str) -> None:
    """The kernel's lzo, lzo-rle and deflate as the primary and as the recompression
    algorithm: the data reads back identical, and a denser second algorithm shrinks it."""
    name = daemon.hot_add()
    daemon.write(name, "comp_algorithm", primary)
    level = {"zstd": " level=19", "deflate": " level=9"}.get(secondary, "")
    daemon.write(name, "recomp_algorithm", f"algo={secondary} priority=1{level}")
    daemon.write(name, "disksize", "64M")
    data = text_pages(2048) + os.urandom(16 * PAGE)
    with open(daemon.dev(name), "r+b") as f:
        f.write(data)
    _, compr, *_ = daemon.mm_stat(name)
    daemon.write(name, "idle", "all")
    daemon.write(name, "recompress", "type=idle")
    _, compr2, *_ = daemon.mm_stat(name)
    if secondary in ("deflate", "zstd"):
        assert compr2 < compr, (compr, compr2)
    with open(daemon.dev(name), "rb") as f:
        assert f.read(len(data)) == data
