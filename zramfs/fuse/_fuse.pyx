# cython: language_level=3, boundscheck=False, wraparound=False
"""zramfs's own FUSE engine: the kernel's protocol (linux/fuse.h) over /dev/fuse, no libfuse.

Owns: mounting (mount(2) as root, fusermount3 otherwise), the INIT negotiation, the worker
threads that read requests from /dev/fuse, their parsing, and the replies.

Request routing, decided in C per request:
* READ / WRITE / FALLOCATE on a *data handle* (fh with DATA_FH_FLAG) are served in the worker
  thread by the C `zramfs_data_ops` without ever taking the GIL.
* FORGET, BATCH_FORGET and INTERRUPT get no reply (the tree keeps no lookup counts, and no
  handler can be interrupted); FLUSH, FSYNC, OPENDIR, RELEASEDIR and STATFS are answered in C;
  requests that would change the tree's shape (MKDIR, UNLINK, RENAME...) get EPERM, as sysfs
  answers; an opcode the tree does not use gets ENOSYS.
* LOOKUP, GETATTR, SETATTR, OPEN, RELEASE, READDIR and READ/WRITE of other files take the GIL
  and call the method of the same name on the Python `ops` object. It returns a result or
  raises OSError(errno); any other exception is logged and answered with EIO, and the mount
  lives on (docs/design.md, hazard 7). A missing method is ENOSYS.

Python ops protocol (all optional; called from the engine's worker threads):
    init(info: dict) -> None                    # what was agreed with the kernel
    lookup(parent: int, name: str) -> Attr
    getattr(ino: int) -> Attr
    setattr(ino: int, changes: dict, fh: int | None) -> Attr
    readdir(ino: int) -> list[tuple[str, Attr]]
    open(ino: int, flags: int) -> OpenReply
    release(ino: int, fh: int) -> None
    read(ino: int, fh: int, size: int, off: int) -> bytes
    write(ino: int, fh: int, data: bytes, off: int) -> int
"Attr" is anything with st_ino/st_mode/st_size (os.stat_result works too).

Threads: `max_threads` workers block in read(2) on the one /dev/fuse descriptor; the kernel
hands each request to one of them. They run no Python but through `with gil` handlers, start
with every signal blocked, and can be cancelled only while they wait in read(2), so a cancel
never catches one holding the GIL or a lock.

Transports: Session(transport="classic") is the above; "io_uring" adds FUSE over io_uring
(_fuse_uring.pxi) once INIT agrees it: ordinary requests then come through ring entries,
served by the same _serve() (a request's reply goes where _reply() finds it should), while
INIT, FORGET and INTERRUPT stay with the /dev/fuse workers.
"""
from __future__ import annotations

import errno as _errno
import logging
import os
import shutil
import socket
import subprocess
import threading

from cpython.bytes cimport PyBytes_FromStringAndSize
from cpython.pycapsule cimport PyCapsule_GetPointer
from libc.errno cimport (EAGAIN, ECONNABORTED, EINTR, EINVAL, EIO, ENOENT, ENOMEM, ENOSYS,
                         ENOTCONN, EOPNOTSUPP, EPERM, EPROTO, errno)
from libc.stdint cimport int32_t, uint16_t, uint32_t, uint64_t
from libc.stdlib cimport calloc, free, malloc
from libc.string cimport memcpy, memmove, memset, strlen
from posix.fcntl cimport O_DIRECT

from zramfs.zram.data_ops cimport ZRAMFS_DATA_OPS_CAPSULE, zramfs_data_ops
from zramfs.fuse.fuse_kernel cimport *          # the protocol's structs, opcodes and flag bits
from zramfs.pthread cimport (pthread_cond_broadcast, pthread_cond_destroy, pthread_cond_init,
                            pthread_cond_signal, pthread_cond_t, pthread_cond_wait,
                            pthread_join, pthread_mutex_destroy,
                            pthread_mutex_init, pthread_mutex_lock, pthread_mutex_t,
                            pthread_mutex_unlock, pthread_t, zram_thread_start_stack)
from zramfs.common cimport za_add, za_load, za_max, za_or, za_store, zram_now_ns

cdef extern from "Python.h":
    int PyGILState_Check() nogil            # safe without the GIL: only looks at the thread

cdef extern from "<sys/uio.h>" nogil:
    struct iovec:
        void* iov_base
        size_t iov_len
    ssize_t writev(int fd, const iovec* iov, int iovcnt)

cdef extern from "<unistd.h>" nogil:
    ssize_t read(int fd, void* buf, size_t n)
    ssize_t write(int fd, const void* buf, size_t n)
    int close(int fd)

cdef extern from "<pthread.h>" nogil:
    int pthread_cancel(pthread_t t)
    int pthread_setcancelstate(int state, int* old)
    int PTHREAD_CANCEL_ENABLE, PTHREAD_CANCEL_DISABLE

cdef extern from "<time.h>" nogil:
    struct timespec:
        long tv_sec
        long tv_nsec
    int clock_gettime(int clk, timespec* t)
    int CLOCK_REALTIME, CLOCK_MONOTONIC

cdef extern from *:
    """
    #include <pthread.h>
    /* Waits for `cond` until `deadline` (CLOCK_REALTIME, as pthread_cond_timedwait wants). */
    static int fe_timedwait(pthread_cond_t* c, pthread_mutex_t* m, const struct timespec* t) {
        return pthread_cond_timedwait(c, m, t);
    }
    """
    int fe_timedwait(pthread_cond_t* c, pthread_mutex_t* m, const timespec* t) nogil

cdef extern from "<linux/falloc.h>":
    int FALLOC_FL_KEEP_SIZE, FALLOC_FL_ZERO_RANGE

log = logging.getLogger("zramfs.fuse")

cdef enum:
    LOGICAL_BLOCK = 512           # a device file's logical block size, as a block device's
    WORKER_STACK = 1 << 20        # room for a Python handler's C frames; locked only as used
    EXIT_GRACE_MS = 500           # how long workers get to see the unmount before cancel

# Handle encoding: the top bit marks a data handle; the low 63 bits are the data engine's own
# handle, passed to the data ops as it is.
cdef uint64_t DATA_FH_FLAG = (<uint64_t>1) << 63
cdef uint64_t DATA_FH_MASK = DATA_FH_FLAG - 1

