# cython: language_level=3
"""zsmalloc: the default pool backend, reached through its driver table (zsmalloc_driver()).

zsmalloc's ideas, in userspace:
- size classes of 16 bytes from 32 to 4096; classes that come out with the same
  (pages per zspage, objects per zspage) are merged into the larger one;
- a zspage is 1..N contiguous 4 KiB pages from the page source (_pages), N chosen per class to
  waste least; since the pages are contiguous in our address space, objects simply cross page
  boundaries;
- handles are indirect (a per-class handle table), so compaction moves objects freely;
- everything lives in the pool's region (a memfd, zramfs.zpool._pages), the bookkeeping too: the
  pool and its classes in the root, handle tables and zspage descriptors in runs of the page
  source. Nothing is malloc'ed, so a daemon after this one finds every object through the
  slot table's handles, whatever this process was doing when it ended, and adopts the pool
  in place or copies its objects out (_zsmalloc_adopt.pxi, the one reader of a kept pool);
- zspages sit in fullness groups; allocation takes the fullest zspage with room;
- one lock per class (no pool-wide lock on malloc/free/map); a pinned zspage is never a
  compaction source, so a reader's object cannot move under it.

Every function here runs without the GIL. The driver's functions (zs_*) take the class locks
they need; a helper given a size_class expects that class's lock held, unless it says it takes
the lock itself. Lock order: one class lock, then the page source's; never two class locks.
"""
from libc.stdint cimport uint8_t, uint16_t, uint32_t, int32_t, uint64_t
from libc.stdlib cimport calloc, free, malloc
from libc.string cimport memcpy, memset

from zramfs.common cimport PAGE_SIZE, za_add, za_load
from zramfs.pthread cimport (pthread_mutex_destroy, pthread_mutex_init, pthread_mutex_lock,
                            pthread_mutex_t, pthread_mutex_unlock)
from zramfs.zpool.zpool cimport (ZPOOL_ARENAS, ZPOOL_ROOT, zpool_class_stat, zpool_driver,
                                 zpool_kept, zpool_kept_at, zpool_within)
from zramfs.zpool._pages cimport (PAGES_MAX_RUN, page_source, pages_adopt, pages_alloc,
                                  pages_alloc_meta, pages_alloc_sparse, pages_destroy,
                                  pages_free, pages_held, pages_init, pages_run,
                                  pages_runs_sound, pages_tags_free, pages_tags_init,
                                  pages_tags_run, pages_tags_set, zregion)

cdef enum:
    MIN_SIZE = 32
    CLASS_DELTA = 16
    NR_SIZES = 255          # (PAGE_SIZE - MIN_SIZE) / CLASS_DELTA + 1: 32, 48, ..., 4096
    # Fullness groups: 0 empty (only while pinned), 1..10 partly used by tenths, 11 full.
    GROUP_EMPTY = 0
    GROUP_FULL = 11
    NR_GROUPS = 12
    # Handle tables: a directory run of DIR_PAGES pages pointing at chunks of CHUNK_PAGES, each
    # of CHUNK_ENTRIES entries; 16M handles a class at most.
    CHUNK_PAGES = 16
    CHUNK_SHIFT = 12
    CHUNK_ENTRIES = 4096        # CHUNK_PAGES * PAGE_SIZE / sizeof(hentry)
    DIR_PAGES = 8
    DIR_ENTRIES = 4096          # DIR_PAGES * PAGE_SIZE / sizeof(hentry*)


ctypedef struct zspage:   # a descriptor, from its class's slab; the handle of each of its objects follows it (_obj_handles)
    char* base
    zspage* prev
    zspage* next
    int32_t freelist       # freed objects; the link to the next is kept in the freed object
    int32_t pins           # readers/writers between map and unmap; compaction skips pinned
    uint16_t bump          # objects at or above this have never been handed out
    uint16_t inuse
    uint8_t group

ctypedef struct hentry:    # one per handle: where its object is now
    zspage* zs
    uint32_t obj_idx
    uint32_t size_or_next  # object size while in use, next free entry while free

