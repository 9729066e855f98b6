# cython: language_level=3
"""A device's slot table, its lifetime, and the byte-range I/O over it, all without the GIL.

Owns: the slot table (one `zslot` per 4 KiB page, as zram's table: the object's handle, size
and flags), the page store and load, the request entry points (zdisk_read/write/fallocate)
and mm_stat's and io_stat's counters; and `Meta` and `Disk`, their Python faces.

Every page operation holds the slot's lock from first look to last touch, so a page being
read is never freed, moved or half-written under the reader (docs/design.md, hazard 2), and
a partial write's read-modify-write is one step. A new object is complete before the slot
points to it and the old one is freed after (hazard 8). Nothing is allocated on the request
path but the compressed objects themselves (hazard 4).

Lock order, outermost first: a compression stream (a request's shared one or a worker's
private one, then a recompression algorithm's); a slot lock; the eviction lock (a writer over
mem_limit evicts holding its own slot lock, and only try-locks other slots); dedup's index
lock (zramfs.zram._dedup: nothing is taken under it); the allocator's
class locks (taken inside malloc/free/map and by the compaction eviction ends with); the
page source's lock; the backing device's bitmap lock.

`Disk` is the device as the FUSE layer sees it: it holds the current `Meta` while the device
is initialised and counts the references held on it (hazard 1). `Meta` is what disksize
creates and reset destroys: table, pool, compressor streams, workers, counters.
"""
from __future__ import annotations

import os
from collections import namedtuple

from libc.errno cimport EBUSY, EINVAL, EIO, ENOMEM, ENOSPC, EOPNOTSUPP
from libc.stdint cimport int64_t, uint32_t, uint64_t
from libc.stdio cimport snprintf
from libc.stdlib cimport calloc, free, malloc, realloc
from libc.string cimport memcmp, memcpy, memset, strncpy
from cpython.buffer cimport PyBUF_SIMPLE, PyBuffer_Release, PyObject_GetBuffer
from cpython.bytes cimport PyBytes_AS_STRING, PyBytes_FromStringAndSize
from cpython.pycapsule cimport PyCapsule_New

from zramfs.zpool._alloc cimport Pool, PoolImage, pool_adopt
from zramfs.zram._backing cimport Backing, backing_free, backing_read, backing_take
from zramfs.zpool._pages cimport region_close, region_create, region_data_run, region_map, zregion
from zramfs.zram._workers cimport zjob, zworkers_run, zworkers_start, zworkers_stop
from zramfs.zcomp._zcomp cimport (Compressor, zcomp_compress, zcomp_decompress, zcomp_private_stream,
                            zcomp_stream_get, zcomp_stream_put)
from zramfs.zram.data_ops cimport ZRAMFS_DATA_OPS_CAPSULE, zramfs_data_ops
from zramfs.pthread cimport pthread_mutex_destroy, pthread_mutex_init
from zramfs.common cimport (PAGE_SHIFT, PAGE_SIZE, posix_memalign, za_add, za_load, za_load_ptr,
                            za_load32, za_load64, za_max, za_store, za_store32,
                            za_store_ptr, za_sub, zram_now_ns, zram_now_s)
from zramfs.zram.zram cimport (ZRAM_ACCESSED, ZRAM_DEDUP, ZRAM_HUGE, ZRAM_IDLE,
                               ZRAM_INCOMPRESSIBLE, ZRAM_LIVE, ZRAM_LOCK, ZRAM_UNDER_WB,
                               ZRAM_WB_COMPRESSED, ZRAM_PRIO_MASK, ZRAM_PRIO_SHIFT, ZRAM_SAME,
                               ZRAM_WB, zram_get, zram_put, zram_set_live, zram_slot_flags,
                               zram_slot_lock, zram_slot_set_flags, zram_slot_unlock)

from zramfs.zpool._alloc import (Pool as _Pool, PoolImage as _PoolImage, PoolImageError,
                           PoolInPlaceError)
from zramfs.zram._workers import default_workers
from zramfs.zcomp._zcomp import Compressor as _Compressor

cdef extern from "<linux/falloc.h>" nogil:
    int FALLOC_FL_KEEP_SIZE, FALLOC_FL_PUNCH_HOLE, FALLOC_FL_ZERO_RANGE
    size_t SIZE_MAX

cdef enum:
    SECTOR_SHIFT = 9
    IO_READ = 0
    IO_WRITE = 1
    IO_DISCARD = 2


# --- one page, slot lock held ----------------------------------------------------------------

