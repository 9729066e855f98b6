/* The words the data path's modules share: the page size, relaxed atomics, a slot's word
   (its flags and its lock) and a disk's live reference word. One copy of each, here. */
#ifndef ZRAMFS_ZRAM_H
#define ZRAMFS_ZRAM_H
#include <stdint.h>
#include <sched.h>

#define ZRAM_PAGE_SHIFT 12
#define ZRAM_PAGE_SIZE (1u << ZRAM_PAGE_SHIFT)

/* Relaxed atomics: counters and page counts that threads bump without a lock, where only the
   value matters, not its ordering. */
#define ZA_LOAD(p) __atomic_load_n((p), __ATOMIC_RELAXED)
#define ZA_STORE(p, v) __atomic_store_n((p), (v), __ATOMIC_RELAXED)
#define ZA_ADD(p, v) __atomic_fetch_add((p), (v), __ATOMIC_RELAXED)
#define ZA_SUB(p, v) __atomic_fetch_sub((p), (v), __ATOMIC_RELAXED)
#define ZA_OR(p, v) __atomic_fetch_or((p), (v), __ATOMIC_RELAXED)

static inline void za_max(size_t* p, size_t v) {
    size_t old = __atomic_load_n(p, __ATOMIC_RELAXED);
    while (v > old && !__atomic_compare_exchange_n(p, &old, v, 1, __ATOMIC_RELAXED,
                                                   __ATOMIC_RELAXED)) {}
}
static inline void za_min(size_t* p, size_t v) {
    size_t old = __atomic_load_n(p, __ATOMIC_RELAXED);
    while (v < old && !__atomic_compare_exchange_n(p, &old, v, 1, __ATOMIC_RELAXED,
                                                   __ATOMIC_RELAXED)) {}
}

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
#define ZRAM_DEDUP (1u << 10)          /* the object is reference counted (zramfs._dedup): it
                                          may be shared, its count is the number of slots
                                          with this bit and its handle */

static inline void zram_slot_lock(uint32_t* flags) {
    unsigned spins = 0;
    while (__atomic_fetch_or(flags, ZRAM_LOCK, __ATOMIC_ACQUIRE) & ZRAM_LOCK) {
        if (++spins > 64) sched_yield();
#if defined(__x86_64__) || defined(__i386__)
        else __builtin_ia32_pause();
#endif
    }
}
static inline void zram_slot_unlock(uint32_t* flags) {
    __atomic_fetch_and(flags, ~ZRAM_LOCK, __ATOMIC_RELEASE);
}
static inline int zram_slot_trylock(uint32_t* flags) {
    return !(__atomic_fetch_or(flags, ZRAM_LOCK, __ATOMIC_ACQUIRE) & ZRAM_LOCK);
}
static inline uint32_t zram_slot_flags(uint32_t* flags) {
    return __atomic_load_n(flags, __ATOMIC_RELAXED) & ~ZRAM_LOCK;
}
/* Slot lock held. */
static inline void zram_slot_set_flags(uint32_t* flags, uint32_t value) {
    __atomic_store_n(flags, value | ZRAM_LOCK, __ATOMIC_RELAXED);
}
/* Clears hint bits (the eviction clock's "accessed") without the lock: losing the race to the
   lock holder only means a page keeps its second chance. */
static inline void zram_slot_clear(uint32_t* flags, uint32_t bits) {
    __atomic_fetch_and(flags, ~bits, __ATOMIC_RELAXED);
}

/* A disk's state word: ZRAM_LIVE while its meta may be used, and below it the number of
   references held on the meta (requests and maintenance alike). Reset clears LIVE, then waits
   for the count to reach 0 before it frees (docs/design.md, hazard 1). */
#define ZRAM_LIVE ((int64_t)1 << 62)
static inline int zram_get(int64_t* state) {
    int64_t s = __atomic_load_n(state, __ATOMIC_RELAXED);
    do {
        if (!(s & ZRAM_LIVE)) return 0;
    } while (!__atomic_compare_exchange_n(state, &s, s + 1, 1, __ATOMIC_ACQUIRE,
                                          __ATOMIC_RELAXED));
    return 1;
}
static inline void zram_put(int64_t* state) {
    __atomic_fetch_sub(state, 1, __ATOMIC_RELEASE);
}
static inline void zram_set_live(int64_t* state, int live) {
    if (live) __atomic_fetch_or(state, ZRAM_LIVE, __ATOMIC_SEQ_CST);
    else __atomic_fetch_and(state, ~ZRAM_LIVE, __ATOMIC_SEQ_CST);
}
#endif
