"""Live restart's kept state at mount level: what a daemon does with kept state it cannot
read, and what ten restarts in a row cost.

- Refusal: the kept state made unreadable while no daemon runs (a slot table's magic, a pool's
  format version, the device record torn in both halves, the record's version). The next
  daemon refuses it with a message that names what is wrong and holds it all: no
  FDSTOREREMOVE reaches the manager, the tree stays mounted, its requests wait. With the
  bytes put back and SIGHUP (try again), it adopts and every page reads back as written.
- Cost: a device holding 64 MiB of mixed data, restarted ten times (SIGKILL and a graceful
  SIGHUP re-exec in turn), the data checked after each: the device uses the same memory at the
  end, and neither the daemon (RSS, descriptors) nor the manager's store grows.

The test plays the service manager (tests/manager.py); test_restart.py has the restarts
themselves, test_state.py the refusals without a mount.
"""
from __future__ import annotations

import contextlib
import os
import random
import re
import signal
import struct
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest

from conftest import (PAGE, PUNCH_HOLE, Cleanup, Daemon, fallocate, is_mounted, requires_fuse,
                      start_daemon, zramfs_daemon)
from manager import Call, Manager, servings, stop
from zramfs.zpool._alloc import POOL_VERSION

pytestmark = requires_fuse

MiB = 1 << 20
RECORD_HALF = 1 << 20            # zramfs.sysfs.record._HALF: the record's two halves
RECORD_BODY = 40                 # zramfs.sysfs.record._HEADER.size: where a half's JSON starts
VERSION_AT = 16                  # the u32 after the 16-byte magic, in every kept header