ctypedef struct size_class:
    pthread_mutex_t lock
    uint32_t index
    uint32_t size
    uint32_t pages_per_zspage
    uint32_t objs_per_zspage
    zspage* groups[NR_GROUPS]
    hentry** dir               # the handle table's directory (a run), NULL until first used
    uint32_t handles_cap       # entries in the chunks allocated so far
    uint32_t handles_free      # head of free entries, 0 if none (entry 0 is never used)
    uint32_t handles_next      # entries at or above this have never been used
    size_t zspages
    size_t obj_used
    zspage* desc_free          # free zspage descriptors (base NULL), linked through `next`
    desc_run* desc_runs        # every run descriptors were carved from, newest first
    uint32_t desc_size         # a descriptor and its objects' handles, rounded to 8 bytes

ctypedef struct desc_run:      # the head of a run of descriptors, which follow it
    desc_run* next
    uint32_t npages
    uint32_t ndesc

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


cdef inline hentry* _hentry(size_class* c, uint32_t idx) noexcept nogil:
    return &c.dir[idx >> CHUNK_SHIFT][idx & (CHUNK_ENTRIES - 1)]


cdef inline uint32_t _header_size() noexcept nogil:
    """A descriptor's own bytes, before its objects' handles."""
    return <uint32_t>((sizeof(zspage) + 7) & ~(<size_t>7))


cdef inline uint32_t* _obj_handles(zspage* zs) noexcept nogil:
    """Per object of the zspage (by obj_idx): the class-local handle index using it, 0 if free."""
    return <uint32_t*>(<char*>zs + _header_size())


cdef inline uint32_t _desc_size(uint32_t objs) noexcept nogil:
    """A descriptor and the handles of a zspage of `objs` objects, rounded to 8 bytes."""
    return _header_size() + <uint32_t>((objs * sizeof(uint32_t) + 7) & ~(<size_t>7))


