# cython: language_level=3
"""The store for compressed pages: a zsmalloc-style pool, and zbud beside it.

zsmalloc's ideas, in userspace:
- size classes of 16 bytes from 32 to 4096; classes that come out with the same
  (pages per zspage, objects per zspage) are merged into the larger one;
- a zspage is 1..N contiguous 4 KiB pages, N chosen per class to waste least; since the pages
  are contiguous in our address space, objects simply cross page boundaries;
- zspages are carved from large anonymous mmap arenas and given back to the OS with
  madvise(MADV_DONTNEED) once empty, so memory held is page-granular and really returns;
- handles are indirect (a per-class handle table), so compaction moves objects freely;
- zspages sit in fullness groups; allocation takes the fullest zspage with room;
- one lock per class (no pool-wide lock on malloc/free/map); a pinned zspage is never a
  compaction source, so a reader's object cannot move under it.

zbud is the simple second backend: at most two objects per page, one from each end.

Both are reached through a `zpool_driver` table (see _alloc.pxd) of C functions that run
without the GIL. `Pool` is the Python face over a driver, for tests and tools, and the
owner the device holds. Backends are picked by name from a registry (zramfs.registry) that
pins a backend while a pool uses it.
"""
from __future__ import annotations

import threading
from collections import namedtuple

from zramfs.registry import Registry

from libc.stdint cimport uint8_t, uint32_t, int32_t, uint64_t
from libc.stdlib cimport malloc, calloc, realloc, free
from libc.string cimport memcpy, memset
from cpython.bytes cimport PyBytes_FromStringAndSize, PyBytes_AS_STRING
from cpython.buffer cimport PyObject_GetBuffer, PyBuffer_Release, PyBUF_SIMPLE

from zramfs.zram cimport PAGE_SIZE, za_load
from zramfs.pthread cimport (pthread_cond_destroy, pthread_cond_init, pthread_cond_signal,
                            pthread_cond_t, pthread_cond_wait, pthread_join, pthread_mutex_destroy,
                            pthread_mutex_init, pthread_mutex_lock, pthread_mutex_t,
                            pthread_mutex_unlock, pthread_t, zram_thread_start)

cdef extern from *:
    """
    #include <sched.h>
    #include <sys/mman.h>
    #ifndef MADV_POPULATE_WRITE
    #define MADV_POPULATE_WRITE 23
    #endif
    /* The calling thread only runs on a CPU that nothing else wants. */
    static void zs_sched_idle(void) {
        struct sched_param p = {0};
        sched_setscheduler(0, SCHED_IDLE, &p);
    }
    """
    void zs_sched_idle() nogil
    void* mmap(void* addr, size_t length, int prot, int flags, int fd, long offset) nogil
    int munmap(void* addr, size_t length) nogil
    int madvise(void* addr, size_t length, int advice) nogil
    void* MAP_FAILED
    int PROT_READ, PROT_WRITE, MAP_PRIVATE, MAP_ANONYMOUS, MAP_NORESERVE, MAP_FIXED, MADV_DONTNEED
    int MADV_POPULATE_WRITE

cdef enum:
    MIN_SIZE = 32
    CLASS_DELTA = 16
    NR_SIZES = 255          # (PAGE_SIZE - MIN_SIZE) / CLASS_DELTA + 1: 32, 48, ..., 4096
    MAX_CHAIN = 16          # upper bound on pages per zspage
    ARENA_PAGES = 16384     # 64 MiB of address space a time
    PREFAULT_PAGES = 64     # fresh arena pages made resident ahead, in one madvise
    RESERVE_PAGES = 512     # the populator keeps this much of the arena resident ahead
    POPULATE_PAGES = 32     # ... this much at a time
    # Fullness groups: 0 empty (only while pinned), 1..10 partly used by tenths, 11 full.
    GROUP_EMPTY = 0
    GROUP_FULL = 11
    NR_GROUPS = 12

PAGE = PAGE_SIZE
DEFAULT_MAX_PAGES_PER_ZSPAGE = 8


class PoolError(Exception):
    """The pool cannot do that (it is destroyed)."""


# ---------------------------------------------------------------------------------------------
# Page source: runs of contiguous pages from mmap arenas. Called with a class lock held (never
# the other way round), so its own lock is innermost. Freed runs go back to the OS at once and
# are kept, by length, for reuse; their bookkeeping lives outside them so that keeping them
# costs no resident memory. A populator thread keeps up to RESERVE_PAGES (2 MiB) of fresh
# arena resident ahead of use: in the process's RSS, not in mem_used_total.

ctypedef struct extent:
    char* addr
    extent* next

ctypedef struct arena:
    char* base
    arena* next

ctypedef struct page_source:
    pthread_mutex_t lock
    arena* arenas
    char* bump
    char* bump_end
    char* populated               # the arena is resident (or being made so) up to here
    extent* runs[MAX_CHAIN + 1]
    size_t pages_held             # pages handed out and not yet given back: mem_used_total
    # The populator thread, which keeps the arena resident ahead of the bump (see pages_alloc).
    pthread_t populator
    pthread_cond_t want
    bint populator_asleep
    bint stop


