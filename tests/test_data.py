"""Data through a real mount: fio --verify, dd and pwrite at odd offsets, discard."""
from __future__ import annotations

import errno
import mmap
import os
import random
import shutil

import pytest

from conftest import PAGE, PUNCH_HOLE, ZERO_RANGE, Daemon, fallocate, run

pytestmark = pytest.mark.skipif(shutil.which("fio") is None, reason="no fio (Debian package fio)")


def fio(*args: str, cwd) -> str:
    out = run("fio", "--output-format=normal", "--verify_state_save=0", "--ioengine=libaio",
              "--direct=1", *args, check=False, cwd=cwd)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "verify:" not in out.stderr and "bad magic" not in out.stdout, out.stdout
    return out.stdout


@pytest.mark.parametrize("rw,bs,jobs,depth", [
    ("write", "1M", 1, 4),
    ("randwrite", "4k", 2, 32),
    ("randwrite", "64k", 2, 8),
    ("randrw", "16k", 2, 16),
])
def test_fio_verify(daemon: Daemon, tmp_path, rw: str, bs: str, jobs: int, depth: int) -> None:
    name = daemon.device("256M")
    fio("--name=verify", f"--filename={daemon.dev(name)}", f"--rw={rw}", f"--bs={bs}",
        f"--numjobs={jobs}", f"--iodepth={depth}", "--size=96M", "--offset_increment=128M",
        "--verify=crc32c", "--verify_fatal=1", "--do_verify=1",
        "--buffer_compress_percentage=50", "--refill_buffers", cwd=tmp_path)
    orig, compr, used, *_ = daemon.mm_stat(name)
    assert orig > 0 and compr > 0 and used >= compr


def test_fio_mixed_block_sizes_verify(daemon: Daemon, tmp_path) -> None:
    name = daemon.device("128M", "zstd")
    fio("--name=mixed", f"--filename={daemon.dev(name)}", "--rw=randwrite",
        "--bsrange=4k-1M", "--size=64M", "--iodepth=8", "--verify=crc32c", "--verify_fatal=1",
        "--do_verify=1", cwd=tmp_path)


def test_dd_round_trips_at_odd_offsets(daemon: Daemon, tmp_path) -> None:
    name = daemon.device("32M")
    src = tmp_path / "src"
    src.write_bytes(random.Random(1).randbytes(3 << 20) + b"zram " * 300007)
    for bs, seek in ((777, 13), (4096, 3), (1 << 20, 2), (512, 4097)):
        run("dd", f"if={src}", f"of={daemon.dev(name)}", f"bs={bs}", f"seek={seek}",
            "conv=notrunc", "status=none")
        back = tmp_path / "back"
        count = -(-src.stat().st_size // bs)
        run("dd", f"if={daemon.dev(name)}", f"of={back}", f"bs={bs}", f"skip={seek}",
            f"count={count}", "status=none")
        assert back.read_bytes()[: src.stat().st_size] == src.read_bytes(), (bs, seek)


def test_pwrite_pread_model(daemon: Daemon) -> None:
    """Random writes at any offset and length, buffered and O_DIRECT, against a bytearray."""
    size = 8 << 20
    name = daemon.device("8M")
    model = bytearray(size)
    rng = random.Random(7)
    fd = os.open(daemon.dev(name), os.O_RDWR)
    try:
        for _ in range(400):
            off = rng.randrange(size - 1)
            n = rng.randrange(1, min(size - off, 3 * PAGE) + 1)
            data = rng.choice([rng.randbytes(n), bytes([rng.randrange(256)]) * n, b"ab" * n])[:n]
            assert os.pwrite(fd, data, off) == n
            model[off : off + n] = data
            off = rng.randrange(size - 1)
            n = rng.randrange(1, min(size - off, 3 * PAGE) + 1)
            assert os.pread(fd, n, off) == model[off : off + n]
        assert os.pread(fd, size, 0) == model
        assert os.pread(fd, 100, size) == b""                  # end of the device
        with pytest.raises(OSError) as e:
            os.pwrite(fd, b"x", size)
        assert e.value.errno == errno.ENOSPC
    finally:
        os.close(fd)
    dfd = os.open(daemon.dev(name), os.O_RDONLY | os.O_DIRECT)
    try:
        buf = mmap.mmap(-1, 1 << 20)
        assert os.preadv(dfd, [buf], 3 << 20) == 1 << 20
        assert buf[:] == model[3 << 20 : 4 << 20]
    finally:
        os.close(dfd)


@pytest.mark.parametrize("mode", [PUNCH_HOLE, ZERO_RANGE])
def test_discard_frees_memory_and_reads_zeros(daemon: Daemon, mode: int) -> None:
    name = daemon.device("64M")
    data = random.Random(3).randbytes(32 << 20)
    with open(daemon.dev(name), "r+b") as f:
        f.write(data)
    orig, _, used, *_ = daemon.mm_stat(name)
    assert orig == 32 << 20 and used >= 32 << 20
    # A range with partial pages at both ends (whole 512-byte blocks, as a block device
    # takes): whole pages freed, the edges zeroed.
    start, end = 1024, (30 << 20) + 512
    fallocate(daemon.dev(name), mode, start, end - start)
    with open(daemon.dev(name), "rb") as f:
        back = f.read(32 << 20)
    assert back[:start] == data[:start]
    assert back[start:end] == bytes(end - start)
    assert back[end:] == data[end:]
    orig, _, used, *_ = daemon.mm_stat(name)
    assert orig <= (2 << 20) + 2 * PAGE and used <= (2 << 20) + 64 * PAGE
    with pytest.raises(OSError) as e:
        fallocate(daemon.dev(name), 0, 0, PAGE)               # plain allocation
    assert e.value.errno == errno.EOPNOTSUPP


def test_discard_through_a_loop_device(daemon: Daemon) -> None:
    """The loop driver turns blkdiscard into PUNCH_HOLE and blkdiscard -z into ZERO_RANGE."""
    name = daemon.device("64M")
    loop = daemon.losetup(name)
    run("dd", "if=/dev/urandom", f"of={loop}", "bs=1M", "count=48", "oflag=direct", "status=none")
    assert daemon.mm_stat(name)[0] == 48 << 20
    run("blkdiscard", "--offset", str(16 << 20), "--length", str(16 << 20), loop)
    assert daemon.mm_stat(name)[0] == 32 << 20
    run("blkdiscard", "-z", "--offset", "0", "--length", str(16 << 20), loop)
    assert daemon.mm_stat(name)[0] == 16 << 20
    with open(loop, "rb", buffering=0) as f:
        assert f.read(32 << 20) == bytes(32 << 20)
