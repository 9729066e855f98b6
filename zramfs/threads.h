/* The data path's own threads (compression workers, the pool's page populator): all signals
   blocked, since they are the main thread's business, and a small stack, since nothing deep
   runs there and under mlockall a big one would be locked. */
#ifndef ZRAMFS_THREADS_H
#define ZRAMFS_THREADS_H
#include <pthread.h>
#include <signal.h>

static int zram_thread_start_stack(pthread_t* t, void* (*fn)(void*), void* arg,
                                   size_t stack) {
    pthread_attr_t attr;
    sigset_t all, old;
    int rc;
    pthread_attr_init(&attr);
    pthread_attr_setstacksize(&attr, stack);
    sigfillset(&all);
    pthread_sigmask(SIG_SETMASK, &all, &old);
    rc = pthread_create(t, &attr, fn, arg);
    pthread_sigmask(SIG_SETMASK, &old, NULL);
    pthread_attr_destroy(&attr);
    return rc;
}
static int zram_thread_start(pthread_t* t, void* (*fn)(void*), void* arg) {
    return zram_thread_start_stack(t, fn, arg, 512 * 1024);
}
#endif
