# pthread's mutexes, condition variables and threads, for the Cython modules (Cython ships no
# declarations for them). All callable without the GIL.

cdef extern from "<pthread.h>" nogil:
    ctypedef struct pthread_mutex_t:
        pass
    ctypedef struct pthread_cond_t:
        pass
    ctypedef unsigned long pthread_t
    int pthread_mutex_init(pthread_mutex_t*, void*)
    int pthread_mutex_destroy(pthread_mutex_t*)
    int pthread_mutex_lock(pthread_mutex_t*)
    int pthread_mutex_trylock(pthread_mutex_t*)
    int pthread_mutex_unlock(pthread_mutex_t*)
    int pthread_cond_init(pthread_cond_t*, void*)
    int pthread_cond_destroy(pthread_cond_t*)
    int pthread_cond_wait(pthread_cond_t*, pthread_mutex_t*)
    int pthread_cond_broadcast(pthread_cond_t*)
    int pthread_join(pthread_t, void**)
    int pthread_cond_signal(pthread_cond_t*)

cdef extern from "threads.h" nogil:
    # A data-path thread: signals blocked, small stack. 0 or an errno.
    int zram_thread_start(pthread_t* t, void* (*fn)(void*) noexcept nogil, void* arg)
    # The same with a stack of `stack` bytes (the FUSE workers run Python handlers).
    int zram_thread_start_stack(pthread_t* t, void* (*fn)(void*) noexcept nogil, void* arg,
                                size_t stack)
