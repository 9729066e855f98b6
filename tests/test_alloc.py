"""The allocator (zramfs.zpool._alloc): models, threads, memory given back, density."""
from __future__ import annotations

import os
import random
import threading
import time

import lz4.block
import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import Bundle, RuleBasedStateMachine, consumes, invariant, rule

import corpus
from pool_io import IoPool
from zramfs import registry
from zramfs.zpool import _alloc

BACKENDS = ["zsmalloc", "zbud"]
PAGE = 4096


def rss_bytes() -> int:
    """Resident memory of this process, from the kernel's own rollup."""
    with open("/proc/self/smaps_rollup") as f:
        for line in f:
            if line.startswith("Rss:"):
                return int(line.split()[1]) * 1024
    raise AssertionError("no Rss line in smaps_rollup")


def fill(seed: int, size: int) -> bytes:
    return random.Random(seed).randbytes(size)


# --- models ----------------------------------------------------------------------------------


class PoolModel(RuleBasedStateMachine):
    """Random malloc/write/free/compact against a dict; every live object reads back."""

    backend = "zsmalloc"
    handles = Bundle("handles")

    def __init__(self) -> None:
        super().__init__()
        self.pool = IoPool(self.backend, "model", max_pages_per_zspage=4)
        self.model: dict[int, bytes] = {}

    @rule(target=handles, size=st.integers(1, PAGE), seed=st.integers(0, 2**16))
    def malloc(self, size: int, seed: int) -> int:
        h = self.pool.malloc(size)
        assert h not in self.model
        data = fill(seed, size)
        self.pool.write(h, data)
        self.model[h] = data
        return h

    @rule(h=handles, seed=st.integers(0, 2**16))
    def rewrite(self, h: int, seed: int) -> None:
        if h in self.model:
            data = fill(seed, len(self.model[h]))
            self.pool.write(h, data)
            self.model[h] = data

    @rule(h=consumes(handles))
    def free(self, h: int) -> None:
        if h in self.model:
            self.pool.free(h)
            del self.model[h]
        else:
            with pytest.raises(KeyError):
                self.pool.free(h)

    @rule()
    def compact(self) -> None:
        before = self.pool.total_pages
        freed = self.pool.compact()
        assert self.pool.total_pages == before - freed

    @invariant()
    def contents(self) -> None:
        for h, data in self.model.items():
            assert self.pool.read(h)[: len(data)] == data

    @invariant()
    def memory(self) -> None:
        held = self.pool.total_pages * PAGE
        assert held >= sum(len(d) for d in self.model.values())
        if not self.model:
            assert held == 0
        for row in self.pool.class_stats():
            assert 0 <= row.obj_used <= row.obj_allocated

    def teardown(self) -> None:
        self.pool.destroy()


class ZbudModel(PoolModel):
    backend = "zbud"


TestZsmallocModel = PoolModel.TestCase
TestZsmallocModel.settings = settings(max_examples=60, stateful_step_count=80, deadline=None)
TestZbudModel = ZbudModel.TestCase
TestZbudModel.settings = settings(max_examples=60, stateful_step_count=80, deadline=None)


# --- behaviour -------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", BACKENDS)
def test_bad_sizes_and_handles(backend: str) -> None:
    with IoPool(backend) as pool:
        for size in (0, PAGE + 1):
            with pytest.raises(ValueError):
                pool.malloc(size)
        h = pool.malloc(100)
        with pytest.raises(ValueError):
            pool.write(h, bytes(PAGE))
        pool.free(h)
        with pytest.raises(KeyError):
            pool.read(h)
    with pytest.raises(_alloc.PoolError):
        pool.malloc(1)


