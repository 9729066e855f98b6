# cython: language_level=3
"""Tiering, over the slot table's API (zramfs.zram._zram): idle marking, writeback to a backing
device, recompression with secondary algorithms (zram.rst's semantics), and zswap-style
eviction of least recently used pages over mem_limit (a zramfs extension).

Each walks the table without the GIL and takes one slot lock at a time; the caller holds a
reference on the meta (Disk.call). Writeback and recompression spread their pages over one
thread a CPU at idle priority (SCHED_IDLE: foreground I/O keeps the CPUs), and stop at their
next batch once cancel() is called (a reset, a hot_remove, a graceful restart, a signal to
the attribute's writer). Lock order as in _zram.pyx: a stream, then a slot lock, then
(eviction) the eviction lock, then the allocator's and backing device's own locks.

With dedup on (zramfs.zram._dedup), an object shared by several slots is not written back,
recompressed or evicted: moving one slot's page would free nothing. One with a single
reference is handled as any other; its slot's reference goes with it.

    from zramfs.zram import _tiering
    disk.call(_tiering.mark_idle, None)             # every stored page
    disk.call(_tiering.writeback, "idle", ())       # pages written back
    disk.call(_tiering.recompress, "idle", 0, 0, 0)
    _tiering.cancel(meta)                           # from any thread: ECANCELED there
"""
from __future__ import annotations

import os

from libc.errno cimport EINVAL, EIO, ENODEV, ENOMEM, ENOSPC
from libc.stdint cimport uint32_t, uint64_t
from libc.stdlib cimport calloc, free, malloc, qsort, realloc
from libc.string cimport memcpy, memset

from zramfs.zram._dedup cimport zdedup_shared
from zramfs.zram._backing cimport (BK_MAX_BATCH, backing_alloc, backing_free, backing_ring_free,
                                   backing_ring_new, backing_write, backing_write_batch)
from zramfs.zcomp._zcomp cimport zcomp, zcomp_compress, zcomp_stream_get, zcomp_stream_put, zstream
from zramfs.zram._zram cimport (Meta, zram_meta, zram_requests, zram_slot_free,
                                zram_slot_has_object, zram_slot_load, zram_slot_replace,
                                zram_stat_stored, zslot)
from zramfs.pthread cimport (pthread_join, pthread_mutex_lock, pthread_mutex_unlock, pthread_t,
                            zram_thread_start)
from zramfs.common cimport (PAGE_SHIFT, PAGE_SIZE, posix_memalign, za_add, za_first, za_load,
                            za_load_int, za_store, za_store_int, za_take, zram_now_s)
from zramfs.zram.zram cimport (ZRAM_ACCESSED, ZRAM_HUGE, ZRAM_IDLE, ZRAM_INCOMPRESSIBLE,
                               ZRAM_PRIO_MASK, ZRAM_PRIO_SHIFT, ZRAM_WB, ZRAM_UNDER_WB,
                               ZRAM_WB_COMPRESSED, zram_slot_clear, zram_slot_flags,
                               zram_slot_lock, zram_slot_set_flags, zram_slot_trylock,
                               zram_slot_unlock)

cdef extern from "<errno.h>":
    enum:
        ECANCELED              # not in Cython's libc.errno

cdef enum:
    TIER_THREADS_MAX = 64     # threads of one writeback or recompression, at most

ctypedef struct zidle:                  # a function for _on_idle_threads' threads
    void* (*main)(void*) noexcept nogil
    void* arg

cdef enum:
    # Which pages a writeback or recompression takes, by zram.rst's page types.
    PICK_ALL = 0              # every page with an object (recompression: by threshold alone)
    PICK_IDLE = 1
    PICK_HUGE = 2
    PICK_HUGE_IDLE = 3
    PICK_INCOMPRESSIBLE = 4   # writeback only
    PICK_INDEXES = 5          # writeback only: the page index ranges given
    EVICT_SLACK = 256         # pages evicted beyond the excess, so not every write evicts

