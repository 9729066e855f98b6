"""Live restart against reclaim (hazard 6): the kept pages must stay out of swap while no
daemon serves, or the successor's adoption waits on a swap write that only it could serve;
and the daemon locks its memory whenever one of its devices is swap, however the swap was
set up. The test plays the service manager (tests/manager.py), so the gap between a killed
daemon and its successor lasts as long as the test wants.
"""
from __future__ import annotations

import ctypes
import hashlib
import mmap
import os
import random
import signal
from pathlib import Path


from conftest import Cleanup, Daemon, requires_fuse, run, wait_for, zramfs_daemon
from manager import Manager, children, servings, stop
from test_restart_load import (SERVE_BOUND, SWAP_PRIORITY, abort_if_down, next_serves,
                               start_next, top_swaps_besides)
from test_ops import zramfs
from test_system import MiB, swapoff_if_on

pytestmark = requires_fuse

MADV_PAGEOUT = 21
SEEK_DATA, SEEK_HOLE = 3, 4
DATA_MIB = 32
_libc = ctypes.CDLL(None, use_errno=True)
_libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
_libc.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_char_p]
_libc.mmap.restype = ctypes.c_void_p
_libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int,
                       ctypes.c_int, ctypes.c_long]
_libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]


def status_kib(pid: int, field: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise AssertionError(f"no {field} for {pid}")


def keepers(pid: int) -> list[int]:
    """The daemon's children that share its memory (the keeper, zramfs.service.reclaim)."""
    mine = os.stat(f"/proc/{pid}/exe")
    return [c for c in children(pid)
            if Path(f"/proc/{c}/comm").read_text() == Path(f"/proc/{pid}/comm").read_text()
            and os.stat(f"/proc/{c}/exe") == mine]


def data_runs(fd: int, size: int) -> list[tuple[int, int]]:
    """The memfd's (offset, length) runs that hold pages (SEEK_DATA/SEEK_HOLE)."""
    runs, off = [], 0
    while off < size:
        try:
            start = os.lseek(fd, off, SEEK_DATA)
        except OSError:
            break
        end = os.lseek(fd, start, SEEK_HOLE)
        runs.append((start, end - start))
        off = end
    return runs


def resident(addr: int, length: int) -> int:
    vec = ctypes.create_string_buffer(length // mmap.PAGESIZE)
    assert _libc.mincore(addr, length, vec) == 0, os.strerror(ctypes.get_errno())
    return sum(b & 1 for b in vec.raw)


def page_out(fd: int, limit: int) -> tuple[int, int]:
    """What reclaim would do to the kept pool in the gap, up to `limit` bytes of its pages:
    each data run mapped here, its pages touched (only pages mapped in this process can be
    paged out from here; holes are left alone, a read fault would fill them), then
    MADV_PAGEOUT. The pages touched, and how many of them are still resident after."""
    size = os.fstat(fd).st_size
    base = _libc.mmap(None, size, mmap.PROT_READ, mmap.MAP_SHARED, fd, 0)
    assert base not in (None, ctypes.c_void_p(-1).value), os.strerror(ctypes.get_errno())
    touched = still = 0
    try:
        for off, length in data_runs(fd, size):
            length = min(length, limit - touched * mmap.PAGESIZE)
            if length <= 0:
                break
            for p in range(off, off + length, mmap.PAGESIZE):
                ctypes.string_at(base + p, 1)            # faulted in: mapped here
            touched += length // mmap.PAGESIZE
            assert _libc.madvise(base + off, length, MADV_PAGEOUT) == 0, \
                os.strerror(ctypes.get_errno())
            still += resident(base + off, length)
    finally:
        _libc.munmap(base, size)
    return touched, still


def fill(d: Daemon, name: str, mib: int) -> str:
    """`mib` MiB of pages that compress to about 40 % written to the device file, so the pool
    holds several MiB; their sha256."""
    h = hashlib.sha256()
    rng = random.Random(name)
    with open(d.dev(name), "r+b", buffering=0) as f:
        for _ in range(mib * MiB // 4096):
            page = rng.randbytes(1536) + bytes(2560)
            h.update(page)
            f.write(page)
        os.fsync(f.fileno())
    return h.hexdigest()


def digest(d: Daemon, name: str, mib: int) -> str:
    h = hashlib.sha256()
    with open(d.dev(name), "rb", buffering=0) as f:
        for _ in range(mib * MiB // (1 * MiB)):
            h.update(f.read(MiB))
    return h.hexdigest()


def test_kept_pages_paged_out_in_the_gap_are_adopted_under_swap(tmp_path: Path,
                                                                 cleanup: Cleanup) -> None:
    """Swap on one device (set up with `zramfs swapon`: the daemon locks its memory then),
    data on another; the daemon SIGKILL'd, and in the gap reclaim is asked to page out the
    kept pool (MADV_PAGEOUT over the pages the pool's memfd holds), which would put them on
    the dead daemon's own swap. They stay resident (the dead daemon's keeper holds them
    locked), the next daemon adopts and serves within the bound, the data reads back, and
    the keeper is gone once it has."""
    mgr = Manager(cleanup)
    args = ("--fuse-transport", "classic")
    with zramfs_daemon(env=mgr.env(), tmp=tmp_path) as d, abort_if_down(d, mgr):
        swap_dev = d.device("256M", "lz4")
        wait_for(lambda: not top_swaps_besides(""), 60,
                 f"another swap at priority {SWAP_PRIORITY} to go")
        loop = zramfs("swapon", swap_dev, "--priority", str(SWAP_PRIORITY),
                      "--mountpoint", str(d.mnt)).stdout.strip()
        d.cleanup.push(f"losetup -d {loop}", lambda: run("losetup", "-d", loop, check=False))
        d.cleanup.push(f"swapoff {loop}", lambda: swapoff_if_on(loop))
        wait_for(lambda: keepers(d.proc.pid), 10, "the daemon to lock its memory")
        keeper = keepers(d.proc.pid)[0]
        assert status_kib(d.proc.pid, "VmLck") > 0
        name = d.device("256M", "lz4")
        want = fill(d, name, DATA_MIB)
        mgr.pump(0.2)
        pool = next(fd for n, fd in mgr.store.items()
                    if n.startswith(f"{name}.") and n.endswith(".pool"))

        d.proc.send_signal(signal.SIGKILL)
        mgr.wait(lambda: d.proc.poll() is not None, "the killed daemon to end")
        mgr.pump(0.05)
        assert Path(f"/proc/{keeper}").exists(), "the keeper died with the daemon"
        touched, still = page_out(pool, 8 * MiB)
        print(f"in the gap: {touched} pages of the kept pool touched and paged out, "
              f"{still} still resident")
        assert touched >= 8 * MiB // 4096 and still == touched, (touched, still)

        before = servings(d)
        start_next(d, mgr, *args)
        next_serves(d, mgr, before, SERVE_BOUND, "the kill")
        wait_for(lambda: not Path(f"/proc/{keeper}").exists()
                 or Path(f"/proc/{keeper}/stat").read_text().split(") ")[1][0] == "Z", 30,
                 "the old keeper to end")
        assert digest(d, name, DATA_MIB) == want
        assert keepers(d.proc.pid), "the next daemon (swap in use) did not lock its memory"
        run("swapoff", loop, timeout=120)
        run("losetup", "-d", loop, timeout=60)
        stop(d, mgr)


def test_swap_set_up_by_hand_locks_the_daemon(tmp_path: Path) -> None:
    """--mlock auto and no swap in the config: nothing locked; swap put on a device by hand
    (losetup, mkswap, swapon) locks the daemon's memory and starts its keeper at once."""
    with zramfs_daemon(tmp=tmp_path) as d:
        name = d.device("64M", "lz4")
        assert status_kib(d.proc.pid, "VmLck") == 0 and not keepers(d.proc.pid)
        loop = d.losetup(name)
        run("mkswap", loop, timeout=60)
        run("swapon", "-p", "10", loop, timeout=60)
        d.cleanup.push(f"swapoff {loop}", lambda: swapoff_if_on(loop))
        wait_for(lambda: keepers(d.proc.pid), 10, "the daemon to lock its memory")
        assert status_kib(d.proc.pid, "VmLck") > 0
        assert "swap on this daemon's devices; locking its memory" in d.log.read_text()
        run("swapoff", loop, timeout=60)
