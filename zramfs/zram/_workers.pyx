# cython: language_level=3
"""The compression workers: a job queue and the threads that help with large requests.

A 1 MiB request is 256 pages; served page by page on one thread it uses one core. Its pages
are shared out instead: the request's own thread and every idle worker take chunks of
JOB_CHUNK pages until none are left, so two cores compress one request. The queue is newest
first, so workers help the latest request. Everything here runs without the GIL; the
workers' lock guards the queue and each job's helper count, nothing else.
"""
import os

from libc.stdint cimport uint64_t
from libc.stdlib cimport calloc, free

from zramfs.zcomp._zcomp cimport zcomp, zstream, zcomp_private_stream
from zramfs.pthread cimport (pthread_cond_broadcast, pthread_cond_destroy, pthread_cond_init,
                            pthread_cond_wait, pthread_join, pthread_mutex_destroy,
                            pthread_mutex_init, pthread_mutex_lock, pthread_mutex_unlock,
                            zram_thread_start)
from zramfs.common cimport (za_add, za_load, za_load_int, za_load_ptr, za_min, za_store_int,
                            za_store_ptr, zram_now_ns)

cdef extern from "<sched.h>" nogil:
    int sched_yield() nogil
    size_t SIZE_MAX

cdef enum:
    # A worker looks for the next job this long before it sleeps. Fresh 2 GiB 1M QD1 writes
    # here: 300 us 590-820 MB/s, 100 us 820-920 MB/s and less daemon CPU (50-150 us alike,
    # 2 ms worse): between two QD1 requests fio fills its next buffer for longer than that,
    # and a worker spinning past it only takes CPU from fio.
    SPIN_NS = 100000


cdef void _job_work(zjob* j, zstream* st) noexcept nogil:
    """Takes chunks of the job until none are left. Any thread, no lock held."""
    cdef size_t c, unit, last
    cdef size_t nr_chunks = (j.count + JOB_CHUNK - 1) // JOB_CHUNK
    while True:
        c = za_add(&j.next_chunk, 1)
        if c >= nr_chunks:
            return
        unit = j.first + c * JOB_CHUNK
        last = min(unit + JOB_CHUNK, j.first + j.count)
        while unit < last:
            if j.fn(j.arg, unit, st):
                za_min(&j.first_bad, unit)
            unit += 1


cdef void _job_unqueue(zworkers* w, zjob* j) noexcept nogil:
    """Workers' lock held; j may already be out of the queue."""
    cdef zjob** p = &w.queue
    while p[0] != NULL:
        if p[0] == j:
            p[0] = j.next
            return
        p = &p[0].next


cdef void _worker_wait(zworkers* w) noexcept nogil:
    """Until there is a job or the workers stop; workers' lock held on entry and exit.
    A large request usually follows another (a sequential stream), and waking a sleeping
    thread costs tens of microseconds here (an idle vCPU halts): so first spin a while,
    yielding the CPU to anyone runnable, then sleep."""
    cdef uint64_t until
    if w.queue != NULL or w.stop:
        return
    pthread_mutex_unlock(&w.lock)
    until = zram_now_ns() + SPIN_NS
    while za_load_ptr(<void**>&w.queue) == NULL and not za_load_int(&w.stop) and zram_now_ns() < until:
        sched_yield()
    pthread_mutex_lock(&w.lock)
    while not w.stop and w.queue == NULL:
        w.sleepers += 1
        pthread_cond_wait(&w.wake, &w.lock)
        w.sleepers -= 1


cdef void* _worker_main(void* arg) noexcept nogil:
    cdef zworker* me = <zworker*>arg
    cdef zworkers* w = me.pool
    cdef zjob* j
    pthread_mutex_lock(&w.lock)
    while True:
        _worker_wait(w)
        if w.stop:
            break
        j = w.queue
        if za_load(&j.next_chunk) * JOB_CHUNK >= j.count:
            _job_unqueue(w, j)        # all taken: nothing for a worker to join
            continue
        j.helpers += 1
        pthread_mutex_unlock(&w.lock)
        _job_work(j, me.stream)
        pthread_mutex_lock(&w.lock)
        _job_unqueue(w, j)
        j.helpers -= 1
        if j.helpers == 0:
            pthread_cond_broadcast(&w.left)
    pthread_mutex_unlock(&w.lock)
    return NULL


cdef size_t zworkers_run(zworkers* w, zjob* j, zstream* st) noexcept nogil:
    cdef size_t unit
    j.next_chunk = 0
    j.first_bad = SIZE_MAX
    j.helpers = 0
    j.next = NULL
    if w == NULL or j.count < JOB_MIN_UNITS:
        for unit in range(j.first, j.first + j.count):
            if j.fn(j.arg, unit, st):
                return unit           # served inline: stop at the first failure
        return SIZE_MAX
    pthread_mutex_lock(&w.lock)
    j.next = w.queue
    za_store_ptr(<void**>&w.queue, j)
    if w.sleepers:
        pthread_cond_broadcast(&w.wake)
    pthread_mutex_unlock(&w.lock)
    _job_work(j, st)                  # this thread works too, so a job never waits for a worker
    pthread_mutex_lock(&w.lock)
    _job_unqueue(w, j)
    while j.helpers:                  # j lives on the caller's stack: wait until no worker touches it
        pthread_cond_wait(&w.left, &w.lock)
    pthread_mutex_unlock(&w.lock)
    return za_load(&j.first_bad)


cdef zworkers* zworkers_start(zcomp* comp, int nr) noexcept nogil:
    cdef zworkers* w = <zworkers*>calloc(1, sizeof(zworkers))
    cdef int i
    if w == NULL:
        return NULL
    pthread_mutex_init(&w.lock, NULL)
    pthread_cond_init(&w.wake, NULL)
    pthread_cond_init(&w.left, NULL)
    w.workers = <zworker*>calloc(nr, sizeof(zworker))
    if w.workers == NULL:
        zworkers_stop(w)
        return NULL
    w.nr = nr
    for i in range(nr):
        w.workers[i].pool = w
        w.workers[i].stream = zcomp_private_stream(comp, i)
        if zram_thread_start(&w.workers[i].thread, _worker_main, &w.workers[i]) != 0:
            zworkers_stop(w)
            return NULL
        w.workers[i].started = 1
    return w


cdef void zworkers_stop(zworkers* w) noexcept nogil:
    cdef int i
    pthread_mutex_lock(&w.lock)
    za_store_int(&w.stop, 1)        # also read unlocked, by a spinning worker
    pthread_cond_broadcast(&w.wake)
    pthread_mutex_unlock(&w.lock)
    for i in range(w.nr):
        if w.workers[i].started:
            pthread_join(w.workers[i].thread, NULL)
    free(w.workers)
    pthread_cond_destroy(&w.left)
    pthread_cond_destroy(&w.wake)
    pthread_mutex_destroy(&w.lock)
    free(w)


def default_workers() -> int:
    """Compression workers per device: with the request's own thread, one per core."""
    return (os.cpu_count() or 1) - 1