# What the engine asks of the kernel, where offered. ASYNC_DIO lets libaio keep more than one
# request per file in flight; ATOMIC_O_TRUNC brings O_TRUNC with OPEN (which ignores it, as a
# block device and sysfs do) instead of as a SETATTR, so a SETATTR of a size is always a real
# truncate; MAX_PAGES lets requests be as large as max_write; DIRECT_IO_ALLOW_MMAP allows a
# shared mmap of a direct-I/O file (6.6+); HAS_RESEND (6.9+) is what a restarted daemon needs.
cdef uint64_t WANTED = (FUSE_ASYNC_READ | FUSE_ATOMIC_O_TRUNC | FUSE_BIG_WRITES |
                        FUSE_ASYNC_DIO | FUSE_PARALLEL_DIROPS | FUSE_MAX_PAGES | FUSE_INIT_EXT |
                        FUSE_DIRECT_IO_ALLOW_MMAP | FUSE_HAS_RESEND)

cdef enum:
    STOP_EXIT = 1                 # session_t.stopping: exit(), the tree unmounted
    STOP_HANDOVER = 2             # stop(): the connection kept for the next server
    INIT_PARAMS_VERSION = 1       # of init_params(), which outlives this process

cdef enum:
    NR_OPS = 64                   # opcodes counted: every one the kernel sends today
    NR_BUCKETS = 24               # latency buckets: bucket b up to 2**b microseconds

cdef struct stats_t:
    # Per opcode: requests served, their total time, and a histogram of their latency (from
    # the request read to its reply written), for the metrics endpoint.
    size_t op_count[NR_OPS]
    size_t op_ns[NR_OPS]
    size_t op_hist[NR_OPS][NR_BUCKETS]
    size_t data_reads
    size_t data_writes
    size_t data_fallocates
    size_t bytes_read
    size_t bytes_written
    size_t max_read_size
    size_t max_write_size
    size_t falloc_mode_mask       # bit m set <=> fallocate mode m (<64) seen
    size_t data_ops_with_gil      # must stay 0: proof the data path is GIL-free
    size_t py_calls

cdef struct worker_t:
    void* session                 # session_t*
    char* request                 # what read(2) fills: the header, its argument, data
    char* scratch                 # a READ's data or a READDIR's entries, for the reply
    pthread_t thread
    bint started

cdef struct session_t:
    void* owner                   # the Session (borrowed; valid while it runs)
    int fd                        # /dev/fuse
    size_t stopping               # atomic: STOP_EXIT or STOP_HANDOVER, once asked
    const zramfs_data_ops* dops   # NULL if no data engine
    unsigned max_io               # max_write, max_read and max_pages * 4096
    unsigned max_background       # async (libaio) requests the kernel may queue to us
    uint64_t flags                # agreed at INIT
    uint32_t proto_minor          # the kernel's
    size_t request_size           # a request buffer: the largest WRITE and its headers
    double attr_timeout
    double entry_timeout
    pthread_mutex_t lock          # guards running
    pthread_cond_t done           # a worker ended
    int running                   # workers not yet ended (lock)
    int nr_workers
    worker_t* workers
    stats_t st
    # The io_uring transport (_fuse_uring.pxi): asked for, queues (possible CPUs), its state
    # once INIT agreed it (uring_t*, lock), whether it served, why it could not (-errno).
    bint want_uring
    int nr_queues
    void* uring
    bint uring_used
    int uring_error


include "_fuse_uring.pxi"


# --- replies ---------------------------------------------------------------------------------

cdef void _reply(session_t* s, uint64_t unique, int err, const void* data,
                 size_t size) noexcept nogil:
    """One reply: the header and `size` bytes of `data`, in one writev. A write that fails
    (the request was interrupted and is gone: ENOENT; the connection ended) changes nothing
    here: the kernel has already finished with the request. A request that came through an
    io_uring entry is answered in the entry (committed by its queue thread)."""
    cdef fuse_out_header h
    cdef iovec iov[2]
    cdef void* ent = fu_get_current()
    if ent != NULL:
        _ring_reply(<ring_ent_t*>ent, unique, err, data, size)
        return
    h.len = <uint32_t>(sizeof(fuse_out_header) + size)
    h.error = -err
    h.unique = unique
    iov[0].iov_base = &h
    iov[0].iov_len = sizeof(fuse_out_header)
    iov[1].iov_base = <void*>data
    iov[1].iov_len = size
    writev(s.fd, iov, 2 if size else 1)


cdef inline void _reply_err(session_t* s, uint64_t unique, int err) noexcept nogil:
    _reply(s, unique, err, NULL, 0)


# --- INIT ------------------------------------------------------------------------------------

cdef void _init(session_t* s, fuse_in_header* h, const char* arg) noexcept nogil:
    cdef const fuse_init_in* i = <const fuse_init_in*>arg
    cdef fuse_init_out o
    cdef uint64_t offered, agreed
    memset(&o, 0, sizeof(o))
    o.major = FUSE_KERNEL_VERSION
    o.minor = ZRAMFS_FUSE_MINOR
    if i.major != FUSE_KERNEL_VERSION or i.minor < 31:
        # A newer major asks to be answered with ours (it then sends INIT again); an older
        # protocol lacks what the engine relies on (flags2, max_pages).
        _reply(s, h.unique, 0 if i.major > FUSE_KERNEL_VERSION else EPROTO,
               &o, sizeof(o) if i.major > FUSE_KERNEL_VERSION else 0)
        return
    offered = i.flags
    if i.flags & FUSE_INIT_EXT:
        offered |= (<uint64_t>i.flags2) << 32
    agreed = offered & WANTED
    if s.want_uring and offered & FUSE_OVER_IO_URING:
        # Asked only if every queue's ring is ready to register once INIT is answered: from
        # then on the kernel holds every request until all queues have entries.
        if _uring_prepare(s) == 0:
            agreed |= FUSE_OVER_IO_URING
    s.flags = agreed
    s.proto_minor = i.minor
    o.max_readahead = 0                       # data files are direct I/O: no page cache
    o.flags = <uint32_t>agreed
    o.flags2 = <uint32_t>(agreed >> 32)
    # O_DIRECT libaio requests are FUSE background requests: beyond max_background (default
    # 12) the kernel parks them in its own queue and sends the next only when one completes,
    # so QD64 reached us as QD12. 128 lets two QD32 streams queue all at once.
    o.max_background = s.max_background
    o.congestion_threshold = s.max_background * 3 // 4
    # The kernel splits larger O_DIRECT requests into pieces of max_write (and of max_pages
    # for reads) and sends a libaio request's pieces all at once: a 1 MiB request at QD1
    # reaches us as four 256 KiB requests served side by side.
    o.max_write = s.max_io
    o.max_pages = s.max_io // 4096
    o.time_gran = 1
    _py_init(s, i, offered, agreed)
    _reply(s, h.unique, 0, &o, sizeof(o))
    if agreed & FUSE_OVER_IO_URING:
        s.uring_used = True
        _uring_go(s)


