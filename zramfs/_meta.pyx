# cython: language_level=3
"""A device's slot table, its lifetime, and the byte-range I/O over it, all without the GIL.

The slot table has one `zslot` per 4 KiB page, as zram's table: the object's handle and size
and flags (same-filled, huge, the slot lock). Every page operation holds the slot's lock from
first look to last touch, so a page being read is never freed, moved or half-written under
the reader (hazard 2), and a partial write's read-modify-write is one step. Lock order:
compression stream, then slot, then the pool's own locks. Nothing is allocated on the request
path but the compressed objects themselves (hazard 4).

`Disk` is the device as the FUSE layer sees it: it holds the current `Meta` while the device
is initialised and counts the requests in flight (hazard 1). `Meta` is what disksize creates
and reset destroys: table, pool, compressor streams, and mm_stat's counters.
"""
from __future__ import annotations

import os

from libc.errno cimport EIO, ENOSPC, ENOMEM, EOPNOTSUPP, EINVAL
from libc.stdint cimport uint32_t, uint64_t, int64_t
from libc.stdlib cimport calloc, free, realloc, qsort
from libc.string cimport memcpy, memset
from cpython.bytes cimport PyBytes_FromStringAndSize, PyBytes_AS_STRING
from cpython.buffer cimport PyObject_GetBuffer, PyBuffer_Release, PyBUF_SIMPLE
from cpython.pycapsule cimport PyCapsule_New

from zramfs.zram cimport za_add, za_load, za_load64, za_sub
from zramfs.pthread cimport (pthread_cond_broadcast, pthread_cond_destroy, pthread_cond_init,
                            pthread_cond_wait, pthread_join, pthread_mutex_destroy,
                            pthread_mutex_init, pthread_mutex_lock, pthread_mutex_unlock,
                            zram_thread_start)
from zramfs.data_ops cimport zramfs_data_ops, ZRAMFS_DATA_OPS_CAPSULE

from zramfs._alloc cimport Pool
from zramfs.zpool cimport zpool_driver
from zramfs._backing cimport Backing, backing_alloc, backing_free, backing_read, backing_write
from zramfs._zcomp cimport (Compressor, zcomp, zstream, zcomp_stream_get, zcomp_stream_put,
                            zcomp_private_stream)

from zramfs._alloc import Pool as _Pool
from zramfs._zcomp import Compressor as _Compressor

cdef extern from *:
    """
    #include <sched.h>
    #include <time.h>
    #include <linux/falloc.h>
    #define ZS_LOCK (1u << 31)
    static inline void zslot_lock(uint32_t* flags) {
        unsigned spins = 0;
        while (__atomic_fetch_or(flags, ZS_LOCK, __ATOMIC_ACQUIRE) & ZS_LOCK) {
            if (++spins > 64) sched_yield();
    #if defined(__x86_64__) || defined(__i386__)
            else __builtin_ia32_pause();
    #endif
        }
    }
    static inline void zslot_unlock(uint32_t* flags) {
        __atomic_fetch_and(flags, ~ZS_LOCK, __ATOMIC_RELEASE);
    }
    static inline int zslot_trylock(uint32_t* flags) {
        return !(__atomic_fetch_or(flags, ZS_LOCK, __ATOMIC_ACQUIRE) & ZS_LOCK);
    }
    /* Clears hint bits (the eviction clock's "accessed") without the lock: losing the race
       to the lock holder only means a page keeps its second chance. */
    static inline void zslot_clear(uint32_t* flags, uint32_t bits) {
        __atomic_fetch_and(flags, ~bits, __ATOMIC_RELAXED);
    }
    static inline uint32_t zm_now_s(void) {
        struct timespec t;
        clock_gettime(CLOCK_MONOTONIC_COARSE, &t);
        return (uint32_t)t.tv_sec;
    }
    /* Flags other than the lock bit change only under the lock, but atomically, since
       waiters set the lock bit on the same word. */
    static inline uint32_t zslot_flags(uint32_t* flags) {
        return __atomic_load_n(flags, __ATOMIC_RELAXED) & ~ZS_LOCK;
    }
    static inline void zslot_set_flags(uint32_t* flags, uint32_t value) {
        __atomic_store_n(flags, value | ZS_LOCK, __ATOMIC_RELAXED);
    }
    #define ZD_LIVE ((int64_t)1 << 62)
    /* A reference on the disk's meta, only while it is live. */
    static inline int zdisk_get(int64_t* state) {
        int64_t s = __atomic_load_n(state, __ATOMIC_RELAXED);
        do {
            if (!(s & ZD_LIVE)) return 0;
        } while (!__atomic_compare_exchange_n(state, &s, s + 1, 1, __ATOMIC_ACQUIRE,
                                              __ATOMIC_RELAXED));
        return 1;
    }
    static inline void zdisk_put(int64_t* state) {
        __atomic_fetch_sub(state, 1, __ATOMIC_RELEASE);
    }
    static inline void zm_max(size_t* p, size_t v) {
        size_t old = __atomic_load_n(p, __ATOMIC_RELAXED);
        while (v > old && !__atomic_compare_exchange_n(p, &old, v, 1, __ATOMIC_RELAXED,
                                                       __ATOMIC_RELAXED)) {}
    }
    static inline uint64_t zm_now_ns(void) {
        struct timespec t;
        clock_gettime(CLOCK_MONOTONIC, &t);
        return (uint64_t)t.tv_sec * 1000000000u + t.tv_nsec;
    }
    /* The workers' queue head, read without the lock while a worker spins. */
    #define ZM_QUEUE(w) __atomic_load_n(&(w)->queue, __ATOMIC_ACQUIRE)
    static inline void zm_min(size_t* p, size_t v) {
        size_t old = __atomic_load_n(p, __ATOMIC_RELAXED);
        while (v < old && !__atomic_compare_exchange_n(p, &old, v, 1, __ATOMIC_RELAXED,
                                                       __ATOMIC_RELAXED)) {}
    }
    """
    uint32_t ZS_LOCK
    int64_t ZD_LIVE
    int FALLOC_FL_KEEP_SIZE, FALLOC_FL_PUNCH_HOLE, FALLOC_FL_ZERO_RANGE
    void zslot_lock(uint32_t* flags) nogil
    void zslot_unlock(uint32_t* flags) nogil
    int zslot_trylock(uint32_t* flags) nogil
    void zslot_clear(uint32_t* flags, uint32_t bits) nogil
    uint32_t zm_now_s() nogil
    uint32_t zslot_flags(uint32_t* flags) nogil
    void zslot_set_flags(uint32_t* flags, uint32_t value) nogil
    int zdisk_get(int64_t* state) nogil
    void zdisk_put(int64_t* state) nogil
    int64_t ZM_AND64 "__atomic_fetch_and"(int64_t*, int64_t, int) nogil
    int64_t ZM_OR64 "__atomic_fetch_or"(int64_t*, int64_t, int) nogil
    int __ATOMIC_SEQ_CST
    void zm_max(size_t* p, size_t v) nogil
    void zm_min(size_t* p, size_t v) nogil
    uint64_t zm_now_ns() nogil
    void* ZM_QUEUE(zworkers*) nogil
    void __atomic_store_n(...) nogil
    int __ATOMIC_RELEASE
    int sched_yield() nogil
    size_t SIZE_MAX
    int posix_memalign(void** p, size_t align, size_t size) nogil

