# The data path's shared words (zram.h): page size, relaxed atomics, the slot word and its lock,
# the disk's live reference word; and posix_memalign, which Cython's libc does not declare.
# All callable without the GIL.
from libc.stdint cimport int64_t, uint32_t

cdef extern from "zram.h" nogil:
    enum:
        PAGE_SHIFT "ZRAM_PAGE_SHIFT"
        PAGE_SIZE "ZRAM_PAGE_SIZE"
    size_t za_load "ZA_LOAD"(size_t*)
    int64_t za_load64 "ZA_LOAD"(int64_t*)
    void za_store "ZA_STORE"(size_t*, size_t)
    int za_load_int "ZA_LOAD"(int*)
    void za_store_int "ZA_STORE"(int*, int)
    void* za_load_ptr "ZA_LOAD"(void**)
    void za_store_ptr "ZA_STORE"(void**, void*)
    size_t za_add "ZA_ADD"(size_t*, size_t)
    size_t za_sub "ZA_SUB"(size_t*, size_t)
    size_t za_or "ZA_OR"(size_t*, size_t)
    void za_max(size_t* p, size_t v)
    void za_min(size_t* p, size_t v)

    enum:
        ZRAM_LOCK
        ZRAM_SAME
        ZRAM_HUGE
        ZRAM_WB
        ZRAM_IDLE
        ZRAM_INCOMPRESSIBLE
        ZRAM_ACCESSED
        ZRAM_PRIO_SHIFT
        ZRAM_PRIO_MASK
        ZRAM_WB_COMPRESSED
        ZRAM_UNDER_WB
        ZRAM_DEDUP
    void zram_slot_lock(uint32_t* flags)
    void zram_slot_unlock(uint32_t* flags)
    int zram_slot_trylock(uint32_t* flags)
    uint32_t zram_slot_flags(uint32_t* flags)
    void zram_slot_set_flags(uint32_t* flags, uint32_t value)
    void zram_slot_clear(uint32_t* flags, uint32_t bits)

    int64_t ZRAM_LIVE
    int zram_get(int64_t* state)
    void zram_put(int64_t* state)
    void zram_set_live(int64_t* state, int live)

cdef extern from "<stdlib.h>" nogil:
    int posix_memalign(void** p, size_t align, size_t size)
