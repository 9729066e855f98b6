# A device's shared words (zram.h): the slot word and its lock, the disk's live reference word.
# All callable without the GIL.
from libc.stdint cimport int64_t, uint32_t

cdef extern from "zram/zram.h" nogil:
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