cdef enum:
    PAGE_SHIFT = 12
    PAGE_SIZE = 4096
    ZS_SAME = 1 << 0         # handle holds the repeated word; no object
    ZS_HUGE = 1 << 1         # the object is the raw page
    ZS_WB = 1 << 2           # written back: handle is the backing device's block
    ZS_IDLE = 1 << 3         # not accessed since marked idle
    ZS_INCOMPRESSIBLE = 1 << 4   # no secondary algorithm could shrink it
    ZS_ACCESSED = 1 << 5     # accessed since the eviction clock last passed
    ZS_PRIO_SHIFT = 6        # 2 bits: the priority of the algorithm that compressed it
    ZS_PRIO_MASK = 3 << 6
    EVICT_SLACK = 256        # pages evicted beyond the excess, so not every write evicts
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


cdef void _free_locked(zmeta* m, zslot* s) noexcept nogil:
    cdef uint32_t flags = zslot_flags(&s.flags)
    if flags & ZS_SAME:
        za_sub(&m.same_pages, 1)
        za_sub(&m.pages_stored, 1)
    elif flags & ZS_WB:
        backing_free(m.backing, s.handle)
        za_sub(&m.pages_stored, 1)
    elif s.size:
        m.driver.free(m.pool, s.handle)
        za_sub(&m.compr_data_size, s.size)
        za_sub(&m.pages_stored, 1)
        if flags & ZS_HUGE:
            za_sub(&m.huge_pages, 1)
    s.handle = 0
    s.size = 0
    zslot_set_flags(&s.flags, 0)


cdef int _load_locked(zmeta* m, zslot* s, char* dst, zstream* st) noexcept nogil:
    """The page into dst; st.page may serve as bounce buffer, so dst is st.page or apart."""
    cdef uint32_t flags = zslot_flags(&s.flags)
    cdef const char* src
    cdef char* bounce
    cdef int rc = 0
    cdef int prio
    cdef zstream* st2
    if flags & ZS_SAME:
        _fill(dst, s.handle)
    elif flags & ZS_WB:
        # O_DIRECT wants an aligned buffer; the stream's scratch page is one.
        bounce = dst if (<size_t>dst & (PAGE_SIZE - 1)) == 0 else st.page
        rc = backing_read(m.backing, s.handle, bounce)
        if rc == 0 and bounce != dst:
            memcpy(dst, bounce, PAGE_SIZE)
    elif s.size == 0:
        memset(dst, 0, PAGE_SIZE)
    else:
        src = m.driver.map(m.pool, s.handle)
        prio = (flags & ZS_PRIO_MASK) >> ZS_PRIO_SHIFT
        if flags & ZS_HUGE:
            memcpy(dst, src, PAGE_SIZE)
        elif prio == 0:
            rc = m.comp.ops.decompress(st.ctx, src, s.size, dst)
        else:                     # recompressed: the secondary algorithm's own context
            st2 = zcomp_stream_get(m.secondary[prio])
            rc = m.secondary[prio].ops.decompress(st2.ctx, src, s.size, dst)
            zcomp_stream_put(st2)
        m.driver.unmap(m.pool, s.handle)
    return rc


cdef inline void _touch(zmeta* m, zslot* s) noexcept nogil:
    """An access: the page is no longer idle, and gets a second chance from eviction."""
    m.ac_time[s - m.table] = zm_now_s()
    zslot_set_flags(&s.flags, (zslot_flags(&s.flags) & ~ZS_IDLE) | ZS_ACCESSED)


cdef int _store_locked(zmeta* m, zslot* s, const char* page, zstream* st) noexcept nogil:
    """Compresses and stores one page in place of the slot's old content; -errno on failure."""
    cdef uint64_t word
    cdef const char* data = st.buffer
    cdef int n
    cdef uint32_t flags = 0
    cdef uint64_t handle
    cdef size_t used
    cdef char* dst
    if _same_filled(page, &word):
        _free_locked(m, s)
        s.handle = word
        zslot_set_flags(&s.flags, ZS_SAME)
        za_add(&m.same_pages, 1)
        za_add(&m.pages_stored, 1)
        return 0
    # A result that would land in a huge class is no better than the page itself.
    n = m.comp.ops.compress(st.ctx, m.comp.level, page, st.buffer, <int>m.huge_size - 1)
    if n <= 0:
        data, n, flags = page, PAGE_SIZE, ZS_HUGE
    handle = m.driver.malloc(m.pool, n)
    if handle == 0:
        return -ENOMEM
    used = m.driver.total_pages(m.pool)
    zm_max(&m.max_used_pages, used)
    if m.limit_pages and used > za_load(&m.limit_pages):
        if m.evict_enable and m.backing != NULL:
            _evict(m, used - za_load(&m.limit_pages))
            used = m.driver.total_pages(m.pool)
        if used > za_load(&m.limit_pages):
            m.driver.free(m.pool, handle)
            return -ENOMEM
    dst = m.driver.map(m.pool, handle)
    memcpy(dst, data, n)
    m.driver.unmap(m.pool, handle)
    _free_locked(m, s)
    s.handle = handle
    s.size = n
    zslot_set_flags(&s.flags, flags)
    za_add(&m.compr_data_size, n)
    za_add(&m.pages_stored, 1)
    if flags & ZS_HUGE:
        za_add(&m.huge_pages, 1)
        za_add(&m.huge_pages_since, 1)
    return 0


