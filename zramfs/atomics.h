/* Relaxed atomic counters, shared by the data path's modules: statistics and page counts
   that threads bump without a lock, where only the value matters, not its ordering. */
#ifndef ZRAMFS_ATOMICS_H
#define ZRAMFS_ATOMICS_H
#define ZA_LOAD(p) __atomic_load_n((p), __ATOMIC_RELAXED)
#define ZA_ADD(p, v) __atomic_fetch_add((p), (v), __ATOMIC_RELAXED)
#define ZA_SUB(p, v) __atomic_fetch_sub((p), (v), __ATOMIC_RELAXED)
#endif
