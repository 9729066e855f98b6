# The backing device of writeback, for the device's data path (cimport zramfs.zram._backing).
#
# Space is managed in 4 KiB blocks with a free bitmap. All of these run without the GIL;
# read and write do their own I/O (pread/pwrite, with O_DIRECT where the file allows it);
# batches go through an io_uring of their caller's own (backing_ring_new).

from zramfs.pthread cimport pthread_mutex_t

ctypedef struct zbacking:
    int fd
    bint direct            # opened with O_DIRECT: buffers must be 4 KiB aligned
    size_t nr_blocks
    unsigned long long* bitmap
    size_t hint            # where the next free-block search starts
    pthread_mutex_t lock   # guards bitmap and hint only
    char* bounce           # one aligned page per caller is the caller's; this one is for tests
    # bd_stat, in 4 KiB units (atomic)
    size_t bd_count
    size_t bd_reads
    size_t bd_writes

cdef long backing_alloc(zbacking* b) noexcept nogil          # a free block, or -1 when full
cdef void backing_free(zbacking* b, size_t block) noexcept nogil
# Marks `block` in use (a restarted daemon's slot table says it is); False if out of range or
# already in use.
cdef bint backing_take(zbacking* b, size_t block) noexcept nogil
# Whole pages only; `page` must be 4 KiB aligned when b.direct. 0 or -errno.
cdef int backing_read(zbacking* b, size_t block, char* page) noexcept nogil
cdef int backing_write(zbacking* b, size_t block, const char* page) noexcept nogil
cdef extern from *:
    """
    #define BK_MAX_BATCH 1024
    """
    enum:
        BK_MAX_BATCH      # the most writes backing_write_batch has in flight at once

# An io_uring for one caller's batches (one thread at a time), or NULL where io_uring is
# unavailable (no io_uring, kernel.io_uring_disabled, no memory): its batches then go by pwrite.
cdef void* backing_ring_new() noexcept nogil
cdef void backing_ring_free(void* ring) noexcept nogil
# `n` (<= BK_MAX_BATCH) pages to their blocks, all writes in flight at once (through `ring`);
# results[i] gets 0 or -errno for pages[i]. Returns how many succeeded.
cdef size_t backing_write_batch(zbacking* b, void* ring, size_t n, const size_t* blocks,
                                char** pages, int* results) noexcept nogil


cdef class Backing:
    cdef zbacking* b
    cdef readonly str path