cdef void* _populator_main(void* arg) noexcept nogil:
    """Makes fresh arena pages resident ahead of their use, RESERVE_PAGES at most, and only on
    a CPU that would otherwise idle: a fault costs more than the zeroing it does (most in a
    VM), and done inline, under a class lock, it was a sixth of the daemon's time in fresh
    writes. The page-source lock is dropped around each madvise; a run handed out meanwhile
    just faults as it is written."""
    cdef page_source* ps = <page_source*>arg
    cdef char* start
    cdef char* end
    zs_sched_idle()
    pthread_mutex_lock(&ps.lock)
    while not ps.stop:
        start = end = NULL
        if ps.bump != NULL:         # no arena before the first allocation
            start = max(ps.populated, ps.bump)
            end = min(ps.bump + <size_t>RESERVE_PAGES * PAGE_SIZE, ps.bump_end)
        if start >= end:
            ps.populator_asleep = True
            pthread_cond_wait(&ps.want, &ps.lock)
            ps.populator_asleep = False
            continue
        end = min(end, start + <size_t>POPULATE_PAGES * PAGE_SIZE)
        ps.populated = end
        pthread_mutex_unlock(&ps.lock)
        madvise(start, end - start, MADV_POPULATE_WRITE)     # a hint: errors ignored
        pthread_mutex_lock(&ps.lock)
    pthread_mutex_unlock(&ps.lock)
    return NULL


cdef int pages_init(page_source* ps) noexcept nogil:
    memset(ps, 0, sizeof(page_source))
    if pthread_mutex_init(&ps.lock, NULL) != 0:
        return -1
    pthread_cond_init(&ps.want, NULL)
    if zram_thread_start(&ps.populator, _populator_main, ps) != 0:
        pthread_cond_destroy(&ps.want)
        pthread_mutex_destroy(&ps.lock)
        return -1
    return 0


cdef void pages_destroy(page_source* ps) noexcept nogil:
    cdef arena* a = ps.arenas
    cdef arena* an
    cdef extent* e
    cdef extent* en
    cdef int i
    pthread_mutex_lock(&ps.lock)
    ps.stop = True
    pthread_cond_signal(&ps.want)
    pthread_mutex_unlock(&ps.lock)
    pthread_join(ps.populator, NULL)
    while a != NULL:
        an = a.next
        munmap(a.base, <size_t>ARENA_PAGES * PAGE_SIZE)
        free(a)
        a = an
    for i in range(MAX_CHAIN + 1):
        e = ps.runs[i]
        while e != NULL:
            en = e.next
            free(e)
            e = en
    pthread_cond_destroy(&ps.want)
    pthread_mutex_destroy(&ps.lock)


cdef int _push_run(page_source* ps, char* addr, int npages) noexcept nogil:
    cdef extent* e = <extent*>malloc(sizeof(extent))
    if e == NULL:
        return -1        # the run is leaked to the arena (still mapped, never resident)
    e.addr = addr
    e.next = ps.runs[npages]
    ps.runs[npages] = e
    return 0


cdef char* _new_arena(page_source* ps) noexcept nogil:
    cdef void* p = mmap(NULL, <size_t>ARENA_PAGES * PAGE_SIZE, PROT_READ | PROT_WRITE,
                        MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0)
    if p == MAP_FAILED:
        return NULL
    cdef arena* a = <arena*>malloc(sizeof(arena))
    if a == NULL:
        munmap(p, <size_t>ARENA_PAGES * PAGE_SIZE)
        return NULL
    a.base = <char*>p
    a.next = ps.arenas
    ps.arenas = a
    return <char*>p