# --- tiering: writeback, idle, recompression, eviction (zram.rst's semantics) -----------------

cdef enum:
    WB_IDLE = 1
    WB_HUGE = 2
    WB_HUGE_IDLE = 3
    WB_INCOMPRESSIBLE = 4
    WB_PAGES = 5              # the page index ranges given


cdef inline bint _has_object(zslot* s, uint32_t flags) noexcept nogil:
    return s.size != 0 and not flags & (ZS_SAME | ZS_WB)


cdef bint _wb_wanted(zslot* s, int mode) noexcept nogil:
    cdef uint32_t f = zslot_flags(&s.flags)
    if not _has_object(s, f):
        return False
    if mode == WB_IDLE:
        return f & ZS_IDLE != 0
    if mode == WB_HUGE:
        return f & ZS_HUGE != 0
    if mode == WB_HUGE_IDLE:
        return f & ZS_HUGE != 0 and f & ZS_IDLE != 0
    if mode == WB_INCOMPRESSIBLE:
        return f & ZS_INCOMPRESSIBLE != 0
    return True


cdef int _writeback_locked(zmeta* m, zslot* s, char* page, zstream* st) noexcept nogil:
    """The slot's page, decompressed, to a new block of the backing device; its memory freed.
    `page` is page-aligned. 0, -ENOSPC when the device is full, or -EIO."""
    cdef long block = backing_alloc(m.backing)
    cdef uint32_t idle
    if block < 0:
        return -ENOSPC
    if _load_locked(m, s, page, st) != 0 or backing_write(m.backing, block, page) != 0:
        backing_free(m.backing, block)
        return -EIO
    idle = zslot_flags(&s.flags) & ZS_IDLE
    _free_locked(m, s)
    s.handle = <uint64_t>block
    zslot_set_flags(&s.flags, ZS_WB | idle)
    za_add(&m.pages_stored, 1)          # still stored, on the backing device
    return 0


ctypedef struct zcandidate:
    size_t index
    size_t size


cdef int _larger_first(const void* a, const void* b) noexcept nogil:
    cdef size_t x = (<const zcandidate*>a).size
    cdef size_t y = (<const zcandidate*>b).size
    return (x < y) - (x > y)


cdef long _writeback(zmeta* m, int mode, const size_t* ranges, size_t nranges, char* page,
                     int* err) noexcept nogil:
    """Writes back the pages `mode` selects, largest objects first. Returns the pages written;
    `err` gets ENOSPC (backing device full), EIO (limit spent, or I/O) or stays 0."""
    cdef size_t i, r, lo, hi, n = 0, cap = 0
    cdef zcandidate* cand = NULL
    cdef zcandidate* grown
    cdef zslot* s
    cdef zstream* st
    cdef long done = 0
    cdef int rc
    err[0] = 0
    for r in range(nranges if mode == WB_PAGES else 1):
        lo, hi = 0, m.nr_pages - 1
        if mode == WB_PAGES:
            lo = ranges[2 * r]
            hi = min(ranges[2 * r + 1], m.nr_pages - 1)
        i = lo
        while i <= hi and i < m.nr_pages:
            s = &m.table[i]
            if _wb_wanted(s, mode):
                if n == cap:
                    cap = cap * 2 if cap else 1024
                    grown = <zcandidate*>realloc(cand, cap * sizeof(zcandidate))
                    if grown == NULL:
                        free(cand)
                        err[0] = ENOMEM
                        return 0
                    cand = grown
                cand[n].index = i
                cand[n].size = s.size
                n += 1
            i += 1
    qsort(cand, n, sizeof(zcandidate), _larger_first)
    st = zcomp_stream_get(m.comp)
    for i in range(n):
        if m.wb_limit_enable and za_load(&m.wb_limit) == 0:
            err[0] = EIO
            break
        s = &m.table[cand[i].index]
        zslot_lock(&s.flags)
        rc = _writeback_locked(m, s, page, st) if _wb_wanted(s, mode) else 1
        zslot_unlock(&s.flags)
        if rc < 0:
            err[0] = -rc
            break
        if rc == 0:
            done += 1
            if m.wb_limit_enable:
                za_sub(&m.wb_limit, 1)
    zcomp_stream_put(st)
    free(cand)
    return done


cdef size_t _mark_idle(zmeta* m, uint32_t age) noexcept nogil:
    """Marks idle every stored page, or (age > 0) those not accessed for `age` seconds."""
    cdef size_t i, marked = 0
    cdef uint32_t now = zm_now_s()
    cdef zslot* s
    for i in range(m.nr_pages):
        s = &m.table[i]
        if not _has_object(s, zslot_flags(&s.flags)):
            continue
        zslot_lock(&s.flags)
        if _has_object(s, zslot_flags(&s.flags)) and (age == 0 or now - m.ac_time[i] >= age):
            zslot_set_flags(&s.flags, zslot_flags(&s.flags) | ZS_IDLE)
            marked += 1
        zslot_unlock(&s.flags)
    return marked