def page_of(rng: random.Random) -> bytes:
    """A page of the kinds a device meets: zero, same-filled, incompressible (huge), text,
    and partly random (compressed to any size: every size class gets objects)."""
    kind = rng.random()
    if kind < 0.05:
        return bytes(PAGE)
    if kind < 0.15:
        return bytes([rng.randrange(1, 256)]) * PAGE
    if kind < 0.25:
        return rng.randbytes(PAGE)
    if kind < 0.6:
        word = b"page %d " % rng.randrange(10**6)
        return (word * (PAGE // len(word) + 1))[:PAGE - 64] + rng.randbytes(64)
    return rng.randbytes(rng.randrange(64, 3600)).ljust(PAGE, b"z")


def fill(path: Path, image: bytearray, rng: random.Random) -> None:
    """`image` filled with mixed pages and written to the device file at `path`."""
    for off in range(0, len(image), PAGE):
        image[off:off + PAGE] = page_of(rng)
    fd = os.open(path, os.O_WRONLY)
    try:
        for off in range(0, len(image), MiB):
            os.pwrite(fd, image[off:off + MiB], off)
    finally:
        os.close(fd)


def differing(fd: int, image: bytes, size: int) -> list[int]:
    """The pages of the device open at `fd` (`size` bytes) that do not read as `image`
    (zeros past its end)."""
    bad = []
    for off in range(0, size, MiB):
        got = os.pread(fd, MiB, off)
        want = image[off:off + MiB].ljust(MiB, b"\0")
        if got != want:
            bad += [off + p for p in range(0, MiB, PAGE) if got[p:p + PAGE] != want[p:p + PAGE]]
    return bad


def kept_name(mgr: Manager, device: str, kind: str) -> str:
    """The store's name of the newest `kind` (table, pool) kept for `device`."""
    seqs = [int(m.group(1)) for n in mgr.store
            if (m := re.fullmatch(rf"{device}\.(\d+)\.{kind}", n))]
    assert seqs, f"nothing kept for {device}: {sorted(mgr.store)}"
    return f"{device}.{max(seqs)}.{kind}"


def restart_killed(d: Daemon, mgr: Manager) -> None:
    """A crash: SIGKILL, then the next daemon started with what the manager keeps."""
    count = servings(d)
    d.proc.kill()
    d.proc.wait(10)
    mgr.pump()
    d.proc = start_daemon(d.mnt, d.log, env=mgr.env(), listen_fds=list(mgr.store.items()))
    wait_serving_again(d, mgr, count + 1)


def restart_gracefully(d: Daemon, mgr: Manager) -> None:
    """An upgrade without a supervisor (systemd's ExecReload=kill -HUP): the same pid
    executes itself anew."""
    count = servings(d)
    d.proc.send_signal(signal.SIGHUP)
    wait_serving_again(d, mgr, count + 1)


def wait_serving_again(d: Daemon, mgr: Manager, count: int) -> None:
    try:
        mgr.wait(lambda: servings(d) >= count or not d.alive(), "the next daemon to serve", 60)
    except AssertionError:
        raise AssertionError(f"no daemon serves:\n{d.log.read_text()}") from None
    assert d.alive(), d.log.read_text()
    mgr.pump()


# --- refusal -----------------------------------------------------------------------------------

@dataclass
class Spoil:
    """Bytes of a kept file made unreadable: `length` at `offset` of what the store keeps
    under the name `name(mgr)` gives, replaced by `how(original)`."""
    name: Callable[[Manager], str]
    offset: int
    length: int
    how: Callable[[bytes], bytes]


def flipped(b: bytes) -> bytes:
    return bytes(x ^ 0xFF for x in b)


def version_99(b: bytes) -> bytes:
    return struct.pack("<I", 99)


def record(mgr: Manager) -> str:
    return "devices"


# What is spoiled, and what the refusing daemon must say.
DAMAGE: dict[str, tuple[list[Spoil], str]] = {
    "table magic": ([Spoil(lambda mgr: kept_name(mgr, "zram1", "table"), 0, 4, flipped)],
                    "cannot adopt the kept state: zram1: not a zramfs slot table (bad magic)"),
    "pool version": ([Spoil(lambda mgr: kept_name(mgr, "zram1", "pool"), VERSION_AT, 4,
                            version_99)],
                     "cannot adopt the kept state: zram1: pool format 99, this zramfs reads "
                     f"{POOL_VERSION}"),
    # The first bytes of each half's JSON: both CRCs fail, as after two torn writes.
    "record torn": ([Spoil(record, half + RECORD_BODY, 8, flipped)
                     for half in (0, RECORD_HALF)],
                    "cannot adopt the kept state: no readable device record"),
    "record version": ([Spoil(record, half + VERSION_AT, 4, version_99)
                        for half in (0, RECORD_HALF)],
                       "cannot adopt the kept state: device record version 99, this zramfs "
                       "reads 1"),
}


@pytest.mark.parametrize("damage", list(DAMAGE))
def test_unreadable_kept_state_is_refused_and_kept_for_a_daemon_that_can(
        damage: str, tmp_path: Path, cleanup: Cleanup) -> None:
    spoils, message = DAMAGE[damage]
    mgr = Manager(cleanup)
    rng = random.Random(damage)
    with zramfs_daemon(env=mgr.env(), tmp=tmp_path) as d:
        mgr.pump()
        # Two devices: the damaged one second, so that the refusing daemon has taken the
        # first one over before it finds the damage.
        images = {}
        for _ in range(2):
            name = d.device("32M", "lz4")
            mgr.pump()
            images[name] = bytearray(8 * MiB)
            fill(d.dev(name), images[name], rng)
        fd = os.open(d.dev("zram1"), os.O_RDWR)
        closed = [False]
        d.cleanup.push("close zram1", lambda: closed[0] or os.close(fd))
        mgr.wait(lambda: {"fuse", "fuse-init", "devices"} <= mgr.store.keys(),
                 "the connection and the record kept")

        d.proc.kill()
        d.proc.wait(10)
        mgr.pump()
        kept = dict(mgr.store)
        inodes = {name: os.fstat(kfd).st_ino for name, kfd in kept.items()}
        # A read made while no daemon can serve it: it waits in the kernel throughout.
        waiting = Call(lambda: os.pread(fd, PAGE, 5 * PAGE))
        originals = []
        for spoil in spoils:
            name = spoil.name(mgr)
            before = os.pread(mgr.store[name], spoil.length, spoil.offset)
            assert len(before) == spoil.length
            os.pwrite(mgr.store[name], spoil.how(before), spoil.offset)
            originals.append((name, spoil.offset, before))

        told = len(mgr.messages)
        d.proc = start_daemon(d.mnt, d.log, env=mgr.env(), listen_fds=list(kept.items()))
        mgr.wait(lambda: "ERROR: holding " in d.log.read_text() or not d.alive(),
                 "the daemon to refuse and hold", 60)
        log = d.log.read_text()
        assert d.alive(), log
        assert message in log, log
        mgr.pump()
        said = mgr.messages[told:]
        assert not [m for m in said if "FDSTOREREMOVE=1" in m], said
        # Everything kept before is kept still, the same files.
        assert {n: os.fstat(mgr.store[n]).st_ino for n in kept if n in mgr.store} == inodes
        # ... and nothing more: a refused daemon's copies of the devices it did take over
        # would be memory the manager holds for no one.
        assert set(mgr.store) == set(kept), (sorted(mgr.store), sorted(kept))
        assert is_mounted(d.mnt)
        assert not waiting.done

        # Mended (as a fixed daemon would read it), and told to try again.
        for name, off, before in originals:
            os.pwrite(mgr.store[name], before, off)
        restart_gracefully(d, mgr)
        assert "adopted the FUSE connection" in d.log.read_text()
        assert waiting.result(10) == images["zram1"][5 * PAGE:6 * PAGE]
        for name, image in images.items():
            dfd = fd if name == "zram1" else os.open(d.dev(name), os.O_RDONLY)
            try:
                bad = differing(dfd, image, 32 * MiB)
            finally:
                if dfd != fd:
                    os.close(dfd)
            assert not bad, f"{name}: {len(bad)} pages differ, the first at {bad[0]}"
        os.close(fd)
        closed[0] = True
        stop(d, mgr)


# --- ten restarts --------------------------------------------------------------------------

RESTARTS = 10
DISKSIZE = 128 * MiB
DATA = 64 * MiB


def fd_count(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def memfd_bytes(pid: int, mgr: Manager) -> int:
    """The memory in the memfds the daemon or the manager holds (resident pages), each file
    once: what the devices cost in all, which RSS (only pages mapped) and mm_stat (only the
    objects' pages) do not show whole. An old pool held after its take-over shows here."""
    files = {}
    for fd in mgr.store.values():
        st = os.fstat(fd)
        files[st.st_dev, st.st_ino] = st.st_blocks * 512
    for fd in os.listdir(f"/proc/{pid}/fd"):
        with contextlib.suppress(FileNotFoundError):
            if os.readlink(f"/proc/{pid}/fd/{fd}").startswith("/memfd:"):
                st = os.stat(f"/proc/{pid}/fd/{fd}")
                files[st.st_dev, st.st_ino] = st.st_blocks * 512
    return sum(files.values())


def test_ten_restarts_keep_the_data_and_cost_no_memory(tmp_path: Path, cleanup: Cleanup) -> None:
    mgr = Manager(cleanup)
    rng = random.Random(10)
    with zramfs_daemon(env=mgr.env(), tmp=tmp_path) as d:
        mgr.pump()
        name = d.device(f"{DISKSIZE >> 20}M", "lz4")
        mgr.pump()
        image = bytearray(DATA)
        fill(d.dev(name), image, rng)
        # Discard an eighth of the pages, in runs of 1 to 16 (holes in the pool's classes).
        for _ in range(DATA // PAGE // 8 // 8):
            off = rng.randrange(DATA // PAGE - 16) * PAGE
            n = rng.randint(1, 16) * PAGE
            fallocate(d.dev(name), PUNCH_HOLE, off, n)
            image[off:off + n] = bytes(n)
        # Packed as a take-over packs it (a fresh pool, objects in table order), so that the
        # first restart's own compaction does not show as a change.
        d.write(name, "compact", "1")
        fd = os.open(d.dev(name), os.O_RDWR)      # held across every restart: its opener count
        closed = [False]                           # too is kept
        d.cleanup.push(f"close {name}", lambda: closed[0] or os.close(fd))
        mgr.pump()
        assert not differing(fd, image, DISKSIZE)

        rows = [("before", d.mm_stat(name), d.rss(), fd_count(d.proc.pid), len(mgr.store),
                 memfd_bytes(d.proc.pid, mgr))]
        for i in range(RESTARTS):
            how = "SIGKILL" if i % 2 == 0 else "SIGHUP"
            (restart_killed if how == "SIGKILL" else restart_gracefully)(d, mgr)
            bad = differing(fd, image, DISKSIZE)
            assert not bad, f"after restart {i + 1} ({how}): {len(bad)} pages differ"
            rows.append((f"{i + 1} {how}", d.mm_stat(name), d.rss(), fd_count(d.proc.pid),
                         len(mgr.store), memfd_bytes(d.proc.pid, mgr)))

        print(f"\n{'restart':<11} {'orig_data':>10} {'compr':>10} {'mem_used':>10} "
              f"{'RSS':>10} {'fds':>4} {'kept':>5} {'memfds':>9}")
        for what, mm, rss, fds, kept, held in rows:
            print(f"{what:<11} {mm[0] / MiB:>10.2f} {mm[1] / MiB:>10.2f} {mm[2] / MiB:>10.2f} "
                  f"{rss / MiB:>10.2f} {fds:>4} {kept:>5} {held / MiB:>9.2f}")
        mm0, mm1 = rows[0][1], rows[-1][1]
        # The same pages stored, compressed to the same bytes, same-filled and huge alike.
        assert (mm1[0], mm1[1], mm1[5], mm1[7]) == (mm0[0], mm0[1], mm0[5], mm0[7])
        # ... in as much memory. Compaction leaves each size class in as few zspages as its
        # objects fit, and so does a take-over, allocating them afresh in table order: the
        # same total. 64 pages (eight zspages of up to 8 pages) for classes where compaction
        # stops a zspage short; a copy of the pool kept or leaked would be the whole pool.
        assert abs(mm1[2] - mm0[2]) <= 64 * PAGE, (mm0[2], mm1[2])
        assert mm1[2] == rows[1][1][2], [r[1][2] for r in rows]  # a take-over of a take-over
        # RSS: each restart is a fresh process mapping the same pool. Allowed: 2 MiB for the
        # pool's populator (fresh pages made resident ahead of use, in RSS and not in
        # mem_used_total) and 2 MiB for Python's heap (it moved by 0.3 MiB in trials). The
        # old pool left mapped after its take-over would add its resident pages, several
        # times that; held unmapped, it shows in the memfds' total below.
        rss = [r[2] for r in rows]
        assert max(rss[1:]) <= max(rss[:2]) + 4 * MiB, rss
        assert 4 * MiB < mm0[2] / 4, "the pool is too small to tell a leak from the allowance"
        # Descriptors, the daemon's and the manager's, and what the memfds hold.
        fds = [r[3] for r in rows]
        assert max(fds[1:]) <= fds[0], fds
        assert {r[4] for r in rows} == {rows[0][4]}, [r[4] for r in rows]
        held = [r[5] for r in rows]
        assert max(held[1:]) <= max(held[:2]) + 64 * PAGE, held

        os.close(fd)
        closed[0] = True
        stop(d, mgr)


def test_pages_written_with_a_dictionary_read_back_after_it_changes_or_goes(
        tmp_path: Path, cleanup: Cleanup) -> None:
    """zstd with a dictionary at a dict= path: the dictionary is kept beside the device's
    pages (zramfs.sysfs.record's `dicts`). A restart that finds another dictionary at the path (one
    trained anew) writes with it and still reads the pages written with the first, by the id
    each frame names; one that finds a dictionary with a kept one's id but other bytes there
    uses the kept copy (an id is all a frame names); one that finds none there uses the kept
    copies. Every page reads back after each."""
    import zstandard
    import corpus
    mgr = Manager(cleanup)
    data = corpus.build(8 << 20, ("/usr/lib/python3.11",))
    pages = [data[i:i + PAGE] for i in range(0, len(data), PAGE)]
    path = tmp_path / "pages.dict"
    path.write_bytes(zstandard.train_dictionary(16 << 10, pages[0::2], dict_id=1111).as_bytes())
    half = len(data) // 2
    with zramfs_daemon(env=mgr.env(), tmp=tmp_path) as d:
        mgr.pump()
        name = d.device("16M", "zstd", f"dict={path}")
        with open(d.dev(name), "r+b", buffering=0) as f:
            f.write(data[:half])
        mgr.pump()
        kept_name(mgr, name, "dicts")
        path.write_bytes(zstandard.train_dictionary(16 << 10, pages[1::2],
                                                    dict_id=2222).as_bytes())
        restart_gracefully(d, mgr)
        with open(d.dev(name), "r+b", buffering=0) as f:
            assert f.read(half) == data[:half]
            f.seek(half)
            f.write(data[half:])
        path.write_bytes(zstandard.train_dictionary(16 << 10, pages[::3], dict_id=1111).as_bytes())
        restart_gracefully(d, mgr)
        with open(d.dev(name), "rb", buffering=0) as f:
            assert f.read(len(data)) == data
        assert "another dictionary with id 1111" in d.log.read_text()
        path.unlink()
        restart_killed(d, mgr)
        with open(d.dev(name), "rb", buffering=0) as f:
            assert f.read(len(data)) == data
        assert "the copy kept from before the restart is used" in d.log.read_text()
        stop(d, mgr)


# --- zbud, adopted in place -----------------------------------------------------------------

def test_a_zbud_device_is_adopted_in_place_through_a_kill_and_a_hup(
        tmp_path: Path, cleanup: Cleanup) -> None:
    """A device on zbud (its `zpool` attribute) is adopted in place as one on zsmalloc is: the
    next daemon maps the kept pool again (the same memfd, nothing copied), and every page
    reads back. A copy would be a new pool (another memfd) and, for a moment, twice the
    memory."""
    mgr = Manager(cleanup)
    rng = random.Random(23)
    with zramfs_daemon(env=mgr.env(), tmp=tmp_path) as d:
        mgr.pump()
        name = d.hot_add()
        d.write(name, "zpool", "zbud")
        d.write(name, "disksize", "64M")
        mgr.pump()
        image = bytearray(32 * MiB)
        fill(d.dev(name), image, rng)
        fd = os.open(d.dev(name), os.O_RDWR)
        closed = [False]
        d.cleanup.push(f"close {name}", lambda: closed[0] or os.close(fd))
        mgr.pump()
        pool = os.fstat(mgr.store[kept_name(mgr, name, "pool")]).st_ino
        before = d.mm_stat(name), memfd_bytes(d.proc.pid, mgr), d.rss()
        assert before[0][2] > 8 * MiB, before
        for how, restart in (("SIGKILL", restart_killed), ("SIGHUP", restart_gracefully)):
            restart(d, mgr)
            log = d.log.read_text()
            assert re.search(rf"{name}: adopted \d+ pages in place", log), log
            assert "copied" not in log, log
            assert d.read(name, "zpool").split().count("[zbud]") == 1
            assert os.fstat(mgr.store[kept_name(mgr, name, "pool")]).st_ino == pool, how
            bad = differing(fd, image, 64 * MiB)
            assert not bad, f"after {how}: {len(bad)} pages differ, the first at {bad[0]}"
            mm, held, rss = d.mm_stat(name), memfd_bytes(d.proc.pid, mgr), d.rss()
            assert (mm[0], mm[1], mm[2]) == tuple(before[0][:3]), (how, before[0], mm)
            # The same memory: not a second pool beside the kept one (allowance: the pool's
            # populator, 1 MiB made resident ahead, and Python's heap).
            assert held <= before[1] + 2 * MiB, (how, before[1], held)
            assert rss <= before[2] + 4 * MiB, (how, before[2], rss)
        fill(d.dev(name), image, rng)                  # and it goes on working
        assert not differing(fd, image, 64 * MiB)
        os.close(fd)
        closed[0] = True
        stop(d, mgr)
