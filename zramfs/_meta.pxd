# A device's data path, for the FUSE layer (cimport zramfs._meta).
#
# The FUSE layer holds the `zdisk*` of an open device file and calls zdisk_read/write/fallocate
# without the GIL from its worker threads. Each returns bytes done (0 for fallocate) or a
# negative errno. A request first takes a reference on the disk's meta, only while the meta is
# live (hazard 1); reset clears LIVE, waits for the in-flight count to drain, then frees.
from libc.stdint cimport uint32_t, uint64_t, int64_t
from posix.types cimport off_t

from zramfs.zpool cimport zpool_driver
from zramfs._backing cimport zbacking
from zramfs._zcomp cimport zcomp, zstream

from zramfs.pthread cimport pthread_cond_t, pthread_mutex_t, pthread_t

cdef struct zworkers

ctypedef struct zslot:
    uint64_t handle        # the object; for a same-filled page, the repeated word
    uint32_t flags         # ZS_* bits, the lock bit among them (atomic)
    uint32_t size          # compressed size, 0 for an empty or same-filled page

ctypedef struct zmeta:
    zslot* table
    size_t nr_pages
    const zpool_driver* driver
    void* pool
    size_t huge_size       # compressed sizes from here up are stored raw
    zcomp* comp
    size_t limit_pages     # mem_limit, 0 = none
    zworkers* workers      # NULL: every request is served inline
    # tiering (zram's writeback, idle, recompression; and zswap-style eviction)
    uint32_t* ac_time      # per slot: last access, CLOCK_MONOTONIC_COARSE seconds
    zbacking* backing      # NULL: no backing device
    zcomp* secondary[4]    # recompression algorithms by priority 1..3; [0] unused
    int wb_limit_enable
    size_t wb_limit        # pages still allowed to be written back, while enabled (atomic)
    int evict_enable       # a write over mem_limit writes LRU pages back instead of failing
    size_t evicted         # pages evicted that way (atomic)
    size_t clock_hand      # eviction's CLOCK position (evict_lock)
    pthread_mutex_t evict_lock
    zstream* evict_stream  # a private stream: eviction must not wait for a shared one
    char* evict_page       # a page-aligned page, for eviction (evict_lock)
    # mm_stat, io_stat: atomic counters
    size_t compr_data_size
    size_t pages_stored
    size_t max_used_pages
    size_t same_pages
    size_t huge_pages
    size_t huge_pages_since
    size_t failed_reads
    size_t failed_writes
    size_t invalid_io
    size_t notify_free

# A large request's pages, shared between the thread that serves it and the compression
# workers: each takes chunks of pages by an atomic counter until none are left.
cdef struct zjob:
    zmeta* meta
    int write
    char* buf
    size_t off                 # the request's byte range
    size_t size
    size_t first_page
    size_t nr_chunks
    size_t next_chunk          # atomic: the next chunk to take
    size_t first_bad           # atomic: the lowest failed page, SIZE_MAX if none
    int helpers                # workers inside the job (workers' lock)
    zjob* next                 # the workers' queue (workers' lock)

cdef struct zworker:
    zworkers* pool
    zstream* stream            # the worker's own (a private stream of the compressor)
    pthread_t thread
    int started

# Threads made with the meta (hazard 4: none are started on the request path); they run no
# Python and never take the GIL.
cdef struct zworkers:
    pthread_mutex_t lock
    pthread_cond_t wake        # workers wait here for a job
    pthread_cond_t left        # a request waits here for the workers to leave its job
    zjob* queue
    int stop
    int sleepers               # workers in pthread_cond_wait (workers' lock)
    int nr
    zworker* workers

ctypedef struct zdisk:
    int64_t state          # ZD_LIVE | number of requests in flight
    zmeta* meta
    # the block layer's stat file: lives as long as the disk, across resets
    size_t ios[3]          # read, write, discard requests
    size_t sectors[3]
    size_t ticks_ns[3]

cdef ssize_t zdisk_read(zdisk* disk, char* buf, size_t size, off_t off) noexcept nogil
cdef ssize_t zdisk_write(zdisk* disk, const char* buf, size_t size, off_t off) noexcept nogil
cdef int zdisk_fallocate(zdisk* disk, int mode, off_t off, off_t length) noexcept nogil


cdef class Meta:
    cdef zmeta* m
    cdef readonly object pool
    cdef readonly object compressor
    cdef readonly size_t disksize
    cdef readonly int workers
    cdef readonly object backing
    cdef readonly dict secondary


cdef class Disk:
    cdef zdisk* disk
    cdef readonly Meta meta
