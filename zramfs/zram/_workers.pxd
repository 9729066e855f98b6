# The compression workers, for the device's data path (cimport zramfs.zram._workers).
#
# A large request's pages are a job: the thread that serves the request and the idle workers
# take chunks of its units (pages) by an atomic counter until none are left, each unit done
# by the job's function with the taker's own compression stream:
#
#     j.fn, j.arg, j.first, j.count = page_io, &range, first_page, nr_pages
#     bad = zworkers_run(w, &j, my_stream)      # the lowest failed unit, or SIZE_MAX
#
# Workers are threads made with the device's meta and stopped with it (docs/design.md,
# hazard 4): none is started on the request path. They run no Python and never take the GIL.
from zramfs.zcomp._zcomp cimport zcomp, zstream
from zramfs.pthread cimport pthread_cond_t, pthread_mutex_t, pthread_t

# 0 or -errno for one unit of a job; any thread, no lock held.
ctypedef int (*zjob_fn)(void* arg, size_t unit, zstream* st) noexcept nogil

cdef struct zworkers

cdef struct zjob:
    zjob_fn fn
    void* arg
    size_t first               # the job's units: first .. first + count - 1
    size_t count
    size_t next_chunk          # atomic: the next chunk to take
    size_t first_bad           # atomic: the lowest failed unit, SIZE_MAX if none
    int helpers                # workers inside the job (workers' lock)
    zjob* next                 # the workers' queue (workers' lock)

cdef struct zworker:
    zworkers* pool
    zstream* stream            # the worker's own: a private stream of the compressor
    pthread_t thread
    int started

cdef struct zworkers:
    pthread_mutex_t lock
    pthread_cond_t wake        # workers wait here for a job
    pthread_cond_t left        # a request waits here for the workers to leave its job
    zjob* queue
    int stop
    int sleepers               # workers in pthread_cond_wait (workers' lock)
    int nr
    zworker* workers

# Units a worker takes at a time, and the smallest job worth sharing: waking a worker costs
# more than a few pages' compression.
cdef enum:
    JOB_CHUNK = 4
    JOB_MIN_UNITS = 16

# nr threads, worker i with the compressor's private stream i; NULL on failure.
cdef zworkers* zworkers_start(zcomp* comp, int nr) noexcept nogil
# Stops, joins and frees; no job may be running (after the device's drain).
cdef void zworkers_stop(zworkers* w) noexcept nogil
# Runs the job with the workers' help (or alone when w is NULL or the job is small); returns
# when every unit is done and no worker touches `j` any more. The lowest failed unit, or
# SIZE_MAX. `st` is the caller's own stream.
cdef size_t zworkers_run(zworkers* w, zjob* j, zstream* st) noexcept nogil
