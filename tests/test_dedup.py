"""Dedup of identical pages (zramfs.zram._dedup): sharing, reference counts, the statistics, the
index as a cache of the slot table, tiering among shared objects, races; then the attribute
on a real mount. The hypothesis models with dedup on are in test_meta.py, fio in
test_system.py, races through a mount in test_races.py."""
from __future__ import annotations

import errno
import mmap
import os
import random
import tempfile
import threading

import pytest

from conftest import PAGE, PUNCH_HOLE, ZERO_RANGE, Daemon, attached, race
from test_meta import destroy, make_disk
from zramfs.zram import _dedup, _tiering
from zramfs.sysfs.device_tiering import open_backing

ORIG, COMPR, USED = 0, 1, 2
PATTERN = (b"a page of text that compresses well, but is not same-filled; " * 70)[:PAGE]


def twin(i: int) -> bytes:
    """Page i of a set of distinct compressible pages."""
    return (f"page {i:6} ".encode() * 512)[:PAGE]


def test_a_thousand_twins_take_one_object() -> None:
    disk = make_disk(1024 * PAGE, dedup=True)
    try:
        for i in range(1000):
            disk.write(i * PAGE, PATTERN)
        orig, compr, used, *_ = disk.meta.mm_stat()
        assert orig == 1000 * PAGE                       # every page counts in orig_data_size
        assert 0 < compr < 200                           # ... the object once in compr_data_size
        assert used <= 8 * PAGE                          # one zspage
        assert _dedup.stat(disk.meta) == (999, 999 * compr, 1)
        assert disk.read(0, 1000 * PAGE) == PATTERN * 1000
        assert _dedup.check(disk.meta) is None
    finally:
        destroy(disk)


def test_dedup_off_stores_each_page() -> None:
    disk = make_disk(128 * PAGE)
    try:
        for i in range(100):
            disk.write(i * PAGE, PATTERN)
        assert disk.meta.mm_stat()[COMPR] > 50 * 100
        assert _dedup.stat(disk.meta) == (0, 0, 0) and not _dedup.enabled(disk.meta)
    finally:
        destroy(disk)


def test_the_object_goes_with_its_last_page() -> None:
    disk = make_disk(64 * PAGE, dedup=True)
    try:
        for i in range(10):
            disk.write(i * PAGE, PATTERN)
        size = disk.meta.mm_stat()[COMPR]
        for i in range(5):                                     # overwrite: one reference each
            disk.write(i * PAGE, twin(i))
        assert _dedup.stat(disk.meta) == (4, 4 * size, 6)
        disk.fallocate(PUNCH_HOLE, 5 * PAGE, 3 * PAGE)         # discard
        disk.fallocate(ZERO_RANGE, 8 * PAGE, PAGE)             # write zeroes
        assert _dedup.stat(disk.meta)[:2] == (0, 0)
        assert disk.read(9 * PAGE, PAGE) == PATTERN
        assert _dedup.check(disk.meta) is None
        disk.write(9 * PAGE + 100, b"x")                       # the last one, changed in part
        assert _dedup.stat(disk.meta) == (0, 0, 6)
        assert disk.meta.mm_stat()[COMPR] == sum(len(_lz4(twin(i))) for i in range(5)) + \
            len(_lz4(PATTERN[:100] + b"x" + PATTERN[101:]))
        assert disk.read(0, 10 * PAGE) == b"".join(twin(i) for i in range(5)) + bytes(4 * PAGE) + \
            PATTERN[:100] + b"x" + PATTERN[101:]
        assert _dedup.check(disk.meta) is None
        for i in range(10):
            disk.fallocate(PUNCH_HOLE, i * PAGE, PAGE)
        assert disk.meta.mm_stat()[:2] == (0, 0) and _dedup.stat(disk.meta) == (0, 0, 0)
    finally:
        destroy(disk)


def _lz4(page: bytes) -> bytes:
    from zramfs.zcomp._zcomp import Compressor
    c = Compressor("lz4")
    try:
        return c.compress(page)
    finally:
        c.destroy()


def test_rewriting_a_page_with_its_own_content() -> None:
    disk = make_disk(8 * PAGE, dedup=True)
    try:
        disk.write(0, PATTERN)
        disk.write(PAGE, PATTERN)
        for _ in range(3):
            disk.write(0, PATTERN)                  # shares the object it already has
        assert _dedup.stat(disk.meta)[::2] == (1, 1)
        assert disk.read(0, 2 * PAGE) == PATTERN * 2
        assert _dedup.check(disk.meta) is None
    finally:
        destroy(disk)