cdef char* pages_alloc(page_source* ps, int npages) noexcept nogil:
    """A run of npages contiguous pages, or NULL. Takes the page-source lock."""
    cdef char* addr = NULL
    cdef char* fault_from = NULL
    cdef char* fault_to = NULL
    cdef extent* e
    cdef int n
    pthread_mutex_lock(&ps.lock)
    # Exact fit first, then split a longer freed run.
    for n in range(npages, MAX_CHAIN + 1):
        e = ps.runs[n]
        if e != NULL:
            ps.runs[n] = e.next
            addr = e.addr
            free(e)
            if n > npages:
                _push_run(ps, addr + <size_t>npages * PAGE_SIZE, n - npages)
            break
    if addr == NULL:
        if ps.bump + <size_t>npages * PAGE_SIZE > ps.bump_end:
            # Keep the old arena's tail for later, then start a new arena.
            while ps.bump != NULL and ps.bump < ps.bump_end:
                n = min(<int>((ps.bump_end - ps.bump) // PAGE_SIZE), MAX_CHAIN)
                _push_run(ps, ps.bump, n)
                ps.bump += <size_t>n * PAGE_SIZE
            addr = _new_arena(ps)
            if addr == NULL:
                pthread_mutex_unlock(&ps.lock)
                return NULL
            ps.bump = addr
            ps.bump_end = addr + <size_t>ARENA_PAGES * PAGE_SIZE
            ps.populated = addr
        addr = ps.bump
        ps.bump += <size_t>npages * PAGE_SIZE
        if ps.bump > ps.populated:
            # The populator is behind (the CPUs are busy): rather than fault page by page
            # as objects are copied in, one madvise makes the next PREFAULT_PAGES resident.
            fault_from = ps.populated if ps.populated > addr else addr
            fault_to = min(ps.bump + <size_t>PREFAULT_PAGES * PAGE_SIZE, ps.bump_end)
            ps.populated = fault_to
        if (ps.populator_asleep
                and ps.populated - ps.bump < <size_t>RESERVE_PAGES * PAGE_SIZE // 2):
            pthread_cond_signal(&ps.want)
    ps.pages_held += npages
    pthread_mutex_unlock(&ps.lock)
    if fault_from != NULL:
        madvise(fault_from, fault_to - fault_from, MADV_POPULATE_WRITE)  # a hint: errors ignored
    return addr


cdef void pages_free(page_source* ps, char* addr, int npages) noexcept nogil:
    """Gives the run's memory back to the OS and keeps its address range for reuse."""
    cdef size_t length = <size_t>npages * PAGE_SIZE
    if madvise(addr, length, MADV_DONTNEED) != 0:
        # Locked memory (the daemon's mlockall, for swap) refuses MADV_DONTNEED: map fresh
        # zero pages over the run instead, which mlockall's MCL_ONFAULT locks as they fault.
        mmap(addr, length, PROT_READ | PROT_WRITE,
             MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE | MAP_FIXED, -1, 0)
    pthread_mutex_lock(&ps.lock)
    _push_run(ps, addr, npages)
    ps.pages_held -= npages
    pthread_mutex_unlock(&ps.lock)


cdef size_t pages_held(page_source* ps) noexcept nogil:
    return za_load(&ps.pages_held)


# ---------------------------------------------------------------------------------------------
# zsmalloc

ctypedef struct zspage:
    char* base
    zspage* prev
    zspage* next
    uint32_t* slots        # per object slot: the class-local handle index using it, 0 if free
    int32_t freelist       # freed slots; the link to the next is kept in the freed object
    uint32_t bump          # slots at or above this have never been handed out
    uint32_t inuse
    int32_t pins           # readers/writers between map and unmap; compaction skips pinned
    int group

ctypedef struct hentry:    # one per handle: where its object is now
    zspage* zs
    uint32_t slot
    uint32_t size_or_next  # object size while in use, next free entry while free

ctypedef struct size_class:
    pthread_mutex_t lock
    uint32_t index
    uint32_t size
    uint32_t pages_per_zspage
    uint32_t objs_per_zspage
    zspage* groups[NR_GROUPS]
    hentry* handles
    uint32_t handles_cap
    uint32_t handles_free      # head of free entries, 0 if none (entry 0 is never used)
    uint32_t handles_next      # entries at or above this have never been used
    size_t zspages
    size_t obj_used

ctypedef struct zs_pool:
    page_source pages
    int nr_classes
    size_class* classes[NR_SIZES]      # distinct classes, by index
    size_class* by_size[NR_SIZES]      # size index -> (merged) class
    size_t huge_class_size


cdef inline int _group_of(zspage* zs, uint32_t objs) noexcept nogil:
    if zs.inuse == 0:
        return GROUP_EMPTY
    if zs.inuse == objs:
        return GROUP_FULL
    return 1 + <int>(zs.inuse * 10 // objs)


cdef inline void _unlink(size_class* c, zspage* zs) noexcept nogil:
    if zs.prev != NULL:
        zs.prev.next = zs.next
    else:
        c.groups[zs.group] = zs.next
    if zs.next != NULL:
        zs.next.prev = zs.prev
    zs.prev = NULL
    zs.next = NULL


cdef inline void _link(size_class* c, zspage* zs) noexcept nogil:
    zs.group = _group_of(zs, c.objs_per_zspage)
    zs.prev = NULL
    zs.next = c.groups[zs.group]
    if zs.next != NULL:
        zs.next.prev = zs
    c.groups[zs.group] = zs


cdef inline void _regroup(size_class* c, zspage* zs) noexcept nogil:
    if _group_of(zs, c.objs_per_zspage) != zs.group:
        _unlink(c, zs)
        _link(c, zs)


cdef zspage* _zspage_new(zs_pool* pool, size_class* c) noexcept nogil:
    cdef zspage* zs = <zspage*>calloc(1, sizeof(zspage))
    if zs == NULL:
        return NULL
    zs.slots = <uint32_t*>calloc(c.objs_per_zspage, sizeof(uint32_t))
    zs.base = pages_alloc(&pool.pages, c.pages_per_zspage)
    if zs.slots == NULL or zs.base == NULL:
        if zs.base != NULL:
            pages_free(&pool.pages, zs.base, c.pages_per_zspage)
        free(zs.slots)
        free(zs)
        return NULL
    zs.freelist = -1
    c.zspages += 1
    _link(c, zs)
    return zs


cdef void _zspage_release(zs_pool* pool, size_class* c, zspage* zs) noexcept nogil:
    """Class lock held; zs is empty and unpinned."""
    _unlink(c, zs)
    pages_free(&pool.pages, zs.base, c.pages_per_zspage)
    c.zspages -= 1
    free(zs.slots)
    free(zs)


cdef inline char* _obj_addr(size_class* c, zspage* zs, uint32_t slot) noexcept nogil:
    return zs.base + <size_t>slot * c.size


cdef inline uint32_t _slot_take(size_class* c, zspage* zs) noexcept nogil:
    """A free slot of a zspage with room. Class lock held."""
    cdef uint32_t slot
    if zs.freelist >= 0:
        slot = <uint32_t>zs.freelist
        memcpy(&zs.freelist, _obj_addr(c, zs, slot), sizeof(int32_t))
    else:
        slot = zs.bump
        zs.bump += 1
    zs.inuse += 1
    return slot


cdef inline void _slot_put(size_class* c, zspage* zs, uint32_t slot) noexcept nogil:
    memcpy(_obj_addr(c, zs, slot), &zs.freelist, sizeof(int32_t))
    zs.freelist = <int32_t>slot
    zs.slots[slot] = 0
    zs.inuse -= 1


cdef uint32_t _handle_take(size_class* c) noexcept nogil:
    """A free entry of the class's handle table, 0 if the table cannot grow."""
    cdef uint32_t idx
    cdef uint32_t cap
    cdef hentry* grown
    if c.handles_free != 0:
        idx = c.handles_free
        c.handles_free = c.handles[idx].size_or_next
        return idx
    if c.handles_next >= c.handles_cap:
        cap = c.handles_cap * 2 if c.handles_cap else 1024
        grown = <hentry*>realloc(c.handles, cap * sizeof(hentry))
        if grown == NULL:
            return 0
        c.handles = grown
        c.handles_cap = cap
    if c.handles_next == 0:
        c.handles_next = 1
    idx = c.handles_next
    c.handles_next += 1
    return idx


cdef inline size_class* _class_of(zs_pool* pool, uint64_t handle) noexcept nogil:
    return pool.classes[handle >> 32]


cdef void* zs_create(int max_pages) noexcept nogil:
    cdef zs_pool* pool = <zs_pool*>calloc(1, sizeof(zs_pool))
    cdef int i, p, best_p
    cdef uint32_t size, objs
    cdef double waste, best_waste
    cdef size_class* c
    cdef size_class* prev = NULL
    if pool == NULL:
        return NULL
    if pages_init(&pool.pages) != 0:
        free(pool)
        return NULL
    # Largest first, so a size merges into the next larger class when both would hold the
    # same number of objects in the same number of pages: the larger serves both, for free.
    for i in range(NR_SIZES - 1, -1, -1):
        size = MIN_SIZE + i * CLASS_DELTA
        best_p = 1
        best_waste = 2.0
        for p in range(1, max_pages + 1):
            waste = (<double>((p * PAGE_SIZE) % size)) / (p * PAGE_SIZE)
            if waste < best_waste:
                best_waste = waste
                best_p = p
        objs = best_p * PAGE_SIZE // size
        if objs == 1:      # ends as the smallest object size that takes a page of its own
            pool.huge_class_size = size - CLASS_DELTA + 1
        if prev != NULL and prev.pages_per_zspage == <uint32_t>best_p and prev.objs_per_zspage == objs:
            pool.by_size[i] = prev
            continue
        c = <size_class*>calloc(1, sizeof(size_class))
        if c == NULL:
            zs_destroy(pool)
            return NULL
        pthread_mutex_init(&c.lock, NULL)
        c.size = size
        c.pages_per_zspage = best_p
        c.objs_per_zspage = objs
        c.index = pool.nr_classes
        pool.classes[pool.nr_classes] = c
        pool.nr_classes += 1
        pool.by_size[i] = c
        prev = c
    return pool


cdef void zs_destroy(void* p) noexcept nogil:
    cdef zs_pool* pool = <zs_pool*>p
    cdef int i, g
    cdef size_class* c
    cdef zspage* zs
    cdef zspage* zn
    for i in range(pool.nr_classes):
        c = pool.classes[i]
        for g in range(NR_GROUPS):
            zs = c.groups[g]
            while zs != NULL:
                zn = zs.next
                free(zs.slots)
                free(zs)
                zs = zn
        free(c.handles)
        pthread_mutex_destroy(&c.lock)
        free(c)
    pages_destroy(&pool.pages)    # unmaps the arenas, and with them every zspage
    free(pool)


cdef uint64_t zs_malloc(void* p, size_t size) noexcept nogil:
    cdef zs_pool* pool = <zs_pool*>p
    cdef size_class* c
    cdef zspage* zs = NULL
    cdef uint32_t slot, idx
    cdef int g
    if size == 0 or size > PAGE_SIZE:
        return 0
    if size < MIN_SIZE:
        size = MIN_SIZE
    c = pool.by_size[(size - MIN_SIZE + CLASS_DELTA - 1) // CLASS_DELTA]
    pthread_mutex_lock(&c.lock)
    idx = _handle_take(c)
    if idx == 0:
        pthread_mutex_unlock(&c.lock)
        return 0
    for g in range(GROUP_FULL - 1, -1, -1):      # the fullest zspage with room
        if c.groups[g] != NULL:
            zs = c.groups[g]
            break
    if zs == NULL:
        zs = _zspage_new(pool, c)
        if zs == NULL:
            c.handles[idx].size_or_next = c.handles_free
            c.handles_free = idx
            pthread_mutex_unlock(&c.lock)
            return 0
    slot = _slot_take(c, zs)
    zs.slots[slot] = idx
    c.handles[idx].zs = zs
    c.handles[idx].slot = slot
    c.handles[idx].size_or_next = <uint32_t>size
    c.obj_used += 1
    _regroup(c, zs)
    pthread_mutex_unlock(&c.lock)
    return (<uint64_t>c.index << 32) | idx


cdef void zs_free(void* p, uint64_t handle) noexcept nogil:
    cdef zs_pool* pool = <zs_pool*>p
    cdef size_class* c = _class_of(pool, handle)
    cdef uint32_t idx = <uint32_t>handle
    cdef hentry* e
    cdef zspage* zs
    pthread_mutex_lock(&c.lock)
    e = &c.handles[idx]
    zs = e.zs
    _slot_put(c, zs, e.slot)
    e.zs = NULL
    e.size_or_next = c.handles_free
    c.handles_free = idx
    c.obj_used -= 1
    if zs.inuse == 0 and zs.pins == 0:
        _zspage_release(pool, c, zs)
    else:
        _regroup(c, zs)
    pthread_mutex_unlock(&c.lock)


cdef char* zs_map(void* p, uint64_t handle) noexcept nogil:
    cdef size_class* c = _class_of(<zs_pool*>p, handle)
    cdef hentry* e
    cdef char* addr
    pthread_mutex_lock(&c.lock)
    e = &c.handles[<uint32_t>handle]
    e.zs.pins += 1
    addr = _obj_addr(c, e.zs, e.slot)
    pthread_mutex_unlock(&c.lock)
    return addr


cdef void zs_unmap(void* p, uint64_t handle) noexcept nogil:
    cdef zs_pool* pool = <zs_pool*>p
    cdef size_class* c = _class_of(pool, handle)
    cdef zspage* zs
    pthread_mutex_lock(&c.lock)
    zs = c.handles[<uint32_t>handle].zs
    zs.pins -= 1
    if zs.pins == 0 and zs.inuse == 0:     # its last object was freed while pinned
        _zspage_release(pool, c, zs)
    pthread_mutex_unlock(&c.lock)


cdef size_t zs_obj_size(void* p, uint64_t handle) noexcept nogil:
    cdef size_class* c = _class_of(<zs_pool*>p, handle)
    cdef size_t size
    pthread_mutex_lock(&c.lock)
    size = c.handles[<uint32_t>handle].size_or_next
    pthread_mutex_unlock(&c.lock)
    return size


cdef size_t zs_total_pages(void* p) noexcept nogil:
    return pages_held(&(<zs_pool*>p).pages)


cdef size_t zs_huge_class_size(void* p) noexcept nogil:
    return (<zs_pool*>p).huge_class_size


cdef size_t zs_class_size(void* p, size_t size) noexcept nogil:
    if size == 0 or size > PAGE_SIZE:
        return 0
    if size < MIN_SIZE:
        size = MIN_SIZE
    return (<zs_pool*>p).by_size[(size - MIN_SIZE + CLASS_DELTA - 1) // CLASS_DELTA].size


cdef inline size_t _wasted_objs(size_class* c) noexcept nogil:
    return c.zspages * c.objs_per_zspage - c.obj_used


cdef zspage* _compact_src(size_class* c) noexcept nogil:
    """The sparsest unpinned zspage, empty ones first."""
    cdef int g
    cdef zspage* zs
    for g in range(GROUP_EMPTY, GROUP_FULL):
        zs = c.groups[g]
        while zs != NULL:
            if zs.pins == 0:
                return zs
            zs = zs.next
    return NULL


cdef zspage* _compact_dst(size_class* c, zspage* src) noexcept nogil:
    """The fullest zspage with room, other than src."""
    cdef int g
    cdef zspage* zs
    for g in range(GROUP_FULL - 1, GROUP_EMPTY, -1):
        zs = c.groups[g]
        while zs != NULL:
            if zs != src:
                return zs
            zs = zs.next
    return NULL


cdef void _move_object(size_class* c, zspage* src, uint32_t sslot, zspage* dst) noexcept nogil:
    cdef uint32_t idx = src.slots[sslot]
    cdef uint32_t dslot = _slot_take(c, dst)
    memcpy(_obj_addr(c, dst, dslot), _obj_addr(c, src, sslot), c.size)
    dst.slots[dslot] = idx
    c.handles[idx].zs = dst
    c.handles[idx].slot = dslot
    _slot_put(c, src, sslot)


cdef size_t _compact_class(zs_pool* pool, size_class* c) noexcept nogil:
    """Empties sparse zspages into dense ones while a whole zspage's worth is wasted."""
    cdef size_t freed = 0
    cdef zspage* src
    cdef zspage* dst
    cdef uint32_t slot
    while True:
        pthread_mutex_lock(&c.lock)
        if _wasted_objs(c) < c.objs_per_zspage:
            pthread_mutex_unlock(&c.lock)
            break
        src = _compact_src(c)
        if src == NULL:
            pthread_mutex_unlock(&c.lock)
            break
        slot = 0
        while src.inuse > 0:
            dst = _compact_dst(c, src)
            if dst == NULL:
                break
            while src.slots[slot] == 0:
                slot += 1
            _move_object(c, src, slot, dst)
            _regroup(c, dst)
        if src.inuse != 0:      # nowhere left to move to
            _regroup(c, src)
            pthread_mutex_unlock(&c.lock)
            break
        _zspage_release(pool, c, src)
        freed += c.pages_per_zspage
        pthread_mutex_unlock(&c.lock)     # one zspage a time, so allocations get in between
    return freed


cdef size_t zs_compact(void* p) noexcept nogil:
    cdef zs_pool* pool = <zs_pool*>p
    cdef size_t freed = 0
    cdef int i
    for i in range(pool.nr_classes):
        freed += _compact_class(pool, pool.classes[i])
    return freed


cdef zpool_driver ZSMALLOC = zpool_driver(
    name=b"zsmalloc", create=zs_create, destroy=zs_destroy, malloc=zs_malloc, free=zs_free,
    map=zs_map, unmap=zs_unmap, obj_size=zs_obj_size, total_pages=zs_total_pages,
    compact=zs_compact, huge_class_size=zs_huge_class_size, class_size=zs_class_size,
)


# ---------------------------------------------------------------------------------------------
# zbud: two buddies a page, "first" from the start and "last" from the end, sized in 64-byte
# chunks. No compaction; objects never move, so map needs no pin. One lock for the pool, as
# in the kernel's zbud. Handles point straight at the page's descriptor, low bit = buddy.

cdef enum:
    CHUNK_SHIFT = 6
    NCHUNKS = 64            # PAGE_SIZE >> CHUNK_SHIFT

ctypedef struct zbud_page:
    char* base
    zbud_page* prev
    zbud_page* next
    uint32_t first_size       # 0 = free
    uint32_t last_size
    int list                  # free chunks for unbuddied pages, NCHUNKS for buddied

ctypedef struct zbud_pool:
    page_source pages
    pthread_mutex_t lock
    zbud_page* lists[NCHUNKS + 1]    # [i] = pages with one buddy and i chunks free; [NCHUNKS] full


cdef inline uint32_t _chunks(uint32_t size) noexcept nogil:
    return (size + (1 << CHUNK_SHIFT) - 1) >> CHUNK_SHIFT


cdef inline int _zbud_list_of(zbud_page* zp) noexcept nogil:
    if zp.first_size and zp.last_size:
        return NCHUNKS
    return NCHUNKS - _chunks(zp.first_size) - _chunks(zp.last_size)


cdef void _zbud_unlink(zbud_pool* pool, zbud_page* zp) noexcept nogil:
    if zp.prev != NULL:
        zp.prev.next = zp.next
    else:
        pool.lists[zp.list] = zp.next
    if zp.next != NULL:
        zp.next.prev = zp.prev
    zp.prev = NULL
    zp.next = NULL


cdef void _zbud_link(zbud_pool* pool, zbud_page* zp) noexcept nogil:
    zp.list = _zbud_list_of(zp)
    zp.prev = NULL
    zp.next = pool.lists[zp.list]
    if zp.next != NULL:
        zp.next.prev = zp
    pool.lists[zp.list] = zp


cdef void* zbud_create(int max_pages) noexcept nogil:
    cdef zbud_pool* pool = <zbud_pool*>calloc(1, sizeof(zbud_pool))
    if pool == NULL:
        return NULL
    if pages_init(&pool.pages) != 0:
        free(pool)
        return NULL
    pthread_mutex_init(&pool.lock, NULL)
    return pool


cdef void zbud_destroy(void* p) noexcept nogil:
    cdef zbud_pool* pool = <zbud_pool*>p
    cdef zbud_page* zp
    cdef zbud_page* zn
    cdef int i
    for i in range(NCHUNKS + 1):
        zp = pool.lists[i]
        while zp != NULL:
            zn = zp.next
            free(zp)
            zp = zn
    pages_destroy(&pool.pages)
    pthread_mutex_destroy(&pool.lock)
    free(pool)


cdef uint64_t zbud_malloc(void* p, size_t size) noexcept nogil:
    cdef zbud_pool* pool = <zbud_pool*>p
    cdef uint32_t need
    cdef zbud_page* zp = NULL
    cdef int i
    cdef uint64_t buddy
    if size == 0 or size > PAGE_SIZE:
        return 0
    need = _chunks(<uint32_t>size)
    pthread_mutex_lock(&pool.lock)
    for i in range(need, NCHUNKS):
        if pool.lists[i] != NULL:
            zp = pool.lists[i]
            _zbud_unlink(pool, zp)
            break
    if zp == NULL:
        zp = <zbud_page*>calloc(1, sizeof(zbud_page))
        if zp != NULL:
            zp.base = pages_alloc(&pool.pages, 1)
            if zp.base == NULL:
                free(zp)
                zp = NULL
        if zp == NULL:
            pthread_mutex_unlock(&pool.lock)
            return 0
    if zp.first_size == 0:
        zp.first_size = <uint32_t>size
        buddy = 0
    else:
        zp.last_size = <uint32_t>size
        buddy = 1
    _zbud_link(pool, zp)
    pthread_mutex_unlock(&pool.lock)
    return (<uint64_t>zp) | buddy


cdef void zbud_free(void* p, uint64_t handle) noexcept nogil:
    cdef zbud_pool* pool = <zbud_pool*>p
    cdef zbud_page* zp = <zbud_page*>(handle & ~(<uint64_t>1))
    pthread_mutex_lock(&pool.lock)
    _zbud_unlink(pool, zp)
    if handle & 1:
        zp.last_size = 0
    else:
        zp.first_size = 0
    if zp.first_size == 0 and zp.last_size == 0:
        pages_free(&pool.pages, zp.base, 1)
        free(zp)
    else:
        _zbud_link(pool, zp)
    pthread_mutex_unlock(&pool.lock)


cdef char* zbud_map(void* p, uint64_t handle) noexcept nogil:
    cdef zbud_page* zp = <zbud_page*>(handle & ~(<uint64_t>1))
    if handle & 1:
        return zp.base + PAGE_SIZE - (_chunks(zp.last_size) << CHUNK_SHIFT)
    return zp.base


cdef void zbud_unmap(void* p, uint64_t handle) noexcept nogil:
    pass


cdef size_t zbud_obj_size(void* p, uint64_t handle) noexcept nogil:
    cdef zbud_page* zp = <zbud_page*>(handle & ~(<uint64_t>1))
    return zp.last_size if handle & 1 else zp.first_size


cdef size_t zbud_total_pages(void* p) noexcept nogil:
    return pages_held(&(<zbud_pool*>p).pages)


cdef size_t zbud_compact(void* p) noexcept nogil:
    return 0


cdef size_t zbud_huge_class_size(void* p) noexcept nogil:
    return PAGE_SIZE - (1 << CHUNK_SHIFT) + 1    # no buddy fits beside anything larger


cdef size_t zbud_class_size(void* p, size_t size) noexcept nogil:
    return _chunks(<uint32_t>size) << CHUNK_SHIFT if 0 < size <= PAGE_SIZE else 0


cdef zpool_driver ZBUD = zpool_driver(
    name=b"zbud", create=zbud_create, destroy=zbud_destroy, malloc=zbud_malloc, free=zbud_free,
    map=zbud_map, unmap=zbud_unmap, obj_size=zbud_obj_size, total_pages=zbud_total_pages,
    compact=zbud_compact, huge_class_size=zbud_huge_class_size, class_size=zbud_class_size,
)


# ---------------------------------------------------------------------------------------------
# Backends are pinned while a pool uses them (docs/design.md, hazard 5); pool names stay unique while an old
# pool is still being torn down (hazard 3).

cdef class _Backend:
    cdef const zpool_driver* driver


cdef _Backend _backend(const zpool_driver* driver):
    cdef _Backend b = _Backend()
    b.driver = driver
    return b


BACKENDS: Registry[_Backend] = Registry("allocator backend")
BACKENDS.register("zsmalloc", _backend(&ZSMALLOC))
BACKENDS.register("zbud", _backend(&ZBUD))

_names_lock = threading.Lock()
_pool_names: set[str] = set()


def _claim_name(wanted: str) -> str:
    """A pool name unique among live pools: `wanted`, or `wanted-N` while that is held."""
    with _names_lock:
        name, n = wanted, 1
        while name in _pool_names:
            n += 1
            name = f"{wanted}-{n}"
        _pool_names.add(name)
        return name


ClassStat = namedtuple(
    "ClassStat",
    "index size obj_allocated obj_used pages_used pages_per_zspage freeable",
)


cdef class Pool:
    """A pool of compressed objects: `Pool("zsmalloc", "zram0")`.

    The Python methods are for tests and tools; they check handles and release the GIL around
    the C calls, so threads really run in parallel. The device uses `driver`/`impl` directly.
    """

    def __init__(self, backend: str = "zsmalloc", name: str = "zram",
                 max_pages_per_zspage: int = DEFAULT_MAX_PAGES_PER_ZSPAGE):
        cdef _Backend b
        if not 1 <= max_pages_per_zspage <= MAX_CHAIN:
            raise ValueError(f"max_pages_per_zspage must be 1..{MAX_CHAIN}")
        b = BACKENDS.pin(backend)
        self._pin = backend
        self.driver = b.driver
        self.backend = backend
        self._live = set()
        cdef int chain = max_pages_per_zspage
        with nogil:
            self.impl = self.driver.create(chain)
        if self.impl == NULL:
            self._unpin()
            raise MemoryError("cannot create pool")
        self.name = _claim_name(name)

    def _unpin(self):
        if self._pin is not None:
            BACKENDS.unpin(self._pin)
            self._pin = None

    def destroy(self) -> None:
        """Frees every object and gives all memory back. The pool is unusable after."""
        if self.impl == NULL:
            return
        with nogil:
            self.driver.destroy(self.impl)
        self.impl = NULL
        self._live.clear()
        self._unpin()
        with _names_lock:
            _pool_names.discard(self.name)   # only now may the name be handed out again

    def __dealloc__(self):
        if self.impl != NULL:
            self.driver.destroy(self.impl)
            self.impl = NULL

    def __enter__(self) -> Pool:
        return self

    def __exit__(self, *exc) -> None:
        self.destroy()

    cdef int _check_open(self) except -1:
        if self.impl == NULL:
            raise PoolError(f"pool {self.name} is destroyed")
        return 0

    cdef int _check_handle(self, handle) except -1:
        self._check_open()
        if handle not in self._live:
            raise KeyError(f"no live object with handle {handle:#x}")
        return 0

    def malloc(self, size_t size) -> int:
        """A handle to a new object of `size` bytes (1..4096)."""
        cdef uint64_t h
        self._check_open()
        if size == 0 or size > PAGE_SIZE:
            raise ValueError(f"object size {size} is not in 1..{PAGE_SIZE}")
        with nogil:
            h = self.driver.malloc(self.impl, size)
        if h == 0:
            raise MemoryError(f"pool {self.name}: no memory for {size} bytes")
        self._live.add(h)
        return h

    def free(self, uint64_t handle) -> None:
        self._check_handle(handle)
        self._live.discard(handle)
        with nogil:
            self.driver.free(self.impl, handle)

    def write(self, uint64_t handle, data) -> None:
        """Copies `data` (a bytes-like object no longer than the object) into the object."""
        cdef Py_buffer view
        cdef char* dst
        self._check_handle(handle)
        PyObject_GetBuffer(data, &view, PyBUF_SIMPLE)
        try:
            if <size_t>view.len > self.driver.obj_size(self.impl, handle):
                raise ValueError(f"{view.len} bytes do not fit the object")
            with nogil:
                dst = self.driver.map(self.impl, handle)
                memcpy(dst, view.buf, view.len)
                self.driver.unmap(self.impl, handle)
        finally:
            PyBuffer_Release(&view)

    def read(self, uint64_t handle) -> bytes:
        """The object's bytes (its whole size as allocated)."""
        cdef size_t n
        cdef char* src
        self._check_handle(handle)
        n = self.driver.obj_size(self.impl, handle)
        out = PyBytes_FromStringAndSize(NULL, n)
        cdef char* buf = PyBytes_AS_STRING(out)
        with nogil:
            src = self.driver.map(self.impl, handle)
            memcpy(buf, src, n)
            self.driver.unmap(self.impl, handle)
        return out

    def compact(self) -> int:
        """Moves objects out of sparse zspages and gives emptied ones back; pages freed."""
        cdef size_t freed
        self._check_open()
        with nogil:
            freed = self.driver.compact(self.impl)
        self.pages_compacted += freed      # under the GIL: no lost updates
        return freed

    @property
    def total_pages(self) -> int:
        """Pages held from the OS (page-granular): mem_used_total / 4096."""
        self._check_open()
        return self.driver.total_pages(self.impl)

    def class_size(self, size_t size) -> int:
        """The room an object of `size` bytes takes."""
        self._check_open()
        return self.driver.class_size(self.impl, size)

    @property
    def huge_class_size(self) -> int:
        """Objects of this size or more take a page of their own; store such pages raw."""
        self._check_open()
        return self.driver.huge_class_size(self.impl)

    def class_stats(self) -> list[ClassStat]:
        """Rows like zsmalloc's debugfs `classes` file (zsmalloc only; zbud has no classes)."""
        cdef zs_pool* pool
        cdef size_class* c
        cdef int i
        self._check_open()
        if self.driver != &ZSMALLOC:
            return []
        pool = <zs_pool*>self.impl
        rows = []
        for i in range(pool.nr_classes - 1, -1, -1):     # classes are built largest first
            c = pool.classes[i]
            with nogil:
                pthread_mutex_lock(&c.lock)
            allocated = c.zspages * c.objs_per_zspage
            used = c.obj_used
            wasted = _wasted_objs(c)
            with nogil:
                pthread_mutex_unlock(&c.lock)
            rows.append(ClassStat(
                index=(c.size - MIN_SIZE) // CLASS_DELTA, size=c.size,
                obj_allocated=allocated, obj_used=used,
                pages_used=allocated // c.objs_per_zspage * c.pages_per_zspage,
                pages_per_zspage=c.pages_per_zspage,
                freeable=wasted // c.objs_per_zspage * c.pages_per_zspage,
            ))
        return rows

    def __repr__(self) -> str:
        return f"<Pool {self.name} backend={self.backend}>"