cdef int _recompress_locked(zmeta* m, zslot* s, int only, char* page, zstream* st) noexcept nogil:
    """Tries the secondary algorithms above the page's own, by priority; keeps a result only if
    it lands in a smaller size class. 1 recompressed, 0 not (now marked incompressible)."""
    cdef uint32_t flags = zslot_flags(&s.flags)
    cdef int prio, n
    cdef size_t old_class
    cdef zcomp* c
    cdef zstream* st2
    cdef uint64_t handle
    cdef size_t used
    cdef char* dst
    if _load_locked(m, s, page, st) != 0:
        return 0
    old_class = m.driver.class_size(m.pool, s.size)
    for prio in range(((flags & ZS_PRIO_MASK) >> ZS_PRIO_SHIFT) + 1, 4):
        c = m.secondary[prio]
        if c == NULL or (only and prio != only):
            continue
        st2 = zcomp_stream_get(c)
        n = c.ops.compress(st2.ctx, c.level, page, st2.buffer, <int>m.huge_size - 1)
        if n > 0 and m.driver.class_size(m.pool, n) < old_class:
            handle = m.driver.malloc(m.pool, n)
            used = m.driver.total_pages(m.pool)
            if handle != 0 and m.limit_pages and used > za_load(&m.limit_pages):
                # Recompression must not take memory over mem_limit any more than a write
                # may: leave the page as it is, for a later try.
                m.driver.free(m.pool, handle)
                zcomp_stream_put(st2)
                return 0
            if handle != 0:
                zm_max(&m.max_used_pages, used)
                dst = m.driver.map(m.pool, handle)
                memcpy(dst, st2.buffer, n)
                m.driver.unmap(m.pool, handle)
                zcomp_stream_put(st2)
                _free_locked(m, s)
                s.handle = handle
                s.size = n
                zslot_set_flags(&s.flags, (flags & ZS_IDLE) | (prio << ZS_PRIO_SHIFT))
                za_add(&m.compr_data_size, n)
                za_add(&m.pages_stored, 1)
                return 1
        zcomp_stream_put(st2)
    zslot_set_flags(&s.flags, flags | ZS_INCOMPRESSIBLE)
    return 0


cdef bint _recompress_wanted(zslot* s, int mode, size_t threshold) noexcept nogil:
    cdef uint32_t f = zslot_flags(&s.flags)
    if not _has_object(s, f) or f & ZS_INCOMPRESSIBLE or s.size < threshold:
        return False
    if mode == WB_IDLE:
        return f & ZS_IDLE != 0
    if mode == WB_HUGE:
        return f & ZS_HUGE != 0
    if mode == WB_HUGE_IDLE:
        return f & ZS_HUGE != 0 and f & ZS_IDLE != 0
    return True                   # no type: every page, by threshold alone


cdef long _recompress(zmeta* m, int mode, size_t threshold, size_t max_pages, int only,
                      char* page) noexcept nogil:
    """Recompresses the pages `mode` (0: any) and `threshold` select, trying at most
    `max_pages` (0: no limit). Returns the pages recompressed."""
    cdef size_t i, tried = 0
    cdef zslot* s
    cdef zstream* st = zcomp_stream_get(m.comp)
    cdef long done = 0
    for i in range(m.nr_pages):
        if max_pages and tried >= max_pages:
            break
        s = &m.table[i]
        if not _recompress_wanted(s, mode, threshold):
            continue
        zslot_lock(&s.flags)
        if _recompress_wanted(s, mode, threshold):
            tried += 1
            done += _recompress_locked(m, s, only, page, st)
        zslot_unlock(&s.flags)
    zcomp_stream_put(st)
    return done


cdef void _evict(zmeta* m, size_t excess) noexcept nogil:
    """zswap-style: writes least recently used pages (CLOCK: an accessed page gets a second
    chance) back until `excess` pages and some slack are freed. Called by a writer over
    mem_limit, holding its own slot lock: so victims are only tried, never waited for."""
    cdef size_t goal = (excess + EVICT_SLACK) << PAGE_SHIFT
    cdef size_t freed = 0, scanned = 0, idx
    cdef uint32_t f
    cdef zslot* s
    cdef int rc
    pthread_mutex_lock(&m.evict_lock)
    if m.driver.total_pages(m.pool) <= za_load(&m.limit_pages):
        pthread_mutex_unlock(&m.evict_lock)       # another writer made room meanwhile
        return
    while freed < goal and scanned < 2 * m.nr_pages:
        idx = m.clock_hand
        m.clock_hand = (idx + 1) % m.nr_pages
        scanned += 1
        s = &m.table[idx]
        f = zslot_flags(&s.flags)
        if not _has_object(s, f):
            continue
        if f & ZS_ACCESSED:
            zslot_clear(&s.flags, ZS_ACCESSED)
            continue
        if not zslot_trylock(&s.flags):
            continue
        rc = 1
        if _has_object(s, zslot_flags(&s.flags)):
            freed += s.size
            rc = _writeback_locked(m, s, m.evict_page, m.evict_stream)
        zslot_unlock(&s.flags)
        if rc == 0:
            za_add(&m.evicted, 1)
        elif rc == -ENOSPC:
            break
    # Objects freed here and there empty few zspages by themselves: compaction does the rest.
    # The pool counts what it frees (mm_stat's pages_compacted), whoever compacts.
    m.driver.compact(m.pool)
    pthread_mutex_unlock(&m.evict_lock)


# --- byte ranges: a request's pages ---------------------------------------------------------

cdef inline size_t _disk_bytes(zmeta* m) noexcept nogil:
    return m.nr_pages << PAGE_SHIFT


cdef inline void _account(zdisk* d, int kind, size_t nbytes, uint64_t started) noexcept nogil:
    za_add(&d.ios[kind], 1)
    za_add(&d.sectors[kind], nbytes >> SECTOR_SHIFT)
    za_add(&d.ticks_ns[kind], zm_now_ns() - started)


cdef int _page_io(zmeta* m, bint write, char* buf, size_t off, size_t size, size_t page,
                  zstream* st) noexcept nogil:
    """Page `page` of the request [off, off + size) between the slot and `buf` (the request's
    buffer); takes and drops the slot's lock. A partial page is read-modify-write in st.page.
    0 or -errno."""
    cdef size_t start = max(page << PAGE_SHIFT, off)
    cdef size_t end = min((page + 1) << PAGE_SHIFT, off + size)
    cdef size_t pofs = start & (PAGE_SIZE - 1)
    cdef size_t n = end - start
    cdef char* b = buf + (start - off)
    cdef zslot* s = &m.table[page]
    cdef int rc
    zslot_lock(&s.flags)
    if n == PAGE_SIZE:
        rc = _store_locked(m, s, b, st) if write else _load_locked(m, s, b, st)
    else:
        rc = _load_locked(m, s, st.page, st)
        if rc == 0:
            if write:
                memcpy(st.page + pofs, b, n)
                rc = _store_locked(m, s, st.page, st)
            else:
                memcpy(b, st.page + pofs, n)
    if rc == 0:
        _touch(m, s)
    zslot_unlock(&s.flags)
    return rc