def test_size_classes_merge_and_huge_threshold() -> None:
    with IoPool("zsmalloc", max_pages_per_zspage=8) as pool:
        rows = pool.class_stats()
        sizes = [r.size for r in rows]
        assert sizes == sorted(sizes) and sizes[0] == 32 and sizes[-1] == PAGE
        assert len(rows) < 255                      # some classes merged
        assert all(1 <= r.pages_per_zspage <= 8 for r in rows)
        huge = pool.huge_class_size
        assert 3000 < huge < PAGE
        # An object just under the threshold shares its zspage; one at it takes a page alone.
        a, b = pool.malloc(huge - 16), pool.malloc(huge - 16)
        assert pool.total_pages > 1
        row = next(r for r in pool.class_stats() if r.size >= huge - 16)
        assert row.obj_used == 2 and row.pages_per_zspage > 1
        pool.free(a)
        pool.free(b)
        h = pool.malloc(huge)
        row = next(r for r in pool.class_stats() if r.obj_used)
        assert row.size == PAGE and row.pages_per_zspage == 1


def test_class_size() -> None:
    with _alloc.Pool("zsmalloc") as pool:
        assert pool.class_size(1) == 32 and pool.class_size(33) == 48
        assert pool.class_size(pool.huge_class_size) == PAGE
        assert pool.class_size(pool.huge_class_size - 1) < PAGE
        sizes = [pool.class_size(n) for n in range(1, PAGE + 1)]
        assert all(a <= b for a, b in zip(sizes, sizes[1:]))
        assert all(n <= c for n, c in zip(range(1, PAGE + 1), sizes))
    with _alloc.Pool("zbud") as pool:
        assert (pool.class_size(1), pool.class_size(65), pool.class_size(PAGE)) == (64, 128, PAGE)


def test_fullest_zspage_first() -> None:
    with IoPool("zsmalloc", max_pages_per_zspage=1) as pool:
        hs = [pool.malloc(1024) for _ in range(12)]          # three zspages of four objects
        assert pool.total_pages == 3
        for h in hs[0:2] + hs[4:5]:                          # zspage 1 half used, zspage 2 3/4
            pool.free(h)
        pool.malloc(1024)                                    # goes to zspage 2, the fullest
        for h in hs[2:4]:
            pool.free(h)
        assert pool.total_pages == 2                         # zspage 1 emptied, given back


def test_compaction_moves_and_frees() -> None:
    with IoPool("zsmalloc", max_pages_per_zspage=4) as pool:
        data = {}
        for i in range(4000):
            h = pool.malloc(500)
            data[h] = fill(i, 500)
            pool.write(h, data[h])
        for h in list(data)[::3] + list(data)[1::3]:         # leave every third
            pool.free(h)
            del data[h]
        before = pool.total_pages
        freeable = sum(r.freeable for r in pool.class_stats())
        freed = pool.compact()
        assert freed > 0 and freed >= freeable // 2
        assert pool.total_pages == before - freed
        assert pool.pages_compacted == freed
        assert sum(r.freeable for r in pool.class_stats()) < freeable
        for h, d in data.items():
            assert pool.read(h)[:500] == d


def test_pool_names_unique_while_torn_down() -> None:
    a = _alloc.Pool(name="zram0")
    b = _alloc.Pool(name="zram0")            # a still alive, e.g. being torn down
    assert (a.name, b.name) == ("zram0", "zram0-2")
    a.destroy()
    c = _alloc.Pool(name="zram0")            # free again once a is gone
    assert c.name == "zram0"
    assert len({a.name, b.name, c.name} - {"zram0"}) == 1
    b.destroy()
    c.destroy()


def test_backend_in_use_cannot_be_unregistered() -> None:
    pool = _alloc.Pool("zbud")
    with pytest.raises(registry.InUse):
        _alloc.BACKENDS.unregister("zbud")
    assert "zbud" in _alloc.BACKENDS.names()
    pool.destroy()
    backend = _alloc.BACKENDS.pin("zbud")
    _alloc.BACKENDS.unpin("zbud")
    _alloc.BACKENDS.unregister("zbud")
    try:
        with pytest.raises(registry.NotRegistered):
            _alloc.Pool("zbud")
    finally:
        _alloc.BACKENDS.register("zbud", backend)
    with _alloc.Pool("zbud") as pool:
        assert pool.backend == "zbud"