def test_huge_twins_share_and_same_filled_pages_stay_in_the_slot() -> None:
    disk = make_disk(16 * PAGE, dedup=True)
    noise = os.urandom(PAGE)
    try:
        for i in range(4):
            disk.write(i * PAGE, noise)              # incompressible: one raw object
            disk.write((8 + i) * PAGE, b"\x5a" * PAGE)
        orig, compr, _, _, _, same, _, huge, _ = disk.meta.mm_stat()
        assert (orig, compr, same, huge) == (8 * PAGE, PAGE, 4, 4)   # huge counts pages
        assert _dedup.stat(disk.meta) == (3, 3 * PAGE, 1)
        assert disk.read(0, 4 * PAGE) == noise * 4
        disk.fallocate(PUNCH_HOLE, 0, 3 * PAGE)
        assert disk.meta.mm_stat()[7] == 1 and disk.meta.mm_stat()[COMPR] == PAGE
    finally:
        destroy(disk)


def test_partial_writes_make_and_break_twins() -> None:
    """A read-modify-write that makes a page equal to another's shares its object."""
    disk = make_disk(8 * PAGE, dedup=True)
    try:
        disk.write(0, PATTERN)
        disk.write(PAGE, PATTERN[:2000] + b"?" * 96 + PATTERN[2096:])
        assert _dedup.stat(disk.meta)[0] == 0
        disk.write(PAGE + 2000, PATTERN[2000:2096])
        assert _dedup.stat(disk.meta)[0] == 1
        assert disk.read(0, 2 * PAGE) == PATTERN * 2
    finally:
        destroy(disk)


@pytest.mark.parametrize("rehash", [False, True])
def test_the_index_is_rebuilt_from_the_slot_table(rehash: bool) -> None:
    """The counts come back from the table alone; without a rehash the old objects are
    counted but not found, so a new twin makes a second object, which is still correct."""
    disk = make_disk(64 * PAGE, dedup=True)
    try:
        for i in range(20):
            disk.write(i * PAGE, twin(i % 4))
        before = _dedup.stat(disk.meta)
        _dedup.rebuild(disk.meta, rehash)
        assert _dedup.stat(disk.meta) == before == (16, before[1], 4)
        assert _dedup.check(disk.meta) is None
        disk.write(30 * PAGE, twin(0))
        assert _dedup.stat(disk.meta)[2] == (4 if rehash else 5)
        for i in range(0, 20, 4):                   # twin(0)'s first object: all its pages
            disk.fallocate(PUNCH_HOLE, i * PAGE, PAGE)
        assert _dedup.check(disk.meta) is None
        assert disk.read(30 * PAGE, PAGE) == twin(0)
        assert disk.read(PAGE, PAGE) == twin(1)
    finally:
        destroy(disk)


@pytest.fixture
def backed():
    with tempfile.NamedTemporaryFile(prefix="zramfs-backing-") as f:
        f.truncate(256 * PAGE)
        backing = open_backing(f.name, None)
        disk = make_disk(128 * PAGE, dedup=True, backing=backing,
                         secondary={1: ("zstd", 19)})
        try:
            yield disk, backing
        finally:
            destroy(disk)
            backing.close()


def test_writeback_leaves_shared_objects_and_takes_single_ones(backed) -> None:
    disk, backing = backed
    meta = disk.meta
    for i in range(4):
        disk.write(i * PAGE, PATTERN)                # one object, 4 references
    for i in range(4, 8):
        disk.write(i * PAGE, twin(i))                # 4 objects, 1 reference each
    _tiering.mark_idle(meta)
    assert _tiering.writeback(meta, "idle") == 4
    assert backing.bd_stat()[0] == 4
    assert _tiering.writeback(meta, None, [(0, 3)]) == 0
    assert _dedup.stat(meta)[::2] == (3, 1)
    disk.fallocate(PUNCH_HOLE, 0, 3 * PAGE)          # one reference left: an ordinary page
    _tiering.mark_idle(meta)
    assert _tiering.writeback(meta, "idle") == 1
    assert _dedup.stat(meta) == (0, 0, 0)
    assert meta.mm_stat()[COMPR] == 0
    assert disk.read(3 * PAGE, 5 * PAGE) == PATTERN + b"".join(twin(i) for i in range(4, 8))
    assert _dedup.check(meta) is None


def test_recompression_leaves_shared_objects(backed) -> None:
    disk, _ = backed
    meta = disk.meta
    text = b"".join(f"line {i}: zram page {i * 7}\n".encode() for i in range(300))[:PAGE]
    for i in range(3):
        disk.write(i * PAGE, text)
    disk.write(3 * PAGE, text[::-1])
    size = meta.mm_stat()[COMPR]
    assert _tiering.recompress(meta, None, 1) == 1   # only the unshared one
    assert _dedup.stat(meta)[::2] == (2, 1)
    disk.fallocate(PUNCH_HOLE, 0, 2 * PAGE)
    assert _tiering.recompress(meta, None, 1) == 1   # its last page: no longer shared
    assert meta.mm_stat()[COMPR] < size
    assert _dedup.stat(meta) == (0, 0, 0)
    assert disk.read(2 * PAGE, 2 * PAGE) == text + text[::-1]
    disk.write(5 * PAGE, text)                       # not found: recompressed objects leave
    assert _dedup.stat(meta)[::2] == (0, 1)
    assert _dedup.check(meta) is None


