# The zpool interface (cimport zramfs.zpool.zpool): the table of C functions through which the device
# reaches a pool, whatever the backend (_zsmalloc, _zbud). Declarations only, no module: a user
# cimports the table's type without importing anything at runtime, and gets a backend's table
# from that backend's `*_driver()` function or from a `Pool` (zramfs.zpool._alloc).
#
# Every function runs without the GIL and takes the backend's own locks as it needs them:
#
#     h = driver.malloc(pool, n)        # 0 when out of memory
#     dst = driver.map(pool, h)         # pins the object: compaction won't move it
#     memcpy(dst, src, n)
#     driver.unmap(pool, h)
#
# The caller owns its handles: it must not free or map a handle another thread is freeing
# (the device's per-slot lock sees to that). Everything else is the pool's business.
from libc.stdint cimport uint32_t, uint64_t

from zramfs.zpool._pages cimport pages_tags, zregion

# Where a backend keeps what, in the region a pool lives in (a memfd: zramfs.zpool._pages): its root
# (the pool's own struct and its classes) at ZPOOL_ROOT, below ZPOOL_ARENAS, then the page
# source's arenas. Offset 0 holds the pool's header (zramfs.zpool._alloc).
cdef enum:
    ZPOOL_ROOT = 4096
    ZPOOL_ARENAS = 131072

# One size class, as a row of zsmalloc's debugfs `classes` file.
ctypedef struct zpool_class_stat:
    uint32_t index             # (size - 32) / 16, the kernel's class number
    uint32_t size
    uint32_t pages_per_zspage
    size_t obj_allocated
    size_t obj_used
    size_t pages_used
    size_t freeable            # pages compaction could give back now

# A kept pool as this process reads it: in place (adoption) or mapped elsewhere, read-only
# (copying, where the old address is taken here). Pointers stored in the pool are the old
# process's: one is followed only into [lo, hi), its arenas in those addresses, and read at
# its value plus delta. Filled by the backend's check; pages_tags_free(&k.tags) frees it.
ctypedef struct zpool_kept:
    char* root                # the pool's root, as mapped now
    ssize_t delta             # as mapped now, less where the old process had it
    const char* lo
    const char* hi
    pages_tags tags           # the descriptor runs the check found (zramfs.zpool._pages)

# [p, p + n) lies within [lo, hi): a kept pointer is checked so before it is followed.
cdef inline bint zpool_within(const void* p, size_t n, const char* lo,
                              const char* hi) noexcept nogil:
    cdef const char* q = <const char*>p
    return q >= lo and q + n <= hi and q + n >= q

# Where a pointer the old process stored is mapped now (once checked).
cdef inline char* zpool_kept_at(const zpool_kept* k, const void* p) noexcept nogil:
    return <char*>p + k.delta

ctypedef struct zpool_driver:
    const char* name
    # Creation in `region` (the caller's, which outlives the pool) and destruction; destroy
    # must not race with anything else on the pool.
    void* (*create)(int max_pages_per_zspage, zregion* region) noexcept nogil
    void (*destroy)(void* pool) noexcept nogil
    # Object life: handle 0 means failure (size out of range or no memory).
    uint64_t (*malloc)(void* pool, size_t size) noexcept nogil
    void (*free)(void* pool, uint64_t handle) noexcept nogil
    # map pins the object and returns its address; unmap unpins. Between the two the caller may
    # read or write up to obj_size(handle) bytes.
    char* (*map)(void* pool, uint64_t handle) noexcept nogil
    void (*unmap)(void* pool, uint64_t handle) noexcept nogil
    size_t (*obj_size)(void* pool, uint64_t handle) noexcept nogil
    # Statistics and maintenance. compact returns the pages it freed; pages_compacted is the
    # pool's running total of those, whoever called compact (mm_stat's pages_compacted).
    size_t (*total_pages)(void* pool) noexcept nogil
    size_t (*compact)(void* pool) noexcept nogil
    size_t (*pages_compacted)(void* pool) noexcept nogil
    size_t (*huge_class_size)(void* pool) noexcept nogil
    # The room an object of `size` really takes (its class's size): recompression keeps a
    # result only if it lands in a smaller class.
    size_t (*class_size)(void* pool, size_t size) noexcept nogil
    # Fills up to `max` rows, smallest class first, and returns how many classes there are
    # (0 for a backend without classes): call with max 0 to size `out`. Takes each class's
    # lock in turn, so a row is consistent but rows are not a snapshot of the whole pool.
    int (*class_stats)(void* pool, zpool_class_stat* out, int max) noexcept nogil
    # Live restart, the one reader of kept memory (zpool_kept). check: the structure of the
    # pool a process before this one left in `region`, mapped where that process had it
    # (`delta` 0) or `delta` bytes off; NULL and *k ready, or why not (and nothing to release).
    # locate: where the live object of `handle` is, as mapped now, if it has `size` bytes or
    # more, else NULL. Both read only and take no lock: the pool is nobody's any more.
    const char* (*check)(zpool_kept* k, const zregion* region, ssize_t delta) noexcept nogil
    const char* (*locate)(const zpool_kept* k, uint64_t handle, size_t size) noexcept nogil
    # Live restart in place: the pool a process before this one left in `region`, mapped again
    # at its old address, checked as above and made this process's, keeping the objects
    # `handles` (the slot table's, repeats allowed) name and freeing the rest. NULL and *pool
    # set, or why not, with the pool unchanged.
    const char* (*adopt)(zregion* region, const uint64_t* handles, size_t n,
                         void** pool) noexcept nogil