# --- threads ---------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", BACKENDS)
def test_threads_hammer_one_pool(backend: str) -> None:
    """Allocate, write, read, free and compact at once; every object keeps its content."""
    pool = IoPool(backend, "hammer", max_pages_per_zspage=4)
    errors: list[str] = []
    stop = threading.Event()

    def worker(seed: int) -> None:
        rng = random.Random(seed)
        mine: dict[int, bytes] = {}
        try:
            for step in range(6000):
                if mine and rng.random() < 0.45:
                    h = rng.choice(list(mine))
                    if pool.read(h)[: len(mine[h])] != mine[h]:
                        errors.append(f"thread {seed}: handle {h:#x} changed")
                        return
                    pool.free(h)
                    del mine[h]
                else:
                    size = rng.choice((rng.randrange(1, 200), rng.randrange(1, PAGE + 1)))
                    data = bytes([seed]) * 4 + rng.randbytes(size - 4) if size > 4 else b"x" * size
                    h = pool.malloc(size)
                    pool.write(h, data)
                    mine[h] = data
            for h, data in mine.items():
                if pool.read(h)[: len(data)] != data:
                    errors.append(f"thread {seed}: handle {h:#x} changed at the end")
        except Exception as e:  # reported below, in the main thread
            errors.append(f"thread {seed}: {e!r}")

    def compactor() -> None:
        while not stop.is_set():
            pool.compact()

    workers = [threading.Thread(target=worker, args=(i,)) for i in range(4)]
    comp = threading.Thread(target=compactor)
    comp.start()
    for t in workers:
        t.start()
    for t in workers:
        t.join()
    stop.set()
    comp.join()
    try:
        assert not errors, errors[:5]
    finally:
        pool.destroy()


# --- memory ----------------------------------------------------------------------------------