def test_eviction_leaves_shared_objects(backed) -> None:
    disk, backing = backed
    meta = disk.meta
    rng = random.Random(5)
    for i in range(0, 64, 2):
        disk.write(i * PAGE, PATTERN)
        disk.write((i + 1) * PAGE, rng.randbytes(PAGE))
    _tiering.set_eviction(meta, True)
    meta.mem_limit = PAGE
    _tiering.evict_to_limit(meta)
    assert backing.bd_stat()[0] == 32                     # the unshared pages, not the twins
    assert _dedup.stat(meta)[::2] == (31, 1)
    rng = random.Random(5)
    for i in range(0, 64, 2):
        assert disk.read(i * PAGE, 2 * PAGE) == PATTERN + rng.randbytes(PAGE)
    assert _dedup.check(meta) is None


def test_reset_frees_the_index() -> None:
    disk = make_disk(64 * PAGE, dedup=True)
    for i in range(64):
        disk.write(i * PAGE, twin(i % 3))
    disk.detach()
    meta = disk.release()
    meta.destroy()
    assert meta.dedup is None


def test_take_over_keeps_shared_objects_shared() -> None:
    """A new daemon's meta with dedup on (enabled before Meta.take_over) copies a shared
    object once and counts its slots from the table; one without dedup gets a copy a slot,
    each an ordinary object (nothing ZRAM_DEDUP left for a meta without an index)."""
    from zramfs.zram._zram import Meta
    old = make_disk(16 * PAGE, dedup=True)
    for i in range(4):
        old.write(i * PAGE, PATTERN)
    old.write(4 * PAGE, twin(4))
    size = old.meta.mm_stat()[COMPR] - len(_lz4(twin(4)))
    try:
        for dedup in (True, False):
            fds = [os.dup(fd) for fd in old.meta.state_fds]
            meta = Meta(16 * PAGE, "lz4", name="taken")
            try:
                if dedup:
                    _dedup.enable(meta)
                assert meta.take_over(*fds) == (5, 0)
                if dedup:
                    _dedup.enable(meta)               # after: the counts from the table
                    assert _dedup.check(meta) is None
                    assert _dedup.stat(meta) == (3, 3 * size, 2)
                    assert meta.mm_stat()[COMPR] == size + len(_lz4(twin(4)))
                else:
                    assert meta.mm_stat()[COMPR] == 4 * size + len(_lz4(twin(4)))
                disk = attached(meta)
                disk.write(8 * PAGE, PATTERN)
                assert disk.read(0, 5 * PAGE) == PATTERN * 4 + twin(4)
                for i in range(4):                     # ordinary or shared, all freed right
                    disk.fallocate(PUNCH_HOLE, i * PAGE, PAGE)
                assert disk.read(8 * PAGE, PAGE) == PATTERN
                assert _dedup.check(meta) is None
                assert _dedup.stat(meta)[::2] == ((0, 2) if dedup else (0, 0))
                destroy(disk)
            finally:
                for fd in fds:
                    os.close(fd)
    finally:
        destroy(old)


# --- races -----------------------------------------------------------------------------------

def test_twins_written_read_discarded_and_compacted_at_once() -> None:
    """Writers copy a few patterns over a few pages (so a page's object is shared with pages
    written, read and discarded by other threads), readers check each page is one whole
    pattern or zeros, a compactor moves objects. The index matches the table afterwards."""
    npages = 16
    disk = make_disk(npages * PAGE, dedup=True, workers=0)
    patterns = [twin(i) for i in range(3)] + [os.urandom(PAGE)]
    allowed = set(patterns) | {bytes(PAGE)}
    stop = threading.Event()
    bad: list[int] = []

    def writer(seed: int) -> None:
        rng = random.Random(seed)
        while not stop.is_set():
            page = rng.randrange(npages)
            if rng.random() < 0.2:
                disk.fallocate(PUNCH_HOLE, page * PAGE, PAGE)
            else:
                disk.write(page * PAGE, rng.choice(patterns))

    def reader() -> None:
        rng = random.Random()
        for _ in range(20000):
            page = rng.randrange(npages)
            if disk.read(page * PAGE, PAGE) not in allowed:
                bad.append(page)
                return

    def compactor() -> None:
        while not stop.is_set():
            disk.meta.compact()

    try:
        race(stop, [lambda: writer(1), lambda: writer(2), compactor], [reader] * 2)
        assert not bad, f"torn or foreign content at pages {bad}"
        assert _dedup.check(disk.meta) is None
        pages = [disk.read(i * PAGE, PAGE) for i in range(npages)]
        stored = sum(1 for p in pages if any(p))
        dup, _, entries = _dedup.stat(disk.meta)
        assert dup + entries == stored and entries <= len(patterns)
    finally:
        destroy(disk)


