# cython: language_level=3
"""A device's slot table and the requests over it, all without the GIL.

Owns: the slot table (one `zslot` per 4 KiB page, as zram's table: the object's handle, size
and flags), the page store and load, mm_stat's counters (the one place they move), the
request entry points (zram_read/write/fallocate), the data ops the front end calls them
through, and `Disk`, a device as the front end reaches it. Included: `Meta`, what disksize
creates and reset destroys (_meta.pxi), and a live restart's table image, adoption in place
and copying (_restart.pxi).

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

`Disk` holds the current `Meta` while the device is initialised and counts the references
held on it (hazard 1): a request or maintenance holds one from start to end.
"""
from __future__ import annotations

import os
from collections import namedtuple

from libc.errno cimport EBUSY, EINVAL, EIO, ENOMEM, ENOSPC, EOPNOTSUPP
from libc.stdint cimport int64_t, uint32_t, uint64_t
from libc.stdio cimport snprintf
from libc.stdlib cimport calloc, free, malloc, realloc
from libc.string cimport memcmp, memcpy, memset, strncpy
from cpython.bytes cimport PyBytes_FromStringAndSize
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

from zramfs.zpool._alloc import (DEFAULT_BACKEND, DEFAULT_MAX_PAGES_PER_ZSPAGE, Pool as _Pool,
                                 PoolImage as _PoolImage, PoolImageError, PoolInPlaceError)
from zramfs.zram._workers import default_workers
from zramfs.zcomp._zcomp import DEFAULT_ALGORITHM, Compressor as _Compressor

# writeback_batch_size until a store says otherwise: the kernel's default.
WB_BATCH = 32

cdef extern from "<linux/falloc.h>" nogil:
    int FALLOC_FL_KEEP_SIZE, FALLOC_FL_PUNCH_HOLE, FALLOC_FL_ZERO_RANGE
    size_t SIZE_MAX

cdef enum:
    SECTOR_SHIFT = 9
    IO_READ = 0
    IO_WRITE = 1
    IO_DISCARD = 2


# --- mm_stat: the one place its counters move (atomic: any thread, any lock) -----------------
#
# A page's counters move with its slot, stored or dropped; compr_data_size with an object,
# which under dedup may outlive the slot that stored it (zram_obj_free).

cdef void zram_stat_stored(zram_meta* m, uint32_t flags, size_t size) noexcept nogil:
    """A slot took content of `flags`: a same-filled word, a written-back block or an object;
    `size`: the bytes of an object that came into the pool with it (0: none, or a shared one
    counted already)."""
    za_add(&m.pages_stored, 1)
    if flags & ZRAM_SAME:
        za_add(&m.same_pages, 1)
    elif flags & ZRAM_HUGE and not flags & ZRAM_WB:
        za_add(&m.huge_pages, 1)
        za_add(&m.huge_pages_since, 1)
    if size:
        za_add(&m.compr_data_size, size)


cdef void zram_stat_dropped(zram_meta* m, uint32_t flags) noexcept nogil:
    """A slot let go of content of `flags` (its object, if any, freed by zram_obj_free)."""
    za_sub(&m.pages_stored, 1)
    if flags & ZRAM_SAME:
        za_sub(&m.same_pages, 1)
    elif flags & ZRAM_HUGE and not flags & ZRAM_WB:
        za_sub(&m.huge_pages, 1)


cdef void zram_obj_free(zram_meta* m, uint64_t handle, size_t size) noexcept nogil:
    """An object out of the pool, and its bytes out of compr_data_size: with its last slot,
    or (dedup) with the last pin on it."""
    m.driver.free(m.pool, handle)
    za_sub(&m.compr_data_size, size)


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


cdef bint zram_slot_has_object(zslot* s, uint32_t flags) noexcept nogil:
    """The slot holds a compressed object in the pool (not same-filled, not written back)."""
    return s.size != 0 and not flags & (ZRAM_SAME | ZRAM_WB)


cdef void _drop(zram_meta* m, uint64_t handle, uint32_t size, uint32_t flags) noexcept nogil:
    """Frees content a slot no longer points at (hazard 8: the slot lets go first, so a
    daemon that ends in between leaves a leak its successor never copies, not a slot pointing
    at freed memory)."""
    if flags & ZRAM_WB:
        backing_free(m.backing, handle)
    elif not flags & ZRAM_SAME:
        if not size:
            return                # an empty slot
        # A shared object (dedup) goes with its last slot: compr_data_size counts it once.
        if not flags & ZRAM_DEDUP or m.dedup_put(m, handle):
            zram_obj_free(m, handle, size)
    zram_stat_dropped(m, flags)


cdef void zram_slot_free(zram_meta* m, zslot* s) noexcept nogil:
    """Empties the slot, then frees what it held."""
    cdef uint32_t flags = zram_slot_flags(&s.flags)
    cdef uint64_t handle = s.handle
    cdef uint32_t size = s.size
    s.handle = 0
    s.size = 0
    zram_slot_set_flags(&s.flags, 0)
    _drop(m, handle, size, flags)