# The page types the attributes name, for both writeback and recompression.
PAGE_TYPES = {"idle": PICK_IDLE, "huge": PICK_HUGE, "huge_idle": PICK_HUGE_IDLE,
              "incompressible": PICK_INCOMPRESSIBLE}


cdef bint _picked(zram_meta* m, zslot* s, int pick) noexcept nogil:
    """A page with an object in the pool, of the page type `pick`, not shared (dedup)."""
    cdef uint32_t f = zram_slot_flags(&s.flags)
    if not zram_slot_has_object(s, f) or zdedup_shared(m, s):
        return False
    if pick == PICK_IDLE:
        return f & ZRAM_IDLE != 0
    if pick == PICK_HUGE:
        return f & ZRAM_HUGE != 0
    if pick == PICK_HUGE_IDLE:
        return f & ZRAM_HUGE != 0 and f & ZRAM_IDLE != 0
    if pick == PICK_INCOMPRESSIBLE:
        return f & ZRAM_INCOMPRESSIBLE != 0
    return True


# --- threads at idle priority ---------------------------------------------------------------

cdef extern from *:
    """
    #include <sched.h>
    /* The calling thread at idle priority: writeback and recompression yield the CPUs to
       everything else. */
    static int zt_idle_priority(void) {
        struct sched_param p = {0};
        return sched_setscheduler(0, SCHED_IDLE, &p);
    }
    """
    int zt_idle_priority() nogil


cdef void _on_idle_threads(void* (*main)(void*) noexcept nogil, void* arg, int nr) noexcept nogil:
    """`main(arg)` on `nr` threads (at least one), which set themselves at idle priority; the
    caller's thread waits for them (or, where no thread can be had, runs it itself)."""
    cdef pthread_t threads[TIER_THREADS_MAX]
    cdef zidle job
    cdef int i, started = 0
    job.main, job.arg = main, arg
    for i in range(max(1, min(nr, <int>TIER_THREADS_MAX))):
        if zram_thread_start(&threads[i], _idle_main, &job) != 0:
            break
        started += 1
    if started == 0:
        main(arg)
    for i in range(started):
        pthread_join(threads[i], NULL)


cdef void* _idle_main(void* arg) noexcept nogil:
    cdef zidle* job = <zidle*>arg
    zt_idle_priority()                  # best effort: at normal priority where refused
    return job.main(job.arg)


# --- idle ------------------------------------------------------------------------------------

cdef inline bint _stored(zslot* s) noexcept nogil:
    """A page with an object in the pool, shared or not."""
    return zram_slot_has_object(s, zram_slot_flags(&s.flags))


cdef size_t _mark_idle(zram_meta* m, uint32_t age) noexcept nogil:
    """Marks idle every stored page, or (age > 0) those not accessed for `age` seconds."""
    cdef size_t i, marked = 0
    cdef uint32_t now = zram_now_s()
    cdef zslot* s
    for i in range(m.nr_pages):
        s = &m.table[i]
        if not _stored(s):
            continue
        zram_slot_lock(&s.flags)
        if _stored(s) and (age == 0 or now - m.ac_time[i] >= age):
            zram_slot_set_flags(&s.flags, zram_slot_flags(&s.flags) | ZRAM_IDLE)
            marked += 1
        zram_slot_unlock(&s.flags)
    return marked


# --- writeback -------------------------------------------------------------------------------

ctypedef struct zwb:                    # one page of a writeback, between its two halves
    size_t index
    size_t block
    uint64_t handle                     # the object it was taken from
    uint32_t keep                       # flags the written-back slot keeps
    uint32_t size                       # with compressed_writeback: the object's size


