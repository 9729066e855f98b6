# The Python face of a pool, for the device (cimport zramfs.zpool._alloc). The device keeps a `Pool`
# as the owner of the pool's life and reaches the pool itself through `driver` and `impl`,
# without the GIL (the table's contract is in zramfs/zpool.pxd):
#
#     cdef Pool pool = Pool("zsmalloc", "zram0")
#     with nogil:
#         h = pool.driver.malloc(pool.impl, n)
#
# driver and impl are set by __init__ and stay until destroy, which sets impl to NULL; the
# owner must see that no C caller is still using impl by then.
from libc.stdint cimport uint32_t, uint64_t
from zramfs.zpool.zpool cimport zpool_driver, zpool_kept
from zramfs.zpool._pages cimport zregion

# The header at offset 0 of a pool's region: what a later daemon checks before it trusts the
# rest (PoolImage).
ctypedef struct zpool_header:
    char magic[16]
    uint32_t version
    uint32_t pointer_size
    char backend[16]
    uint64_t base              # where the process that made the pool mapped the region
    uint64_t size


cdef class Pool:
    cdef const zpool_driver* driver
    cdef void* impl
    cdef zregion region
    cdef readonly str name
    cdef readonly str backend
    cdef size_t _compacted_at_destroy   # the driver's pages_compacted, read as impl went
    cdef object _pin

    cdef int _check_open(self) except -1


# A pool a process before this one left in its region (a memfd kept across a restart), for
# copying out where its old address is taken here: mapped read-only elsewhere, its header
# and structure checked (the backend's check, as adoption in place checks it); `locate` finds
# an object from its handle. locate may run without the GIL, not while close runs.
cdef class PoolImage:
    cdef zregion region
    cdef const zpool_driver* driver
    cdef zpool_kept kept
    cdef readonly str backend
    cdef const char* locate(self, uint64_t handle, size_t size) noexcept nogil


# Live restart in place: the pool kept in memfd `fd`, mapped again where the process that made
# it had it and made this one's, with the objects `handles` name (the slot table's, repeats
# allowed) and no other (zpool_driver.adopt). Raises PoolImageError for a pool that cannot be
# adopted (damaged, another format), PoolInPlaceError for one that must be copied instead
# (its address is taken in this process).
cdef Pool pool_adopt(int fd, const uint64_t* handles, size_t n, str name)