def test_memory_really_returns() -> None:
    """Free most objects and compact: resident memory falls by what the pool says it freed."""
    with IoPool("zsmalloc", "rss") as pool:
        rng = random.Random(1)
        handles = []
        chunk = rng.randbytes(PAGE)
        for i in range(60000):                      # ~100 MiB in objects of 1..3.5 KiB
            size = rng.randrange(1000, 3500)
            h = pool.malloc(size)
            pool.write(h, chunk[:size])
            handles.append(h)
        rng.shuffle(handles)
        keep = handles[: len(handles) // 10]
        rss_full, held_full = rss_bytes(), pool.total_pages * PAGE
        for h in handles[len(handles) // 10 :]:
            pool.free(h)
        pool.compact()
        rss_after, held_after = rss_bytes(), pool.total_pages * PAGE
        given_back = held_full - held_after
        assert given_back > 0.8 * held_full          # 90 % freed, compacted
        assert rss_full - rss_after >= 0.95 * given_back, (rss_full, rss_after, given_back)
        assert all(len(pool.read(h)) >= 1000 for h in keep)


@pytest.mark.parametrize("backend", BACKENDS)
def test_fresh_pages_are_made_resident_ahead_and_no_further(backend: str) -> None:
    """The populator thread makes the arena resident ahead of the first object, about 1 MiB
    of it: more than the one zspage in use, far less than the 64 MiB arena."""
    with IoPool(backend, "ahead") as pool:
        before = rss_bytes()
        pool.write(pool.malloc(100), b"x" * 100)
        assert pool.total_pages <= 8                  # one zspage
        deadline = time.monotonic() + 5
        while rss_bytes() - before < 768 << 10 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert rss_bytes() - before >= 768 << 10
        time.sleep(0.2)                               # it would go on, were it not bounded
        assert rss_bytes() - before <= 4 << 20


@pytest.fixture(scope="module")
def corpus_data() -> bytes:
    return corpus.build(128 << 20)


def test_density_on_real_files(corpus_data: bytes) -> None:
    """lz4 pages of real files, stored as zram would: at most 5 % over the objects' sizes."""
    with IoPool("zsmalloc", "density") as pool:
        huge = pool.huge_class_size
        stored = 0
        for page in corpus.pages(corpus_data):
            data = lz4.block.compress(page, store_size=False)
            if len(data) >= huge:
                data = page                      # zram stores such pages raw
            pool.write(pool.malloc(len(data)), data)
            stored += len(data)
        held = pool.total_pages * PAGE
        print(f"\ndensity: {held} bytes held for {stored} bytes of objects: {held / stored:.4f}")
        assert held <= 1.05 * stored


def test_memory_returns_under_mlockall() -> None:
    """With every page locked (the daemon's swap safety), freed zspages still go back."""
    import ctypes
    libc = ctypes.CDLL(None, use_errno=True)
    MCL_CURRENT, MCL_FUTURE, MCL_ONFAULT = 1, 2, 4
    if libc.mlockall(MCL_CURRENT | MCL_FUTURE | MCL_ONFAULT) != 0:
        pytest.skip(f"mlockall: {os.strerror(ctypes.get_errno())}")
    try:
        with IoPool("zsmalloc", "mlocked") as pool:
            chunk = random.Random(2).randbytes(PAGE)
            handles = [pool.malloc(3000) for _ in range(20000)]
            for h in handles:
                pool.write(h, chunk[:3000])
            rss_full, held_full = rss_bytes(), pool.total_pages * PAGE
            for h in handles:
                pool.free(h)
            assert pool.total_pages == 0
            assert rss_full - rss_bytes() >= 0.95 * held_full
            h = pool.malloc(3000)                        # the freed runs are usable again
            pool.write(h, chunk[:3000])
            assert pool.read(h)[:3000] == chunk[:3000]
    finally:
        libc.munlockall()


# --- a kept pool: adopted in place, or read for copying ----------------------------------------


def kept(pool: _alloc.Pool) -> int:
    """A dup of the pool's memfd, the pool itself destroyed: what a killed daemon leaves."""
    fd = os.dup(pool.fd)
    pool.destroy()
    return fd


def objects(pool: _alloc.Pool, seed: int, n: int) -> dict[int, bytes]:
    rng = random.Random(seed)
    model = {}
    for _ in range(n):
        data = rng.randbytes(rng.choice([20, 100, 700, 1500, 2040, 3000, 4000]))
        h = pool.malloc(len(data))
        pool.write(h, data)
        model[h] = data
    return model


@pytest.mark.parametrize("backend", BACKENDS)
def test_adoption_in_place_keeps_what_is_named_and_frees_the_rest(backend: str) -> None:
    """The handles given (repeats allowed) read back; every other object is freed, the room
    it took given back and used again; adopted twice over, the same."""
    pool = IoPool(backend, "kept")
    model = objects(pool, 1, 3000)
    used = pool.total_pages
    fd = kept(pool)
    keep = sorted(model)[:1000]        # whole classes or pages, so that their room goes back
    try:
        for round in range(2):
            with IoPool.adopt(fd, keep + keep[:10], f"again{round}") as again:
                assert again.backend == backend
                assert all(again.read(h)[:len(model[h])] == model[h] for h in keep)
                assert again.total_pages < used * 0.75
                fresh = objects(again, 2 + round, 500)
                assert all(again.read(h)[:len(d)] == d for h, d in fresh.items())
                for h in fresh:
                    again.free(h)
        with IoPool.adopt(fd, [], "empty") as empty:
            assert empty.total_pages == 0
    finally:
        os.close(fd)


@pytest.mark.parametrize("backend", BACKENDS)
def test_adoption_refuses_a_handle_that_leads_nowhere_and_changes_nothing(backend: str) -> None:
    pool = IoPool(backend, "kept")
    h = pool.malloc(100)
    pool.write(h, b"a" * 100)
    if backend == "zbud":           # the first buddy alone; a descriptor's neighbour, unused
        bad = [h | 1, h + 8, h + 40, h + 4096, 1 << 46, 0]
    else:
        bad = [h + 1, h | (200 << 32), h ^ (1 << 31), 0]
    fd = kept(pool)
    try:
        for b in bad:
            with pytest.raises(_alloc.PoolImageError, match="damaged"):
                IoPool.adopt(fd, [h, b])
        with IoPool.adopt(fd, [h]) as again:
            assert again.read(h)[:100] == b"a" * 100
    finally:
        os.close(fd)


@pytest.mark.parametrize("backend", BACKENDS)
def test_copying_reads_a_kept_pool_through_the_same_checks(backend: str) -> None:
    """PoolImage (for copying where the old address is taken) finds what adoption would, and
    None for what adoption refuses."""
    with IoPool(backend, "image") as pool:
        model = objects(pool, 4, 300)
        image = _alloc.PoolImage(pool.fd)        # mapped elsewhere: the address is taken
        try:
            assert all(image.read(h, len(d)) == d for h, d in model.items())
            h = next(iter(model))
            assert image.read(h, len(model[h]) + 1) is None          # larger than the object
            if backend == "zbud":
                bad = [1, h + 8, 1 << 46]
            else:
                bad = [h | (200 << 32), (h >> 32 << 32) | 0xFFFFF0, h >> 32 << 32]
            for b in bad + [0, (1 << 63) | 5]:
                assert image.read(b, 10) is None, hex(b)
        finally:
            image.close()


def zbud_descriptor_list(fd: int) -> tuple[int, int, int]:
    """A kept zbud pool's list of descriptor pages: (where its head is in the memfd, the
    first page's tail as the old process addressed it, where that process had the region)."""
    base = int.from_bytes(os.pread(fd, 8, 40), "little")         # zpool_header.base
    root = os.pread(fd, 4096, 4096)                               # ZPOOL_ROOT
    # The head: the one pointer in the root to a page's last 16 bytes.
    heads = [at for at in range(0, 4096, 8)
             if (v := int.from_bytes(root[at:at + 8], "little")) > base
             and v % PAGE == PAGE - 16]
    assert len(heads) == 1, heads
    return 4096 + heads[0], int.from_bytes(root[heads[0]:heads[0] + 8], "little"), base


def test_a_zbud_pool_whose_descriptor_list_loops_is_refused() -> None:
    pool = IoPool("zbud", "loop")
    model = objects(pool, 6, 500)
    fd = kept(pool)
    try:
        _, run, base = zbud_descriptor_list(fd)
        saved = os.pread(fd, 8, run - base)
        os.pwrite(fd, run.to_bytes(8, "little"), run - base)      # its next is itself
        with pytest.raises(_alloc.PoolImageError, match="loop"):
            IoPool.adopt(fd, list(model))
        with pytest.raises(_alloc.PoolImageError, match="loop"):
            _alloc.PoolImage(fd)
        os.pwrite(fd, saved, run - base)
        with IoPool.adopt(fd, list(model)) as again:
            assert all(again.read(h)[:len(d)] == d for h, d in model.items())
    finally:
        os.close(fd)


def test_a_zbud_pool_made_before_its_descriptor_list_is_adopted() -> None:
    """A zbud pool of the previous layout has no list of its pages of descriptors (zeros where
    it is now): they are found from its lists, and adoption gives it the list."""
    pool = IoPool("zbud", "old")
    model = objects(pool, 5, 2000)
    fd = kept(pool)
    try:
        head, run, base = zbud_descriptor_list(fd)
        os.pwrite(fd, bytes(8), head)
        pages = 0
        while run:
            nxt = int.from_bytes(os.pread(fd, 8, run - base), "little")
            os.pwrite(fd, bytes(16), run - base)
            run, pages = nxt, pages + 1
        assert pages > 1                # a list of several pages, now gone
        for round in range(2):          # the second time, with the list the first one made
            with IoPool.adopt(fd, list(model), f"new{round}") as again:
                assert all(again.read(h)[:len(d)] == d for h, d in model.items())
    finally:
        os.close(fd)