cdef int _wb_prepare(zram_meta* m, zslot* s, char* page, zstream* st, zwb* w) noexcept nogil:
    """Slot lock held: a block for the page, and what goes in it in `page` (page-aligned):
    the page decompressed, or with compressed_writeback the object as it is stored (a read
    decompresses it), as the kernel's. 0, -ENOSPC (backing device full) or -EIO."""
    cdef long block = backing_alloc(m.backing)
    cdef uint32_t flags = zram_slot_flags(&s.flags)
    cdef const char* src
    if block < 0:
        return -ENOSPC
    w.index = s - m.table
    w.block = <size_t>block
    w.handle = s.handle
    w.keep = 0
    w.size = s.size
    if m.compressed_wb:
        src = m.driver.map(m.pool, s.handle)
        memcpy(page, src, s.size)
        m.driver.unmap(m.pool, s.handle)
        memset(page + s.size, 0, PAGE_SIZE - s.size)
        w.keep = ZRAM_WB_COMPRESSED | (flags & (ZRAM_HUGE | ZRAM_PRIO_MASK))
    elif zram_slot_load(m, s, page, st) != 0:
        backing_free(m.backing, block)
        return -EIO
    return 0


cdef void _wb_commit(zram_meta* m, zslot* s, zwb* w) noexcept nogil:
    """Slot lock held, its page on the block: the object freed, the slot pointing at the block
    (a new home complete before the old one goes: hazard 8)."""
    cdef uint32_t idle = zram_slot_flags(&s.flags) & ZRAM_IDLE
    zram_slot_free(m, s)
    s.handle = <uint64_t>w.block
    if w.keep & ZRAM_WB_COMPRESSED:
        s.size = w.size                 # what to decompress when it is read back
    zram_slot_set_flags(&s.flags, ZRAM_WB | w.keep | idle)
    zram_stat_stored(m, ZRAM_WB | w.keep | idle, 0)      # still stored, on the backing device


cdef int _writeback_locked(zram_meta* m, zslot* s, char* page, zstream* st) noexcept nogil:
    """The slot's page to a new block of the backing device, one write (eviction's way); its
    memory freed. 0, -ENOSPC when the device is full, or -EIO."""
    cdef zwb w
    cdef int rc = _wb_prepare(m, s, page, st, &w)
    if rc != 0:
        return rc
    if backing_write(m.backing, w.block, page) != 0:
        backing_free(m.backing, w.block)
        return -EIO
    _wb_commit(m, s, &w)
    return 0


ctypedef struct zcandidate:
    size_t index
    size_t size


cdef int _larger_first(const void* a, const void* b) noexcept nogil:
    cdef size_t x = (<const zcandidate*>a).size
    cdef size_t y = (<const zcandidate*>b).size
    return (x < y) - (x > y)


ctypedef struct zwbrun:                 # a writeback, shared by its threads
    zram_meta* m
    int want
    zcandidate* cand
    size_t n
    size_t batch
    int* stop                           # set: stop at the next batch (Meta.tier_stop)
    size_t cursor                       # the next candidate to claim (atomic)
    size_t done                         # pages written back (atomic)
    int err                             # the first error (za_first)


