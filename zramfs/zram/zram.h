/* A device's shared words, as zram_drv.h has them: a slot's word (its flags and its lock) and a
   disk's live reference word. Callable without the GIL; the lock rules are at each function. */
#ifndef ZRAMFS_ZRAM_H
#define ZRAMFS_ZRAM_H
#include <sched.h>
#include "common.h"

/* A slot's flags word, as zram's table entry: flag bits below, the slot lock in the top bit.
   Flags other than the lock change only under the lock, but atomically, since waiters set the
   lock bit on the same word. */
#define ZRAM_LOCK (1u << 31)
#define ZRAM_SAME (1u << 0)            /* handle holds the repeated word; no object */
#define ZRAM_HUGE (1u << 1)            /* the object is the raw page */
#define ZRAM_WB (1u << 2)              /* written back: handle is the backing device's block */
#define ZRAM_IDLE (1u << 3)            /* not accessed since marked idle */
#define ZRAM_INCOMPRESSIBLE (1u << 4)  /* no recompression algorithm could shrink it */
#define ZRAM_ACCESSED (1u << 5)        /* accessed since the eviction clock last passed */
#define ZRAM_PRIO_SHIFT 6              /* 2 bits: the priority of the algorithm that compressed it */
#define ZRAM_PRIO_MASK (3u << ZRAM_PRIO_SHIFT)
#define ZRAM_WB_COMPRESSED (1u << 8)   /* written back as it was stored: decompress on read */
#define ZRAM_UNDER_WB (1u << 9)        /* a batched writeback of it is in flight; any change
                                          of the slot's content clears it */
#define ZRAM_DEDUP (1u << 10)          /* the object is reference counted (zramfs.zram._dedup): it
                                          may be shared, its count is the number of slots
                                          with this bit and its handle */

static inline void zram_slot_lock(uint32_t* flags) {
    unsigned spins = 0;
    while (ZA_OR_ACQ(flags, ZRAM_LOCK) & ZRAM_LOCK) {
        if (++spins > 64) sched_yield();
#if defined(__x86_64__) || defined(__i386__)
        else __builtin_ia32_pause();
#endif
    }
}
static inline void zram_slot_unlock(uint32_t* flags) {
    ZA_AND_REL(flags, ~ZRAM_LOCK);
}
static inline int zram_slot_trylock(uint32_t* flags) {
    return !(ZA_OR_ACQ(flags, ZRAM_LOCK) & ZRAM_LOCK);
}
static inline uint32_t zram_slot_flags(uint32_t* flags) {
    return ZA_LOAD(flags) & ~ZRAM_LOCK;
}
/* Slot lock held. */
static inline void zram_slot_set_flags(uint32_t* flags, uint32_t value) {
    ZA_STORE(flags, value | ZRAM_LOCK);
}
/* Clears hint bits (the eviction clock's "accessed") without the lock: losing the race to the
   lock holder only means a page keeps its second chance. */
static inline void zram_slot_clear(uint32_t* flags, uint32_t bits) {
    ZA_AND(flags, ~bits);
}

/* A disk's state word: ZRAM_LIVE while its meta may be used, and below it the number of
   references held on the meta (requests and maintenance alike). Reset clears LIVE, then waits
   for the count to reach 0 before it frees (docs/design.md, hazard 1). */
#define ZRAM_LIVE ((int64_t)1 << 62)
static inline int zram_get(int64_t* state) {
    int64_t s = ZA_LOAD(state);
    do {
        if (!(s & ZRAM_LIVE)) return 0;
    } while (!ZA_CAS_ACQ(state, &s, s + 1));
    return 1;
}
static inline void zram_put(int64_t* state) {
    ZA_SUB_REL(state, 1);
}
static inline void zram_set_live(int64_t* state, int live) {
    if (live) ZA_OR_SEQ(state, ZRAM_LIVE);
    else ZA_AND_SEQ(state, ~ZRAM_LIVE);
}
#endif
