# cython: language_level=3
"""zsmalloc: the default pool backend, reached through its driver table (zsmalloc_driver()).

zsmalloc's ideas, in userspace:
- size classes of 16 bytes from 32 to 4096; classes that come out with the same
  (pages per zspage, objects per zspage) are merged into the larger one;
- a zspage is 1..N contiguous 4 KiB pages from the page source (_pages), N chosen per class to
  waste least; since the pages are contiguous in our address space, objects simply cross page
  boundaries;
- handles are indirect (a per-class handle table), so compaction moves objects freely;
- zspages sit in fullness groups; allocation takes the fullest zspage with room;
- one lock per class (no pool-wide lock on malloc/free/map); a pinned zspage is never a
  compaction source, so a reader's object cannot move under it.

Every function here runs without the GIL. The driver's functions (zs_*) take the class locks
they need; a helper given a size_class expects that class's lock held, unless it says it takes
the lock itself. Lock order: one class lock, then the page source's; never two class locks.
"""
from libc.stdint cimport uint32_t, int32_t, uint64_t
from libc.stdlib cimport calloc, realloc, free
from libc.string cimport memcpy

from zramfs.zram cimport PAGE_SIZE, za_add, za_load
from zramfs.pthread cimport (pthread_mutex_destroy, pthread_mutex_init, pthread_mutex_lock,
                            pthread_mutex_t, pthread_mutex_unlock)
from zramfs.zpool cimport zpool_class_stat, zpool_driver
from zramfs._pages cimport (PAGES_MAX_RUN, page_source, pages_alloc, pages_destroy, pages_free,
                            pages_held, pages_init)

cdef enum:
    MIN_SIZE = 32
    CLASS_DELTA = 16
    NR_SIZES = 255          # (PAGE_SIZE - MIN_SIZE) / CLASS_DELTA + 1: 32, 48, ..., 4096
    # Fullness groups: 0 empty (only while pinned), 1..10 partly used by tenths, 11 full.
    GROUP_EMPTY = 0
    GROUP_FULL = 11
    NR_GROUPS = 12


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
    size_t pages_compacted             # freed by compaction, ever (atomic: compactions overlap)


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


cdef inline size_class* _class_for(zs_pool* pool, size_t size) noexcept nogil:
    """The class that serves objects of `size` bytes, MIN_SIZE..PAGE_SIZE."""
    return pool.by_size[(size - MIN_SIZE + CLASS_DELTA - 1) // CLASS_DELTA]


cdef void* zs_create(int max_pages) noexcept nogil:
    cdef zs_pool* pool
    cdef int i, p, best_p
    cdef uint32_t size, objs
    cdef double waste, best_waste
    cdef size_class* c
    cdef size_class* prev = NULL
    if not 1 <= max_pages <= PAGES_MAX_RUN:     # a zspage is one run of the page source
        return NULL
    pool = <zs_pool*>calloc(1, sizeof(zs_pool))
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
    c = _class_for(pool, size)
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
    return _class_for(<zs_pool*>p, size).size


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
    """Empties sparse zspages into dense ones while a whole zspage's worth is wasted. Takes the
    class lock itself, one zspage a time, so allocations get in between."""
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
    """Takes each class lock in turn. Any thread may call it, several at once: the Python
    face, the device's eviction path; each count lands in pages_compacted, and only there."""
    cdef zs_pool* pool = <zs_pool*>p
    cdef size_t freed = 0
    cdef int i
    for i in range(pool.nr_classes):
        freed += _compact_class(pool, pool.classes[i])
    za_add(&pool.pages_compacted, freed)
    return freed


cdef size_t zs_pages_compacted(void* p) noexcept nogil:
    return za_load(&(<zs_pool*>p).pages_compacted)


cdef int zs_class_stats(void* p, zpool_class_stat* out, int max) noexcept nogil:
    """Rows like zsmalloc's debugfs `classes` file, each under its class lock."""
    cdef zs_pool* pool = <zs_pool*>p
    cdef size_class* c
    cdef zpool_class_stat* row
    cdef int i, n = 0
    for i in range(pool.nr_classes - 1, -1, -1):     # classes are built largest first
        if n >= max:
            break
        c = pool.classes[i]
        row = &out[n]
        n += 1
        pthread_mutex_lock(&c.lock)
        row.obj_allocated = c.zspages * c.objs_per_zspage
        row.obj_used = c.obj_used
        row.freeable = _wasted_objs(c) // c.objs_per_zspage * c.pages_per_zspage
        pthread_mutex_unlock(&c.lock)
        row.index = (c.size - MIN_SIZE) // CLASS_DELTA
        row.size = c.size
        row.pages_per_zspage = c.pages_per_zspage
        row.pages_used = row.obj_allocated // c.objs_per_zspage * c.pages_per_zspage
    return pool.nr_classes


cdef zpool_driver ZSMALLOC = zpool_driver(
    name=b"zsmalloc", create=zs_create, destroy=zs_destroy, malloc=zs_malloc, free=zs_free,
    map=zs_map, unmap=zs_unmap, obj_size=zs_obj_size, total_pages=zs_total_pages,
    compact=zs_compact, pages_compacted=zs_pages_compacted, huge_class_size=zs_huge_class_size,
    class_size=zs_class_size, class_stats=zs_class_stats,
)


cdef const zpool_driver* zsmalloc_driver() noexcept nogil:
    return &ZSMALLOC
