# cython: language_level=3
"""The backing device of writeback: a block device, or a regular file (a zramfs extension;
the kernel takes block devices only), in 4 KiB blocks with a free bitmap.

    backing = Backing("/dev/sdb2", fd)  # or a file: its size is the capacity
    backing.bd_stat()                   # (bd_count, bd_reads, bd_writes), 4 KiB units

The data path reaches it through the C functions in _backing.pxd, without the GIL; the free
bitmap has its own lock. Writeback's batches go through liburing, the library the FUSE rings
already use (one async I/O library in the project), a ring per writeback thread, with O_DIRECT
where the file allows it, and through plain pwrite where io_uring is unavailable (e.g.
kernel.io_uring_disabled).
"""
from __future__ import annotations

import fcntl
import os
import stat


from libc.errno cimport errno, EIO
from libc.stdlib cimport calloc, free
from libc.string cimport memcpy
from cpython.bytes cimport PyBytes_FromStringAndSize, PyBytes_AS_STRING

from zramfs.common cimport PAGE_SIZE, posix_memalign, za_add, za_load, za_sub
from zramfs.pthread cimport (pthread_mutex_destroy, pthread_mutex_init, pthread_mutex_lock,
                            pthread_mutex_unlock)

cdef extern from *:
    """
    #include <unistd.h>
    #include <stdlib.h>
    #include <errno.h>
    #include <stdint.h>
    #include <liburing.h>
    /* liburing, as the FUSE rings (fuse/dev_uring.pxi): one async I/O library in the
       project. Writes of whole pages at their blocks, all in flight at once: with O_DIRECT
       they really overlap; otherwise the kernel does them one by one, which is still correct.
       A ring serves one caller at a time (backing_write_batch's contract). */
    #define BK_STALE UINT64_MAX   /* a write turned into a no-op: no batch counts its CQE */

    /* A ring for one caller's batches, or NULL where io_uring is unavailable. */
    static void* bk_ring_setup(void) {
        struct io_uring* r = malloc(sizeof(*r));
        if (r != NULL && io_uring_queue_init(BK_MAX_BATCH, r, 0) == 0) return r;
        free(r);
        return NULL;
    }
    static void bk_ring_destroy(void* r) {
        if (r != NULL) { io_uring_queue_exit((struct io_uring*)r); free(r); }
    }
    static size_t bk_write_batch(void* ring, int fd, size_t n, const size_t* blocks,
                                 char** pages, int* results) {
        struct io_uring* r = (struct io_uring*)ring;
        struct io_uring_sqe* sqes[BK_MAX_BATCH];
        struct io_uring_cqe* cqe;
        size_t i, queued = 0, left, inflight, done = 0, ok = 0;
        int rc;
        if (n > BK_MAX_BATCH) n = BK_MAX_BATCH;
        for (i = 0; i < n; i++) results[i] = -EIO;
        /* The ring holds BK_MAX_BATCH: it runs short only while a refused batch's no-ops are
           left in it, and what finds no entry is not written. */
        while (queued < n && (sqes[queued] = io_uring_get_sqe(r)) != NULL) {
            io_uring_prep_write(sqes[queued], fd, pages[queued], 4096,
                                (uint64_t)blocks[queued] * 4096);
            io_uring_sqe_set_data64(sqes[queued], queued);
            queued++;
        }
        /* Every write handed over and waited for in one system call when all goes well. The
           kernel stops at a write it refuses (that write's CQE says why): the rest follow. */
        rc = io_uring_submit_and_wait(r, (unsigned)queued);
        while (rc > 0 && io_uring_sq_ready(r))
            rc = io_uring_submit(r);
        /* What the kernel did not take is not written (as a failed io_submit was): it cannot
           be taken back from the ring, so it becomes a no-op that a later call consumes. */
        left = io_uring_sq_ready(r);
        if (left > queued) left = queued;
        for (i = queued - left; i < queued; i++) {
            io_uring_prep_nop(sqes[i]);
            io_uring_sqe_set_data64(sqes[i], BK_STALE);
        }
        inflight = queued - left;
        while (done < inflight) {
            rc = io_uring_peek_cqe(r, &cqe);
            if (rc == -EAGAIN) rc = io_uring_wait_cqe(r, &cqe);
            if (rc == -EINTR) continue;
            if (rc < 0) break;
            if (cqe->user_data != BK_STALE) {
                size_t k = cqe->user_data;
                results[k] = cqe->res == 4096 ? 0 : (cqe->res < 0 ? cqe->res : -EIO);
                ok += results[k] == 0;
                done++;
            }
            io_uring_cqe_seen(r, cqe);
        }
        return ok;
    }
    """
    void* bk_ring_setup() nogil
    void bk_ring_destroy(void* ring) nogil
    size_t bk_write_batch(void* ring, int fd, size_t n, const size_t* blocks,
                          char** pages, int* results) nogil
    ssize_t pread(int fd, void* buf, size_t n, long off) nogil
    ssize_t pwrite(int fd, const void* buf, size_t n, long off) nogil
    int close(int fd) nogil
    int __builtin_ctzll(unsigned long long) nogil

