# The allocator's C-level interface, for the device's data path (cimport zramfs._alloc).
#
# A pool is reached through its driver, a table of C functions that all run without the GIL:
#
#     cdef Pool pool = Pool("zsmalloc", "zram0")
#     with nogil:
#         h = pool.driver.malloc(pool.impl, n)       # 0 when out of memory
#         dst = pool.driver.map(pool.impl, h)        # pins the object: compaction won't move it
#         memcpy(dst, src, n)
#         pool.driver.unmap(pool.impl, h)
#
# The caller owns its handles: it must not free or map a handle another thread is freeing
# (the device's per-slot lock sees to that). Everything else is the pool's business.
from libc.stdint cimport uint64_t

ctypedef struct zpool_driver:
    const char* name
    # Creation and destruction; destroy must not race with anything else on the pool.
    void* (*create)(int max_pages_per_zspage) noexcept nogil
    void (*destroy)(void* pool) noexcept nogil
    # Object life: handle 0 means failure (size out of range or no memory).
    uint64_t (*malloc)(void* pool, size_t size) noexcept nogil
    void (*free)(void* pool, uint64_t handle) noexcept nogil
    # map pins the object and returns its address; unmap unpins. Between the two the caller may
    # read or write up to obj_size(handle) bytes.
    char* (*map)(void* pool, uint64_t handle) noexcept nogil
    void (*unmap)(void* pool, uint64_t handle) noexcept nogil
    size_t (*obj_size)(void* pool, uint64_t handle) noexcept nogil
    # Statistics and maintenance.
    size_t (*total_pages)(void* pool) noexcept nogil
    size_t (*compact)(void* pool) noexcept nogil
    size_t (*huge_class_size)(void* pool) noexcept nogil
    # The room an object of `size` really takes (its class's size): recompression keeps a
    # result only if it lands in a smaller class.
    size_t (*class_size)(void* pool, size_t size) noexcept nogil


cdef class Pool:
    cdef const zpool_driver* driver
    cdef void* impl
    cdef readonly str name
    cdef readonly str backend
    cdef readonly size_t pages_compacted
    cdef set _live
    cdef object _pin

    cdef int _check_open(self) except -1
    cdef int _check_handle(self, handle) except -1