cdef inline uint32_t _desc_run_pages(size_class* c) noexcept nogil:
    """The pages of one of the class's descriptor runs: its head and at least one descriptor."""
    return <uint32_t>((sizeof(desc_run) + c.desc_size + PAGE_SIZE - 1) // PAGE_SIZE)


cdef inline uint32_t _desc_run_count(size_class* c, uint32_t npages) noexcept nogil:
    """The descriptors a run of `npages` pages holds."""
    return <uint32_t>((npages * PAGE_SIZE - sizeof(desc_run)) // c.desc_size)


cdef inline zspage* _desc_at(size_class* c, desc_run* run, uint32_t i) noexcept nogil:
    return <zspage*>(<char*>run + sizeof(desc_run) + <size_t>i * c.desc_size)


cdef zspage* _desc_take(zs_pool* pool, size_class* c) noexcept nogil:
    """A zeroed zspage descriptor with room for the handles of the class's objects. Class lock held. The slab's
    runs are never given back: descriptors are few (one per zspage) and reused. Each run is
    on the class's list of runs, so that adoption finds every descriptor, free or not (a
    free one has no base: a fresh run is zeros)."""
    cdef zspage* d = c.desc_free
    cdef desc_run* run
    cdef int npages, i
    if d == NULL:
        npages = _desc_run_pages(c)
        run = <desc_run*>pages_alloc_meta(&pool.pages, npages)
        if run == NULL:
            return NULL
        run.npages = npages
        run.ndesc = _desc_run_count(c, npages)
        run.next = c.desc_runs
        c.desc_runs = run
        for i in range(<int>run.ndesc - 1, -1, -1):     # the run's first descriptor on top
            _desc_put(c, _desc_at(c, run, i))
        d = c.desc_free
    c.desc_free = d.next
    memset(d, 0, c.desc_size)
    return d


cdef inline void _desc_put(size_class* c, zspage* zs) noexcept nogil:
    zs.base = NULL
    zs.next = c.desc_free
    c.desc_free = zs


cdef zspage* _zspage_new(zs_pool* pool, size_class* c) noexcept nogil:
    cdef zspage* zs = _desc_take(pool, c)
    if zs == NULL:
        return NULL
    zs.base = pages_alloc(&pool.pages, c.pages_per_zspage)
    if zs.base == NULL:
        _desc_put(c, zs)
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
    _desc_put(c, zs)


cdef inline char* _obj_addr(size_class* c, zspage* zs, uint32_t obj_idx) noexcept nogil:
    return zs.base + <size_t>obj_idx * c.size


cdef inline uint32_t _obj_take(size_class* c, zspage* zs) noexcept nogil:
    """A free object of a zspage with room, by its obj_idx. Class lock held."""
    cdef uint32_t obj_idx
    if zs.freelist >= 0:
        obj_idx = <uint32_t>zs.freelist
        memcpy(&zs.freelist, _obj_addr(c, zs, obj_idx), sizeof(int32_t))
    else:
        obj_idx = zs.bump
        zs.bump += 1
    zs.inuse += 1
    return obj_idx


cdef inline void _obj_put(size_class* c, zspage* zs, uint32_t obj_idx) noexcept nogil:
    memcpy(_obj_addr(c, zs, obj_idx), &zs.freelist, sizeof(int32_t))
    zs.freelist = <int32_t>obj_idx
    _obj_handles(zs)[obj_idx] = 0
    zs.inuse -= 1


cdef uint32_t _handle_take(zs_pool* pool, size_class* c) noexcept nogil:
    """A free entry of the class's handle table, 0 if the table cannot grow. Class lock held.
    The table grows by chunks that never move, so an entry's address is for good."""
    cdef uint32_t idx
    cdef hentry* chunk
    if c.handles_free != 0:
        idx = c.handles_free
        c.handles_free = _hentry(c, idx).size_or_next
        return idx
    if c.handles_next >= c.handles_cap:
        if c.handles_cap >= <uint32_t>DIR_ENTRIES * CHUNK_ENTRIES:
            return 0
        if c.dir == NULL:
            c.dir = <hentry**>pages_alloc_sparse(&pool.pages, DIR_PAGES)
            if c.dir == NULL:
                return 0
        chunk = <hentry*>pages_alloc_sparse(&pool.pages, CHUNK_PAGES)
        if chunk == NULL:
            return 0
        c.dir[c.handles_cap >> CHUNK_SHIFT] = chunk
        c.handles_cap += CHUNK_ENTRIES
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


cdef void* zs_create(int max_pages, zregion* region) noexcept nogil:
    """The pool and its classes in the region's root, the rest of the region for arenas."""
    cdef zs_pool* pool
    cdef char* root_end = region.base + ZPOOL_ARENAS
    cdef size_class* next_class
    cdef int i, p, best_p
    cdef uint32_t size, objs
    cdef double waste, best_waste
    cdef size_class* c
    cdef size_class* prev = NULL
    if not 1 <= max_pages <= PAGES_MAX_RUN:     # a zspage is one run of the page source
        return NULL
    pool = <zs_pool*>(region.base + ZPOOL_ROOT)
    memset(pool, 0, sizeof(zs_pool))
    next_class = <size_class*>(pool + 1)
    if pages_init(&pool.pages, region, ZPOOL_ARENAS) != 0:
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
        c = next_class
        next_class += 1
        if <char*>next_class > root_end:      # cannot happen with 4 KiB pages: 255 classes fit
            zs_destroy(pool)
            return NULL
        memset(c, 0, sizeof(size_class))
        pthread_mutex_init(&c.lock, NULL)
        c.desc_size = _desc_size(objs)
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
    """Everything is in the region: its owner unmaps it, and with it every zspage."""
    cdef zs_pool* pool = <zs_pool*>p
    cdef int i
    for i in range(pool.nr_classes):
        pthread_mutex_destroy(&pool.classes[i].lock)
    pages_destroy(&pool.pages)


cdef uint64_t zs_malloc(void* p, size_t size) noexcept nogil:
    cdef zs_pool* pool = <zs_pool*>p
    cdef size_class* c
    cdef zspage* zs = NULL
    cdef uint32_t obj_idx, idx
    cdef int g
    if size == 0 or size > PAGE_SIZE:
        return 0
    if size < MIN_SIZE:
        size = MIN_SIZE
    c = _class_for(pool, size)
    pthread_mutex_lock(&c.lock)
    idx = _handle_take(pool, c)
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
            _hentry(c, idx).size_or_next = c.handles_free
            c.handles_free = idx
            pthread_mutex_unlock(&c.lock)
            return 0
    obj_idx = _obj_take(c, zs)
    _obj_handles(zs)[obj_idx] = idx
    _hentry(c, idx).zs = zs
    _hentry(c, idx).obj_idx = obj_idx
    _hentry(c, idx).size_or_next = <uint32_t>size
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
    e = _hentry(c, idx)
    zs = e.zs
    _obj_put(c, zs, e.obj_idx)
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
    e = _hentry(c, <uint32_t>handle)
    e.zs.pins += 1
    addr = _obj_addr(c, e.zs, e.obj_idx)
    pthread_mutex_unlock(&c.lock)
    return addr


cdef void zs_unmap(void* p, uint64_t handle) noexcept nogil:
    cdef zs_pool* pool = <zs_pool*>p
    cdef size_class* c = _class_of(pool, handle)
    cdef zspage* zs
    pthread_mutex_lock(&c.lock)
    zs = _hentry(c, <uint32_t>handle).zs
    zs.pins -= 1
    if zs.pins == 0 and zs.inuse == 0:     # its last object was freed while pinned
        _zspage_release(pool, c, zs)
    pthread_mutex_unlock(&c.lock)


cdef size_t zs_obj_size(void* p, uint64_t handle) noexcept nogil:
    cdef size_class* c = _class_of(<zs_pool*>p, handle)
    cdef size_t size
    pthread_mutex_lock(&c.lock)
    size = _hentry(c, <uint32_t>handle).size_or_next
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


cdef void _move_object(size_class* c, zspage* src, uint32_t src_idx, zspage* dst) noexcept nogil:
    cdef uint32_t idx = _obj_handles(src)[src_idx]
    cdef uint32_t dst_idx = _obj_take(c, dst)
    memcpy(_obj_addr(c, dst, dst_idx), _obj_addr(c, src, src_idx), c.size)
    _obj_handles(dst)[dst_idx] = idx
    _hentry(c, idx).zs = dst
    _hentry(c, idx).obj_idx = dst_idx
    _obj_put(c, src, src_idx)


cdef size_t _compact_class(zs_pool* pool, size_class* c) noexcept nogil:
    """Empties sparse zspages into dense ones while a whole zspage's worth is wasted. Takes the
    class lock itself, one zspage a time, so allocations get in between."""
    cdef size_t freed = 0
    cdef zspage* src
    cdef zspage* dst
    cdef uint32_t obj_idx
    while True:
        pthread_mutex_lock(&c.lock)
        if _wasted_objs(c) < c.objs_per_zspage:
            pthread_mutex_unlock(&c.lock)
            break
        src = _compact_src(c)
        if src == NULL:
            pthread_mutex_unlock(&c.lock)
            break
        obj_idx = 0
        while src.inuse > 0:
            dst = _compact_dst(c, src)
            if dst == NULL:
                break
            while _obj_handles(src)[obj_idx] == 0:
                obj_idx += 1
            _move_object(c, src, obj_idx, dst)
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


include "_zsmalloc_adopt.pxi"


cdef zpool_driver ZSMALLOC = zpool_driver(
    name=b"zsmalloc", create=zs_create, destroy=zs_destroy, malloc=zs_malloc, free=zs_free,
    map=zs_map, unmap=zs_unmap, obj_size=zs_obj_size, total_pages=zs_total_pages,
    compact=zs_compact, pages_compacted=zs_pages_compacted, huge_class_size=zs_huge_class_size,
    class_size=zs_class_size, class_stats=zs_class_stats, check=zs_check, locate=zs_locate,
    adopt=zs_adopt,
)


cdef const zpool_driver* zsmalloc_driver() noexcept nogil:
    return &ZSMALLOC