cdef void _py_init(session_t* s, const fuse_init_in* i, uint64_t offered,
                   uint64_t agreed) noexcept with gil:
    cdef Session owner = <Session>s.owner
    # What a later server of this connection must know, as the kernel never sends INIT again.
    owner._init_params = {"version": INIT_PARAMS_VERSION, "major": i.major, "minor": i.minor,
                          "offered": offered, "flags": agreed, "max_write": s.max_io,
                          "max_pages": s.max_io // 4096, "max_background": s.max_background}
    owner._init_done.set()
    info = {"proto": (i.major, i.minor), "offered_flags": i.flags, "flags": agreed,
            "max_write": s.max_io, "max_read": s.max_io, "max_background": s.max_background,
            "direct_io_allow_mmap": bool(agreed & FUSE_DIRECT_IO_ALLOW_MMAP),
            "has_resend": bool(agreed & FUSE_HAS_RESEND),
            "io_uring": bool(agreed & FUSE_OVER_IO_URING),
            "io_uring_offered": bool(i.flags & FUSE_INIT_EXT and
                                     ((<uint64_t>i.flags2) << 32) & FUSE_OVER_IO_URING)}
    log.debug("FUSE init: %s", info)
    try:
        fn = _handler(s, "init")
        if fn is not None:
            fn(info)
    except BaseException as e:
        _errno_of("init", e)


# --- the data path: no GIL -------------------------------------------------------------------

cdef inline void _note_gil(session_t* s) noexcept nogil:
    if PyGILState_Check():
        za_add(&s.st.data_ops_with_gil, 1)


cdef inline bint _misaligned(uint32_t flags, uint64_t off, uint64_t size) noexcept nogil:
    """O_DIRECT I/O on a block device must be aligned to its logical block (512 bytes)."""
    return flags & O_DIRECT and (off | size) & (LOGICAL_BLOCK - 1)


cdef void _data_read(session_t* s, fuse_in_header* h, const fuse_read_in* r,
                     char* scratch) noexcept nogil:
    cdef ssize_t n
    _note_gil(s)
    za_add(&s.st.data_reads, 1)
    za_max(&s.st.max_read_size, r.size)
    if _misaligned(r.flags, r.offset, r.size) or r.size > s.max_io:
        _reply_err(s, h.unique, EINVAL)
        return
    # Decompressed straight into the reply's buffer, which one writev hands to the kernel.
    n = s.dops.read(s.dops.ctx, r.fh & DATA_FH_MASK, scratch, r.size, r.offset)
    if n < 0:
        _reply_err(s, h.unique, <int>-n)
        return
    za_add(&s.st.bytes_read, n)
    _reply(s, h.unique, 0, scratch, n)


cdef void _data_write(session_t* s, fuse_in_header* h, const fuse_write_in* w,
                      const char* data) noexcept nogil:
    cdef ssize_t n
    cdef fuse_write_out o
    _note_gil(s)
    za_add(&s.st.data_writes, 1)
    za_max(&s.st.max_write_size, w.size)
    if _misaligned(w.flags, w.offset, w.size):
        _reply_err(s, h.unique, EINVAL)
        return
    n = s.dops.write(s.dops.ctx, w.fh & DATA_FH_MASK, data, w.size, w.offset)
    if n < 0:
        _reply_err(s, h.unique, <int>-n)
        return
    za_add(&s.st.bytes_written, n)
    memset(&o, 0, sizeof(o))
    o.size = <uint32_t>n
    _reply(s, h.unique, 0, &o, sizeof(o))


cdef void _data_fallocate(session_t* s, fuse_in_header* h,
                          const fuse_fallocate_in* f) noexcept nogil:
    cdef int mode = f.mode
    _note_gil(s)
    za_add(&s.st.data_fallocates, 1)
    if 0 <= mode < 64:
        za_or(&s.st.falloc_mode_mask, (<size_t>1) << mode)
    # As blkdev_fallocate: whole logical blocks only, and write-zeroes with or without
    # KEEP_SIZE (a device's size never changes anyway). The data engine decides which modes
    # it supports (EOPNOTSUPP otherwise).
    if (f.offset | f.length) & (LOGICAL_BLOCK - 1):
        _reply_err(s, h.unique, EINVAL)
        return
    if mode == FALLOC_FL_ZERO_RANGE:
        mode |= FALLOC_FL_KEEP_SIZE
    _reply_err(s, h.unique, -s.dops.fallocate(s.dops.ctx, f.fh & DATA_FH_MASK, mode,
                                               f.offset, f.length))


# --- dispatch --------------------------------------------------------------------------------

cdef void _dispatch(session_t* s, char* req, size_t n, char* scratch) noexcept nogil:
    """One request read from /dev/fuse, `n` bytes at `req`, answered (or not, for those that
    take no answer)."""
    cdef fuse_in_header* h = <fuse_in_header*>req
    cdef char* arg = req + sizeof(fuse_in_header)
    if n < sizeof(fuse_in_header) or h.len != n:
        return                                     # not a request: nothing to answer
    _serve(s, h, arg, n - sizeof(fuse_in_header), arg + sizeof(fuse_write_in), scratch)


cdef void _serve(session_t* s, fuse_in_header* h, char* arg, size_t arglen, char* data,
                 char* scratch) noexcept nogil:
    """One request of either transport: its header, its first argument (`arglen` bytes at
    `arg`), a WRITE's data, and `scratch` (max_io bytes) for the reply's data."""
    cdef uint32_t op = h.opcode
    cdef fuse_open_out oo
    cdef fuse_statfs_out so
    if op == FUSE_READ and s.dops != NULL and (<fuse_read_in*>arg).fh & DATA_FH_FLAG:
        _data_read(s, h, <fuse_read_in*>arg, scratch)
    elif op == FUSE_WRITE and s.dops != NULL and (<fuse_write_in*>arg).fh & DATA_FH_FLAG:
        _data_write(s, h, <fuse_write_in*>arg, data)
    elif op == FUSE_FALLOCATE and s.dops != NULL and (<fuse_fallocate_in*>arg).fh & DATA_FH_FLAG:
        _data_fallocate(s, h, <fuse_fallocate_in*>arg)
    elif op == FUSE_FALLOCATE:
        _reply_err(s, h.unique, EOPNOTSUPP)
    elif op == FUSE_INIT:
        _init(s, h, arg)
    elif op == FUSE_FORGET or op == FUSE_BATCH_FORGET or op == FUSE_INTERRUPT:
        pass                                       # no reply is wanted (or needed)
    elif (op == FUSE_MKDIR or op == FUSE_UNLINK or op == FUSE_RMDIR or op == FUSE_RENAME
          or op == FUSE_RENAME2 or op == FUSE_SYMLINK or op == FUSE_LINK or op == FUSE_MKNOD
          or op == FUSE_CREATE):
        _reply_err(s, h.unique, EPERM)             # the tree's shape is fixed, as sysfs's
    elif op == FUSE_FLUSH or op == FUSE_FSYNC or op == FUSE_FSYNCDIR or \
            op == FUSE_RELEASEDIR or op == FUSE_DESTROY:
        _reply_err(s, h.unique, 0)                 # nothing is cached, nothing to keep
    elif op == FUSE_OPENDIR:
        memset(&oo, 0, sizeof(oo))
        _reply(s, h.unique, 0, &oo, sizeof(oo))
    elif op == FUSE_STATFS:
        memset(&so, 0, sizeof(so))
        so.st.bsize = 4096
        so.st.frsize = 4096
        so.st.namelen = 255
        _reply(s, h.unique, 0, &so, sizeof(so))
    elif (op == FUSE_LOOKUP or op == FUSE_GETATTR or op == FUSE_SETATTR or op == FUSE_OPEN
          or op == FUSE_RELEASE or op == FUSE_READDIR or op == FUSE_READ or op == FUSE_WRITE):
        if not _ring_defer():                      # io_uring: a helper thread calls it
            _py_request(s, h, arg, arglen, data, scratch)
    else:
        _reply_err(s, h.unique, ENOSYS)


cdef void _account(session_t* s, uint32_t op, uint64_t ns) noexcept nogil:
    """One request of opcode `op` served in `ns`: its count, time and latency bucket."""
    cdef uint64_t us = ns // 1000
    cdef int b = 0
    if op >= NR_OPS:
        return
    while us and b < NR_BUCKETS - 1:
        us >>= 1
        b += 1
    za_add(&s.st.op_count[op], 1)
    za_add(&s.st.op_ns[op], ns)
    za_add(&s.st.op_hist[op][b], 1)


cdef void* _worker_main(void* arg) noexcept nogil:
    cdef worker_t* w = <worker_t*>arg
    cdef session_t* s = <session_t*>w.session
    cdef ssize_t n
    cdef int old, err
    cdef uint64_t started
    pthread_setcancelstate(PTHREAD_CANCEL_DISABLE, &old)
    while not za_load(&s.stopping):
        # Cancelled only here, waiting for a request: never holding the GIL or a lock.
        pthread_setcancelstate(PTHREAD_CANCEL_ENABLE, &old)
        n = read(s.fd, w.request, s.request_size)
        err = errno
        pthread_setcancelstate(PTHREAD_CANCEL_DISABLE, &old)
        if n < 0:
            if err == EINTR or err == EAGAIN or err == ENOENT:
                continue                            # interrupted before it was read: next
            break                                   # ENODEV: unmounted; the connection is gone
        started = zram_now_ns()
        _dispatch(s, w.request, n, w.scratch)
        _account(s, (<fuse_in_header*>w.request).opcode, zram_now_ns() - started)
    pthread_mutex_lock(&s.lock)
    s.running -= 1
    pthread_cond_broadcast(&s.done)
    pthread_mutex_unlock(&s.lock)
    return NULL


# --- requests for Python (GIL held) ----------------------------------------------------------

cdef int _errno_of(str op, BaseException exc) noexcept:
    """An exception from a handler as an errno; anything but an OSError is logged."""
    if isinstance(exc, OSError) and (<object>exc).errno:
        return (<object>exc).errno
    try:
        log.error("FUSE %s handler failed", op, exc_info=exc)
    except BaseException:
        pass
    return EIO


cdef object _handler(session_t* s, str op):
    """The ops object's method, or None where it has none (ENOSYS)."""
    s.st.py_calls += 1            # under the GIL: no atomics needed
    return getattr((<Session>s.owner).ops, op, None)


cdef void _fill_attr(fuse_attr* fa, object a) except *:
    memset(fa, 0, sizeof(fuse_attr))
    fa.ino = a.st_ino
    fa.mode = a.st_mode
    fa.nlink = getattr(a, "st_nlink", 1)
    fa.size = getattr(a, "st_size", 0)
    fa.uid = getattr(a, "st_uid", 0)
    fa.gid = getattr(a, "st_gid", 0)
    fa.mtime = fa.ctime = fa.atime = int(getattr(a, "st_mtime", 0))
    fa.blksize = 4096
    fa.blocks = (fa.size + 511) // 512


cdef inline void _split(double t, uint64_t* sec, uint32_t* nsec) noexcept:
    sec[0] = <uint64_t>t
    nsec[0] = <uint32_t>((t - <double>sec[0]) * 1e9)


cdef str _name(const char* p, size_t room):
    """A NUL-terminated name from a request, no further than the request itself."""
    cdef size_t n = 0
    while n < room and p[n] != 0:
        n += 1
    return PyBytes_FromStringAndSize(p, n).decode("utf-8", "surrogateescape")


cdef void _py_request(session_t* s, fuse_in_header* h, char* arg, size_t arglen,
                      const char* data, char* scratch) noexcept with gil:
    cdef uint32_t op = h.opcode
    cdef str opname = OPCODE_NAMES[op]          # the ops method of the same name
    cdef fuse_entry_out eo
    cdef fuse_attr_out ao
    cdef fuse_open_out oo
    cdef fuse_write_out wo
    cdef const fuse_setattr_in* sa
    cdef const fuse_read_in* ri
    cdef const fuse_write_in* wi
    cdef const char* out = NULL
    cdef size_t outlen = 0
    cdef int err = 0
    cdef bytes keep
    try:
        fn = _handler(s, opname)
        if fn is None:
            err = ENOSYS
        elif op == FUSE_LOOKUP:
            memset(&eo, 0, sizeof(eo))
            a = fn(h.nodeid, _name(arg, arglen))
            _fill_attr(&eo.attr, a)
            eo.nodeid = eo.attr.ino
            eo.generation = getattr(a, "generation", 0)
            _split(s.entry_timeout, &eo.entry_valid, &eo.entry_valid_nsec)
            _split(s.attr_timeout, &eo.attr_valid, &eo.attr_valid_nsec)
            out, outlen = <const char*>&eo, sizeof(eo)
        elif op == FUSE_GETATTR or op == FUSE_SETATTR:
            memset(&ao, 0, sizeof(ao))
            if op == FUSE_GETATTR:
                a = fn(h.nodeid)
            else:
                sa = <const fuse_setattr_in*>arg
                a = fn(h.nodeid, _changes(sa),
                       (sa.fh & DATA_FH_MASK) if sa.valid & FATTR_FH else None)
            _fill_attr(&ao.attr, a)
            _split(s.attr_timeout, &ao.attr_valid, &ao.attr_valid_nsec)
            out, outlen = <const char*>&ao, sizeof(ao)
        elif op == FUSE_OPEN:
            memset(&oo, 0, sizeof(oo))
            r = fn(h.nodeid, (<const fuse_open_in*>arg).flags)
            fh = int(r.fh)
            if not 0 <= fh <= DATA_FH_MASK or (r.data and s.dops == NULL):
                raise OSError(EINVAL, "bad open reply")
            # No write cache, so nothing to flush at close: without NOFLUSH every close(2)
            # would wait for a FLUSH round trip.
            oo.open_flags = FOPEN_NOFLUSH
            if r.data:
                oo.fh = DATA_FH_FLAG | fh
                # No page-cache copy of a device's data; direct writes may run side by side.
                oo.open_flags |= FOPEN_DIRECT_IO | FOPEN_PARALLEL_DIRECT_WRITES
            else:
                oo.fh = fh
                if r.direct_io:
                    oo.open_flags |= FOPEN_DIRECT_IO
                if r.keep_cache:
                    oo.open_flags |= FOPEN_KEEP_CACHE
            if r.nonseekable:
                oo.open_flags |= FOPEN_NONSEEKABLE
            out, outlen = <const char*>&oo, sizeof(oo)
        elif op == FUSE_RELEASE:
            fn(h.nodeid, (<const fuse_release_in*>arg).fh & DATA_FH_MASK)
        elif op == FUSE_READDIR:
            ri = <const fuse_read_in*>arg
            outlen = _dirents(fn(h.nodeid), ri.offset, min(ri.size, s.max_io), scratch)
            out = scratch
        elif op == FUSE_READ:
            ri = <const fuse_read_in*>arg
            keep = bytes(fn(h.nodeid, ri.fh, ri.size, ri.offset))[:ri.size]
            out = keep
            outlen = len(keep)
        elif op == FUSE_WRITE:
            wi = <const fuse_write_in*>arg
            memset(&wo, 0, sizeof(wo))
            wo.size = int(fn(h.nodeid, wi.fh, PyBytes_FromStringAndSize(data, wi.size),
                             wi.offset))
            out, outlen = <const char*>&wo, sizeof(wo)
    except BaseException as e:
        err = _errno_of(opname, e)
        outlen = 0
    with nogil:
        _reply(s, h.unique, err, out, outlen)


cdef dict _changes(const fuse_setattr_in* sa):
    """A SETATTR's changes, as the ops' setattr takes them."""
    changes = {}
    if sa.valid & FATTR_SIZE:
        changes["size"] = sa.size
    if sa.valid & FATTR_MODE:
        changes["mode"] = sa.mode
    if sa.valid & FATTR_UID:
        changes["uid"] = sa.uid
    if sa.valid & FATTR_GID:
        changes["gid"] = sa.gid
    if sa.valid & (FATTR_MTIME | FATTR_MTIME_NOW):
        changes["mtime"] = None if sa.valid & FATTR_MTIME_NOW else sa.mtime
    if sa.valid & (FATTR_ATIME | FATTR_ATIME_NOW):
        changes["atime"] = None if sa.valid & FATTR_ATIME_NOW else sa.atime
    return changes


cdef size_t _dirents(list entries, uint64_t off, size_t size, char* buf) except? 0:
    """Directory entries from `off` on, as many as fit `size` bytes; entry i's offset is i + 1,
    so the kernel asks again from where a full buffer stopped."""
    cdef size_t pos = 0, reclen, namelen
    cdef fuse_dirent* d
    cdef bytes bname
    cdef size_t i
    for i in range(off, len(entries)):
        name, a = entries[i]
        bname = name.encode("utf-8", "surrogateescape")
        namelen = len(bname)
        reclen = FUSE_DIRENT_ALIGN(FUSE_NAME_OFFSET + namelen)
        if pos + reclen > size:
            break
        d = <fuse_dirent*>(buf + pos)
        memset(d, 0, reclen)
        d.ino = a.st_ino
        d.off = i + 1
        d.namelen = <uint32_t>namelen
        d.type = (a.st_mode & 0o170000) >> 12
        memcpy(buf + pos + FUSE_NAME_OFFSET, <const char*>bname, namelen)
        pos += reclen
    return pos


# The requests the tree is asked, by the kernel's names for them (lower case).
OPCODE_NAMES = {FUSE_LOOKUP: "lookup", FUSE_FORGET: "forget", FUSE_GETATTR: "getattr",
                FUSE_SETATTR: "setattr", FUSE_OPEN: "open", FUSE_READ: "read",
                FUSE_WRITE: "write", FUSE_STATFS: "statfs", FUSE_RELEASE: "release",
                FUSE_FSYNC: "fsync", FUSE_FLUSH: "flush", FUSE_INIT: "init",
                FUSE_OPENDIR: "opendir", FUSE_READDIR: "readdir", FUSE_RELEASEDIR: "releasedir",
                FUSE_INTERRUPT: "interrupt", FUSE_BATCH_FORGET: "batch_forget",
                FUSE_FALLOCATE: "fallocate"}
LATENCY_BUCKETS = [2 ** b / 1e6 for b in range(NR_BUCKETS - 1)]   # seconds; then +Inf


# --- transports ------------------------------------------------------------------------------

TRANSPORTS = ("classic", "io_uring")
URING_PARAM = "/sys/module/fuse/parameters/enable_uring"


def possible_cpus() -> int:
    """CPUs the kernel may ever run (/sys/devices/system/cpu/possible, e.g. "0-3"): the
    io_uring transport needs a queue for each."""
    try:
        text = open("/sys/devices/system/cpu/possible").read().strip()
    except OSError:
        return os.cpu_count() or 1
    return max(int(part.rpartition("-")[2]) for part in text.split(",")) + 1


def uring_param() -> bool | None:
    """The fuse module's enable_uring: True, False, or None where the kernel has no FUSE
    over io_uring (no CONFIG_FUSE_IO_URING, or older than 6.14)."""
    try:
        return open(URING_PARAM).read().strip() in ("Y", "1")
    except OSError:
        return None


# --- mounting --------------------------------------------------------------------------------

def _mount(mountpoint: str, fsname: str, options: list[str]) -> int:
    """Mounts a FUSE file system at `mountpoint`; its /dev/fuse descriptor. As root with
    mount(2); otherwise through fusermount3 (package fuse3), which passes the descriptor back
    over a socket named in _FUSE_COMMFD."""
    import ctypes
    if os.geteuid() != 0:
        return _mount_fusermount(mountpoint, fsname, options)
    fd = os.open("/dev/fuse", os.O_RDWR | os.O_CLOEXEC)
    data = ",".join([f"fd={fd}", "rootmode=40000", f"user_id={os.getuid()}",
                     f"group_id={os.getgid()}", *options])
    libc = ctypes.CDLL(None, use_errno=True)
    MS_NOSUID, MS_NODEV = 2, 4
    if libc.mount(fsname.encode(), mountpoint.encode(), b"fuse.zramfs",
                  MS_NOSUID | MS_NODEV, data.encode()) != 0:
        e = ctypes.get_errno()
        os.close(fd)
        raise OSError(e, f"mount {mountpoint}: {os.strerror(e)}")
    return fd


def _mount_fusermount(mountpoint: str, fsname: str, options: list[str]) -> int:
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    with ours, theirs:
        env = dict(os.environ, _FUSE_COMMFD=str(theirs.fileno()))
        opts = ",".join([f"fsname={fsname}", "subtype=zramfs", *options])
        done = subprocess.run(["fusermount3", "-o", opts, "--", mountpoint], env=env,
                              pass_fds=[theirs.fileno()], capture_output=True, text=True)
        if done.returncode != 0:
            raise OSError(_errno.EIO, f"fusermount3: {done.stderr.strip()}")
        _, fds, _, _ = socket.recv_fds(ours, 1, 1)
    if not fds:
        raise OSError(_errno.EIO, "fusermount3 passed no descriptor")
    return fds[0]


def _unmount(mountpoint: str) -> None:
    """Lazily: the tree goes at once; the connection ends once nothing has a file open."""
    import ctypes
    if os.geteuid() == 0:
        ctypes.CDLL(None, use_errno=True).umount2(mountpoint.encode(), 2)   # MNT_DETACH
    elif shutil.which("fusermount3"):
        subprocess.run(["fusermount3", "-u", "-z", "--", mountpoint], capture_output=True)


# --- Python faces ----------------------------------------------------------------------------

class Attr:
    """Inode attributes returned by lookup/getattr/setattr. `generation` tells a reused inode
    number from the node that had it before: the kernel drops its old inode when it changes."""
    __slots__ = ("st_ino", "st_mode", "st_nlink", "st_size", "st_uid", "st_gid", "st_mtime",
                 "generation")

    def __init__(self, st_ino: int, st_mode: int, st_size: int = 0, *, st_nlink: int = 1,
                 st_uid: int = 0, st_gid: int = 0, st_mtime: float = 0.0,
                 generation: int = 0) -> None:
        self.generation = generation
        self.st_ino = st_ino
        self.st_mode = st_mode
        self.st_size = st_size
        self.st_nlink = st_nlink
        self.st_uid = st_uid
        self.st_gid = st_gid
        self.st_mtime = st_mtime


class OpenReply:
    """What ops.open() returns. data=True routes READ/WRITE/FALLOCATE of this handle to the C
    data ops (fh is then the data engine's handle, < 2**63), always as direct I/O."""
    __slots__ = ("fh", "data", "direct_io", "keep_cache", "nonseekable")

    def __init__(self, fh: int = 0, *, data: bool = False, direct_io: bool = True,
                 keep_cache: bool = False, nonseekable: bool = False) -> None:
        self.fh = fh
        self.data = data
        self.direct_io = direct_io
        self.keep_cache = keep_cache
        self.nonseekable = nonseekable


cdef class Session:
    """One mounted FUSE file system, served by the engine's worker threads.

    Session(mountpoint, ops, data_ops=capsule or None, fsname=..., options=(), ...) mounts at
    once; Session.adopt(mountpoint, fd, ops, init=...) serves a connection mounted by an
    earlier process. run() serves requests until unmounted or exit() (the GIL released
    meanwhile); exit() makes run() return; close() unmounts and frees. For a live restart,
    stop() makes run() return with the tree still mounted, and detach() hands the connection
    over instead of close().
    """
    cdef session_t s
    cdef readonly object ops
    cdef readonly object data_ops        # the data ops' capsule, kept while mounted
    cdef readonly str mountpoint
    cdef bint mounted
    cdef object _lock                    # serialises unmount and close
    cdef object _init_params             # init_params(), once INIT is answered or adopted
    cdef object _init_done               # threading.Event: _init_params is set

    def __cinit__(self) -> None:
        memset(&self.s, 0, sizeof(self.s))
        self.s.fd = -1
        pthread_mutex_init(&self.s.lock, NULL)
        pthread_cond_init(&self.s.done, NULL)

    def __init__(self, mountpoint: str, ops: object, *, data_ops: object = None,
                 fsname: str = "zramfs", options: tuple = (), allow_other: bool = False,
                 max_io: int = 256 << 10, max_threads: int = 8, max_background: int = 128,
                 attr_timeout: float = 1.0, entry_timeout: float = 1.0,
                 transport: str = "classic") -> None:
        if transport not in TRANSPORTS:
            raise ValueError(f"FUSE transport {transport!r} is not one of {', '.join(TRANSPORTS)}")
        self._configure(mountpoint, ops, data_ops, max_io, max_threads, max_background,
                        attr_timeout, entry_timeout)
        self.s.want_uring = transport == "io_uring"
        opts = ["default_permissions", f"max_read={max_io}"]
        if allow_other:
            opts.append("allow_other")
        opts.extend(options)
        self.s.fd = _mount(mountpoint, fsname, opts)
        self.mounted = True

    cdef void _configure(self, str mountpoint, object ops, object data_ops, unsigned max_io,
                         int max_threads, unsigned max_background, double attr_timeout,
                         double entry_timeout) except *:
        self.ops = ops
        self.data_ops = data_ops
        self.mountpoint = mountpoint
        self._lock = threading.Lock()
        self._init_done = threading.Event()
        self.s.owner = <void*>self
        self.s.max_io = max_io
        self.s.max_background = max_background
        self.s.attr_timeout = attr_timeout
        self.s.entry_timeout = entry_timeout
        # A request: its header, a WRITE's own header, and up to max_write of data.
        self.s.request_size = max_io + 4096
        self.s.nr_workers = max_threads
        self.s.nr_queues = possible_cpus()
        if data_ops is not None:
            self.s.dops = <const zramfs_data_ops*>PyCapsule_GetPointer(
                data_ops, ZRAMFS_DATA_OPS_CAPSULE)

    @classmethod
    def adopt(cls, mountpoint: str, fd: int, ops: object, *, init: dict,
              data_ops: object = None, max_threads: int = 8, attr_timeout: float = 1.0,
              entry_timeout: float = 1.0) -> Session:
        """A session on the connection of `fd`, which an earlier server mounted at
        `mountpoint` and negotiated (`init`: its init_params()). No mount and no INIT: the
        kernel sends INIT once a connection. Requests the earlier server read and did not
        answer are asked for again (FUSE_NOTIFY_RESEND, Linux 6.9+) where the kernel offered
        that at INIT; they come back with bit 63 set in their unique, which the replies echo
        as they echo any unique. The session owns `fd` from here on, and unmounts at exit()
        as a mounting one does."""
        cdef Session self
        if init.get("version") != INIT_PARAMS_VERSION or init.get("major") != FUSE_KERNEL_VERSION:
            raise ValueError(f"INIT parameters of another version: {init!r}")
        if init["flags"] & FUSE_OVER_IO_URING:
            raise ValueError("a connection served over io_uring cannot be adopted: its rings "
                             "died with the daemon that registered them")
        self = Session.__new__(Session)
        self._configure(mountpoint, ops, data_ops, init["max_write"], max_threads,
                        init["max_background"], attr_timeout, entry_timeout)
        self.s.flags = init["flags"]
        self.s.proto_minor = init["minor"]
        self._init_params = dict(init)
        self._init_done.set()
        self.s.fd = fd
        self.mounted = True
        err = _notify_resend(fd) if init["offered"] & FUSE_HAS_RESEND else -1
        if err < 0:
            log.warning("the kernel has no FUSE_NOTIFY_RESEND (Linux 6.9+): requests the "
                        "previous daemon read and did not answer are lost; their callers wait "
                        "until the tree is unmounted")
        elif err:
            log.warning("FUSE_NOTIFY_RESEND: %s: requests the previous daemon read and did "
                        "not answer are lost", os.strerror(err))
        else:
            log.info("adopted the FUSE connection of %s (protocol 7.%d); the kernel resends "
                     "what the previous daemon left unanswered", mountpoint, init["minor"])
        return self

    @property
    def fd(self) -> int:
        """The /dev/fuse descriptor (-1 once closed or detached), for the fd store."""
        return self.s.fd

    def init_params(self) -> dict | None:
        """What INIT agreed, as Session.adopt takes it (JSON-able); None before INIT."""
        return None if self._init_params is None else dict(self._init_params)

    def wait_init(self, timeout: float | None = None) -> dict | None:
        """init_params(), once the kernel's INIT is answered (blocks; None on timeout)."""
        self._init_done.wait(timeout)
        return self.init_params()

    def run(self) -> int:
        """Serves requests until unmounted or exit(); the GIL released meanwhile. 0."""
        cdef session_t* s = &self.s
        cdef int i, rc = 0
        cdef timespec deadline
        if s.fd < 0:
            raise RuntimeError("session closed")
        s.workers = <worker_t*>calloc(s.nr_workers, sizeof(worker_t))
        if s.workers == NULL:
            raise MemoryError()
        with nogil:
            for i in range(s.nr_workers):
                s.workers[i].session = s
                s.workers[i].request = <char*>malloc(s.request_size)
                s.workers[i].scratch = <char*>malloc(s.max_io)
                if s.workers[i].request == NULL or s.workers[i].scratch == NULL:
                    rc = -ENOMEM
                    break
                # Resident before the first read(2): the kernel ends with EIO a request whose
                # copy into this buffer faults while the process is being killed (a crash
                # during a live restart), instead of leaving it for the next daemon.
                memset(s.workers[i].request, 0, s.request_size)
                pthread_mutex_lock(&s.lock)
                s.running += 1
                pthread_mutex_unlock(&s.lock)
                if zram_thread_start_stack(&s.workers[i].thread, _worker_main, &s.workers[i],
                                           WORKER_STACK) != 0:
                    pthread_mutex_lock(&s.lock)
                    s.running -= 1
                    pthread_mutex_unlock(&s.lock)
                    rc = -ENOMEM
                    break
                s.workers[i].started = True
            if rc != 0:
                za_store(&s.stopping, 1)
            # Until every worker has ended (the connection is gone), or exit() was asked and
            # a grace period passed: workers still waiting in read(2) are then cancelled.
            # After stop() there is no unmount to wait for: they are cancelled at once.
            pthread_mutex_lock(&s.lock)
            while s.running and not za_load(&s.stopping):
                fe_timedwait(&s.done, &s.lock, _after(&deadline, 1000))
            if s.running and za_load(&s.stopping) != STOP_HANDOVER:
                _after(&deadline, EXIT_GRACE_MS)
                while s.running and fe_timedwait(&s.done, &s.lock, &deadline) == 0:
                    pass
            pthread_mutex_unlock(&s.lock)
            for i in range(s.nr_workers):
                if s.workers[i].started:
                    pthread_cancel(s.workers[i].thread)     # a no-op for one that ended
                    pthread_join(s.workers[i].thread, NULL)
                free(s.workers[i].request)
                free(s.workers[i].scratch)
            _uring_stop(s)
        free(s.workers)
        s.workers = NULL
        return rc

    def exit(self) -> None:
        """Makes run() return: flags the exit and unmounts lazily, so waiting workers see the
        connection end (or are cancelled after a grace period, where open files keep it).
        Safe from any thread, a handler's too: nothing here waits for requests."""
        za_store(&self.s.stopping, 1)
        self.unmount()

    def stop(self) -> None:
        """Makes run() return with the tree still mounted, for a live restart: requests being
        served finish, workers waiting in read(2) are cancelled there (none holds a request),
        and what comes meanwhile waits in the kernel for the next server. Any thread."""
        za_store(&self.s.stopping, STOP_HANDOVER)

    def detach(self) -> int:
        """After stop() and run(): gives up the tree and the connection without unmounting
        or closing; the caller owns the returned descriptor (to hand to the next server), and
        close() has nothing left to do."""
        cdef int fd = self.s.fd
        with self._lock:
            self.mounted = False
        self.s.fd = -1
        self._init_done.set()           # wait_init() returns (None if INIT never came)
        return fd

    def unmount(self) -> None:
        """Lazy unmount, without the exit flag: run() returns once the kernel ends the
        connection, after the last open file closes."""
        with self._lock:
            if self.mounted:
                self.mounted = False
                _unmount(self.mountpoint)

    def close(self) -> None:
        """Unmounts (if still mounted) and closes the connection. run() must have returned."""
        self.unmount()
        if self.s.fd >= 0:
            close(self.s.fd)
            self.s.fd = -1
        if self._init_done is not None:
            self._init_done.set()       # wait_init() returns (None if INIT never came)

    def stats(self) -> dict:
        """Data-path counters (relaxed atomics)."""
        cdef stats_t* s = &self.s.st
        return {
            "data_reads": za_load(&s.data_reads),
            "data_writes": za_load(&s.data_writes),
            "data_fallocates": za_load(&s.data_fallocates),
            "bytes_read": za_load(&s.bytes_read),
            "bytes_written": za_load(&s.bytes_written),
            "max_read_size": za_load(&s.max_read_size),
            "max_write_size": za_load(&s.max_write_size),
            "falloc_modes": [m for m in range(64) if za_load(&s.falloc_mode_mask) >> m & 1],
            "data_ops_with_gil": za_load(&s.data_ops_with_gil),
            "py_calls": s.py_calls,
            "flags": self.s.flags,
            "transport": "io_uring" if self.s.uring_used else "classic",
            "ring_queues": self.s.nr_queues if self.s.uring_used else 0,
            "ring_error": -self.s.uring_error,
        }

    def requests(self) -> dict[str, tuple[int, float, list[int]]]:
        """Per request type served so far: (count, total seconds, latency histogram), the
        histogram's bucket b counting requests up to 2**b microseconds (the last: any)."""
        cdef stats_t* st = &self.s.st
        out = {}
        for op, name in OPCODE_NAMES.items():
            count = za_load(&st.op_count[op])
            if count:
                out[name] = (count, za_load(&st.op_ns[op]) / 1e9,
                             [za_load(&st.op_hist[op][b]) for b in range(NR_BUCKETS)])
        return out

    def __dealloc__(self) -> None:
        if self.s.fd >= 0:
            close(self.s.fd)
        pthread_cond_destroy(&self.s.done)
        pthread_mutex_destroy(&self.s.lock)


cdef int _notify_resend(int fd) noexcept nogil:
    """FUSE_NOTIFY_RESEND: a bare header, unique 0. The kernel moves every request read
    from this connection's still-open descriptors and not answered back to the head of its
    queue, bit 63 (FUSE_UNIQUE_RESEND) set in their unique; fs/fuse/dev.c finds a reply's
    request by the whole unique, so a reply echoes it as it came. 0, or the errno."""
    cdef fuse_out_header h
    h.len = sizeof(fuse_out_header)
    h.error = FUSE_NOTIFY_RESEND
    h.unique = 0
    return 0 if write(fd, &h, sizeof(h)) == <ssize_t>sizeof(h) else errno


cdef timespec* _after(timespec* t, long ms) noexcept nogil:
    """`t` set to `ms` milliseconds from now, on CLOCK_REALTIME."""
    clock_gettime(CLOCK_REALTIME, t)
    t.tv_sec += ms // 1000
    t.tv_nsec += (ms % 1000) * 1000000
    if t.tv_nsec >= 1000000000:
        t.tv_sec += 1
        t.tv_nsec -= 1000000000
    return t