# --- large requests: the pages shared out to the compression workers ---------------------------

cdef enum:
    JOB_CHUNK = 4              # pages a worker takes at a time
    JOB_MIN_PAGES = 16         # smaller requests are served inline: waking a worker costs more
    # A worker looks for the next job this long before it sleeps. Fresh 2 GiB 1M QD1 writes
    # here: 300 us 590-820 MB/s, 100 us 820-920 MB/s and less daemon CPU (50-150 us alike,
    # 2 ms worse): between two QD1 requests fio fills its next buffer for longer than that,
    # and a worker spinning past it only takes CPU from fio.
    SPIN_NS = 100000


cdef void _job_work(zjob* j, zstream* st) noexcept nogil:
    """Takes chunks of the job until none are left. Any thread, no lock held."""
    cdef size_t c, page, last
    cdef size_t end_page = (j.off + j.size - 1) >> PAGE_SHIFT
    while True:
        c = za_add(&j.next_chunk, 1)
        if c >= j.nr_chunks:
            return
        page = j.first_page + c * JOB_CHUNK
        last = min(page + JOB_CHUNK - 1, end_page)
        while page <= last:
            if _page_io(j.meta, j.write, j.buf, j.off, j.size, page, st):
                zm_min(&j.first_bad, page)
            page += 1


cdef void _job_unqueue(zworkers* w, zjob* j) noexcept nogil:
    """Workers' lock held; j may already be out of the queue."""
    cdef zjob** p = &w.queue
    while p[0] != NULL:
        if p[0] == j:
            p[0] = j.next
            return
        p = &p[0].next


cdef void _worker_wait(zworkers* w) noexcept nogil:
    """Until there is a job or the workers stop; workers' lock held on entry and exit.
    A large request usually follows another (a sequential stream), and waking a sleeping
    thread costs tens of microseconds here (an idle vCPU halts): so first spin a while,
    yielding the CPU to anyone runnable, then sleep."""
    cdef uint64_t until
    if w.queue != NULL or w.stop:
        return
    pthread_mutex_unlock(&w.lock)
    until = zm_now_ns() + SPIN_NS
    while ZM_QUEUE(w) == NULL and not w.stop and zm_now_ns() < until:
        sched_yield()
    pthread_mutex_lock(&w.lock)
    while not w.stop and w.queue == NULL:
        w.sleepers += 1
        pthread_cond_wait(&w.wake, &w.lock)
        w.sleepers -= 1


cdef void* _worker_main(void* arg) noexcept nogil:
    cdef zworker* me = <zworker*>arg
    cdef zworkers* w = me.pool
    cdef zjob* j
    pthread_mutex_lock(&w.lock)
    while True:
        _worker_wait(w)
        if w.stop:
            break
        j = w.queue
        if za_load(&j.next_chunk) >= j.nr_chunks:
            _job_unqueue(w, j)        # all taken: nothing for a worker to join
            continue
        j.helpers += 1
        pthread_mutex_unlock(&w.lock)
        _job_work(j, me.stream)
        pthread_mutex_lock(&w.lock)
        _job_unqueue(w, j)
        j.helpers -= 1
        if j.helpers == 0:
            pthread_cond_broadcast(&w.left)
    pthread_mutex_unlock(&w.lock)
    return NULL


cdef size_t _range_io(zmeta* m, bint write, char* buf, size_t off, size_t size,
                      zstream* st) noexcept nogil:
    """The request's pages, inline or shared with the workers. Returns the index of the lowest
    page that failed, SIZE_MAX if none. The caller holds a reference on the meta (so the
    workers outlive this) and its own stream `st`."""
    cdef size_t first = off >> PAGE_SHIFT
    cdef size_t last = (off + size - 1) >> PAGE_SHIFT
    cdef size_t page
    cdef zworkers* w = m.workers
    cdef zjob j
    if w == NULL or last - first + 1 < JOB_MIN_PAGES:
        for page in range(first, last + 1):
            if _page_io(m, write, buf, off, size, page, st):
                return page
        return SIZE_MAX
    j.meta = m
    j.write = write
    j.buf = buf
    j.off = off
    j.size = size
    j.first_page = first
    j.nr_chunks = (last - first + JOB_CHUNK) // JOB_CHUNK
    j.next_chunk = 0
    j.first_bad = SIZE_MAX
    j.helpers = 0
    j.next = NULL
    pthread_mutex_lock(&w.lock)
    j.next = w.queue              # newest first: the workers help the latest request
    __atomic_store_n(&w.queue, &j, __ATOMIC_RELEASE)
    if w.sleepers:
        pthread_cond_broadcast(&w.wake)
    pthread_mutex_unlock(&w.lock)
    _job_work(&j, st)             # this thread works too, so a job never waits for a worker
    pthread_mutex_lock(&w.lock)
    _job_unqueue(w, &j)
    while j.helpers:              # j lives on this stack: wait until no worker touches it
        pthread_cond_wait(&w.left, &w.lock)
    pthread_mutex_unlock(&w.lock)
    return za_load(&j.first_bad)


cdef zworkers* _workers_start(zcomp* comp, int nr) noexcept nogil:
    """nr threads, each with the compressor's private stream i; NULL on failure."""
    cdef zworkers* w = <zworkers*>calloc(1, sizeof(zworkers))
    cdef int i
    if w == NULL:
        return NULL
    pthread_mutex_init(&w.lock, NULL)
    pthread_cond_init(&w.wake, NULL)
    pthread_cond_init(&w.left, NULL)
    w.workers = <zworker*>calloc(nr, sizeof(zworker))
    if w.workers == NULL:
        _workers_stop(w)
        return NULL
    w.nr = nr
    for i in range(nr):
        w.workers[i].pool = w
        w.workers[i].stream = zcomp_private_stream(comp, i)
        if zram_thread_start(&w.workers[i].thread, _worker_main, &w.workers[i]) != 0:
            _workers_stop(w)
            return NULL
        w.workers[i].started = 1
    return w


