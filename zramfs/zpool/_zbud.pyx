# cython: language_level=3
"""zbud: the simple second pool backend, reached through its driver table (zbud_driver()).

Two buddies a page, "first" from the start and "last" from the end, sized in 64-byte chunks;
pages come one at a time from the page source (_pages). No compaction; objects never move, so
map needs no pin, and map, unmap and obj_size take no lock: the caller's hold on its handle
keeps the page. One lock for the pool, as in the kernel's zbud, taken by malloc and free; the
list helpers (_zbud_link, _zbud_unlink) expect it held, and the page source's lock nests
inside it. Handles point straight at the page's descriptor, low bit = buddy. As zsmalloc's,
everything lives in the pool's region (zramfs.zpool._pages): the pool in the root, descriptors in
pages of the page source, each on the pool's list of them, so that a later daemon adopts the
pool in place, or copies its objects out, checking every handle (_zbud_adopt.pxi).
Every function here runs without the GIL.
"""
from libc.stdint cimport uint32_t, uint64_t
from libc.stdlib cimport free, malloc, qsort
from libc.string cimport memset

from zramfs.common cimport PAGE_SIZE
from zramfs.pthread cimport (pthread_mutex_destroy, pthread_mutex_init, pthread_mutex_lock,
                            pthread_mutex_t, pthread_mutex_unlock)
from zramfs.zpool.zpool cimport (ZPOOL_ARENAS, ZPOOL_ROOT, zpool_class_stat, zpool_driver,
                                 zpool_kept, zpool_kept_at, zpool_within)
from zramfs.zpool._pages cimport (page_source, pages_adopt, pages_alloc, pages_alloc_meta,
                                  pages_destroy, pages_free, pages_held, pages_init, pages_run,
                                  pages_runs_sound, pages_tags_free, pages_tags_init,
                                  pages_tags_run, pages_tags_set, zregion)

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

# The tail of a page of descriptors, in the bytes the descriptors leave (where a page made
# before zbud kept this list has zeros): the page's place on the pool's list.
ctypedef struct zbud_run:
    zbud_run* next
    uint64_t ndesc

ctypedef struct zbud_pool:
    page_source pages
    pthread_mutex_t lock
    zbud_page* lists[NCHUNKS + 1]    # [i] = pages with one buddy and i chunks free; [NCHUNKS] full
    zbud_page* desc_free             # free descriptors (base NULL), linked through `next`
    zbud_run* desc_runs              # every page of descriptors, newest first


cdef inline size_t _descs_per_page() noexcept nogil:
    return (PAGE_SIZE - sizeof(zbud_run)) // sizeof(zbud_page)


cdef inline zbud_run* _run_of(char* page) noexcept nogil:
    return <zbud_run*>(page + PAGE_SIZE - sizeof(zbud_run))


cdef zbud_page* _desc_take(zbud_pool* pool) noexcept nogil:
    """A zeroed descriptor. Pool lock held. The slab's pages are never given back; each is
    on the pool's list before any of its descriptors is handed out, so that adoption finds
    every descriptor, free or not."""
    cdef zbud_page* d
    cdef zbud_run* run
    cdef char* page
    cdef size_t i
    if pool.desc_free == NULL:
        page = pages_alloc_meta(&pool.pages, 1)
        if page == NULL:
            return NULL
        run = _run_of(page)
        run.ndesc = _descs_per_page()
        run.next = pool.desc_runs
        pool.desc_runs = run
        for i in range(_descs_per_page()):
            _desc_put(pool, <zbud_page*>page + i)
    d = pool.desc_free
    pool.desc_free = d.next
    memset(d, 0, sizeof(zbud_page))
    return d


cdef inline void _desc_put(zbud_pool* pool, zbud_page* d) noexcept nogil:
    d.base = NULL
    d.next = pool.desc_free
    pool.desc_free = d


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


cdef void* zbud_create(int max_pages, zregion* region) noexcept nogil:
    cdef zbud_pool* pool = <zbud_pool*>(region.base + ZPOOL_ROOT)
    memset(pool, 0, sizeof(zbud_pool))
    if pages_init(&pool.pages, region, ZPOOL_ARENAS) != 0:
        return NULL
    pthread_mutex_init(&pool.lock, NULL)
    return pool


cdef void zbud_destroy(void* p) noexcept nogil:
    cdef zbud_pool* pool = <zbud_pool*>p      # in the region: its owner unmaps it all
    pages_destroy(&pool.pages)
    pthread_mutex_destroy(&pool.lock)


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
        zp = _desc_take(pool)
        if zp != NULL:
            zp.base = pages_alloc(&pool.pages, 1)
            if zp.base == NULL:
                _desc_put(pool, zp)
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
        _desc_put(pool, zp)
    else:
        _zbud_link(pool, zp)
    pthread_mutex_unlock(&pool.lock)


cdef inline char* _buddy(char* page, zbud_page* zp, uint64_t handle) noexcept nogil:
    """The object of `handle` in its page: first from the start, last from the end."""
    if handle & 1:
        return page + PAGE_SIZE - (_chunks(zp.last_size) << CHUNK_SHIFT)
    return page


cdef char* zbud_map(void* p, uint64_t handle) noexcept nogil:
    cdef zbud_page* zp = <zbud_page*>(handle & ~(<uint64_t>1))
    return _buddy(zp.base, zp, handle)


cdef void zbud_unmap(void* p, uint64_t handle) noexcept nogil:
    pass


cdef size_t zbud_obj_size(void* p, uint64_t handle) noexcept nogil:
    cdef zbud_page* zp = <zbud_page*>(handle & ~(<uint64_t>1))
    return zp.last_size if handle & 1 else zp.first_size


cdef size_t zbud_total_pages(void* p) noexcept nogil:
    return pages_held(&(<zbud_pool*>p).pages)


cdef size_t zbud_compact(void* p) noexcept nogil:
    return 0                 # objects never move: nothing to compact


cdef size_t zbud_pages_compacted(void* p) noexcept nogil:
    return 0                 # ... so nothing was ever freed by compacting


cdef size_t zbud_huge_class_size(void* p) noexcept nogil:
    return PAGE_SIZE - (1 << CHUNK_SHIFT) + 1    # no buddy fits beside anything larger


cdef size_t zbud_class_size(void* p, size_t size) noexcept nogil:
    return _chunks(<uint32_t>size) << CHUNK_SHIFT if 0 < size <= PAGE_SIZE else 0


cdef int zbud_class_stats(void* p, zpool_class_stat* out, int max) noexcept nogil:
    return 0                 # no size classes


include "_zbud_adopt.pxi"


cdef zpool_driver ZBUD = zpool_driver(
    name=b"zbud", create=zbud_create, destroy=zbud_destroy, malloc=zbud_malloc, free=zbud_free,
    map=zbud_map, unmap=zbud_unmap, obj_size=zbud_obj_size, total_pages=zbud_total_pages,
    compact=zbud_compact, pages_compacted=zbud_pages_compacted,
    huge_class_size=zbud_huge_class_size, class_size=zbud_class_size,
    class_stats=zbud_class_stats, check=zbud_check, locate=zbud_locate, adopt=zbud_adopt,
)


cdef const zpool_driver* zbud_driver() noexcept nogil:
    return &ZBUD
