# What every C part shares (common.h): the page size, the clock and the atomics; and
# posix_memalign, which Cython's libc does not declare. All callable without the GIL.
from libc.stdint cimport int64_t, uint32_t, uint64_t

cdef extern from "common.h" nogil:
    enum:
        PAGE_SHIFT "ZRAM_PAGE_SHIFT"
        PAGE_SIZE "ZRAM_PAGE_SIZE"
    # Relaxed: counters and page counts, where only the value matters.
    size_t za_load "ZA_LOAD"(size_t*)
    int64_t za_load64 "ZA_LOAD"(int64_t*)
    void za_store "ZA_STORE"(size_t*, size_t)
    int za_load_int "ZA_LOAD"(int*)
    void za_store_int "ZA_STORE"(int*, int)
    size_t za_add "ZA_ADD"(size_t*, size_t)
    size_t za_sub "ZA_SUB"(size_t*, size_t)
    size_t za_or "ZA_OR"(size_t*, size_t)
    unsigned int za_add_uint "ZA_ADD"(unsigned int*, unsigned int)
    void za_max(size_t* p, size_t v)
    void za_min(size_t* p, size_t v)
    bint za_take(size_t* p)             # one unit taken unless the count is 0
    void za_first(int* p, int v)        # stored only where 0 is
    # Acquire / release: a pointer or word that publishes what it points to or guards.
    void* za_load_ptr "ZA_LOAD_ACQ"(void**)
    void za_store_ptr "ZA_STORE_REL"(void**, void*)
    uint32_t za_load32 "ZA_LOAD_ACQ"(uint32_t*)
    void za_store32 "ZA_STORE_REL"(uint32_t*, uint32_t)

    uint64_t zram_now_ns()
    uint32_t zram_now_s()

cdef extern from "<stdlib.h>" nogil:
    int posix_memalign(void** p, size_t align, size_t size)
