# Relaxed atomic counters (atomics.h), callable without the GIL.
from libc.stdint cimport int64_t

cdef extern from "atomics.h" nogil:
    size_t za_load "ZA_LOAD"(size_t*)
    int64_t za_load64 "ZA_LOAD"(int64_t*)
    size_t za_add "ZA_ADD"(size_t*, size_t)
    size_t za_sub "ZA_SUB"(size_t*, size_t)