cdef void _workers_stop(zworkers* w) noexcept nogil:
    """Stops and joins the threads and frees. No request may be in flight (after the drain)."""
    cdef int i
    pthread_mutex_lock(&w.lock)
    w.stop = 1
    pthread_cond_broadcast(&w.wake)
    pthread_mutex_unlock(&w.lock)
    for i in range(w.nr):
        if w.workers[i].started:
            pthread_join(w.workers[i].thread, NULL)
    free(w.workers)
    pthread_cond_destroy(&w.left)
    pthread_cond_destroy(&w.wake)
    pthread_mutex_destroy(&w.lock)
    free(w)


cdef ssize_t zdisk_read(zdisk* d, char* buf, size_t size, off_t off) noexcept nogil:
    """Reads up to `size` bytes at `off`; short at the end of the device."""
    cdef uint64_t started = zm_now_ns()
    cdef zmeta* m
    cdef zstream* st
    cdef size_t bad = SIZE_MAX
    if not zdisk_get(&d.state):
        return -EIO
    m = d.meta
    if off < 0 or <size_t>off >= _disk_bytes(m):
        zdisk_put(&d.state)
        return 0
    size = min(size, _disk_bytes(m) - <size_t>off)
    if size:
        st = zcomp_stream_get(m.comp)
        bad = _range_io(m, False, buf, <size_t>off, size, st)
        zcomp_stream_put(st)
    if bad != SIZE_MAX:
        za_add(&m.failed_reads, 1)
    zdisk_put(&d.state)
    _account(d, IO_READ, size if bad == SIZE_MAX else 0, started)
    return -EIO if bad != SIZE_MAX else <ssize_t>size


cdef ssize_t zdisk_write(zdisk* d, const char* buf, size_t size, off_t off) noexcept nogil:
    """Writes `size` bytes at `off`; ENOSPC at or past the end, short up to it, and short up
    to the first page that failed (EIO if that is the first)."""
    cdef uint64_t started = zm_now_ns()
    cdef zmeta* m
    cdef zstream* st
    cdef size_t bad = SIZE_MAX, done
    if not zdisk_get(&d.state):
        return -EIO
    m = d.meta
    if off < 0 or <size_t>off >= _disk_bytes(m):
        za_add(&m.invalid_io, 1)
        zdisk_put(&d.state)
        return -ENOSPC
    size = min(size, _disk_bytes(m) - <size_t>off)
    if size:
        st = zcomp_stream_get(m.comp)
        # The buffer is only read from: the shared page walk takes it as char*.
        bad = _range_io(m, True, <char*>buf, <size_t>off, size, st)
        zcomp_stream_put(st)
    done = size
    if bad != SIZE_MAX:
        za_add(&m.failed_writes, 1)
        done = (bad << PAGE_SHIFT) - <size_t>off if (bad << PAGE_SHIFT) > <size_t>off else 0
    zdisk_put(&d.state)
    _account(d, IO_WRITE, done, started)
    if bad != SIZE_MAX and done == 0:
        return -EIO
    return <ssize_t>done


cdef int zdisk_fallocate(zdisk* d, int mode, off_t off, off_t length) noexcept nogil:
    """Discard (PUNCH_HOLE) and write-zeroes (ZERO_RANGE), both with KEEP_SIZE: whole pages
    are freed, the partial pages at either end zeroed."""
    cdef uint64_t started = zm_now_ns()
    cdef zmeta* m
    cdef zstream* st = NULL
    cdef zslot* s
    cdef size_t pos, end, n, pofs
    cdef int rc = 0
    if mode != (FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE) and \
            mode != (FALLOC_FL_ZERO_RANGE | FALLOC_FL_KEEP_SIZE):
        return -EOPNOTSUPP
    if off < 0 or length <= 0:
        return -EINVAL
    if not zdisk_get(&d.state):
        return -EIO
    m = d.meta
    pos = <size_t>off
    end = min(<size_t>off + <size_t>length, _disk_bytes(m))
    while pos < end:
        s = &m.table[pos >> PAGE_SHIFT]
        pofs = pos & (PAGE_SIZE - 1)
        n = min(PAGE_SIZE - pofs, end - pos)
        zslot_lock(&s.flags)
        if n == PAGE_SIZE:
            if zslot_flags(&s.flags) & ZS_SAME or s.size:
                za_add(&m.notify_free, 1)
            _free_locked(m, s)
        else:
            if st == NULL:
                st = zcomp_stream_get(m.comp)
            rc = _load_locked(m, s, st.page, st)
            if rc == 0:
                memset(st.page + pofs, 0, n)
                rc = _store_locked(m, s, st.page, st)
            if rc == 0:
                _touch(m, s)
        zslot_unlock(&s.flags)
        if rc:
            za_add(&m.failed_writes, 1)
            break
        pos += n
    if st != NULL:
        zcomp_stream_put(st)
    zdisk_put(&d.state)
    _account(d, IO_DISCARD, pos - <size_t>off if pos > <size_t>off else 0, started)
    return -EIO if rc else 0


# --- the FUSE layer's data ops: a device file's handle is its zdisk* ----------------------------

cdef ssize_t _dops_read(void* ctx, uint64_t fh, char* buf, size_t size,
                        uint64_t off) noexcept nogil:
    return zdisk_read(<zdisk*>fh, buf, size, <off_t>off)


cdef ssize_t _dops_write(void* ctx, uint64_t fh, const char* buf, size_t size,
                         uint64_t off) noexcept nogil:
    return zdisk_write(<zdisk*>fh, buf, size, <off_t>off)


cdef int _dops_fallocate(void* ctx, uint64_t fh, int mode, uint64_t off,
                         uint64_t length) noexcept nogil:
    return zdisk_fallocate(<zdisk*>fh, mode, <off_t>off, <off_t>length)


cdef zramfs_data_ops DATA_OPS = zramfs_data_ops(
    ctx=NULL, read=_dops_read, write=_dops_write, fallocate=_dops_fallocate)


def data_ops_capsule() -> object:
    """The data ops for _fuse.Session(data=zramfs._meta): file handles are `Disk.address`."""
    return PyCapsule_New(&DATA_OPS, ZRAMFS_DATA_OPS_CAPSULE, NULL)


