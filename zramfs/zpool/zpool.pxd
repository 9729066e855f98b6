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

from zramfs.zpool._pages cimport zregion

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
    # Live restart: where the object of `handle` (`size` bytes) is in a pool a process before
    # this one left, or NULL. `old` is that pool's root as mapped now; pointers stored in it
    # are the old process's, `delta` bytes off; nothing outside [lo, hi) is trusted or read.
    # Reads only, no locks: the old pool is nobody's any more.
    const char* (*locate)(const char* old, ssize_t delta, const char* lo, const char* hi,
                          uint64_t handle, size_t size) noexcept nogil
    # Live restart in place: the pool a process before this one left in `region`, mapped
    # again at its old address, made this process's, keeping the objects `handles` (the
    # slot table's, repeats allowed) name and freeing the rest. NULL and *pool set, or why
    # not, with the pool's data unchanged. NULL for a backend that cannot (callers copy the
    # objects out with locate instead).
    const char* (*adopt)(zregion* region, const uint64_t* handles, size_t n,
                         void** pool) noexcept nogil
