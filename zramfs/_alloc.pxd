# The Python face of a pool, for the device (cimport zramfs._alloc). The device keeps a `Pool`
# as the owner of the pool's life and reaches the pool itself through `driver` and `impl`,
# without the GIL (the table's contract is in zramfs/zpool.pxd):
#
#     cdef Pool pool = Pool("zsmalloc", "zram0")
#     with nogil:
#         h = pool.driver.malloc(pool.impl, n)
#
# driver and impl are set by __init__ and stay until destroy, which sets impl to NULL; the
# owner must see that no C caller is still using impl by then.
from zramfs.zpool cimport zpool_driver


cdef class Pool:
    cdef const zpool_driver* driver
    cdef void* impl
    cdef readonly str name
    cdef readonly str backend
    cdef size_t _compacted_at_destroy   # the driver's pages_compacted, read as impl went
    cdef set _live
    cdef object _pin

    cdef int _check_open(self) except -1
    cdef int _check_handle(self, handle) except -1