WRITEBACK_MODES = {"idle": WB_IDLE, "huge": WB_HUGE, "huge_idle": WB_HUGE_IDLE,
                   "incompressible": WB_INCOMPRESSIBLE}


# --- Python faces ----------------------------------------------------------------------------

def default_workers() -> int:
    """Compression workers per device: with the request's own thread, one per core."""
    return (os.cpu_count() or 1) - 1


MmStat = tuple  # orig_data_size compr_data_size mem_used_total mem_limit mem_used_max
                # same_pages pages_compacted huge_pages huge_pages_since


cdef class Meta:
    """What writing disksize creates: `Meta(disksize, "lz4", name="zram0")`.

    Everything the data path needs is made here, none of it later (hazard 4): the table, the
    pool, the compressor's streams, and `workers` compression threads (default: one per core
    but one) that take a share of the pages of large requests.
    """

    def __init__(self, size_t disksize, str algorithm="lz4", level=None, *,
                 str backend="zsmalloc", str name="zram", streams=None,
                 int max_pages_per_zspage=8, workers=None, Backing backing=None,
                 dict secondary=None):
        """`backing`: the writeback device (the caller's to close, after destroy).
        `secondary`: recompression algorithms, {priority: (name, level or None)}."""
        cdef Pool pool
        cdef Compressor comp
        if disksize == 0 or disksize % PAGE_SIZE:
            raise ValueError(f"disksize must be a positive multiple of {PAGE_SIZE}")
        self.m = <zmeta*>calloc(1, sizeof(zmeta))
        if self.m == NULL:
            raise MemoryError("no memory for the device's meta")
        self.disksize = disksize
        # calloc of a large table maps zero pages lazily: untouched slots cost nothing.
        self.m.table = <zslot*>calloc(disksize >> PAGE_SHIFT, sizeof(zslot))
        if self.m.table == NULL:
            self.destroy()
            raise MemoryError(f"no memory for a slot table of {disksize >> PAGE_SHIFT} pages")
        self.m.nr_pages = disksize >> PAGE_SHIFT
        cdef int nr_workers = default_workers() if workers is None else workers
        if nr_workers < 0:
            self.destroy()
            raise ValueError("workers must be 0 or more")
        self.secondary = {}
        self.m.ac_time = <uint32_t*>calloc(self.m.nr_pages, sizeof(uint32_t))
        if self.m.ac_time == NULL or \
                posix_memalign(<void**>&self.m.evict_page, PAGE_SIZE, PAGE_SIZE) != 0:
            self.m.evict_page = NULL
            self.destroy()
            raise MemoryError("no memory for the access times")
        pthread_mutex_init(&self.m.evict_lock, NULL)
        try:
            self.pool = _Pool(backend, name, max_pages_per_zspage)
            # One private stream a worker, and one for eviction.
            self.compressor = _Compressor(algorithm, level, streams,
                                          private_streams=nr_workers + 1)
            for prio, (sname, slevel) in sorted((secondary or {}).items()):
                if not 1 <= prio <= 3:
                    raise ValueError(f"recompression priority {prio} is not 1..3")
                self.secondary[prio] = _Compressor(sname, slevel, 2)
        except BaseException:
            self.destroy()
            raise
        for prio, c in self.secondary.items():
            self.m.secondary[prio] = (<Compressor>c).comp
        if backing is not None:
            self.backing = backing
            self.m.backing = backing.b
        pool = self.pool
        comp = self.compressor
        self.m.driver = pool.driver
        self.m.pool = pool.impl
        self.m.huge_size = pool.driver.huge_class_size(pool.impl)
        self.m.comp = comp.comp
        self.m.evict_stream = zcomp_private_stream(comp.comp, nr_workers)
        if nr_workers:
            with nogil:
                self.m.workers = _workers_start(self.m.comp, nr_workers)
            if self.m.workers == NULL:
                self.destroy()
                raise MemoryError(f"cannot start {nr_workers} compression workers")
        self.workers = nr_workers

    def destroy(self) -> None:
        """Frees everything. Only once no request can reach the meta (Disk.release)."""
        if self.m == NULL:
            return
        if self.m.workers != NULL:
            with nogil:
                _workers_stop(self.m.workers)
            self.m.workers = NULL
        if self.pool is not None:
            self.pool.destroy()       # frees every object at once: no need to walk the table
        if self.compressor is not None:
            self.compressor.destroy()
        for c in (self.secondary or {}).values():
            c.destroy()
        if self.m.ac_time != NULL:
            pthread_mutex_destroy(&self.m.evict_lock)
        free(self.m.ac_time)
        free(self.m.evict_page)
        free(self.m.table)
        free(self.m)
        self.m = NULL

    def __dealloc__(self):
        # Dropped without destroy: the pool and compressors free themselves as objects.
        if self.m != NULL:
            if self.m.workers != NULL:
                _workers_stop(self.m.workers)
            if self.m.ac_time != NULL:
                pthread_mutex_destroy(&self.m.evict_lock)
            free(self.m.ac_time)
            free(self.m.evict_page)
            free(self.m.table)
            free(self.m)

    @property
    def mem_limit(self) -> int:
        return self.m.limit_pages << PAGE_SHIFT

    @mem_limit.setter
    def mem_limit(self, size_t nbytes) -> None:
        """Bytes, rounded up to pages; 0 for none. With eviction on, a limit below the memory
        used now evicts down to it at once."""
        self.m.limit_pages = (nbytes + PAGE_SIZE - 1) >> PAGE_SHIFT
        self._evict_to_limit()

    def _evict_to_limit(self) -> None:
        cdef size_t used, limit = self.m.limit_pages
        if not (self.m.evict_enable and self.m.backing != NULL and limit):
            return
        with nogil:
            used = self.m.driver.total_pages(self.m.pool)
            if used > limit:
                _evict(self.m, used - limit)

    def reset_mem_used_max(self) -> None:
        """mem_used_max starts again from the memory used now."""
        self.m.max_used_pages = self.pool.total_pages

    def compact(self) -> int:
        return self.pool.compact()

    def mm_stat(self) -> tuple[int, ...]:
        """The nine fields of mm_stat, in the kernel's order."""
        cdef zmeta* m = self.m
        return (
            za_load(&m.pages_stored) << PAGE_SHIFT,
            za_load(&m.compr_data_size),
            self.pool.total_pages << PAGE_SHIFT,
            m.limit_pages << PAGE_SHIFT,
            za_load(&m.max_used_pages) << PAGE_SHIFT,
            za_load(&m.same_pages),
            self.pool.pages_compacted,
            za_load(&m.huge_pages),
            za_load(&m.huge_pages_since),
        )

    def io_stat(self) -> tuple[int, int, int, int]:
        """failed_reads failed_writes invalid_io notify_free."""
        cdef zmeta* m = self.m
        return (za_load(&m.failed_reads), za_load(&m.failed_writes),
                za_load(&m.invalid_io), za_load(&m.notify_free))

    # Tiering. These walk the table without the GIL; call them from a worker thread.

    def mark_idle(self, age: int | None = None) -> int:
        """Marks idle every stored page, or those not accessed for `age` seconds."""
        cdef uint32_t a = age or 0
        cdef size_t marked
        with nogil:
            marked = _mark_idle(self.m, a)
        return marked

    def writeback(self, mode: str | None, ranges=()) -> int:
        """Writes back the pages of a `mode` (idle, huge, huge_idle, incompressible), or of
        the page index `ranges`; returns how many. OSError: ENODEV without a backing device,
        ENOSPC when it is full, EIO when writeback_limit is spent or I/O fails."""
        cdef int cmode = WB_PAGES if mode is None else WRITEBACK_MODES[mode]
        cdef size_t n = len(ranges)
        cdef size_t* cranges = <size_t*>calloc(2 * n + 2, sizeof(size_t))
        cdef char* page = NULL
        cdef long done
        cdef int err = 0
        if self.m.backing == NULL:
            free(cranges)
            raise OSError(19, "no backing device")
        if cranges == NULL or posix_memalign(<void**>&page, PAGE_SIZE, PAGE_SIZE) != 0:
            free(cranges)
            raise MemoryError()
        for i, (lo, hi) in enumerate(ranges):
            cranges[2 * i], cranges[2 * i + 1] = lo, hi
        with nogil:
            done = _writeback(self.m, cmode, cranges, n, page, &err)
        free(cranges)
        free(page)
        if err:
            raise OSError(err, f"writeback stopped after {done} pages")
        return done

    def recompress(self, mode: str | None, size_t threshold=0, size_t max_pages=0,
                   int priority=0) -> int:
        """Recompresses the pages a `mode` (idle, huge, huge_idle; None: all) and `threshold`
        select with the secondary algorithms (or only the one of `priority`)."""
        cdef int cmode = 0 if mode is None else WRITEBACK_MODES[mode]
        cdef char* page = NULL
        cdef long done
        if not self.secondary:
            raise OSError(22, "no recompression algorithm")
        if posix_memalign(<void**>&page, PAGE_SIZE, PAGE_SIZE) != 0:
            raise MemoryError()
        with nogil:
            done = _recompress(self.m, cmode, threshold, max_pages, priority, page)
        free(page)
        return done

    @property
    def wb_limit(self) -> int:
        return za_load(&self.m.wb_limit)

    @wb_limit.setter
    def wb_limit(self, size_t pages) -> None:
        self.m.wb_limit = pages

    @property
    def wb_limit_enable(self) -> bool:
        return bool(self.m.wb_limit_enable)

    @wb_limit_enable.setter
    def wb_limit_enable(self, bint on) -> None:
        self.m.wb_limit_enable = on

    @property
    def evict_enable(self) -> bool:
        return bool(self.m.evict_enable)

    @evict_enable.setter
    def evict_enable(self, bint on) -> None:
        self.m.evict_enable = on
        self._evict_to_limit()

    @property
    def evicted(self) -> int:
        return za_load(&self.m.evicted)