cdef inline bint _same_filled(const char* page, uint64_t* word) noexcept nogil:
    cdef const uint64_t* w = <const uint64_t*>page
    cdef size_t i
    for i in range(1, PAGE_SIZE // 8):
        if w[i] != w[0]:
            return False
    word[0] = w[0]
    return True


cdef inline void _fill(char* page, uint64_t word) noexcept nogil:
    cdef uint64_t* w = <uint64_t*>page
    cdef size_t i
    if word == 0:
        memset(page, 0, PAGE_SIZE)
        return
    for i in range(PAGE_SIZE // 8):
        w[i] = word


cdef uint32_t zram_now() noexcept nogil:
    """Seconds on a coarse monotonic clock: the unit of access times and idle ages."""
    return zram_now_s()


cdef bint zram_slot_has_object(zslot* s, uint32_t flags) noexcept nogil:
    """The slot holds a compressed object in the pool (not same-filled, not written back)."""
    return s.size != 0 and not flags & (ZRAM_SAME | ZRAM_WB)


cdef void _drop(zram* m, uint64_t handle, uint32_t size, uint32_t flags) noexcept nogil:
    """Frees content a slot no longer points at (hazard 8: the slot lets go first, so a
    daemon that ends in between leaves a leak its successor never copies, not a slot pointing
    at freed memory)."""
    if flags & ZRAM_SAME:
        za_sub(&m.same_pages, 1)
        za_sub(&m.pages_stored, 1)
    elif flags & ZRAM_WB:
        backing_free(m.backing, handle)
        za_sub(&m.pages_stored, 1)
    elif size:
        # A shared object (dedup) goes with its last slot: compr_data_size counts it once.
        if not flags & ZRAM_DEDUP or m.dedup_put(m, handle):
            m.driver.free(m.pool, handle)
            za_sub(&m.compr_data_size, size)
        za_sub(&m.pages_stored, 1)
        if flags & ZRAM_HUGE:
            za_sub(&m.huge_pages, 1)


cdef void zram_slot_free(zram* m, zslot* s) noexcept nogil:
    """Empties the slot, then frees what it held."""
    cdef uint32_t flags = zram_slot_flags(&s.flags)
    cdef uint64_t handle = s.handle
    cdef uint32_t size = s.size
    s.handle = 0
    s.size = 0
    zram_slot_set_flags(&s.flags, 0)
    _drop(m, handle, size, flags)


cdef int zram_slot_load(zram* m, zslot* s, char* page, zstream* st) noexcept nogil:
    """The slot's page into `page`; st.page may serve as bounce buffer, so `page` is st.page
    or apart from it. 0 or -errno."""
    cdef uint32_t flags = zram_slot_flags(&s.flags)
    cdef const char* src
    cdef char* bounce
    cdef int rc = 0
    if flags & ZRAM_SAME:
        _fill(page, s.handle)
    elif flags & ZRAM_WB_COMPRESSED:
        # Written back as stored: read into the stream's (aligned) buffer, then as from the pool.
        rc = backing_read(m.backing, s.handle, st.buffer)
        if rc == 0:
            rc = _decompress(m, flags, st.buffer, s.size, page, st)
    elif flags & ZRAM_WB:
        # O_DIRECT wants an aligned buffer; the stream's scratch page is one.
        bounce = page if (<size_t>page & (PAGE_SIZE - 1)) == 0 else st.page
        rc = backing_read(m.backing, s.handle, bounce)
        if rc == 0 and bounce != page:
            memcpy(page, bounce, PAGE_SIZE)
    elif s.size == 0:
        memset(page, 0, PAGE_SIZE)
    else:
        src = m.driver.map(m.pool, s.handle)
        rc = _decompress(m, flags, src, s.size, page, st)
        m.driver.unmap(m.pool, s.handle)
    return rc


cdef int _decompress(zram* m, uint32_t flags, const char* src, size_t size, char* page,
                     zstream* st) noexcept nogil:
    """An object as stored (raw for a huge page; else by the algorithm its priority names)
    into `page`. 0 or -EIO."""
    cdef int prio = (flags & ZRAM_PRIO_MASK) >> ZRAM_PRIO_SHIFT
    cdef int rc
    cdef zstream* st2
    if flags & ZRAM_HUGE:
        memcpy(page, src, PAGE_SIZE)
        return 0
    if prio == 0:
        rc = zcomp_decompress(m.comp, st, src, <int>size, page)
    else:                         # recompressed: the secondary algorithm's own stream
        st2 = zcomp_stream_get(m.secondary[prio])
        rc = zcomp_decompress(m.secondary[prio], st2, src, <int>size, page)
        zcomp_stream_put(st2)
    return -EIO if rc != 0 else 0


cdef int zram_slot_replace(zram* m, zslot* s, const char* data, size_t n, uint32_t flags,
                           bint may_evict) noexcept nogil:
    """Stores `n` bytes of `data` as the slot's new object with `flags`, then frees the old
    content: the write path's and recompression's one way into the pool. -ENOMEM when the
    pool has no memory (the process's budget is spent) or the object would take it over
    mem_limit; a writer (`may_evict`) first has eviction, where on, make room."""
    cdef uint64_t handle = m.driver.malloc(m.pool, n)
    cdef uint64_t old_handle
    cdef uint32_t old_size, old_flags
    cdef size_t used, limit
    cdef char* dst
    if handle == 0 and may_evict and m.evict != NULL:
        m.evict(m, 0)             # the process's memory budget is spent: make room, once
        handle = m.driver.malloc(m.pool, n)
    if handle == 0:
        return -ENOMEM
    used = m.driver.total_pages(m.pool)
    za_max(&m.max_used_pages, used)
    limit = za_load(&m.limit_pages)
    if limit and used > limit:
        if may_evict and m.evict != NULL:
            m.evict(m, used - limit)
            used = m.driver.total_pages(m.pool)
        if used > limit:
            m.driver.free(m.pool, handle)
            return -ENOMEM
    dst = m.driver.map(m.pool, handle)
    memcpy(dst, data, n)
    m.driver.unmap(m.pool, handle)
    # The slot points at the complete new object, then the old content goes (hazard 8).
    old_flags = zram_slot_flags(&s.flags)
    old_handle = s.handle
    old_size = s.size
    s.handle = handle
    s.size = <uint32_t>n
    zram_slot_set_flags(&s.flags, flags)
    _drop(m, old_handle, old_size, old_flags)
    za_add(&m.compr_data_size, n)
    za_add(&m.pages_stored, 1)
    if flags & ZRAM_HUGE:
        za_add(&m.huge_pages, 1)
        za_add(&m.huge_pages_since, 1)
    return 0


cdef int _slot_store(zram* m, zslot* s, const char* page, zstream* st) noexcept nogil:
    """Compresses and stores one page in place of the slot's old content; -errno on failure.
    A same-filled page takes no object; one that compresses no better than a huge class is
    stored raw."""
    cdef uint64_t word
    cdef int n
    if _same_filled(page, &word):
        zram_slot_free(m, s)
        s.handle = word
        zram_slot_set_flags(&s.flags, ZRAM_SAME)
        za_add(&m.same_pages, 1)
        za_add(&m.pages_stored, 1)
        return 0
    if m.dedup_store != NULL:     # dedup on: zramfs.zram._dedup stores it, or shares a twin
        return m.dedup_store(m, s, page, st)
    n = zcomp_compress(m.comp, st, page, <int>m.huge_size - 1)
    if n <= 0:
        return zram_slot_replace(m, s, page, PAGE_SIZE, ZRAM_HUGE, True)
    return zram_slot_replace(m, s, st.buffer, n, 0, True)


cdef inline void _touch(zram* m, zslot* s) noexcept nogil:
    """An access: the page is no longer idle, and gets a second chance from eviction."""
    m.ac_time[s - m.table] = zram_now_s()
    zram_slot_set_flags(&s.flags, (zram_slot_flags(&s.flags) & ~ZRAM_IDLE) | ZRAM_ACCESSED)


# --- byte ranges: a request's pages ---------------------------------------------------------

ctypedef struct zrange:
    zram* m
    bint write
    char* buf                  # the request's buffer (only read from for a write)
    size_t off                 # the request's byte range on the device
    size_t size


cdef int _page_io(void* arg, size_t page, zstream* st) noexcept nogil:
    """Page `page` of the request between its slot and the request's buffer; takes and drops
    the slot's lock. A partial page is read-modify-write in st.page. 0 or -errno."""
    cdef zrange* r = <zrange*>arg
    cdef zram* m = r.m
    cdef size_t start = max(page << PAGE_SHIFT, r.off)
    cdef size_t end = min((page + 1) << PAGE_SHIFT, r.off + r.size)
    cdef size_t pofs = start & (PAGE_SIZE - 1)
    cdef size_t n = end - start
    cdef char* b = r.buf + (start - r.off)
    cdef zslot* s = &m.table[page]
    cdef int rc
    zram_slot_lock(&s.flags)
    if n == PAGE_SIZE:
        rc = _slot_store(m, s, b, st) if r.write else zram_slot_load(m, s, b, st)
    else:
        rc = zram_slot_load(m, s, st.page, st)
        if rc == 0:
            if r.write:
                memcpy(st.page + pofs, b, n)
                rc = _slot_store(m, s, st.page, st)
            else:
                memcpy(b, st.page + pofs, n)
    if rc == 0:
        _touch(m, s)
    zram_slot_unlock(&s.flags)
    return rc


cdef size_t _range_io(zram* m, bint write, char* buf, size_t off, size_t size,
                      zstream* st) noexcept nogil:
    """The request's pages, inline or shared with the workers. The lowest page that failed,
    SIZE_MAX if none. The caller holds a reference on the meta (so the workers outlive this)
    and its own stream `st`."""
    cdef zrange r
    cdef zjob j
    r.m, r.write, r.buf, r.off, r.size = m, write, buf, off, size
    j.fn = _page_io
    j.arg = &r
    j.first = off >> PAGE_SHIFT
    j.count = ((off + size - 1) >> PAGE_SHIFT) - j.first + 1
    return zworkers_run(m.workers, &j, st)


cdef inline bint _uninitialised(zdisk* d) noexcept nogil:
    """No meta (and not removed): a device of size 0, as the kernel's before disksize; one
    being reset or removed fails with EIO instead."""
    return za_load_ptr(<void**>&d.meta) == NULL and not za_load(&d.gone)


cdef inline size_t _disk_bytes(zram* m) noexcept nogil:
    return m.nr_pages << PAGE_SHIFT


cdef inline void _account(zdisk* d, int kind, size_t nbytes, uint64_t started) noexcept nogil:
    za_add(&d.ios[kind], 1)
    za_add(&d.sectors[kind], nbytes >> SECTOR_SHIFT)
    za_add(&d.ticks_ns[kind], zram_now_ns() - started)


cdef inline int _get(zdisk* d, uint32_t generation) noexcept nogil:
    """A reference on the disk's meta, for the device `generation` names: 1; 0 where the disk
    is not live; -1 where it now serves a newer device of its id (the caller's is gone)."""
    if generation and za_load32(&d.generation) != generation:
        return -1
    if not zram_get(&d.state):
        return 0
    if generation and za_load32(&d.generation) != generation:
        zram_put(&d.state)            # reused between the two looks: not the caller's device
        return -1
    return 1


cdef ssize_t zdisk_read(zdisk* d, uint32_t generation, char* buf, size_t size,
                        off_t off) noexcept nogil:
    """Reads up to `size` bytes at `off`; short at the end of the device."""
    cdef uint64_t started = zram_now_ns()
    cdef zram* m
    cdef zstream* st
    cdef size_t bad = SIZE_MAX
    cdef int got = _get(d, generation)
    if got <= 0:
        return 0 if got == 0 and _uninitialised(d) else -EIO   # size 0: end of file at once
    m = d.meta
    if off < 0 or <size_t>off >= _disk_bytes(m):
        zram_put(&d.state)
        return 0
    size = min(size, _disk_bytes(m) - <size_t>off)
    if size:
        st = zcomp_stream_get(m.comp)
        bad = _range_io(m, False, buf, <size_t>off, size, st)
        zcomp_stream_put(st)
    if bad != SIZE_MAX:
        za_add(&m.failed_reads, 1)
    zram_put(&d.state)
    _account(d, IO_READ, size if bad == SIZE_MAX else 0, started)
    return -EIO if bad != SIZE_MAX else <ssize_t>size


cdef ssize_t zdisk_write(zdisk* d, uint32_t generation, const char* buf, size_t size,
                         off_t off) noexcept nogil:
    """Writes `size` bytes at `off`; ENOSPC at or past the end, short up to it. A page that
    fails fails the whole request with EIO, as a bio does in the kernel's zram: a block device
    has no short writes, and the pages before it may or may not hold the new data."""
    cdef uint64_t started = zram_now_ns()
    cdef zram* m
    cdef zstream* st
    cdef size_t bad = SIZE_MAX, done
    cdef int got = _get(d, generation)
    if got <= 0:
        return -ENOSPC if got == 0 and _uninitialised(d) else -EIO   # size 0: no room
    m = d.meta
    if off < 0 or <size_t>off >= _disk_bytes(m):
        za_add(&m.invalid_io, 1)
        zram_put(&d.state)
        return -ENOSPC
    size = min(size, _disk_bytes(m) - <size_t>off)
    if size:
        st = zcomp_stream_get(m.comp)
        bad = _range_io(m, True, <char*>buf, <size_t>off, size, st)
        zcomp_stream_put(st)
    done = size
    if bad != SIZE_MAX:
        za_add(&m.failed_writes, 1)
        done = 0
    zram_put(&d.state)
    _account(d, IO_WRITE, done, started)
    if bad != SIZE_MAX:
        return -EIO
    return <ssize_t>done


cdef int zdisk_fallocate(zdisk* d, uint32_t generation, int mode, off_t off,
                         off_t length) noexcept nogil:
    """Discard (PUNCH_HOLE) and write-zeroes (ZERO_RANGE), both with KEEP_SIZE: whole pages
    are freed, the partial pages at either end zeroed."""
    cdef uint64_t started = zram_now_ns()
    cdef zram* m
    cdef zstream* st = NULL
    cdef zslot* s
    cdef size_t pos, end, n, pofs
    cdef int rc = 0
    if mode != (FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE) and \
            mode != (FALLOC_FL_ZERO_RANGE | FALLOC_FL_KEEP_SIZE):
        return -EOPNOTSUPP
    cdef int got
    if off < 0 or length <= 0:
        return -EINVAL
    got = _get(d, generation)
    if got <= 0:                                        # past the end of a size-0 device
        return -EINVAL if got == 0 and _uninitialised(d) else -EIO
    m = d.meta
    pos = <size_t>off
    end = min(<size_t>off + <size_t>length, _disk_bytes(m))
    while pos < end:
        s = &m.table[pos >> PAGE_SHIFT]
        pofs = pos & (PAGE_SIZE - 1)
        n = min(PAGE_SIZE - pofs, end - pos)
        zram_slot_lock(&s.flags)
        if n == PAGE_SIZE:
            if zram_slot_flags(&s.flags) & ZRAM_SAME or s.size:
                za_add(&m.notify_free, 1)
            zram_slot_free(m, s)
        else:
            if st == NULL:
                st = zcomp_stream_get(m.comp)
            rc = zram_slot_load(m, s, st.page, st)
            if rc == 0:
                memset(st.page + pofs, 0, n)
                rc = _slot_store(m, s, st.page, st)
            if rc == 0:
                _touch(m, s)
        zram_slot_unlock(&s.flags)
        if rc:
            za_add(&m.failed_writes, 1)
            break
        pos += n
    if st != NULL:
        zcomp_stream_put(st)
    zram_put(&d.state)
    _account(d, IO_DISCARD, pos - <size_t>off if pos > <size_t>off else 0, started)
    return -EIO if rc else 0


# --- the FUSE layer's data ops: a device file's handle names its device --------------------------
#
# A handle is (generation << 32) | id: it means the same device to any daemon that serves the
# connection later, and a handle of a removed device never reaches one that got its id since.
# The disks are kept by id and never freed, so a request may always look its one up.

cdef enum:
    MAX_DISKS = 1 << 16

cdef zdisk* _disks[MAX_DISKS]


cdef inline zdisk* _disk_of(uint64_t fh) noexcept nogil:
    cdef size_t id = <uint32_t>fh
    if id >= MAX_DISKS:
        return NULL
    return <zdisk*>za_load_ptr(<void**>&_disks[id])


cdef ssize_t _dops_read(void* ctx, uint64_t fh, char* buf, size_t size,
                        uint64_t off) noexcept nogil:
    cdef zdisk* d = _disk_of(fh)
    if d == NULL:
        return -EIO
    return zdisk_read(d, <uint32_t>(fh >> 32), buf, size, <off_t>off)


cdef ssize_t _dops_write(void* ctx, uint64_t fh, const char* buf, size_t size,
                         uint64_t off) noexcept nogil:
    cdef zdisk* d = _disk_of(fh)
    if d == NULL:
        return -EIO
    return zdisk_write(d, <uint32_t>(fh >> 32), buf, size, <off_t>off)


cdef int _dops_fallocate(void* ctx, uint64_t fh, int mode, uint64_t off,
                         uint64_t length) noexcept nogil:
    cdef zdisk* d = _disk_of(fh)
    if d == NULL:
        return -EIO
    return zdisk_fallocate(d, <uint32_t>(fh >> 32), mode, <off_t>off, <off_t>length)


cdef zramfs_data_ops DATA_OPS = zramfs_data_ops(
    ctx=NULL, read=_dops_read, write=_dops_write, fallocate=_dops_fallocate)


def data_ops_capsule() -> object:
    """The data ops, for _fuse.Session(data_ops=...): file handles are `Disk.handle`."""
    return PyCapsule_New(&DATA_OPS, ZRAMFS_DATA_OPS_CAPSULE, NULL)


# --- the table's region: what a restarted daemon copies the device from -----------------------

# The table's memfd: this header, the `zram` struct (its counters are what a successor keeps of
# it), then the slot table and the access times, each from a page boundary.
ctypedef struct ztable_header:
    char magic[16]
    uint32_t version
    uint32_t pointer_size
    uint64_t nr_pages
    uint64_t zram_size
    uint64_t slot_size
    uint64_t table_offset
    uint64_t ac_time_offset

cdef enum:
    ZRAM_OFFSET = 256             # the zram struct, after the header

TABLE_MAGIC = b"zramfs-table"
TABLE_VERSION = 1


cdef size_t _table_offset() noexcept nogil:
    return (ZRAM_OFFSET + sizeof(zram) + PAGE_SIZE - 1) & ~(<size_t>PAGE_SIZE - 1)


cdef size_t _ac_time_offset(size_t nr_pages) noexcept nogil:
    return _table_offset() + ((nr_pages * sizeof(zslot) + PAGE_SIZE - 1)
                              & ~(<size_t>PAGE_SIZE - 1))


ctypedef struct ztakeover:
    size_t pages              # pages copied (same-filled, written back and objects alike)
    size_t lost               # slots whose object could not be found (should be 0)


cdef inline uint64_t* _remap_slot(uint64_t* remap, size_t mask, uint64_t old) noexcept nogil:
    """The (old handle, new handle) pair of `old` in an open-addressed table, or the empty
    pair where it goes (handles are never 0)."""
    cdef size_t i = ((old * <uint64_t>0x9E3779B97F4A7C15) >> 17) & mask
    while remap[2 * i] != 0 and remap[2 * i] != old:
        i = (i + 1) & mask
    return &remap[2 * i]


cdef ztakeover _take_over(zram* m, const zram* old, const zslot* old_table,
                          const uint32_t* old_ac, PoolImage image) noexcept nogil:
    """Fills the empty `m` from a previous daemon's table: same-filled words and written-back
    blocks as they were, each object copied out of the old pool into m's. The slot table is
    the truth: an object no slot points at (a write that never finished) is not copied, and
    slot locks held by the old daemon's threads are not carried over. A write the old daemon
    had not answered is sent again by the kernel (FUSE_NOTIFY_RESEND) and rewrites its pages."""
    cdef ztakeover r
    cdef size_t i, mask = 1
    cdef uint32_t flags
    cdef int rc
    cdef uint64_t* remap = NULL
    cdef uint64_t* pair = NULL
    cdef const char* src
    cdef zslot* s
    r.pages = 0
    r.lost = 0
    # Dedup (zramfs.zram._dedup, enabled on m before this): an object several ZRAM_DEDUP slots
    # share is copied once, its new handle found by its old one. Without dedup on m, or
    # without memory for the map, each slot gets its own copy, an ordinary object.
    if m.dedup != NULL:
        while mask < 2 * m.nr_pages:
            mask <<= 1
        remap = <uint64_t*>calloc(2 * mask, sizeof(uint64_t))
        mask -= 1
    for i in range(m.nr_pages):
        flags = old_table[i].flags & ~(<uint32_t>ZRAM_LOCK | ZRAM_UNDER_WB)
        if remap == NULL:
            flags &= ~(<uint32_t>ZRAM_DEDUP)
        s = &m.table[i]
        if flags & (ZRAM_SAME | ZRAM_WB):
            if flags & ZRAM_WB and (m.backing == NULL
                                    or not backing_take(m.backing, old_table[i].handle)):
                r.lost += 1
                continue
            s.handle = old_table[i].handle
            s.size = old_table[i].size
            s.flags = flags
            za_add(&m.pages_stored, 1)
            if flags & ZRAM_SAME:
                za_add(&m.same_pages, 1)
        elif old_table[i].size:
            if flags & ZRAM_DEDUP:
                pair = _remap_slot(remap, mask, old_table[i].handle)
                if pair[1] != 0:              # copied already, for another slot
                    s.handle = pair[1]
                    s.size = old_table[i].size
                    if flags & ZRAM_HUGE:
                        za_add(&m.huge_pages, 1)
                    s.flags = flags
                    m.ac_time[i] = old_ac[i]
                    za_add(&m.pages_stored, 1)
                    r.pages += 1
                    continue
            # Into the pool by the one door, which counts what it stores.
            src = image.locate(old_table[i].handle, old_table[i].size)
            rc = -EIO
            if src != NULL:
                zram_slot_lock(&s.flags)
                rc = zram_slot_replace(m, s, src, old_table[i].size, flags, False)
                zram_slot_unlock(&s.flags)
            if rc != 0:
                r.lost += 1
                continue
            if flags & ZRAM_DEDUP:
                pair[0] = old_table[i].handle
                pair[1] = s.handle
        else:
            continue
        m.ac_time[i] = old_ac[i]
        r.pages += 1
    # The copies above counted as new huge pages: the old count replaces that.
    _hand_on_counters(m, old)
    free(remap)
    return r


cdef void _hand_on_counters(zram* m, const zram* old) noexcept nogil:
    """What cannot be recounted from the table is the old daemon's to hand on."""
    m.max_used_pages = max(old.max_used_pages, m.driver.total_pages(m.pool))
    m.huge_pages_since = old.huge_pages_since
    m.failed_reads = old.failed_reads
    m.failed_writes = old.failed_writes
    m.invalid_io = old.invalid_io
    m.notify_free = old.notify_free
    m.evicted = old.evicted


class TableImageError(Exception):
    """The fd holds no slot table this version can adopt, or one of another size."""


cdef const ztable_header* _table_header(zregion* r, size_t nr_pages) except NULL:
    """The header of a kept slot table mapped in `r`, checked: TableImageError if it is no
    table of this layout for a device of `nr_pages`."""
    cdef const ztable_header* h = <const ztable_header*>r.base
    if r.size < PAGE_SIZE or memcmp(h.magic, <const char*>TABLE_MAGIC,
                                    len(TABLE_MAGIC) + 1) != 0:
        raise TableImageError("not a zramfs slot table (bad magic)")
    if (h.version != TABLE_VERSION or h.pointer_size != sizeof(void*)
            or h.zram_size != sizeof(zram) or h.slot_size != sizeof(zslot)
            or h.table_offset != _table_offset()):
        raise TableImageError(f"slot table format {h.version}, this zramfs reads "
                              f"{TABLE_VERSION} (or another build's layout)")
    if h.nr_pages != nr_pages:
        raise TableImageError(f"slot table of {h.nr_pages} pages, the device has {nr_pages}")
    if h.ac_time_offset != _ac_time_offset(nr_pages) \
            or r.size < h.ac_time_offset + h.nr_pages * sizeof(uint32_t):
        raise TableImageError("slot table truncated")
    return h


cdef size_t _stored_slots(const zregion* r, size_t i, size_t* end) noexcept nogil:
    """The next run of slots from `i` on that the table's memfd has pages for, [first, *end);
    first == *end == nr_pages when there is none. A slot in a hole was never written: reading
    it would make the page resident for nothing (a shared-memory read fault allocates)."""
    cdef const ztable_header* h = <const ztable_header*>r.base
    cdef size_t offset = h.table_offset, nr = h.nr_pages
    cdef size_t limit = offset + nr * sizeof(zslot), stop
    cdef size_t data = region_data_run(r, offset + min(i, nr) * sizeof(zslot), limit, &stop)
    end[0] = (stop - offset + sizeof(zslot) - 1) // sizeof(zslot)
    if data == limit:
        return nr
    return max(i, (data - offset) // sizeof(zslot))


cdef inline bint _kept_object(const zslot* s) noexcept nogil:
    """A kept slot names an object of the pool."""
    return s.size != 0 and not s.flags & (ZRAM_SAME | ZRAM_WB)


Adopted = namedtuple("Adopted", "pages lost shared")
Adopted.__doc__ = """What a meta adopted in place holds: pages kept, pages lost (written back
to blocks the backing device cannot give again), and slots marked as sharing an object
(ZRAM_DEDUP: the device must have dedup on)."""


# --- Python faces ----------------------------------------------------------------------------

Stats = namedtuple("Stats", "mm_stat io_stat streams backend pool evicted")
Stats.__doc__ = """A snapshot of a meta's statistics: mm_stat's nine fields and io_stat's four
in the kernel's order, the compression streams, the allocator backend, the pool's unique name,
and the pages evicted."""


cdef class Meta:
    """What writing disksize creates: `Meta(disksize, "lz4", name="zram0")`.

    Everything the data path needs is made here, none of it later (hazard 4): the table, the
    pool (`backend`: zsmalloc or zbud), the compressor's streams, and `workers` compression
    threads (default: one per core but one) that take a share of the pages of large requests.
    """

    def __init__(self, size_t disksize, str algorithm="lz4", level=None, *,
                 str backend="zsmalloc", str name="zram", streams=None,
                 int max_pages_per_zspage=8, workers=None, Backing backing=None,
                 dict secondary=None, dict dictionaries=None, tuple older=(),
                 bint compressed_wb=False, tuple kept=None):
        """`backing`: the writeback device (the caller's to close, after destroy).
        `secondary`: recompression algorithms, {priority: (name, level or None)}.
        `dictionaries`: zstd dictionaries, {priority: bytes}, 0 for the primary algorithm.
        `older`: zstd dictionaries (bytes) the kept pages may have been compressed with, which
        every zstd compressor reads with (by the id a frame names) and none writes with.
        `compressed_wb`: writeback writes objects as stored (decompressed when read back).
        `kept`: the (table, pool) fds a daemon before this one kept (state_fds): the device
        is adopted in place, its memory mapped again and nothing copied (`adopted` says what
        it holds). TableImageError/PoolImageError for kept state this daemon cannot adopt,
        PoolInPlaceError for a pool to copy instead (take_over)."""
        cdef Compressor comp
        cdef int nr_workers = default_workers() if workers is None else workers
        if disksize == 0 or disksize % PAGE_SIZE:
            raise ValueError(f"disksize must be a positive multiple of {PAGE_SIZE}")
        if nr_workers < 0:
            raise ValueError("workers must be 0 or more")
        cdef size_t nr_pages = disksize >> PAGE_SHIFT
        cdef ztable_header* h
        cdef zram old
        self.adopted = None
        if kept is not None:
            old = self._adopt_kept(kept[0], kept[1], nr_pages, name)
            if self.pool.backend != backend:
                self.pool.destroy()
                region_close(&self.region)
                raise PoolImageError(f"a {self.pool.backend} pool, the device's zpool is "
                                     f"{backend}")
        else:
            # A memfd, sparse: untouched slots cost nothing. Kept across a restart.
            rc = region_create(&self.region, f"zramfs-table:{name}".encode(),
                               _ac_time_offset(nr_pages) + nr_pages * sizeof(uint32_t), False)
            if rc != 0:
                raise MemoryError(f"no memory for a slot table of {nr_pages} pages: "
                                  f"{os.strerror(-rc)}")
            h = <ztable_header*>self.region.base
            strncpy(h.magic, TABLE_MAGIC, sizeof(h.magic))
            h.version = TABLE_VERSION
            h.pointer_size = sizeof(void*)
            h.nr_pages = nr_pages
            h.zram_size = sizeof(zram)
            h.slot_size = sizeof(zslot)
            h.table_offset = _table_offset()
            h.ac_time_offset = _ac_time_offset(nr_pages)
        h = <ztable_header*>self.region.base
        self.m = <zram*>(self.region.base + ZRAM_OFFSET)
        self.disksize = disksize
        self.secondary = {}
        self.m.nr_pages = nr_pages
        self.m.table = <zslot*>(self.region.base + h.table_offset)
        self.m.ac_time = <uint32_t*>(self.region.base + h.ac_time_offset)
        if posix_memalign(<void**>&self.m.evict_page, PAGE_SIZE, PAGE_SIZE) != 0:
            self.m.evict_page = NULL
            self.destroy()
            raise MemoryError("no memory for the eviction page")
        pthread_mutex_init(&self.m.evict_lock, NULL)
        try:
            if self.pool is None:
                self.pool = _Pool(backend, name, max_pages_per_zspage)
            # One private stream a worker, and one for eviction.
            dictionaries = dictionaries or {}
            self.compressor = _Compressor(algorithm, level, streams,
                                          private_streams=nr_workers + 1,
                                          dictionary=dictionaries.get(0),
                                          older=older if algorithm == "zstd" else ())
            for prio, (sname, slevel) in sorted((secondary or {}).items()):
                if not 1 <= prio <= 3:
                    raise ValueError(f"recompression priority {prio} is not 1..3")
                self.secondary[prio] = _Compressor(sname, slevel, 2,
                                                   dictionary=dictionaries.get(prio),
                                                   older=older if sname == "zstd" else ())
        except BaseException:
            self.destroy()
            raise
        for prio, c in self.secondary.items():
            self.m.secondary[prio] = (<Compressor>c).comp
        if backing is not None:
            self.backing = backing
            self.m.backing = backing.b
        self.m.compressed_wb = compressed_wb
        self.m.wb_batch = 32                  # the kernel's default writeback_batch_size
        comp = self.compressor
        self.m.driver = self.pool.driver
        self.m.pool = self.pool.impl
        self.m.huge_size = self.pool.driver.huge_class_size(self.pool.impl)
        self.m.comp = comp.comp
        self.m.evict_stream = zcomp_private_stream(comp.comp, nr_workers)
        if nr_workers:
            with nogil:
                self.m.workers = zworkers_start(self.m.comp, nr_workers)
            if self.m.workers == NULL:
                self.destroy()
                raise MemoryError(f"cannot start {nr_workers} compression workers")
        self.workers = nr_workers
        if kept is not None:
            self.adopted = self._recount(&old)

    cdef zram _adopt_kept(self, int table_fd, int pool_fd, size_t nr_pages, str name) except *:
        """The kept slot table mapped in place, and the kept pool adopted with the objects its
        slots name (pool_adopt); then, and only then, the table made this meta's: the old
        process's zram struct cleared (returned: the counters a recount cannot give; _recount
        releases the slot locks). On failure nothing kept is changed."""
        cdef const ztable_header* h
        cdef zslot* table
        cdef uint64_t* handles
        cdef size_t i, first, end, n = 0
        cdef zram old
        rc = region_map(&self.region, table_fd, True)
        if rc != 0:
            raise TableImageError(f"fd {table_fd} is not a slot table: {os.strerror(-rc)}")
        try:
            h = _table_header(&self.region, nr_pages)
            table = <zslot*>(self.region.base + h.table_offset)
            handles = <uint64_t*>malloc((nr_pages + 1) * sizeof(uint64_t))
            if handles == NULL:
                raise MemoryError(f"no memory for the handles of {nr_pages} pages")
            try:
                first = _stored_slots(&self.region, 0, &end)
                while first < end:
                    for i in range(first, end):
                        if _kept_object(&table[i]):
                            handles[n] = table[i].handle
                            n += 1
                    first = _stored_slots(&self.region, end, &end)
                self.pool = pool_adopt(pool_fd, handles, n, name)
            finally:
                free(handles)
        except BaseException:
            region_close(&self.region)
            raise
        memcpy(&old, self.region.base + ZRAM_OFFSET, sizeof(zram))
        memset(self.region.base + ZRAM_OFFSET, 0, sizeof(zram))
        return old

    cdef object _recount(self, const zram* old):
        """mm_stat's counters from the adopted table (written-back blocks taken again from the
        backing device), the rest from the old process's struct; what was adopted. First the
        slot locks the old process's threads held are released and its writebacks in flight
        forgotten (nothing uses the table before this)."""
        cdef zram* m = self.m
        cdef zslot* s
        cdef size_t i, first, end, shared = 0, lost = 0, mask = 1
        cdef uint64_t* seen = NULL
        cdef uint64_t* pair
        first = _stored_slots(&self.region, 0, &end)
        while first < end:
            for i in range(first, end):
                s = &m.table[i]
                if s.flags & (ZRAM_LOCK | ZRAM_UNDER_WB):
                    s.flags &= ~(<uint32_t>ZRAM_LOCK | ZRAM_UNDER_WB)
                shared += (s.flags & ZRAM_DEDUP) != 0
            first = _stored_slots(&self.region, end, &end)
        if shared:
            # A shared object counts once in compr_data_size: its handle is marked when seen.
            while mask < 2 * shared:
                mask <<= 1
            seen = <uint64_t*>calloc(2 * mask, sizeof(uint64_t))
            if seen == NULL:
                raise MemoryError("no memory to count the shared objects")
            mask -= 1
        first = _stored_slots(&self.region, 0, &end)
        while first < end:
            for i in range(first, end):
                s = &m.table[i]
                if s.flags & ZRAM_SAME:
                    m.pages_stored += 1
                    m.same_pages += 1
                elif s.flags & ZRAM_WB:
                    if m.backing != NULL and backing_take(m.backing, s.handle):
                        m.pages_stored += 1
                    else:
                        lost += 1
                elif s.size:
                    m.pages_stored += 1
                    if s.flags & ZRAM_HUGE:
                        m.huge_pages += 1
                    if s.flags & ZRAM_DEDUP:
                        pair = _remap_slot(seen, mask, s.handle)
                        if pair[0] == 0:
                            pair[0] = s.handle
                            m.compr_data_size += s.size
                    else:
                        m.compr_data_size += s.size
            first = _stored_slots(&self.region, end, &end)
        free(seen)
        _hand_on_counters(m, old)
        return Adopted(pages=m.pages_stored, lost=lost, shared=shared)

    def __cinit__(self):
        self.region.fd = -1
        self.region.base = NULL

    @property
    def state_fds(self) -> tuple[int, int]:
        """The memfds of the slot table and of the pool (the meta's to close): dups of them,
        kept past this process, let the next daemon `take_over` the device."""
        return self.region.fd, self.pool.fd

    def take_over(self, int table_fd, int pool_fd) -> tuple[int, int]:
        """Copies a previous daemon's device into this meta, which must be new (nothing
        stored, not yet attached): (pages kept, pages lost). The fds are only read; the caller
        closes them (and so frees the old copy) once this meta's own fds are kept instead.
        TableImageError/PoolImageError for state this daemon cannot read."""
        cdef zregion old
        cdef const ztable_header* h
        cdef ztakeover r
        cdef PoolImage image
        if self.m.pages_stored:
            raise RuntimeError("take_over into a meta that holds pages")
        rc = region_map(&old, table_fd, False)
        if rc != 0:
            raise TableImageError(f"fd {table_fd} is not a slot table: {os.strerror(-rc)}")
        try:
            h = _table_header(&old, self.m.nr_pages)
            image = _PoolImage(pool_fd)
            try:
                with nogil:
                    r = _take_over(self.m, <const zram*>(old.base + ZRAM_OFFSET),
                                   <const zslot*>(old.base + h.table_offset),
                                   <const uint32_t*>(old.base + h.ac_time_offset), image)
            finally:
                image.close()
        finally:
            region_close(&old)
        return r.pages, r.lost

    def _stop_workers(self) -> None:
        """The compression workers stopped and joined: they use the compressor's streams."""
        if self.m.workers != NULL:
            with nogil:
                zworkers_stop(self.m.workers)
            self.m.workers = NULL

    def _free_table(self) -> None:
        self._stop_workers()
        if self.m.evict_page != NULL:
            pthread_mutex_destroy(&self.m.evict_lock)
        free(self.m.evict_page)
        self.m = NULL
        region_close(&self.region)

    def destroy(self) -> None:
        """Frees everything. Only once no reference is held on the meta (Disk.release)."""
        if self.m == NULL:
            return
        self._stop_workers()
        if self.pool is not None:
            self.pool.destroy()       # frees every object at once: no need to walk the table
        self.m.dedup_store = NULL
        self.m.dedup_put = NULL
        self.m.dedup = NULL
        self.dedup = None             # its index frees itself
        if self.compressor is not None:
            self.compressor.destroy()
        for c in (self.secondary or {}).values():
            c.destroy()
        self._free_table()

    def __dealloc__(self):
        # Dropped without destroy: the pool and compressors free themselves as objects.
        if self.m != NULL:
            self._free_table()

    @property
    def mem_limit(self) -> int:
        return za_load(&self.m.limit_pages) << PAGE_SHIFT

    @mem_limit.setter
    def mem_limit(self, size_t nbytes) -> None:
        """Bytes, rounded up to pages; 0 for none. Eviction down to a lowered limit is the
        caller's to run (zramfs.zram._tiering.evict_to_limit), as maintenance."""
        self.m.limit_pages = (nbytes + PAGE_SIZE - 1) >> PAGE_SHIFT

    def reset_mem_used_max(self) -> None:
        """mem_used_max starts again from the memory used now."""
        self.m.max_used_pages = self.m.driver.total_pages(self.m.pool)

    def compact(self) -> int:
        return self.pool.compact()

    def mm_stat(self) -> tuple[int, ...]:
        """The nine fields of mm_stat, in the kernel's order."""
        cdef zram* m = self.m
        return (
            za_load(&m.pages_stored) << PAGE_SHIFT,
            za_load(&m.compr_data_size),
            m.driver.total_pages(m.pool) << PAGE_SHIFT,
            za_load(&m.limit_pages) << PAGE_SHIFT,
            za_load(&m.max_used_pages) << PAGE_SHIFT,
            za_load(&m.same_pages),
            self.pool.pages_compacted,
            za_load(&m.huge_pages),
            za_load(&m.huge_pages_since),
        )

    def io_stat(self) -> tuple[int, int, int, int]:
        """failed_reads failed_writes invalid_io notify_free."""
        cdef zram* m = self.m
        return (za_load(&m.failed_reads), za_load(&m.failed_writes),
                za_load(&m.invalid_io), za_load(&m.notify_free))

    def stats(self) -> Stats:
        return Stats(self.mm_stat(), self.io_stat(), self.compressor.streams,
                     self.pool.backend, self.pool.name, za_load(&self.m.evicted))

    def block_state(self) -> bytes:
        """debugfs's block_state, as the kernel prints it: a line for each stored page, its
        index, the time it was last accessed and its flags (s same-filled, w written back,
        h huge, i idle, r recompressed, n incompressible). Flags are read without the slot
        locks: a page changing meanwhile may show either state, as in the kernel."""
        cdef zram* m = self.m
        cdef size_t i, n = 0, cap = 1 << 16
        cdef char* out = <char*>malloc(cap)
        cdef char* grown
        cdef zslot* s
        cdef uint32_t f
        cdef int k
        cdef char letters[8]
        if out == NULL:
            raise MemoryError()
        with nogil:
            for i in range(m.nr_pages):
                s = &m.table[i]
                f = zram_slot_flags(&s.flags)
                if not (f & (ZRAM_SAME | ZRAM_WB) or s.size):
                    continue
                if cap - n < 64:
                    cap *= 2
                    grown = <char*>realloc(out, cap)
                    if grown == NULL:
                        break
                    out = grown
                letters[0] = 115 if f & ZRAM_SAME else 46           # 's' or '.'
                letters[1] = 119 if f & ZRAM_WB else 46             # 'w'
                letters[2] = 104 if f & ZRAM_HUGE else 46           # 'h'
                letters[3] = 105 if f & ZRAM_IDLE else 46           # 'i'
                letters[4] = 114 if f & ZRAM_PRIO_MASK else 46      # 'r'
                letters[5] = 110 if f & ZRAM_INCOMPRESSIBLE else 46 # 'n'
                letters[6] = 0
                k = snprintf(out + n, cap - n, "%12zu %12u.%06u %s\n", i, m.ac_time[i], 0,
                             letters)
                n += k
        try:
            return PyBytes_FromStringAndSize(out, n)
        finally:
            free(out)

    def classes(self) -> list:
        """The allocator's size classes, as zsmalloc's debugfs `classes` (none for zbud)."""
        return self.pool.class_stats()


cdef class Disk:
    """A device as the FUSE layer reaches it; lives as long as the device (across resets).

    `attach(meta)` makes it live; `detach()` stops new references; once `in_flight` is 0,
    `release()` hands the meta back to be destroyed outside any request. Maintenance runs
    through `call`, holding a reference as a request does, so reset waits for it too.
    """

    def __cinit__(self, dev_id=None, int generation=1):
        """The disk of device `dev_id`, the `generation`-th device with that id. The zdisk is
        kept for the id's next devices, never freed: a request with an old handle may still
        look it up (and gets EIO). Without an id, a disk of its own, which no handle reaches
        (for tests and tools that call it directly)."""
        cdef zdisk* d
        if dev_id is None:
            self.disk = <zdisk*>calloc(1, sizeof(zdisk))
            self.private = True
            if self.disk == NULL:
                raise MemoryError()
            return
        if not 0 <= dev_id < MAX_DISKS or generation < 1:
            raise ValueError(f"no disk {dev_id} of generation {generation}")
        d = _disks[dev_id]
        if d == NULL:
            d = <zdisk*>calloc(1, sizeof(zdisk))
            if d == NULL:
                raise MemoryError()
        elif za_load64(&d.state) != 0:
            raise RuntimeError(f"disk {dev_id} is still in use")
        else:
            memset(d, 0, sizeof(zdisk))     # the device before it was removed and drained
        d.id = dev_id
        za_store32(&d.generation, generation)
        za_store_ptr(<void**>&_disks[dev_id], d)
        self.disk = d

    def __dealloc__(self):
        if self.private:
            free(self.disk)

    @property
    def handle(self) -> int:
        """What the FUSE layer's file handles carry: this device's generation and id."""
        if self.private:
            raise ValueError("a disk without an id has no handle")
        return (<uint64_t>self.disk.generation << 32) | self.disk.id

    def attach(self, Meta meta) -> None:
        if self.meta is not None:
            raise RuntimeError("disk already has a meta")
        self.meta = meta
        za_store_ptr(<void**>&self.disk.meta, meta.m)     # _uninitialised reads it unlocked
        zram_set_live(&self.disk.state, 1)

    def detach(self) -> None:
        """New requests fail with EIO, new maintenance with EBUSY, from now on."""
        zram_set_live(&self.disk.state, 0)

    def retire(self) -> None:
        """The device is removed: its file fails with EIO from now on, even once the meta is
        gone (an uninitialised device reads as empty instead)."""
        za_store(&self.disk.gone, 1)

    @property
    def live(self) -> bool:
        return bool(za_load64(&self.disk.state) & ZRAM_LIVE)

    @property
    def in_flight(self) -> int:
        """References held on the meta: requests and maintenance."""
        return za_load64(&self.disk.state) & ~ZRAM_LIVE

    def release(self) -> Meta:
        """Takes the meta away once detached and drained."""
        if self.live or self.in_flight:
            raise RuntimeError("disk is live or has references held")
        meta, self.meta = self.meta, None
        za_store_ptr(<void**>&self.disk.meta, NULL)
        return meta

    def call(self, fn, *args):
        """`fn(meta, *args)` holding a reference on the meta, from any thread: so maintenance
        (writeback, recompression, compaction, eviction) and reset never overlap.
        OSError(EBUSY) once the disk is detached or has no meta."""
        if not zram_get(&self.disk.state):
            raise OSError(EBUSY, "the device is not initialised or is being reset")
        try:
            return fn(self.meta, *args)
        finally:
            zram_put(&self.disk.state)

    def stat(self) -> tuple[int, ...]:
        """The block layer's 17 stat fields (read, write, discard; no merges, no flushes)."""
        cdef zdisk* d = self.disk
        ios = [za_load(&d.ios[i]) for i in range(3)]
        sectors = [za_load(&d.sectors[i]) for i in range(3)]
        ms = [za_load(&d.ticks_ns[i]) // 1000000 for i in range(3)]
        busy = ms[0] + ms[1] + ms[2]
        return (ios[0], 0, sectors[0], ms[0], ios[1], 0, sectors[1], ms[1],
                self.in_flight, busy, busy, ios[2], 0, sectors[2], ms[2], 0, 0)

    # Python entry points over the same C path, for tests and tools.

    def read(self, off_t off, size_t size) -> bytes:
        cdef ssize_t n
        out = PyBytes_FromStringAndSize(NULL, size)
        cdef char* buf = PyBytes_AS_STRING(out)
        with nogil:
            n = zdisk_read(self.disk, 0, buf, size, off)
        if n < 0:
            raise OSError(-n, f"read of {size} bytes at {off}")
        return out[:n]

    def write(self, off_t off, data) -> int:
        cdef Py_buffer view
        cdef ssize_t n
        PyObject_GetBuffer(data, &view, PyBUF_SIMPLE)
        try:
            with nogil:
                n = zdisk_write(self.disk, 0, <const char*>view.buf, view.len, off)
        finally:
            PyBuffer_Release(&view)
        if n < 0:
            raise OSError(-n, f"write of {len(data)} bytes at {off}")
        return n

    def fallocate(self, int mode, off_t off, off_t length) -> None:
        cdef int rc
        with nogil:
            rc = zdisk_fallocate(self.disk, 0, mode, off, length)
        if rc < 0:
            raise OSError(-rc, f"fallocate mode {mode:#x} of {length} bytes at {off}")