cdef enum:
    BITS = 64


class BackingError(OSError):
    """The backing device cannot be used (not a block device or file, empty, unreadable)."""


cdef long backing_alloc(zbacking* b) noexcept nogil:
    cdef size_t words = (b.nr_blocks + BITS - 1) // BITS
    cdef size_t i, w, bit, block
    cdef unsigned long long free_bits
    pthread_mutex_lock(&b.lock)
    for i in range(words):
        w = (b.hint + i) % words
        free_bits = ~b.bitmap[w]
        if free_bits:
            bit = __builtin_ctzll(free_bits)
            block = w * BITS + bit
            if block < b.nr_blocks:
                b.bitmap[w] |= 1ULL << bit
                b.hint = w
                pthread_mutex_unlock(&b.lock)
                za_add(&b.bd_count, 1)
                return <long>block
    pthread_mutex_unlock(&b.lock)
    return -1


cdef void backing_free(zbacking* b, size_t block) noexcept nogil:
    pthread_mutex_lock(&b.lock)
    b.bitmap[block // BITS] &= ~(1ULL << (block % BITS))
    pthread_mutex_unlock(&b.lock)
    za_sub(&b.bd_count, 1)


cdef bint backing_take(zbacking* b, size_t block) noexcept nogil:
    cdef bint taken = False
    cdef unsigned long long bit = 1ULL << (block % BITS)
    if block >= b.nr_blocks:
        return False
    pthread_mutex_lock(&b.lock)
    if not b.bitmap[block // BITS] & bit:
        b.bitmap[block // BITS] |= bit
        taken = True
    pthread_mutex_unlock(&b.lock)
    if taken:
        za_add(&b.bd_count, 1)
    return taken


cdef int backing_read(zbacking* b, size_t block, char* page) noexcept nogil:
    cdef ssize_t n = pread(b.fd, page, PAGE_SIZE, <long>(block * PAGE_SIZE))
    if n != PAGE_SIZE:
        return -(errno if n < 0 else EIO)
    za_add(&b.bd_reads, 1)
    return 0


cdef int backing_write(zbacking* b, size_t block, const char* page) noexcept nogil:
    cdef ssize_t n = pwrite(b.fd, page, PAGE_SIZE, <long>(block * PAGE_SIZE))
    if n != PAGE_SIZE:
        return -(errno if n < 0 else EIO)
    za_add(&b.bd_writes, 1)
    return 0


cdef void* backing_ring_new() noexcept nogil:
    return bk_ring_setup()


cdef void backing_ring_free(void* ring) noexcept nogil:
    bk_ring_destroy(ring)


cdef size_t backing_write_batch(zbacking* b, void* ring, size_t n, const size_t* blocks,
                                char** pages, int* results) noexcept nogil:
    cdef size_t i, ok = 0
    if ring != NULL:
        ok = bk_write_batch(ring, b.fd, n, blocks, pages, results)
    else:
        for i in range(n):
            results[i] = backing_write(b, blocks[i], pages[i])
            ok += results[i] == 0
        return ok
    za_add(&b.bd_writes, ok)
    return ok


MAX_BATCH = BK_MAX_BATCH


def _capacity(fd: int, st: os.stat_result) -> int:
    if stat.S_ISBLK(st.st_mode):
        return os.lseek(fd, 0, os.SEEK_END)
    return st.st_size


cdef class Backing:
    """An open backing device; `close()` when the device is reset."""

    def __init__(self, path: str, int fd):
        """`fd`: an open block device or regular file (BackingError(EINVAL) for anything
        else), as zramfs.sysfs.device_tiering.open_backing opens `path` (without waiting on
        it), or a live restart's kept descriptor. This object owns it from now on; `path` is
        its name."""
        st = os.fstat(fd)
        if not (stat.S_ISBLK(st.st_mode) or stat.S_ISREG(st.st_mode)):
            os.close(fd)
            raise BackingError(22, f"{path}: not a block device or regular file")
        try:
            fcntl.fcntl(fd, fcntl.F_SETFL, fcntl.fcntl(fd, fcntl.F_GETFL) | os.O_DIRECT)
            direct = True
        except OSError:
            direct = False           # e.g. tmpfs: no O_DIRECT; the page cache it is
        nr_blocks = _capacity(fd, st) // PAGE_SIZE
        if nr_blocks == 0:
            os.close(fd)
            raise BackingError(28, f"{path}: smaller than one 4 KiB block")
        self.b = <zbacking*>calloc(1, sizeof(zbacking))
        if self.b == NULL:
            os.close(fd)
            raise MemoryError()
        self.b.fd = fd
        self.b.direct = direct
        self.b.nr_blocks = nr_blocks
        self.b.bitmap = <unsigned long long*>calloc((nr_blocks + BITS - 1) // BITS, 8)
        if self.b.bitmap == NULL or \
                posix_memalign(<void**>&self.b.bounce, PAGE_SIZE, PAGE_SIZE) != 0:
            self.close()
            raise MemoryError(f"no memory for a bitmap of {nr_blocks} blocks")
        pthread_mutex_init(&self.b.lock, NULL)
        self.path = path

    def close(self) -> None:
        if self.b != NULL:
            close(self.b.fd)
            free(self.b.bitmap)
            free(self.b.bounce)
            free(self.b)
            self.b = NULL

    def __dealloc__(self):
        self.close()

    @property
    def fd(self) -> int:
        """Its descriptor (this object's: kept for a restart as a duplicate)."""
        return self.b.fd

    @property
    def nr_blocks(self) -> int:
        return self.b.nr_blocks

    def bd_stat(self) -> tuple[int, int, int]:
        return (za_load(&self.b.bd_count), za_load(&self.b.bd_reads),
                za_load(&self.b.bd_writes))

    # For tests: the same C calls the data path makes.

    def alloc(self) -> int | None:
        cdef long block
        with nogil:
            block = backing_alloc(self.b)
        return None if block < 0 else block

    def free_block(self, size_t block) -> None:
        if block >= self.b.nr_blocks:
            raise ValueError(f"no block {block}")
        backing_free(self.b, block)

    def write(self, size_t block, bytes page) -> None:
        cdef int rc
        if len(page) != PAGE_SIZE or block >= self.b.nr_blocks:
            raise ValueError("one whole page, to a block that exists")
        memcpy(self.b.bounce, PyBytes_AS_STRING(page), PAGE_SIZE)
        with nogil:
            rc = backing_write(self.b, block, self.b.bounce)
        if rc:
            raise OSError(-rc, os.strerror(-rc))

    def read(self, size_t block) -> bytes:
        cdef int rc
        if block >= self.b.nr_blocks:
            raise ValueError(f"no block {block}")
        with nogil:
            rc = backing_read(self.b, block, self.b.bounce)
        if rc:
            raise OSError(-rc, os.strerror(-rc))
        return PyBytes_FromStringAndSize(self.b.bounce, PAGE_SIZE)
