"""The device's data path without FUSE (zramfs.zram._zram, _workers, _tiering): a model, stats,
limits, lifetime, races."""
from __future__ import annotations

import contextlib
import errno
import gc
import os
import random
import tempfile
import threading
import time
from collections.abc import Iterator

import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule

from conftest import PAGE, PUNCH_HOLE, ZERO_RANGE, attached, destroy, race
from disk_io import IoDisk
from zramfs.sysfs.device_tiering import open_backing
from zramfs.zram import _dedup, _tiering
from zramfs.zram._zram import Meta



def make_disk(size: int = 64 * PAGE, algorithm: str = "lz4", dedup: bool = False,
              **kw) -> IoDisk:
    meta = Meta(size, algorithm, name="test", **kw)
    if dedup:
        _dedup.enable(meta)
    return attached(meta)


def page_data(kind: str, seed: int, size: int) -> bytes:
    rng = random.Random(seed)
    if kind == "random":
        return rng.randbytes(size)
    if kind == "text":
        words = [b"zram", b"page", b"swap", b"slot", b"\n", b"compressed "]
        out = b" ".join(rng.choice(words) for _ in range(size // 3 + 1))
        return out[:size].ljust(size, b".")
    return bytes([rng.randrange(256)]) * size          # same-filled


class DiskModel(RuleBasedStateMachine):
    """Writes, reads and discards at any offset and length against a bytearray."""

    SIZE = 48 * PAGE

    def __init__(self) -> None:
        super().__init__()
        self.algorithm = "zstd" if random.random() < 0.3 else "lz4"
        self.disk = make_disk(self.SIZE, self.algorithm)
        self.model = bytearray(self.SIZE)

    span = st.integers(0, SIZE - 1).flatmap(
        lambda off: st.tuples(st.just(off), st.integers(1, min(3 * PAGE, DiskModel.SIZE - off))))

    @rule(span=span, kind=st.sampled_from(["random", "text", "same"]), seed=st.integers(0, 999))
    def write(self, span: tuple[int, int], kind: str, seed: int) -> None:
        off, n = span
        data = page_data(kind, seed, n)
        assert self.disk.write(off, data) == n
        self.model[off : off + n] = data

    @rule(span=span)
    def read(self, span: tuple[int, int]) -> None:
        off, n = span
        assert self.disk.read(off, n) == self.model[off : off + n]

    @rule(span=span, mode=st.sampled_from([PUNCH_HOLE, ZERO_RANGE]))
    def discard(self, span: tuple[int, int], mode: int) -> None:
        off, n = span
        self.disk.fallocate(mode, off, n)
        self.model[off : off + n] = bytes(n)

    @rule()
    def compact(self) -> None:
        self.disk.meta.compact()

    @invariant()
    def whole_device(self) -> None:
        assert self.disk.read(0, self.SIZE) == self.model

    @invariant()
    def stats_add_up(self) -> None:
        orig, compr, used, _, used_max, same, _, huge, _ = self.disk.meta.mm_stat()
        stored = sum(1 for p in range(0, self.SIZE, PAGE) if any(self.model[p : p + PAGE]))
        assert orig // PAGE >= stored                  # all-zero pages may be stored as same
        assert compr <= (orig // PAGE - same) * PAGE
        assert used_max >= used
        assert huge <= orig // PAGE

    def teardown(self) -> None:
        destroy(self.disk)


TestDiskModel = DiskModel.TestCase
TestDiskModel.settings = settings(max_examples=50, stateful_step_count=40, deadline=None)


class TieredDiskModel(DiskModel):
    """The same, with writeback, idle marking, recompression and eviction in between: where a
    page lives (memory, backing file, another algorithm) never changes what it reads."""

    def __init__(self) -> None:
        RuleBasedStateMachine.__init__(self)
        self.algorithm = "lz4"
        self.file = tempfile.NamedTemporaryFile(prefix="zramfs-backing-")
        # Room for every page, so eviction can always make room and no write may fail;
        # a full backing device is tested on a mount (test_tiering.py).
        self.file.truncate(self.SIZE)
        self.backing = open_backing(self.file.name, None)
        # Half the runs write objects back as stored (compressed_writeback).
        self.disk = make_disk(self.SIZE, "lz4", backing=self.backing,
                              secondary={1: ("zstd", 19), 2: ("lz4hc", 12)},
                              compressed_wb=random.random() < 0.5)
        self.model = bytearray(self.SIZE)
        self.evicting = False

    @rule(age=st.sampled_from([None, 1]))
    def mark_idle(self, age: int | None) -> None:
        _tiering.mark_idle(self.disk.meta, age)

    @rule(mode=st.sampled_from(["idle", "huge", "huge_idle", "incompressible", None]),
          lo=st.integers(0, DiskModel.SIZE // PAGE - 1), n=st.integers(1, 8))
    def writeback(self, mode: str | None, lo: int, n: int) -> None:
        _tiering.writeback(self.disk.meta, mode, [] if mode else [(lo, lo + n - 1)])

    @rule(mode=st.sampled_from(["idle", "huge", "huge_idle", None]),
          threshold=st.sampled_from([0, 1, 100, 2000]), priority=st.sampled_from([0, 1, 2]))
    def recompress(self, mode: str | None, threshold: int, priority: int) -> None:
        if mode is None and not threshold:
            threshold = 1
        _tiering.recompress(self.disk.meta, mode, threshold, 0, priority)

    @rule(on=st.booleans())
    def evict_over_a_tiny_limit(self, on: bool) -> None:
        # Two 8-page zspages: the page being written and its old object, which cannot be
        # evicted while it is written; everything else can be.
        self.disk.meta.mem_limit = 16 * PAGE if on else 0
        _tiering.set_eviction(self.disk.meta, on)
        _tiering.evict_to_limit(self.disk.meta)
        self.evicting = on

    @invariant()
    def backing_blocks_add_up(self) -> None:
        assert self.backing.bd_stat()[0] <= self.SIZE // PAGE
        if self.evicting:            # the point of eviction: writes stay within the limit
            assert self.disk.meta.mm_stat()[2] <= 16 * PAGE
        assert self.disk.meta.mm_stat()[0] // PAGE >= self.backing.bd_stat()[0]

    def teardown(self) -> None:
        destroy(self.disk)
        self.backing.close()
        self.file.close()


TestTieredDiskModel = TieredDiskModel.TestCase
TestTieredDiskModel.settings = settings(max_examples=40, stateful_step_count=40, deadline=None)


# --- the same models with dedup on: few distinct pages, so twins are everywhere -----------------

class DedupMixin:
    """Pages from a handful of seeds (twins of each other, whole or partial), twin-heavy page
    copies, and an index rebuilt from the slot table now and then. After every step the index
    agrees with the table (each object's count is its ZRAM_DEDUP slots) and mm_stat counts a
    shared object once."""

    def _may_fail(self) -> bool:
        """Under eviction's tiny limit a shared object cannot be evicted (that would free
        nothing), so a write may find no room: only then may one fail."""
        return getattr(self, "evicting", False) and _dedup.stat(self.disk.meta)[0] > 0

    def _landed(self, off: int, new: bytes) -> None:
        """After a failed write: each page of the range holds its old or its new content,
        whole (a page is stored or not, never half), and the model follows the device."""
        n = len(new)
        got = self.disk.read(off, n)
        for p in range(off // PAGE * PAGE, off + n, PAGE):
            lo, hi = max(p, off) - off, min(p + PAGE, off + n) - off
            assert got[lo:hi] in (new[lo:hi], self.model[off + lo : off + hi]), p
        self.model[off : off + n] = got

    def _write(self, off: int, data: bytes) -> None:
        may_fail = self._may_fail()
        try:
            done = self.disk.write(off, data)
        except OSError as e:
            assert e.errno == errno.EIO and (may_fail or self._may_fail()), e
            done = -1
        if done == len(data):
            self.model[off : off + len(data)] = data
        else:
            assert may_fail or self._may_fail(), f"short write of {done} bytes"
            self._landed(off, data)

    @rule(span=DiskModel.span, kind=st.sampled_from(["random", "text", "same"]),
          seed=st.integers(0, 999))
    def write(self, span: tuple[int, int], kind: str, seed: int) -> None:
        off, n = span
        self._write(off, page_data(kind, seed, n))

    @rule(span=DiskModel.span, mode=st.sampled_from([PUNCH_HOLE, ZERO_RANGE]))
    def discard(self, span: tuple[int, int], mode: int) -> None:
        off, n = span
        may_fail = self._may_fail()
        try:
            self.disk.fallocate(mode, off, n)
        except OSError as e:                    # a partial page's zeroing found no room
            assert e.errno == errno.EIO and may_fail, e
            self._landed(off, bytes(n))
        else:
            self.model[off : off + n] = bytes(n)

    @rule(src=st.integers(0, DiskModel.SIZE // PAGE - 1),
          dst=st.integers(0, DiskModel.SIZE // PAGE - 1), n=st.integers(1, 4))
    def copy_pages(self, src: int, dst: int, n: int) -> None:
        n = min(n, self.SIZE // PAGE - max(src, dst))
        self._write(dst * PAGE, self.disk.read(src * PAGE, n * PAGE))

    @rule(page=st.integers(0, DiskModel.SIZE // PAGE - 4),
          kind=st.sampled_from(["random", "text"]), seed=st.integers(0, 3), n=st.integers(1, 4))
    def write_twins(self, page: int, kind: str, seed: int, n: int) -> None:
        self._write(page * PAGE, page_data(kind, seed, PAGE) * n)

    @rule(rehash=st.booleans())
    def rebuild_index(self, rehash: bool) -> None:
        _dedup.rebuild(self.disk.meta, rehash)

    @invariant()
    def index_is_the_table(self) -> None:
        assert _dedup.check(self.disk.meta) is None, _dedup.check(self.disk.meta)
        orig, compr, *_ = self.disk.meta.mm_stat()
        deduplicated, saved, entries = _dedup.stat(self.disk.meta)
        assert deduplicated + entries <= orig // PAGE
        assert compr + saved <= orig                 # each page's object, counted per page


class DedupDiskModel(DedupMixin, DiskModel):
    def __init__(self) -> None:
        RuleBasedStateMachine.__init__(self)
        self.algorithm = "zstd" if random.random() < 0.3 else "lz4"
        self.disk = make_disk(self.SIZE, self.algorithm, dedup=True)
        self.model = bytearray(self.SIZE)


class TieredDedupDiskModel(DedupMixin, TieredDiskModel):
    """Writeback, recompression and eviction of shared and unshared objects among twins."""

    @invariant()
    def backing_blocks_add_up(self) -> None:
        assert self.backing.bd_stat()[0] <= self.SIZE // PAGE
        if self.evicting and not self._may_fail():   # only shared objects may hold memory
            assert self.disk.meta.mm_stat()[2] <= 16 * PAGE
        assert self.disk.meta.mm_stat()[0] // PAGE >= self.backing.bd_stat()[0]

    def __init__(self) -> None:
        super().__init__()
        destroy(self.disk)
        self.disk = make_disk(self.SIZE, "lz4", dedup=True, backing=self.backing,
                              secondary={1: ("zstd", 19), 2: ("lz4hc", 12)},
                              compressed_wb=random.random() < 0.5)


TestDedupDiskModel = DedupDiskModel.TestCase
TestDedupDiskModel.settings = settings(max_examples=50, stateful_step_count=40, deadline=None)
TestTieredDedupDiskModel = TieredDedupDiskModel.TestCase
TestTieredDedupDiskModel.settings = settings(max_examples=40, stateful_step_count=40,
                                             deadline=None)


def test_same_and_huge_pages_are_counted() -> None:
    disk = make_disk(16 * PAGE)
    try:
        disk.write(0, b"\xab" * PAGE)                      # same-filled: no object
        disk.write(PAGE, os.urandom(PAGE))                 # incompressible: huge
        disk.write(2 * PAGE, b"hello zram " * 372 + b"1234")
        orig, compr, used, limit, used_max, same, compacted, huge, huge_since = disk.meta.mm_stat()
        assert (orig, same, huge, huge_since, limit) == (3 * PAGE, 1, 1, 1, 0)
        assert PAGE < compr < 2 * PAGE and used >= PAGE + compr - PAGE
        disk.fallocate(PUNCH_HOLE, 0, 2 * PAGE)
        orig, compr, _, _, _, same, _, huge, huge_since = disk.meta.mm_stat()
        assert (orig // PAGE, same, huge, huge_since) == (1, 0, 0, 1)   # since: never falls
        assert disk.meta.io_stat()[3] == 2                 # notify_free: pages discarded
        assert disk.read(0, 2 * PAGE) == bytes(2 * PAGE)
    finally:
        destroy(disk)


def test_mem_limit_fails_writes_with_eio() -> None:
    disk = make_disk(1024 * PAGE)
    try:
        disk.meta.mem_limit = 64 * PAGE
        written = 0
        with pytest.raises(OSError) as err:
            for i in range(1024):
                disk.write(i * PAGE, os.urandom(PAGE))
                written += 1
        assert err.value.errno == 5
        assert 50 <= written <= 64
        assert disk.meta.io_stat()[1] == 1                   # failed_writes
        assert disk.meta.mm_stat()[2] <= 64 * PAGE           # mem_used_total within the limit
        disk.meta.mem_limit = 0
        disk.write(written * PAGE, b"x" * PAGE)              # lifted: writes work again
    finally:
        destroy(disk)


def test_mem_used_max_resets_to_current() -> None:
    disk = make_disk(256 * PAGE)
    try:
        for i in range(200):
            disk.write(i * PAGE, os.urandom(PAGE))
        disk.fallocate(PUNCH_HOLE, 0, 200 * PAGE)
        _, _, used, _, used_max, *_ = disk.meta.mm_stat()
        assert used_max >= 200 * PAGE > used
        disk.meta.reset_mem_used_max()
        assert disk.meta.mm_stat()[4] == used
    finally:
        destroy(disk)


def test_out_of_range_io() -> None:
    disk = make_disk(4 * PAGE)
    try:
        with pytest.raises(OSError) as err:
            disk.write(4 * PAGE, b"x")
        assert err.value.errno == 28                         # ENOSPC
        assert disk.write(4 * PAGE - 10, b"y" * 100) == 10   # short at the end
        assert disk.read(4 * PAGE, 10) == b""
        assert disk.meta.io_stat()[2] == 1                   # invalid_io
        with pytest.raises(OSError) as err:
            disk.fallocate(0, 0, PAGE)                       # plain allocate: not supported
        assert err.value.errno == 95
    finally:
        destroy(disk)


def test_detached_disk_fails_with_eio_and_drains() -> None:
    disk = make_disk()
    disk.write(0, b"z" * PAGE)
    disk.detach()
    assert not disk.live and disk.in_flight == 0
    for call in (lambda: disk.read(0, 1), lambda: disk.write(0, b"x"),
                 lambda: disk.fallocate(PUNCH_HOLE, 0, PAGE)):
        with pytest.raises(OSError) as err:
            call()
        assert err.value.errno == 5
    meta = disk.release()
    meta.destroy()
    disk.attach(Meta(8 * PAGE, "zstd", name="test"))        # re-initialised, fresh content
    assert disk.read(0, PAGE) == bytes(PAGE)
    destroy(disk)


def test_readers_never_see_a_torn_page() -> None:
    """One writer rewrites a page with whole-page patterns; readers see one pattern each time."""
    disk = make_disk(8 * PAGE)
    patterns = [bytes([i]) * 2000 + os.urandom(96) + bytes([i]) * 2000 for i in range(1, 17)]
    allowed = set(patterns) | {bytes(PAGE)}
    stop = threading.Event()
    bad: list[bytes] = []

    def writer() -> None:
        i = 0
        while not stop.is_set():
            disk.write(PAGE, patterns[i % len(patterns)])
            if i % 50 == 0:
                disk.fallocate(PUNCH_HOLE, PAGE, PAGE)
            i += 1

    def reader() -> None:
        for _ in range(20000):
            got = disk.read(PAGE, PAGE)
            if got not in allowed:
                bad.append(got)
                return

    def compactor() -> None:
        while not stop.is_set():
            disk.meta.compact()

    race(stop, [writer, compactor], [reader] * 3)
    destroy(disk)
    assert not bad


def test_concurrent_partial_writes_to_one_page_all_land() -> None:
    """Read-modify-write of one page from several threads loses no write."""
    disk = make_disk(4 * PAGE)
    nthreads, per = 4, PAGE // 4

    def writer(t: int) -> None:
        for rep in range(300):
            for k in range(t * per, (t + 1) * per, 256):
                disk.write(k, bytes([t + 1 + rep % 2]) * 256)

    threads = [threading.Thread(target=writer, args=(t,)) for t in range(nthreads)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    page = disk.read(0, PAGE)
    destroy(disk)
    for t in range(nthreads):
        assert page[t * per : (t + 1) * per] == bytes([t + 2]) * per


# --- large requests shared out to the compression workers --------------------------------------

@pytest.mark.parametrize("workers", [1, 3])
@pytest.mark.parametrize("algorithm", ["lz4", "zstd"])
def test_large_requests_through_workers_match_a_model(workers: int, algorithm: str) -> None:
    """Requests of 16 pages and more are split among the workers: unaligned ones, with
    partial pages at either end, land exactly as the model says."""
    size = 256 * PAGE
    disk = make_disk(size, algorithm, workers=workers)
    model = bytearray(size)
    rng = random.Random(4)
    try:
        for i in range(60):
            n = rng.randrange(16 * PAGE, 80 * PAGE)
            off = rng.randrange(0, size - n)
            data = b"".join(page_data(rng.choice(["random", "text", "same"]), i * 100 + k, PAGE)
                            for k in range(n // PAGE + 1))[:n]
            assert disk.write(off, data) == n
            model[off : off + n] = data
            r_off = rng.randrange(0, size - 16 * PAGE)
            r_n = rng.randrange(16 * PAGE, size - r_off + 1)
            assert disk.read(r_off, r_n) == model[r_off : r_off + r_n]
        assert disk.read(0, size) == model
        orig, *_ = disk.meta.mm_stat()                # all-zero pages may be stored as same
        assert orig >= sum(PAGE for p in range(0, size, PAGE) if any(model[p : p + PAGE]))
    finally:
        destroy(disk)


def test_large_write_that_fails_part_way_fails_whole_with_eio() -> None:
    """Under mem_limit a large write fails part-way: the request fails with EIO, as a bio in
    the kernel's zram does (a block device has no short writes), and each page of it holds
    either its old content or the new, never a mix."""
    disk = make_disk(512 * PAGE, workers=1)
    try:
        disk.meta.mem_limit = 64 * PAGE
        data = os.urandom(256 * PAGE)                       # huge pages: one page each
        with pytest.raises(OSError) as err:
            disk.write(0, data)
        assert err.value.errno == 5
        pages = [disk.read(i * PAGE, PAGE) for i in range(256)]
        new = sum(p == data[i * PAGE:(i + 1) * PAGE] for i, p in enumerate(pages))
        assert 0 < new < 256                                # some fitted, the rest did not
        assert all(p in (data[i * PAGE:(i + 1) * PAGE], bytes(PAGE))
                   for i, p in enumerate(pages))
        assert disk.meta.io_stat()[1] == 1                  # failed_writes: once a request
        assert disk.meta.mm_stat()[2] <= 64 * PAGE
    finally:
        destroy(disk)


def test_large_readers_never_see_a_torn_page_under_large_writers() -> None:
    """Large writes (shared among workers) and large reads of the same pages, with discard
    and compaction beside them: every page a reader gets is one whole written version."""
    npages = 64
    disk = make_disk(npages * PAGE, workers=2)
    versions = [bytes([v]) * 1000 + os.urandom(96) + bytes([v]) * 3000 for v in range(1, 9)]
    allowed = set(versions) | {bytes(PAGE)}
    stop = threading.Event()
    bad: list[int] = []

    def writer(seed: int) -> None:
        rng = random.Random(seed)
        while not stop.is_set():
            v = rng.choice(versions)
            first = rng.randrange(0, npages - 32)
            disk.write(first * PAGE, v * rng.randrange(16, 33))
            if rng.random() < 0.05:
                disk.fallocate(PUNCH_HOLE, first * PAGE, 16 * PAGE)

    def reader() -> None:
        for _ in range(300):
            got = disk.read(0, npages * PAGE)
            for p in range(npages):
                if got[p * PAGE : (p + 1) * PAGE] not in allowed:
                    bad.append(p)
                    return

    def compactor() -> None:
        while not stop.is_set():
            disk.meta.compact()

    race(stop, [lambda: writer(0), lambda: writer(1), compactor], [reader] * 2)
    destroy(disk)
    assert not bad


def test_workers_start_with_the_meta_and_stop_with_it() -> None:
    """The threads exist from disksize on (none are made per request) and are gone after
    destroy, also when a meta is dropped without destroy. Each has its compression workers
    and its pool's page populator."""
    def threads() -> int:
        return len(os.listdir("/proc/self/task"))

    gc.collect()            # an earlier test's dropped meta joins its workers now, not midway
    before = threads()
    disk = make_disk(64 * PAGE, workers=3)
    assert disk.meta.workers == 3 and threads() == before + 3 + 1
    disk.write(0, os.urandom(64 * PAGE))
    assert threads() == before + 3 + 1
    destroy(disk)
    assert threads() == before
    meta = Meta(64 * PAGE, "lz4", name="test", workers=2)
    assert threads() == before + 2 + 1
    del meta
    assert threads() == before
    with pytest.raises(ValueError):
        Meta(64 * PAGE, "lz4", name="test", workers=-1)


def test_eviction_compaction_is_counted_once_by_the_pool() -> None:
    """Eviction calls the allocator's compaction from C, not through Pool.compact: what that
    frees still shows in mm_stat's pages_compacted, once."""
    npages = 8192            # eviction takes ~1 MiB of objects (its slack): far from all
    with tempfile.NamedTemporaryFile(prefix="zramfs-backing-") as f:
        f.truncate(npages * PAGE)
        backing = open_backing(f.name, None)
        disk = make_disk(npages * PAGE, workers=0, backing=backing)
        try:
            meta = disk.meta
            rng = random.Random(3)
            for i in range(npages):                 # ~600 bytes compressed: 6 to a page
                disk.write(i * PAGE, rng.randbytes(600) + bytes(PAGE - 600))
            for i in range(1, npages, 2):           # every zspage left half used
                disk.fallocate(PUNCH_HOLE, i * PAGE, PAGE)
            assert meta.mm_stat()[6] == 0
            used = meta.mm_stat()[2] // PAGE
            _tiering.set_eviction(meta, True)
            meta.mem_limit = (used - 4) * PAGE      # evicts a few pages, then compacts
            _tiering.evict_to_limit(meta)
            compacted = meta.mm_stat()[6]
            assert meta.stats().evicted > 0 and compacted > 0
            assert meta.mm_stat()[2] // PAGE <= used - compacted
        finally:
            destroy(disk)
            backing.close()


def _mixed_pages(n: int, seed: int) -> bytes:
    """Text (recompressible), random (not) and same-filled pages, in a fixed mix."""
    kinds = ("text", "text", "text", "random", "same")
    return b"".join(page_data(kinds[i % len(kinds)], seed + i, PAGE) for i in range(n))


def test_recompression_on_threads_does_what_one_thread_does() -> None:
    """The same pages on two disks, recompressed (zstd 19 above lz4) by one thread and by
    four: the same pages recompressed, the same compr_data_size and huge pages, identical
    data; a second run finds nothing left. With max_pages, batches on four threads add up to
    the one-thread total."""
    n = 1024
    data = _mixed_pages(n, 1)
    disks = [make_disk(n * PAGE, secondary={1: ("zstd", 19)}) for _ in range(3)]
    try:
        for disk in disks:
            disk.write(0, data)
        one = _tiering.recompress(disks[0].meta, None, 0, 0, 0, 1)
        four = _tiering.recompress(disks[1].meta, None, 0, 0, 0, 4)
        assert one == four > n // 2, (one, four)
        assert disks[0].meta.mm_stat()[1] == disks[1].meta.mm_stat()[1]
        assert disks[0].meta.mm_stat()[7] == disks[1].meta.mm_stat()[7]
        assert _tiering.recompress(disks[1].meta, None, 0, 0, 0, 4) == 0
        batches, total = 0, 0
        while True:
            done = _tiering.recompress(disks[2].meta, None, 0, 100, 0, 4)
            assert done <= 100
            if done == 0 and batches > n // 100:
                break
            total, batches = total + done, batches + 1
        assert total == one
        for disk in disks:
            assert disk.read(0, n * PAGE) == data
    finally:
        for disk in disks:
            destroy(disk)


@contextlib.contextmanager
def _backed_disks(tmp_path, count: int, n: int,
                  **kw) -> Iterator[tuple[list[IoDisk], list]]:
    """`count` disks of `n` pages, each with a backing file of its own on tmp_path's file
    system (O_DIRECT where it allows it); destroyed and closed after, pass or fail."""
    backings, disks = [], []
    try:
        for i in range(count):
            path = tmp_path / f"backing{i}"
            with open(path, "wb") as f:
                f.truncate(n * PAGE)
            backings.append(open_backing(str(path), None))
        for b in backings:
            disks.append(make_disk(n * PAGE, backing=b, **kw))
        yield disks, backings
    finally:
        for disk in disks:
            destroy(disk)
        for backing in backings:
            backing.close()


def test_writeback_on_threads_does_what_one_thread_does(tmp_path) -> None:
    """The same pages on two disks, every one idle, written back by one thread and by four:
    the same pages on the backing device, the same mm_stat, identical data. With
    writeback_limit, four threads together write exactly the limit, then EIO."""
    n = 2048
    data = _mixed_pages(n, 2)
    with _backed_disks(tmp_path, 3, n) as (disks, backings):
        for disk in disks:
            disk.write(0, data)
            _tiering.set_wb_batch(disk.meta, 16)
            _tiering.mark_idle(disk.meta, None)
        objects = n - n // 5                            # every page but the same-filled
        one = _tiering.writeback(disks[0].meta, "idle", (), 1)
        four = _tiering.writeback(disks[1].meta, "idle", (), 4)
        assert one == four == objects, (one, four)
        assert backings[0].bd_stat() == backings[1].bd_stat()
        assert backings[1].bd_stat()[0] == objects
        assert disks[0].meta.mm_stat() == disks[1].meta.mm_stat()
        _tiering.set_wb_limit(disks[2].meta, 100, True)
        with pytest.raises(OSError) as e:
            _tiering.writeback(disks[2].meta, "idle", (), 4)
        assert e.value.errno == errno.EIO
        assert backings[2].bd_stat()[0] == 100 and _tiering.wb_limit(disks[2].meta) == 0
        for disk in disks:
            assert disk.read(0, n * PAGE) == data


def _in_background(fn, *args) -> tuple[threading.Thread, dict]:
    outcome: dict = {}

    def run() -> None:
        try:
            outcome["done"] = fn(*args)
        except OSError as e:
            outcome["error"] = e
    thread = threading.Thread(target=run)
    thread.start()
    return thread, outcome


def test_cancel_stops_writeback_and_recompression_midway(tmp_path) -> None:
    """cancel() midway: the run ends with ECANCELED, what it did is kept and reads back, and
    a second run does the rest: the two together leave what one uncancelled run leaves on a
    twin disk. Writeback one page a batch (to a file, O_DIRECT where it can), so that it is
    caught under way."""
    n = 4096
    data = _mixed_pages(n, 3)
    with _backed_disks(tmp_path, 2, n, secondary={1: ("zstd", 19)}) as (disks, backings):
        cancelled, twin = disks
        for disk in disks:
            disk.write(0, data)
        assert _tiering.recompress(twin.meta, None, 0, 0, 0, 2) > 0
        before = cancelled.meta.mm_stat()[1]
        thread, outcome = _in_background(_tiering.recompress, cancelled.meta, None, 0, 0, 0, 2)
        while cancelled.meta.mm_stat()[1] == before and thread.is_alive():
            time.sleep(0.0005)
        _tiering.cancel(cancelled.meta)
        thread.join()
        assert outcome["error"].errno == errno.ECANCELED, outcome
        assert cancelled.read(0, n * PAGE) == data
        _tiering.cancel(cancelled.meta, False)
        assert _tiering.recompress(cancelled.meta, None, 0, 0, 0, 2) > 0      # the rest
        stored = [0, 1, 5, 7]           # orig, compr, same and huge: not the peak it passed
        assert [cancelled.meta.mm_stat()[i] for i in stored] == \
            [twin.meta.mm_stat()[i] for i in stored]

        for disk in disks:
            _tiering.set_wb_batch(disk.meta, 1)
            _tiering.mark_idle(disk.meta, None)
        total = _tiering.writeback(twin.meta, "idle", (), 2)
        thread, outcome = _in_background(_tiering.writeback, cancelled.meta, "idle", (), 2)
        while backings[0].bd_stat()[0] == 0 and thread.is_alive():
            time.sleep(0.0005)
        _tiering.cancel(cancelled.meta)
        thread.join()
        assert outcome["error"].errno == errno.ECANCELED, outcome
        assert 0 < backings[0].bd_stat()[0] < total
        assert cancelled.read(0, n * PAGE) == data
        _tiering.cancel(cancelled.meta, False)
        _tiering.mark_idle(cancelled.meta, None)        # reading it back made it hot again
        _tiering.writeback(cancelled.meta, "idle", (), 2)
        assert backings[0].bd_stat()[0] == backings[1].bd_stat()[0] == total
        assert cancelled.read(0, n * PAGE) == data


def test_recompression_pauses_for_foreground_requests_and_still_finishes() -> None:
    """A recompression while another disk takes requests without a break: its threads pause
    for them, but every so often take a page all the same, so it finishes, with what an
    undisturbed one does; it does not pause where nothing else runs."""
    n = 64
    data = _mixed_pages(n, 5)
    disks = [make_disk(n * PAGE, secondary={1: ("zstd", 19)}) for _ in range(2)]
    busy = make_disk(16 * PAGE)
    stop = threading.Event()

    def foreground() -> None:
        page = bytes(range(256)) * 16
        while not stop.is_set():
            busy.write(0, page)
    writer = threading.Thread(target=foreground)
    try:
        for disk in disks:
            disk.write(0, data)
        writer.start()
        started = time.monotonic()
        polite = _tiering.recompress(disks[0].meta, None, 0, 0, 0, 2)
        paused = time.monotonic() - started
        stop.set()
        writer.join()
        started = time.monotonic()
        alone = _tiering.recompress(disks[1].meta, None, 0, 0, 0, 2)
        assert polite == alone > 0
        assert disks[0].meta.mm_stat()[1] == disks[1].meta.mm_stat()[1]
        assert disks[0].read(0, n * PAGE) == data
        # Not a timing of the machine: a pause is at least 10 ms, and a thread takes one page
        # after 20 of them at most; 64 pages, of which some are not recompressed, never pause
        # without a foreground, and always do with one.
        assert paused > 0.2, paused
    finally:
        stop.set()
        if writer.is_alive():
            writer.join()
        for disk in disks + [busy]:
            destroy(disk)


def test_recompression_on_threads_under_overwrites() -> None:
    """Four recompression threads (they compress without the slot lock) while another
    thread overwrites every page once, in random order: each page reads back as written,
    whether its overwrite came before, during or after its recompression. Once only, so
    that a recompression that stored a page's old content over the new could not be healed
    by a later write."""
    n = 512
    disk = make_disk(n * PAGE, secondary={1: ("zstd", 19)})
    try:
        for round_ in range(4):
            old = b"".join(page_data("text", 1000 * round_ + i, PAGE) for i in range(n))
            new = [page_data(("text", "random", "same")[i % 3], 7 + 1000 * round_ + i, PAGE)
                   for i in range(n)]
            disk.write(0, old)
            order = list(range(n))
            random.Random(round_).shuffle(order)
            started = threading.Event()

            def overwrite() -> None:
                started.wait()
                for k, i in enumerate(order):
                    disk.write(i * PAGE, new[i])
                    if k % 8 == 0:
                        time.sleep(0.0005)      # spread over the recompression
            writer = threading.Thread(target=overwrite)
            writer.start()
            try:
                started.set()
                while writer.is_alive():
                    _tiering.recompress(disk.meta, None, 0, 0, 0, 4, polite=False)
            finally:
                started.set()
                writer.join()
            assert disk.read(0, n * PAGE) == b"".join(new), f"round {round_}"
    finally:
        destroy(disk)
