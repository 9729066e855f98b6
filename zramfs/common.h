/* What every C part of zramfs shares: the page size, the clock, and every atomic access to a
   word threads share (the one place `__atomic_` is written). Callable anywhere, GIL or not. */
#ifndef ZRAMFS_COMMON_H
#define ZRAMFS_COMMON_H
#include <stdint.h>
#include <stddef.h>
#include <time.h>

#define ZRAM_PAGE_SHIFT 12
#define ZRAM_PAGE_SIZE (1u << ZRAM_PAGE_SHIFT)

/* Relaxed atomics: counters and page counts that threads bump without a lock, where only the
   value matters, not its ordering. */
#define ZA_LOAD(p) __atomic_load_n((p), __ATOMIC_RELAXED)
#define ZA_STORE(p, v) __atomic_store_n((p), (v), __ATOMIC_RELAXED)
#define ZA_ADD(p, v) __atomic_fetch_add((p), (v), __ATOMIC_RELAXED)
#define ZA_SUB(p, v) __atomic_fetch_sub((p), (v), __ATOMIC_RELAXED)
#define ZA_OR(p, v) __atomic_fetch_or((p), (v), __ATOMIC_RELAXED)
#define ZA_AND(p, v) __atomic_fetch_and((p), (v), __ATOMIC_RELAXED)

/* Ordered atomics: a pointer or word that publishes what it points to or guards (release on
   store, acquire on load), and the read-modify-writes a lock word needs. */
#define ZA_LOAD_ACQ(p) __atomic_load_n((p), __ATOMIC_ACQUIRE)
#define ZA_STORE_REL(p, v) __atomic_store_n((p), (v), __ATOMIC_RELEASE)
#define ZA_OR_ACQ(p, v) __atomic_fetch_or((p), (v), __ATOMIC_ACQUIRE)
#define ZA_AND_REL(p, v) __atomic_fetch_and((p), (v), __ATOMIC_RELEASE)
#define ZA_SUB_REL(p, v) __atomic_fetch_sub((p), (v), __ATOMIC_RELEASE)
#define ZA_OR_SEQ(p, v) __atomic_fetch_or((p), (v), __ATOMIC_SEQ_CST)
#define ZA_AND_SEQ(p, v) __atomic_fetch_and((p), (v), __ATOMIC_SEQ_CST)
/* Compare-and-swap (weak): on failure *old gets the current value. */
#define ZA_CAS(p, old, v) \
    __atomic_compare_exchange_n((p), (old), (v), 1, __ATOMIC_RELAXED, __ATOMIC_RELAXED)
#define ZA_CAS_ACQ(p, old, v) \
    __atomic_compare_exchange_n((p), (old), (v), 1, __ATOMIC_ACQUIRE, __ATOMIC_RELAXED)

static inline void za_max(size_t* p, size_t v) {
    size_t old = ZA_LOAD(p);
    while (v > old && !ZA_CAS(p, &old, v)) {}
}
static inline void za_min(size_t* p, size_t v) {
    size_t old = ZA_LOAD(p);
    while (v < old && !ZA_CAS(p, &old, v)) {}
}

/* One unit taken from a count, unless it is spent: true when taken. */
static inline int za_take(size_t* p) {
    size_t old = ZA_LOAD(p);
    while (old && !ZA_CAS(p, &old, old - 1)) {}
    return old != 0;
}
/* `v` stored where nothing was yet (0): the first of several threads' errors is kept. */
static inline void za_first(int* p, int v) {
    int old = 0;
    while (!ZA_CAS(p, &old, v) && old == 0) {}
}

/* The clock: CLOCK_MONOTONIC in nanoseconds (latencies, the workers' spin), and the coarse
   one in seconds (a slot's last access, as zram's ac_time). */
static inline uint64_t zram_now_ns(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return (uint64_t)t.tv_sec * 1000000000u + t.tv_nsec;
}
static inline uint32_t zram_now_s(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC_COARSE, &t);
    return (uint32_t)t.tv_sec;
}
#endif