cdef long _writeback(zram_meta* m, int pick, const size_t* ranges, size_t nranges,
                     int nr_threads, int* stop, int* err) noexcept nogil:
    """Writes back the pages `pick` selects, largest objects first, on `nr_threads` threads
    at idle priority. The pages written; `err` gets ENOSPC (backing device full), EIO (limit
    spent, or I/O), ENOMEM, ECANCELED (`stop` set) or stays 0."""
    cdef size_t i, r, lo, hi, n = 0, cap = 0
    cdef zcandidate* cand = NULL
    cdef zcandidate* grown
    cdef zslot* s
    cdef zwbrun run
    cdef int want = PICK_ALL if pick == PICK_INDEXES else pick
    for r in range(nranges if pick == PICK_INDEXES else 1):
        lo, hi = 0, m.nr_pages - 1
        if pick == PICK_INDEXES:
            lo = ranges[2 * r]
            hi = min(ranges[2 * r + 1], m.nr_pages - 1)
        i = lo
        while i <= hi and i < m.nr_pages:
            s = &m.table[i]
            if _picked(m, s, want):
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
    memset(&run, 0, sizeof(run))
    run.m, run.want, run.cand, run.n, run.stop = m, want, cand, n, stop
    run.batch = max(<size_t>1, min(m.wb_batch, <size_t>BK_MAX_BATCH))
    # A thread a batch at most: a small writeback needs no more.
    _on_idle_threads(_writeback_main, &run,
                     min(nr_threads, <int>((n + run.batch - 1) // run.batch)))
    free(cand)
    err[0] = run.err
    return <long>za_load(&run.done)


cdef size_t _wb_prepare_batch(zwbrun* r, size_t first, char* pages, zwb* wbs, size_t* blocks,
                              char** ptrs) noexcept nogil:
    """The pages of candidates [first, first + batch) that are still wanted, each under its
    slot lock read into `pages`, given a block and marked ZRAM_UNDER_WB, each taking one page
    of writeback_limit; how many. Stops early (r.err set) when the limit is spent, or on
    ENOSPC or EIO."""
    cdef zram_meta* m = r.m
    cdef size_t i, k = 0
    cdef zslot* s
    cdef int rc
    cdef zstream* st = zcomp_stream_get(m.comp)
    for i in range(first, min(first + r.batch, r.n)):
        s = &m.table[r.cand[i].index]
        zram_slot_lock(&s.flags)
        rc = 0
        if _picked(m, s, r.want):
            if m.wb_limit_enable and not za_take(&m.wb_limit):
                rc = -EIO               # the limit is spent
            else:
                rc = _wb_prepare(m, s, pages + k * PAGE_SIZE, st, &wbs[k])
                if rc == 0:
                    zram_slot_set_flags(&s.flags, zram_slot_flags(&s.flags) | ZRAM_UNDER_WB)
                    blocks[k] = wbs[k].block
                    ptrs[k] = pages + k * PAGE_SIZE
                    k += 1
                elif m.wb_limit_enable:
                    za_add(&m.wb_limit, 1)
        zram_slot_unlock(&s.flags)
        if rc != 0:
            za_first(&r.err, -rc)
            break
    zcomp_stream_put(st)
    return k


cdef void _wb_commit_batch(zwbrun* r, size_t k, zwb* wbs, int* results) noexcept nogil:
    """Each written page committed under its slot lock again, only where the slot was not
    changed meanwhile (the mark is gone then, and the block and its page of writeback_limit
    go back)."""
    cdef zram_meta* m = r.m
    cdef size_t j
    cdef zslot* s
    cdef uint32_t f
    for j in range(k):
        s = &m.table[wbs[j].index]
        zram_slot_lock(&s.flags)
        f = zram_slot_flags(&s.flags)
        if results[j] == 0 and f & ZRAM_UNDER_WB and s.handle == wbs[j].handle:
            zram_slot_set_flags(&s.flags, f & ~ZRAM_UNDER_WB)
            _wb_commit(m, s, &wbs[j])
            za_add(&r.done, 1)
        else:
            if f & ZRAM_UNDER_WB:
                zram_slot_set_flags(&s.flags, f & ~ZRAM_UNDER_WB)
            backing_free(m.backing, wbs[j].block)
            if m.wb_limit_enable:
                za_add(&m.wb_limit, 1)
            if results[j] != 0:
                za_first(&r.err, EIO)
        zram_slot_unlock(&s.flags)


cdef void* _writeback_main(void* arg) noexcept nogil:
    """A writeback thread: claims a batch of candidates at a time, prepares it, writes it with
    every write in flight at once (its own ring), and commits it; until the candidates are
    done, `stop` is set or any thread met an error."""
    cdef zwbrun* r = <zwbrun*>arg
    cdef size_t batch = r.batch, first, k
    cdef char* pages = NULL
    cdef zwb* wbs = <zwb*>malloc(batch * sizeof(zwb))
    cdef size_t* blocks = <size_t*>malloc(batch * sizeof(size_t))
    cdef char** ptrs = <char**>malloc(batch * sizeof(char*))
    cdef int* results = <int*>malloc(batch * sizeof(int))
    cdef void* ring = backing_ring_new()
    if (wbs == NULL or blocks == NULL or ptrs == NULL or results == NULL
            or posix_memalign(<void**>&pages, PAGE_SIZE, batch * PAGE_SIZE) != 0):
        za_first(&r.err, ENOMEM)
    while not za_load_int(&r.err):
        if za_load_int(r.stop):
            za_first(&r.err, ECANCELED)
            break
        first = za_add(&r.cursor, batch)
        if first >= r.n:
            break
        k = _wb_prepare_batch(r, first, pages, wbs, blocks, ptrs)
        if k:
            backing_write_batch(r.m.backing, ring, k, blocks, ptrs, results)
            _wb_commit_batch(r, k, wbs, results)
    backing_ring_free(ring)
    free(pages)
    free(wbs)
    free(blocks)
    free(ptrs)
    free(results)
    return NULL


# --- recompression: _recompress.pxi -----------------------------------------------------------

include "_recompress.pxi"


# --- eviction (zswap-style, over mem_limit) --------------------------------------------------

cdef void _evict(zram_meta* m, size_t excess) noexcept nogil:
    """Writes least recently used pages (CLOCK: an accessed page gets a second chance) back
    until `excess` pages and some slack are freed (excess 0: the process's memory budget is
    spent, so the slack alone, whatever mem_limit says). Called by a writer over mem_limit holding
    its own slot lock, or by evict_to_limit: so victims are only tried, never waited for."""
    cdef size_t goal = (excess + EVICT_SLACK) << PAGE_SHIFT
    cdef size_t freed = 0, scanned = 0, idx
    cdef uint32_t f
    cdef zslot* s
    cdef int rc
    pthread_mutex_lock(&m.evict_lock)
    if excess and m.driver.total_pages(m.pool) <= za_load(&m.limit_pages):
        pthread_mutex_unlock(&m.evict_lock)       # another writer made room meanwhile
        return
    while freed < goal and scanned < 2 * m.nr_pages:
        idx = m.clock_hand
        m.clock_hand = (idx + 1) % m.nr_pages
        scanned += 1
        s = &m.table[idx]
        f = zram_slot_flags(&s.flags)
        if not zram_slot_has_object(s, f):
            continue
        if f & ZRAM_ACCESSED:
            zram_slot_clear(&s.flags, ZRAM_ACCESSED)
            continue
        if not zram_slot_trylock(&s.flags):
            continue
        rc = 1
        if zram_slot_has_object(s, zram_slot_flags(&s.flags)) and not zdedup_shared(m, s):
            freed += s.size
            rc = _writeback_locked(m, s, m.evict_page, m.evict_stream)
        zram_slot_unlock(&s.flags)
        if rc == 0:
            za_add(&m.evicted, 1)
        elif rc == -ENOSPC:
            break
    # Objects freed here and there empty few zspages by themselves: compaction does the rest.
    m.driver.compact(m.pool)
    pthread_mutex_unlock(&m.evict_lock)


# --- Python entry points: each takes the meta, under a reference held by Disk.call ----------

def mark_idle(Meta meta, age: int | None = None) -> int:
    """Marks idle every stored page, or those not accessed for `age` seconds."""
    cdef uint32_t a = age or 0
    cdef size_t marked
    with nogil:
        marked = _mark_idle(meta.m, a)
    return marked


def _threads(int threads) -> int:
    """How many threads a writeback or recompression runs on: `threads`, or with 0 one a CPU
    this process may run on."""
    return threads if threads > 0 else len(os.sched_getaffinity(0))


def writeback(Meta meta, mode: str | None, ranges=(), int threads=0) -> int:
    """Writes back the pages of a page type `mode` (idle, huge, huge_idle, incompressible),
    or with None those of the page index `ranges` (inclusive pairs), on `threads` threads at
    idle priority (0: one a CPU); returns how many. OSError: ENODEV without a backing device,
    ENOSPC when it is full, EIO when writeback_limit is spent or I/O fails, ECANCELED when
    cancel() stopped it."""
    cdef zram_meta* m = meta.m
    cdef int pick = PICK_INDEXES if mode is None else PAGE_TYPES[mode]
    cdef size_t n = len(ranges)
    cdef size_t* cranges
    cdef long done
    cdef int err = 0
    cdef int nr = _threads(threads)
    if m.backing == NULL:
        raise OSError(ENODEV, "no backing device")
    cranges = <size_t*>calloc(2 * n + 2, sizeof(size_t))
    if cranges == NULL:
        raise MemoryError()
    for i, (lo, hi) in enumerate(ranges):
        cranges[2 * i], cranges[2 * i + 1] = lo, hi
    with nogil:
        done = _writeback(m, pick, cranges, n, nr, &meta.tier_stop, &err)
    free(cranges)
    if err == ECANCELED:
        raise OSError(err, f"writeback cancelled after {done} pages")
    if err:
        raise OSError(err, f"writeback stopped after {done} pages")
    return done


def recompress(Meta meta, mode: str | None, size_t threshold=0, size_t max_pages=0,
               int priority=0, int threads=0, bint polite=True) -> int:
    """Recompresses the pages a page type `mode` (idle, huge, huge_idle; None: all) and
    `threshold` select with the secondary algorithms (or only the one of `priority`), on
    `threads` threads at idle priority (0: one a CPU), pausing while foreground requests come
    in unless not `polite` (tests that race it against writes). OSError(ECANCELED) when
    cancel() stopped it."""
    cdef int pick = PICK_ALL if mode is None else PAGE_TYPES[mode]
    cdef long done
    cdef bint cancelled = False
    cdef int nr = _threads(threads)
    if not meta.secondary:
        raise OSError(EINVAL, "no recompression algorithm")
    if pick == PICK_INCOMPRESSIBLE:
        raise OSError(EINVAL, "incompressible pages are not recompressed")
    with nogil:
        done = _recompress(meta.m, pick, threshold, max_pages, priority, nr, polite,
                           &meta.tier_stop, &cancelled)
    if cancelled:
        raise OSError(ECANCELED, f"recompression cancelled after {done} pages")
    return done


def cancel(Meta meta, bint stop=True) -> None:
    """Stops the writeback or recompression running on `meta` at its next batch (what it did
    is kept); with False, lets the next one run. Any thread."""
    za_store_int(&meta.tier_stop, stop)


def set_eviction(Meta meta, bint on) -> None:
    """A write over mem_limit evicts least recently used pages to the backing device instead
    of failing (zswap-style). Needs a backing device to take effect."""
    if on and meta.m.backing != NULL:
        meta.m.evict = _evict
    else:
        meta.m.evict = NULL


def eviction(Meta meta) -> bool:
    return meta.m.evict != NULL


def evict_to_limit(Meta meta) -> None:
    """With eviction on, evicts down to mem_limit now (after the limit was lowered)."""
    cdef zram_meta* m = meta.m
    cdef size_t used, limit = za_load(&m.limit_pages)
    if m.evict == NULL or not limit:
        return
    with nogil:
        used = m.driver.total_pages(m.pool)
        if used > limit:
            m.evict(m, used - limit)


def wb_limit(Meta meta) -> int:
    """Pages still allowed to be written back (while writeback_limit_enable)."""
    return za_load(&meta.m.wb_limit)


def set_wb_batch(Meta meta, size_t pages) -> None:
    """writeback_batch_size: how many writeback I/Os are in flight at once (1..1024)."""
    meta.m.wb_batch = pages


def set_wb_limit(Meta meta, size_t pages, bint enable) -> None:
    meta.m.wb_limit = pages
    meta.m.wb_limit_enable = enable
