# cython: language_level=3
"""The backing device of writeback: a block device, or a regular file (a zramfs extension;
the kernel takes block devices only), in 4 KiB blocks with a free bitmap.

    backing = Backing("/dev/sdb2", fd)  # or a file: its size is the capacity
    backing.bd_stat()                   # (bd_count, bd_reads, bd_writes), 4 KiB units

The data path reaches it through the C functions in _backing.pxd, without the GIL.
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
    #include <string.h>
    #include <errno.h>
    #include <sys/syscall.h>
    #include <linux/aio_abi.h>
    /* Linux AIO by its system calls (no libaio): writes of whole pages at their blocks, all
       in flight at once. With O_DIRECT they really overlap; otherwise the kernel does them
       one by one, which is still correct. */
    static unsigned long bk_aio_setup(void) {
        aio_context_t ctx = 0;
        if (syscall(SYS_io_setup, BK_MAX_BATCH, &ctx) != 0) return 0;
        return (unsigned long)ctx;
    }
    static void bk_aio_destroy(unsigned long ctx) {
        if (ctx) syscall(SYS_io_destroy, (aio_context_t)ctx);
    }
    static size_t bk_write_batch(unsigned long ctx, int fd, size_t n, const size_t* blocks,
                                 char** pages, int* results) {
        struct iocb cbs[BK_MAX_BATCH];
        struct iocb* list[BK_MAX_BATCH];
        struct io_event events[BK_MAX_BATCH];
        size_t i, done = 0, submitted = 0, ok = 0;
        long rc;
        if (n > BK_MAX_BATCH) n = BK_MAX_BATCH;
        memset(cbs, 0, n * sizeof(struct iocb));
        for (i = 0; i < n; i++) {
            cbs[i].aio_data = i;
            cbs[i].aio_lio_opcode = IOCB_CMD_PWRITE;
            cbs[i].aio_fildes = fd;
            cbs[i].aio_buf = (unsigned long)pages[i];
            cbs[i].aio_nbytes = 4096;
            cbs[i].aio_offset = (long long)blocks[i] * 4096;
            list[i] = &cbs[i];
            results[i] = -EIO;
        }
        while (submitted < n) {
            rc = syscall(SYS_io_submit, (aio_context_t)ctx, (long)(n - submitted),
                         list + submitted);
            if (rc <= 0) break;
            submitted += rc;
        }
        while (done < submitted) {
            rc = syscall(SYS_io_getevents, (aio_context_t)ctx, 1L, (long)(submitted - done),
                         events, NULL);
            if (rc < 0) { if (errno == EINTR) continue; break; }
            for (i = 0; i < (size_t)rc; i++) {
                size_t k = events[i].data;
                results[k] = events[i].res == 4096 ? 0 : (events[i].res < 0 ? (int)events[i].res : -EIO);
                ok += results[k] == 0;
            }
            done += rc;
        }
        return ok;
    }
    """
    unsigned long bk_aio_setup() nogil
    void bk_aio_destroy(unsigned long ctx) nogil
    size_t bk_write_batch(unsigned long ctx, int fd, size_t n, const size_t* blocks,
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


cdef size_t backing_write_batch(zbacking* b, size_t n, const size_t* blocks, char** pages,
                                int* results) noexcept nogil:
    cdef size_t i, ok = 0
    if b.aio:
        ok = bk_write_batch(b.aio, b.fd, n, blocks, pages, results)
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
        else), as zramfs.sysfs.device.open_backing opens `path` (without waiting on it), or a
        live restart's kept descriptor. This object owns it from now on; `path` is its name."""
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
        self.b.aio = bk_aio_setup()           # 0 where the kernel has no AIO: plain pwrite
        self.path = path

    def close(self) -> None:
        if self.b != NULL:
            bk_aio_destroy(self.b.aio)
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