def test_tiering_against_twin_writers() -> None:
    """Writeback, recompression and eviction run while writers share and drop objects."""
    npages = 32
    with tempfile.NamedTemporaryFile(prefix="zramfs-backing-") as f:
        f.truncate(4096 * PAGE)
        backing = open_backing(f.name, None)
        disk = make_disk(npages * PAGE, dedup=True, workers=0, backing=backing,
                         secondary={1: ("zstd", 9)})
        meta = disk.meta
        patterns = [twin(i) for i in range(4)]
        stop = threading.Event()
        last: dict[int, bytes] = {}
        lock = threading.Lock()

        def writer(seed: int) -> None:
            rng = random.Random(seed)
            while not stop.is_set():
                page = rng.randrange(seed, npages, 2)          # each writer its own pages
                data = rng.choice(patterns)
                try:
                    disk.write(page * PAGE, data)
                except OSError as e:
                    # Over a one-page mem_limit whose objects are all shared (eviction skips
                    # those), a write fails as in the kernel, and the page keeps what it had.
                    assert e.errno == errno.EIO, e
                    continue
                with lock:
                    last[page] = data

        def tiering() -> None:
            for i in range(150):
                _tiering.mark_idle(meta)
                if i % 3 == 0:
                    _tiering.writeback(meta, "idle")
                elif i % 3 == 1:
                    _tiering.recompress(meta, None, 1, polite=False)   # the race itself
                else:
                    # Eviction on before the limit comes down and until it goes back up: a
                    # write over mem_limit with nothing to evict fails (ENOMEM, as in the
                    # kernel), which is not what this race is about.
                    _tiering.set_eviction(meta, True)
                    meta.mem_limit = PAGE
                    _tiering.evict_to_limit(meta)
                    meta.mem_limit = 0
                    _tiering.set_eviction(meta, False)

        try:
            race(stop, [lambda: writer(0), lambda: writer(1)], [tiering])
            for page, data in last.items():
                assert disk.read(page * PAGE, PAGE) == data, page
            assert _dedup.check(meta) is None
        finally:
            destroy(disk)
            backing.close()


# --- the attribute, on a real mount ----------------------------------------------------------

def errno_of(fn) -> int:
    with pytest.raises(OSError) as e:
        fn()
    return e.value.errno


def test_dedup_attribute_before_disksize_only(daemon: Daemon) -> None:
    name = daemon.hot_add()
    assert daemon.read(name, "dedup") == "0\n"
    assert daemon.read(name, "dedup_stat") == "       0        0        0\n"
    assert errno_of(lambda: daemon.write(name, "dedup", "yes")) == errno.EINVAL
    assert errno_of(lambda: daemon.write(name, "dedup_stat", "0")) == errno.EACCES
    daemon.write(name, "dedup", "1")
    assert daemon.read(name, "dedup") == "1\n"
    daemon.write(name, "dedup", "0")
    assert daemon.read(name, "dedup") == "0\n"
    daemon.write(name, "dedup", "7")                      # any non-zero number: on
    assert daemon.read(name, "dedup") == "1\n"
    daemon.write(name, "disksize", "16M")
    assert errno_of(lambda: daemon.write(name, "dedup", "0")) == errno.EBUSY
    assert daemon.read(name, "dedup") == "1\n"
    daemon.write(name, "reset", "1")
    assert daemon.read(name, "dedup") == "0\n"            # the default again, as after reset


def test_a_thousand_twins_through_the_mount(daemon: Daemon) -> None:
    name = daemon.hot_add()
    daemon.write(name, "dedup", "1")
    daemon.write(name, "disksize", "8M")
    buf = mmap.mmap(-1, PAGE)
    buf[:] = PATTERN
    fd = os.open(daemon.dev(name), os.O_RDWR | os.O_DIRECT)
    try:
        for i in range(1000):
            os.pwritev(fd, [buf], i * PAGE)
        orig, compr, used, *_ = daemon.mm_stat(name)
        assert orig == 1000 * PAGE and compr < 200 and used <= 8 * PAGE
        dup, saved, entries = map(int, daemon.read(name, "dedup_stat").split())
        assert (dup, saved, entries) == (999, 999 * compr, 1)
        for i in range(1000):
            buf[:] = bytes(PAGE)
            os.preadv(fd, [buf], i * PAGE)
            assert buf[:] == PATTERN, i
    finally:
        os.close(fd)
    daemon.write(name, "reset", "1")
    assert daemon.read(name, "dedup_stat") == "       0        0        0\n"
