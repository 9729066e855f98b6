"""Live restart's memory side, without a mount: a device's table and pool kept in memfds and
adopted in place by a new meta (Meta(kept=...)) or copied into one (Meta.take_over), the device
record (zramfs.sysfs.record), and what is refused.
The mount-level restarts (SIGKILL under fio, swap, ext4) are in test_restart.py."""
from __future__ import annotations

import os
import random
import struct

import pytest

from conftest import attached, destroy
from disk_io import IoDisk
from pool_io import IoPool
from zramfs.zpool._alloc import PoolImage, PoolImageError, PoolInPlaceError
from zramfs.zram._zram import Meta, TableImageError
from zramfs.sysfs.record import DECODE_ONLY, DeviceRecord, Record, State, StateError
from zramfs.sysfs.device import SETTINGS

PAGE = 4096
SIZE = 32 << 20


def page_of(rng: random.Random) -> bytes:
    kind = rng.random()
    if kind < 0.15:
        return bytes([rng.randrange(256)]) * PAGE                    # same-filled
    if kind < 0.25:
        return rng.randbytes(PAGE)                                   # huge
    word = b"page %d " % rng.randrange(10**6)
    return (word * (PAGE // len(word) + 1))[:PAGE - 64] + rng.randbytes(64)


def fill(disk: IoDisk, rng: random.Random, n: int) -> dict[int, bytes]:
    """n writes, overwrites and discards at random offsets: the model of what reads back."""
    model: dict[int, bytes] = {}
    for _ in range(n):
        off = rng.randrange(SIZE // PAGE) * PAGE
        if rng.random() < 0.1:
            disk.fallocate(0x03, off, PAGE)                          # discard
            model[off] = bytes(PAGE)
        else:
            model[off] = page_of(rng)
            disk.write(off, model[off])
    return model


@pytest.mark.parametrize("backend", ["zsmalloc", "zbud"])
def test_take_over_copies_every_page_and_the_counters(backend: str) -> None:
    rng = random.Random(backend)
    old = attached(Meta(SIZE, "lz4", backend=backend, name="old"))
    model = fill(old, rng, 4000)
    old.meta.compact()
    before = old.meta.mm_stat()
    fds = [os.dup(fd) for fd in old.meta.state_fds]
    destroy(old)                      # the old process's own mapping is gone; the fds keep it
    new_meta = Meta(SIZE, "lz4", backend=backend, name="new")
    try:
        pages, lost = new_meta.take_over(*fds)
        new = attached(new_meta)
        assert lost == 0
        assert pages == before[0] // PAGE                            # orig_data_size in pages
        after = new.meta.mm_stat()
        assert after[0] == before[0] and after[1] == before[1]       # stored, compressed
        assert after[5] == before[5] and after[7] == before[7]       # same, huge
        assert after[2] <= before[2]                                 # packed at least as tight
        bad = [off for off, data in model.items() if new.read(off, PAGE) != data]
        assert not bad, f"{len(bad)} pages differ after take_over"
        fill(new, rng, 500)                                          # and it goes on working
        destroy(new)
    finally:
        for fd in fds:
            os.close(fd)


def test_adoption_in_place_keeps_every_page_and_the_counters() -> None:
    """Three restarts: each new meta maps the kept memfds again (the same files, nothing
    copied) and holds what the one before held, in the same memory; and it goes on working."""
    rng = random.Random(3)
    disk = attached(Meta(SIZE, "lz4", name="gen0"))
    model = fill(disk, rng, 4000)
    disk.meta.compact()
    first = [os.fstat(fd).st_ino for fd in disk.meta.state_fds]
    for gen in range(1, 4):
        before = disk.meta.mm_stat()
        fds = [os.dup(fd) for fd in disk.meta.state_fds]
        destroy(disk)                  # the old process's mapping is gone; the fds keep it
        try:
            meta = Meta(SIZE, "lz4", name=f"gen{gen}", kept=tuple(fds))
        finally:
            for fd in fds:
                os.close(fd)
        disk = attached(meta)
        assert [os.fstat(fd).st_ino for fd in meta.state_fds] == first
        assert meta.adopted.lost == 0 and meta.adopted.pages == before[0] // PAGE
        after = meta.mm_stat()
        for field in (0, 1, 2, 4, 5, 7):   # stored, compressed, used, max used, same, huge
            assert after[field] == before[field], (gen, field, before, after)
        bad = [off for off, data in model.items() if disk.read(off, PAGE) != data]
        assert not bad, f"{len(bad)} pages differ after adoption {gen}"
        model.update(fill(disk, rng, 500))
    destroy(disk)


def test_adoption_frees_objects_no_slot_names() -> None:
    """A write that never reached the slot table leaves an object nobody names: adoption
    gives it back, its zspage with it when it was the last, and reuses the room."""
    with IoPool("zsmalloc", "p") as pool:
        handles = [pool.malloc(size) for size in (100, 100, 3000, 3000, 700) for _ in range(200)]
        for h in handles:
            pool.write(h, h.to_bytes(8, "little") * 8)
        used = pool.total_pages
        fd = os.dup(pool.fd)
    # The first 60 objects of each size: the zspages of the other 140 end up empty.
    kept = [h for g in range(5) for h in handles[g * 200:g * 200 + 60]] + handles[:5]
    try:
        adopted = IoPool.adopt(fd, kept, "q")
    finally:
        os.close(fd)
    with adopted:
        assert sum(r.obj_used for r in adopted.class_stats()) == len(set(kept))
        assert adopted.total_pages < used * 0.5
        for h in set(kept):
            assert adopted.read(h)[:64] == h.to_bytes(8, "little") * 8
        for h in set(kept):
            adopted.free(h)
        assert adopted.total_pages == 0
        fresh = [adopted.malloc(200) for _ in range(1000)]
        for h in fresh:
            adopted.write(h, b"n" * 200)
        assert all(adopted.read(h)[:200] == b"n" * 200 for h in fresh)


def test_adoption_in_place_refuses_what_it_cannot_trust() -> None:
    """A handle that leads nowhere is refused before anything is changed; a pool still mapped
    in this process (its address taken) is left to be copied. zbud is adopted in place as
    zsmalloc is (test_alloc.py has its own refusals)."""
    with IoPool("zsmalloc", "p") as pool:
        h = pool.malloc(100)
        pool.write(h, b"a" * 100)
        fd = os.dup(pool.fd)
        with pytest.raises(PoolInPlaceError, match="taken"):
            IoPool.adopt(fd, [h])
    try:
        for bad in (h + 1, h | (200 << 32), h ^ (1 << 31)):
            with pytest.raises(PoolImageError, match="damaged"):
                IoPool.adopt(fd, [h, bad])
        with IoPool.adopt(fd, [h]) as again:                  # nothing was changed
            assert again.read(h)[:100] == b"a" * 100
    finally:
        os.close(fd)
    with IoPool("zbud", "z") as pool:
        fd = os.dup(pool.fd)
    try:
        with IoPool.adopt(fd, []) as empty:
            assert empty.backend == "zbud" and empty.total_pages == 0
    finally:
        os.close(fd)
    with IoPool("zsmalloc", "e") as pool:                    # one that never held anything
        fd = os.dup(pool.fd)
    try:
        with IoPool.adopt(fd, []) as empty:
            assert empty.total_pages == 0
            assert empty.read(empty.malloc(10))[:1] == b"\0"
    finally:
        os.close(fd)


def test_adoption_leaves_a_sparse_table_sparse() -> None:
    """Slots never written are holes in the table's memfd; adopting reads only the rest."""
    disk = attached(Meta(1 << 30, "lz4", name="sparse"))
    for i in range(0, 1 << 30, 64 << 20):
        disk.write(i, b"s" * 100 + bytes(PAGE - 100))
    fds = [os.dup(fd) for fd in disk.meta.state_fds]
    destroy(disk)
    try:
        meta = Meta(1 << 30, "lz4", name="sparse2", kept=tuple(fds))
    finally:
        for fd in fds:
            os.close(fd)
    disk = attached(meta)
    try:
        assert meta.adopted == (16, 0, 0)
        assert os.fstat(meta.state_fds[0]).st_blocks * 512 < 1 << 20   # of 4 MiB of slots
        assert disk.read(64 << 20, PAGE)[:100] == b"s" * 100
    finally:
        destroy(disk)


def test_kept_memory_stays_with_the_fd_and_freed_pages_go_back() -> None:
    """A dup of the pool's memfd keeps its pages after the meta is gone; pages the device
    frees are holes punched in the memfd (shared memory ignores MADV_DONTNEED)."""
    def resident(fd: int) -> int:
        return os.fstat(fd).st_blocks * 512

    rng = random.Random(7)
    disk = attached(Meta(SIZE, "lz4", name="gone"))
    pool_fd = disk.meta.state_fds[1]
    for i in range(2000):
        disk.write(i * PAGE, rng.randbytes(PAGE))                   # ~8 MiB, incompressible
    full = resident(pool_fd)
    assert full > 7 << 20
    disk.fallocate(0x03, 0, 1000 * PAGE)                             # discard half: 3.9 MiB
    # Less the populator's reserve, which may fill meanwhile (1 MiB made resident ahead).
    assert resident(pool_fd) < full - (3 << 20) + (1 << 20)
    kept = os.dup(pool_fd)
    destroy(disk)
    try:
        assert resident(kept) > 3 << 20                              # kept by the dup
    finally:
        os.close(kept)


def test_take_over_refuses_what_it_cannot_read() -> None:
    disk = attached(Meta(SIZE, "lz4", name="src"))
    disk.write(0, b"x" * 100 + bytes(PAGE - 100))
    table, pool = (os.dup(fd) for fd in disk.meta.state_fds)
    destroy(disk)
    junk = os.memfd_create("junk")
    os.write(junk, b"\0" * (1 << 20))
    try:
        with pytest.raises(TableImageError, match="pages"):          # another disksize
            Meta(2 * SIZE, "lz4", name="t").take_over(table, pool)
        with pytest.raises(TableImageError, match="magic"):
            Meta(SIZE, "lz4", name="t").take_over(junk, pool)
        with pytest.raises(PoolImageError, match="magic"):
            Meta(SIZE, "lz4", name="t").take_over(table, junk)
        with pytest.raises(PoolImageError):
            PoolImage(table)                                         # a table is no pool
        # A pool of another format version: refused, and the fd is left as it was.
        version_at = 16
        saved = os.pread(pool, 4, version_at)
        os.pwrite(pool, struct.pack("<I", 99), version_at)
        with pytest.raises(PoolImageError, match="format 99"):
            Meta(SIZE, "lz4", name="t").take_over(table, pool)
        os.pwrite(pool, saved, version_at)
        meta = Meta(SIZE, "lz4", name="t")
        assert meta.take_over(table, pool) == (1, 0)                 # still whole
        meta.destroy()
    finally:
        for fd in (table, pool, junk):
            os.close(fd)


def test_a_handle_that_leads_nowhere_is_not_followed() -> None:
    """PoolImage checks every step of a handle: garbage handles give None, not a crash."""
    with IoPool("zsmalloc", "p") as pool:
        h = pool.malloc(100)
        pool.write(h, b"a" * 100)
        image = PoolImage(pool.fd)
        assert image.read(h, 100) == b"a" * 100
        for bad in (0, 1, h + 1, h | (200 << 32), (1 << 63) | 5, h ^ (1 << 31)):
            assert image.read(bad, 100) is None
        assert image.read(h, 5000) is None                           # larger than its class
        image.close()


def test_record_survives_a_torn_write() -> None:
    rec = Record()
    rec.write({"n": 1})
    rec.write({"n": 2})
    assert Record(os.dup(rec.fd)).read() == {"n": 2}
    # A write torn in the middle (the daemon killed in it) leaves the other half.
    half = 1 << 20
    os.pwrite(rec.fd, b"\xff" * 64, (rec.seq % 2) * half + 40)
    assert Record(os.dup(rec.fd)).read() == {"n": 1}
    os.pwrite(rec.fd, b"\xff" * 64, ((rec.seq + 1) % 2) * half + 40)
    with pytest.raises(StateError, match="no readable"):
        Record(os.dup(rec.fd)).read()
    os.close(rec.fd)


def test_state_keeps_one_complete_pair_at_every_moment() -> None:
    kept: dict[str, int] = {}
    log: list[str] = []

    def keep(name: str, fd: int) -> None:
        kept[name] = fd
        log.append(f"+{name}")

    def drop(name: str) -> None:
        kept.pop(name, None)
        log.append(f"-{name}")

    state = State({}, keep, drop, SETTINGS)
    assert "devices" in kept
    state.added(0, 1)
    state.stored(0, "comp_algorithm", "zstd")
    state.stored(0, "idle", "all")                                   # an action: not kept
    state.stored(0, "disksize", "1G")
    state.keep_meta(0, (10, 11))
    state.keep_meta(0, (12, 13))
    assert log[-4:] == ["+zram0.2.table", "+zram0.2.pool", "-zram0.1.table", "-zram0.1.pool"]
    # A new daemon given these fds finds the newest pair and the settings in order.
    inherited = {name: [fd] for name, fd in kept.items()}
    inherited["devices"] = [os.dup(state.record.fd)]
    inherited["zram0.1.table"] = [os.memfd_create("stale")]          # a pair never completed
    successor = State(inherited, keep, drop, SETTINGS)
    records = successor.load()
    assert records == [DeviceRecord(0, 1, 0, [("comp_algorithm", "zstd"), ("disksize", "1G")])]
    assert successor.kept_pair(0) == (12, 13)
    state.stored(0, "reset", "1")
    state.drop_meta(0)
    assert not [n for n in kept if n.startswith("zram0.")]
    assert state.devices[0].settings == []


def test_state_keeps_the_dictionaries_beside_the_pair() -> None:
    """A device's dictionaries are kept with its pair ((priority, bytes); DECODE_ONLY for
    one no algorithm writes with), go with it, and read back in a successor; a kept set
    that is not whole is refused."""
    kept: dict[str, int] = {}
    state = State({}, lambda name, fd: kept.__setitem__(name, fd),
                  lambda name: kept.pop(name, None), SETTINGS)
    state.added(0, 1)
    dictionaries = [(0, b"first" * 100), (DECODE_ONLY, b"older" * 50)]
    state.keep_meta(0, (10, 11), dictionaries)
    state.keep_meta(0, (12, 13), dictionaries)
    assert sorted(n for n in kept if n.startswith("zram0.")) == \
        ["zram0.2.dicts", "zram0.2.pool", "zram0.2.table"]
    inherited = {name: [fd] for name, fd in kept.items()}
    successor = State(inherited, lambda name, fd: None, lambda name: None, SETTINGS)
    assert successor.kept_pair(0) == (12, 13)
    assert successor.kept_dictionaries(0) == dictionaries
    fd = inherited["zram0.2.dicts"][0]
    data = os.pread(fd, 1 << 20, 0)
    for damaged in (b"x" + data[1:], data[:-1]):
        spoiled = os.memfd_create("spoiled")
        os.write(spoiled, damaged)
        inherited["zram0.2.dicts"] = [spoiled]
        with pytest.raises(StateError, match="kept dictionaries"):
            successor.kept_dictionaries(0)
        os.close(spoiled)
    state.drop_meta(0)
    assert not [n for n in kept if n.startswith("zram0.")]