cdef int zram_slot_load(zram_meta* m, zslot* s, char* page, zstream* st) noexcept nogil:
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


cdef int _decompress(zram_meta* m, uint32_t flags, const char* src, size_t size, char* page,
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


cdef int zram_slot_replace(zram_meta* m, zslot* s, const char* data, size_t n, uint32_t flags,
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
    zram_stat_stored(m, flags, n)
    return 0


cdef int zram_slot_compress(zram_meta* m, zslot* s, const char* page, zstream* st,
                            uint32_t flags) noexcept nogil:
    """The page compressed into the slot with `flags`, in place of its old content; stored
    raw (ZRAM_HUGE) where it compresses no better than the huge class. The store path's one
    way to compress, dedup's too. 0 or -errno (zram_slot_replace's)."""
    cdef int n = zcomp_compress(m.comp, st, page, <int>m.huge_size - 1)
    if n <= 0:
        return zram_slot_replace(m, s, page, PAGE_SIZE, flags | ZRAM_HUGE, True)
    return zram_slot_replace(m, s, st.buffer, n, flags, True)


cdef int _slot_store(zram_meta* m, zslot* s, const char* page, zstream* st) noexcept nogil:
    """Stores one page in place of the slot's old content; -errno on failure. A same-filled
    page takes no object; dedup, where on, shares a stored twin or wraps zram_slot_compress."""
    cdef uint64_t word
    if _same_filled(page, &word):
        zram_slot_free(m, s)
        s.handle = word
        zram_slot_set_flags(&s.flags, ZRAM_SAME)
        zram_stat_stored(m, ZRAM_SAME, 0)
        return 0
    if m.dedup_store != NULL:     # dedup on: zramfs.zram._dedup stores it, or shares a twin
        return m.dedup_store(m, s, page, st)
    return zram_slot_compress(m, s, page, st, 0)


cdef inline void _touch(zram_meta* m, zslot* s) noexcept nogil:
    """An access: the page is no longer idle, and gets a second chance from eviction."""
    m.ac_time[s - m.table] = zram_now_s()
    zram_slot_set_flags(&s.flags, (zram_slot_flags(&s.flags) & ~ZRAM_IDLE) | ZRAM_ACCESSED)


# --- byte ranges: a request's pages ---------------------------------------------------------

ctypedef struct zrange:
    zram_meta* m
    bint write
    char* buf                  # the request's buffer (only read from for a write)
    size_t off                 # the request's byte range on the device
    size_t size


cdef int _page_io(void* arg, size_t page, zstream* st) noexcept nogil:
    """Page `page` of the request between its slot and the request's buffer; takes and drops
    the slot's lock. A partial page is read-modify-write in st.page. 0 or -errno."""
    cdef zrange* r = <zrange*>arg
    cdef zram_meta* m = r.m
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


cdef size_t _range_io(zram_meta* m, bint write, char* buf, size_t off, size_t size,
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


cdef inline bint _uninitialised(zram* d) noexcept nogil:
    """No meta (and not removed): a device of size 0, as the kernel's before disksize; one
    being reset or removed fails with EIO instead."""
    return za_load_ptr(<void**>&d.meta) == NULL and not za_load(&d.gone)


cdef inline size_t _disk_bytes(zram_meta* m) noexcept nogil:
    return m.nr_pages << PAGE_SHIFT


cdef inline void _account(zram* d, int kind, size_t nbytes, uint64_t started) noexcept nogil:
    za_add(&d.ios[kind], 1)
    za_add(&d.sectors[kind], nbytes >> SECTOR_SHIFT)
    za_add(&d.ticks_ns[kind], zram_now_ns() - started)


cdef size_t _requests = 0             # the data path's requests, every device's (atomic)


cdef size_t zram_requests() noexcept nogil:
    return za_load(&_requests)


cdef inline int _get(zram* d, uint32_t generation) noexcept nogil:
    """A request's reference on the disk's meta, for the device `generation` names: 1; 0
    where the disk is not live; -1 where it now serves a newer device of its id (the caller's
    is gone)."""
    za_add(&_requests, 1)
    if generation and za_load32(&d.generation) != generation:
        return -1
    if not zram_get(&d.state):
        return 0
    if generation and za_load32(&d.generation) != generation:
        zram_put(&d.state)            # reused between the two looks: not the caller's device
        return -1
    return 1


cdef ssize_t zram_read(zram* d, uint32_t generation, char* buf, size_t size,
                        off_t off) noexcept nogil:
    """Reads up to `size` bytes at `off`; short at the end of the device."""
    cdef uint64_t started = zram_now_ns()
    cdef zram_meta* m
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


cdef ssize_t zram_write(zram* d, uint32_t generation, const char* buf, size_t size,
                         off_t off) noexcept nogil:
    """Writes `size` bytes at `off`; ENOSPC at or past the end, short up to it. A page that
    fails fails the whole request with EIO, as a bio does in the kernel's zram: a block device
    has no short writes, and the pages before it may or may not hold the new data."""
    cdef uint64_t started = zram_now_ns()
    cdef zram_meta* m
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


cdef int zram_fallocate(zram* d, uint32_t generation, int mode, off_t off,
                         off_t length) noexcept nogil:
    """Discard (PUNCH_HOLE) and write-zeroes (ZERO_RANGE), both with KEEP_SIZE: whole pages
    are freed, the partial pages at either end zeroed."""
    cdef uint64_t started = zram_now_ns()
    cdef zram_meta* m
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


# --- the data ops a front end calls (zramfs.fuse): a device file's handle names its device ------
#
# A handle is (generation << 32) | id: it means the same device to any daemon that serves the
# connection later, and a handle of a removed device never reaches one that got its id since.
# The disks are kept by id and never freed, so a request may always look its one up.

cdef enum:
    MAX_DISKS = 1 << 16

cdef zram* _disks[MAX_DISKS]


cdef inline zram* _disk_of(uint64_t fh) noexcept nogil:
    cdef size_t id = <uint32_t>fh
    if id >= MAX_DISKS:
        return NULL
    return <zram*>za_load_ptr(<void**>&_disks[id])


cdef ssize_t _dops_read(uint64_t fh, char* buf, size_t size, uint64_t off) noexcept nogil:
    cdef zram* d = _disk_of(fh)
    if d == NULL:
        return -EIO
    return zram_read(d, <uint32_t>(fh >> 32), buf, size, <off_t>off)


cdef ssize_t _dops_write(uint64_t fh, const char* buf, size_t size, uint64_t off) noexcept nogil:
    cdef zram* d = _disk_of(fh)
    if d == NULL:
        return -EIO
    return zram_write(d, <uint32_t>(fh >> 32), buf, size, <off_t>off)


cdef int _dops_fallocate(uint64_t fh, int mode, uint64_t off, uint64_t length) noexcept nogil:
    cdef zram* d = _disk_of(fh)
    if d == NULL:
        return -EIO
    return zram_fallocate(d, <uint32_t>(fh >> 32), mode, <off_t>off, <off_t>length)


cdef zramfs_data_ops DATA_OPS = zramfs_data_ops(
    read=_dops_read, write=_dops_write, fallocate=_dops_fallocate)


def data_ops_capsule() -> object:
    """The data ops, for _fuse.Session(data_ops=...): file handles are `Disk.handle`."""
    return PyCapsule_New(&DATA_OPS, ZRAMFS_DATA_OPS_CAPSULE, NULL)


# --- the meta (_meta.pxi) and a restart (_restart.pxi) --------------------------------------

include "_meta.pxi"
include "_restart.pxi"


cdef class Disk:
    """A device as the FUSE layer reaches it; lives as long as the device (across resets).

    `attach(meta)` makes it live; `detach()` stops new references; once `in_flight` is 0,
    `release()` hands the meta back to be destroyed outside any request. Maintenance runs
    through `call`, holding a reference as a request does, so reset waits for it too.
    """

    def __cinit__(self, dev_id, int generation=1):
        """The disk of device `dev_id`, the `generation`-th device with that id. The zram is
        kept for the id's next devices, never freed: a request with an old handle may still
        look it up (and gets EIO)."""
        cdef zram* d
        if not 0 <= dev_id < MAX_DISKS or generation < 1:
            raise ValueError(f"no disk {dev_id} of generation {generation}")
        d = _disks[dev_id]
        if d == NULL:
            d = <zram*>calloc(1, sizeof(zram))
            if d == NULL:
                raise MemoryError()
        elif za_load64(&d.state) != 0:
            raise RuntimeError(f"disk {dev_id} is still in use")
        else:
            memset(d, 0, sizeof(zram))     # the device before it was removed and drained
        d.id = dev_id
        za_store32(&d.generation, generation)
        za_store_ptr(<void**>&_disks[dev_id], d)
        self.disk = d

    @property
    def handle(self) -> int:
        """What the FUSE layer's file handles carry: this device's generation and id."""
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
        cdef zram* d = self.disk
        ios = [za_load(&d.ios[i]) for i in range(3)]
        sectors = [za_load(&d.sectors[i]) for i in range(3)]
        ms = [za_load(&d.ticks_ns[i]) // 1000000 for i in range(3)]
        busy = ms[0] + ms[1] + ms[2]
        return (ios[0], 0, sectors[0], ms[0], ios[1], 0, sectors[1], ms[1],
                self.in_flight, busy, busy, ios[2], 0, sectors[2], ms[2], 0, 0)
