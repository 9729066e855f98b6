# Cython view of data_ops.h (see there for the contract).
from libc.stdint cimport uint64_t

cdef extern from "zram/data_ops.h" nogil:
    const char* ZRAMFS_DATA_OPS_CAPSULE

    ctypedef struct zramfs_data_ops:
        ssize_t (*read)(uint64_t fh, char* buf, size_t size, uint64_t off) noexcept nogil
        ssize_t (*write)(uint64_t fh, const char* buf, size_t size, uint64_t off) noexcept nogil
        int (*fallocate)(uint64_t fh, int mode, uint64_t off, uint64_t length) noexcept nogil