cdef class Disk:
    """A device as the FUSE layer reaches it; lives as long as the device (across resets).

    `attach(meta)` makes it live; `detach()` stops new requests; once `in_flight` is 0,
    `release()` hands the meta back to be destroyed outside any request.
    """

    def __cinit__(self):
        self.disk = <zdisk*>calloc(1, sizeof(zdisk))
        if self.disk == NULL:
            raise MemoryError()

    def __dealloc__(self):
        free(self.disk)

    @property
    def address(self) -> int:
        """The zdisk*, for the FUSE layer's file handles."""
        return <size_t>self.disk

    def attach(self, Meta meta) -> None:
        if self.meta is not None:
            raise RuntimeError("disk already has a meta")
        self.meta = meta
        self.disk.meta = meta.m
        ZM_OR64(&self.disk.state, ZD_LIVE, __ATOMIC_SEQ_CST)

    def detach(self) -> None:
        """New requests fail with EIO from now on."""
        ZM_AND64(&self.disk.state, ~ZD_LIVE, __ATOMIC_SEQ_CST)

    @property
    def live(self) -> bool:
        return bool(za_load64(&self.disk.state) & ZD_LIVE)

    @property
    def in_flight(self) -> int:
        return za_load64(&self.disk.state) & ~ZD_LIVE

    def release(self) -> Meta:
        """Takes the meta away once detached and drained."""
        if self.live or self.in_flight:
            raise RuntimeError("disk is live or has requests in flight")
        meta, self.meta = self.meta, None
        self.disk.meta = NULL
        return meta

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
            n = zdisk_read(self.disk, buf, size, off)
        if n < 0:
            raise OSError(-n, f"read of {size} bytes at {off}")
        return out[:n]

    def write(self, off_t off, data) -> int:
        cdef Py_buffer view
        cdef ssize_t n
        PyObject_GetBuffer(data, &view, PyBUF_SIMPLE)
        try:
            with nogil:
                n = zdisk_write(self.disk, <const char*>view.buf, view.len, off)
        finally:
            PyBuffer_Release(&view)
        if n < 0:
            raise OSError(-n, f"write of {len(data)} bytes at {off}")
        return n

    def fallocate(self, int mode, off_t off, off_t length) -> None:
        cdef int rc
        with nogil:
            rc = zdisk_fallocate(self.disk, mode, off, length)
        if rc < 0:
            raise OSError(-rc, f"fallocate mode {mode:#x} of {length} bytes at {off}")
