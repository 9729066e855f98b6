# cython: language_level=3, boundscheck=False, wraparound=False
"""zramfs's own FUSE engine: the kernel's protocol (linux/fuse.h) over /dev/fuse, no libfuse.

This file owns the protocol: the session, a request as a transport hands it over (fuse_req_t),
the INIT negotiation, the opcode dispatch (_serve), the GIL-free data path, the per-opcode
counters, and the Python face (Session). Beside it, included here (one extension), one file
per concern, as the kernel splits fs/fuse/:
* dev.pxi: the classic transport, worker threads reading /dev/fuse (the kernel's dev.c);
* dev_uring.pxi: FUSE over io_uring, a ring per CPU (the kernel's dev_uring.c), taken once
  INIT agrees it (Session(transport="io_uring")); INIT, FORGET and INTERRUPT stay on dev.pxi;
* ops.pxi: the requests the Python ops object answers, under the GIL;
* mount.pxi: mounting and unmounting.

A request carries its way back: the transport that read it sets fuse_req_t.reply and .ctx,
and every answer goes through _reply(r, ...), so the dispatch and the handlers never know
which transport asked. A transport whose thread must not wait for the GIL sets r.no_gil;
_serve then leaves a request that needs Python unanswered and says so, and the transport
hands it to a thread that may take the GIL.

Request routing, decided in C per request:
* READ / WRITE / FALLOCATE on a *data handle* (fh with DATA_FH_FLAG) are served in the
  transport's thread by the C `zramfs_data_ops` without ever taking the GIL.
* FORGET, BATCH_FORGET and INTERRUPT get no reply (the tree keeps no lookup counts). An
  INTERRUPT of a WRITE the ops object is serving calls ops.interrupt(thread) with the ident
  of the thread serving it (a long writeback or recompression stops: its writer was
  signalled). FLUSH, FSYNC, OPENDIR, RELEASEDIR and STATFS are answered in C;
  requests that would change the tree's shape (MKDIR, UNLINK, RENAME...) get EPERM, as sysfs
  answers; an opcode the tree does not use gets ENOSYS.
* LOOKUP, GETATTR, SETATTR, OPEN, RELEASE, READDIR and READ/WRITE of other files take the GIL
  and call the method of the same name on the Python `ops` object (ops.pxi). It returns a
  result or raises OSError(errno); any other exception is logged and answered with EIO, and
  the mount lives on (docs/design.md, hazard 7). A missing method is ENOSYS.

Python ops protocol (all optional; called from the engine's threads, with the GIL):
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

Every C function here runs without the GIL unless it says otherwise; shared counters are
relaxed atomics (zramfs/common.pxd), s.lock guards the count of running threads.
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
from libc.string cimport memcpy, memmove, memset
from posix.fcntl cimport O_DIRECT

from zramfs.zram.data_ops cimport ZRAMFS_DATA_OPS_CAPSULE, zramfs_data_ops
from zramfs.fuse.fuse_kernel cimport *          # the protocol's structs, opcodes and flag bits
from zramfs.pthread cimport (pthread_cond_broadcast, pthread_cond_destroy, pthread_cond_init,
                            pthread_cond_signal, pthread_cond_t, pthread_cond_wait,
                            pthread_join, pthread_mutex_destroy,
                            pthread_mutex_init, pthread_mutex_lock, pthread_mutex_t,
                            pthread_mutex_unlock, pthread_t, zram_thread_start_stack)
from zramfs.common cimport (PAGE_SIZE, posix_memalign, za_add, za_load, za_max, za_or, za_store,
                            zram_now_ns)

cdef extern from "Python.h":
    int PyGILState_Check() nogil            # safe without the GIL: only looks at the thread

cdef extern from "<unistd.h>" nogil:
    ssize_t read(int fd, void* buf, size_t n)
    ssize_t write(int fd, const void* buf, size_t n)
    int close(int fd)

cdef extern from "<time.h>" nogil:
    struct timespec:
        long tv_sec
        long tv_nsec
    int clock_gettime(int clk, timespec* t)
    int CLOCK_REALTIME

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
    # Per opcode: the requests' total time and a histogram of their latency (from the
    # request read to its reply written), for the metrics endpoint. The count is the
    # histogram's sum, so a reader between two of _account's adds never sees them differ.
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

cdef struct worker_t              # dev.pxi: a /dev/fuse worker thread
cdef struct uring_t               # dev_uring.pxi: the rings, once INIT agreed them

cdef struct session_t:
    void* owner                   # the Session (borrowed; valid while it runs)
    int fd                        # /dev/fuse
    size_t stopping               # atomic: STOP_EXIT or STOP_HANDOVER, once asked
    const zramfs_data_ops* dops   # NULL if no data engine
    unsigned max_io               # max_write, max_read and max_pages * PAGE_SIZE
    unsigned max_background       # async (libaio) requests the kernel may queue to us
    uint64_t flags                # agreed at INIT
    uint32_t proto_minor          # the kernel's
    size_t request_size           # a request buffer: the largest WRITE and its headers
    double attr_timeout
    double entry_timeout
    pthread_mutex_t lock          # guards running
    pthread_cond_t done           # a thread of either transport ended
    int running                   # transport threads not yet ended (lock)
    int nr_workers
    worker_t* workers
    stats_t st
    # The io_uring transport: asked for, queues (possible CPUs), its state once INIT agreed
    # it (lock), whether it served, why it could not (-errno).
    bint want_uring
    int nr_queues
    uring_t* uring
    bint uring_used
    int uring_error

# A transport's way back for one request: writes the reply (`size` bytes of `data` after the
# header, `err` as a positive errno) where the request came from. No GIL; never fails loudly:
# a request the kernel has dropped meanwhile needs no answer.
ctypedef void (*reply_fn)(void* ctx, uint64_t unique, int err, const void* data,
                          size_t size) noexcept nogil

cdef struct fuse_req_t:
    # One request as its transport hands it to _serve and the handlers, which answer it
    # through reply(ctx, ...) alone. Owned by the thread serving it.
    session_t* s
    fuse_in_header* h             # its header (the reply's header may take its place)
    char* arg                     # the opcode's first argument, arglen bytes
    size_t arglen
    const char* data              # a WRITE's data
    char* scratch                 # max_io bytes for the reply's data (a READ's, READDIR's)
    reply_fn reply                # the transport's: dev.pxi's or dev_uring.pxi's
    void* ctx                     # what reply needs: the session, or the ring entry
    bint no_gil                   # this thread must not wait for the GIL (see _serve)


include "dev.pxi"
include "dev_uring.pxi"
include "ops.pxi"
include "mount.pxi"


# --- replies ---------------------------------------------------------------------------------

cdef inline void _reply(fuse_req_t* r, int err, const void* data, size_t size) noexcept nogil:
    r.reply(r.ctx, r.h.unique, err, data, size)


cdef inline void _reply_err(fuse_req_t* r, int err) noexcept nogil:
    r.reply(r.ctx, r.h.unique, err, NULL, 0)


# --- INIT ------------------------------------------------------------------------------------

cdef void _init(fuse_req_t* r) noexcept nogil:
    """INIT, always from /dev/fuse (dev.pxi): what the engine asks for, agreed with what the
    kernel offers; the io_uring transport set up first where both want it."""
    cdef session_t* s = r.s
    cdef const fuse_init_in* i = <const fuse_init_in*>r.arg
    cdef fuse_init_out o
    cdef uint64_t offered, agreed
    memset(&o, 0, sizeof(o))
    o.major = FUSE_KERNEL_VERSION
    o.minor = ZRAMFS_FUSE_MINOR
    if i.major != FUSE_KERNEL_VERSION or i.minor < 31:
        # A newer major asks to be answered with ours (it then sends INIT again); an older
        # protocol lacks what the engine relies on (flags2, max_pages).
        _reply(r, 0 if i.major > FUSE_KERNEL_VERSION else EPROTO,
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
            # Before _py_init, whose event lets wait_init() return: a stats() after it sees it.
            s.uring_used = True
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
    o.max_pages = s.max_io // PAGE_SIZE
    o.time_gran = 1
    _py_init(s, i, offered, agreed)
    _reply(r, 0, &o, sizeof(o))
    if agreed & FUSE_OVER_IO_URING:
        _uring_go(s)


# --- the data path: no GIL -------------------------------------------------------------------

cdef inline void _note_gil(session_t* s) noexcept nogil:
    if PyGILState_Check():
        za_add(&s.st.data_ops_with_gil, 1)


cdef inline bint _data_refused(fuse_req_t* r, size_t* count, size_t* largest, uint32_t flags,
                               uint64_t off, uint64_t size) noexcept nogil:
    """A data READ or WRITE counted; refused with EINVAL (True) if larger than max_io or, as
    O_DIRECT I/O on a block device, not aligned to its logical block (512 bytes)."""
    _note_gil(r.s)
    za_add(count, 1)
    za_max(largest, size)
    if flags & O_DIRECT and (off | size) & (LOGICAL_BLOCK - 1) or size > r.s.max_io:
        _reply_err(r, EINVAL)
        return True
    return False


cdef void _data_read(fuse_req_t* r, const fuse_read_in* a) noexcept nogil:
    cdef session_t* s = r.s
    cdef ssize_t n
    if _data_refused(r, &s.st.data_reads, &s.st.max_read_size, a.flags, a.offset, a.size):
        return
    # Decompressed straight into the reply's buffer, which the transport hands to the kernel.
    n = s.dops.read(a.fh & DATA_FH_MASK, r.scratch, a.size, a.offset)
    if n < 0:
        _reply_err(r, <int>-n)
        return
    za_add(&s.st.bytes_read, n)
    _reply(r, 0, r.scratch, n)


cdef void _data_write(fuse_req_t* r, const fuse_write_in* a) noexcept nogil:
    cdef session_t* s = r.s
    cdef ssize_t n
    cdef fuse_write_out o
    if _data_refused(r, &s.st.data_writes, &s.st.max_write_size, a.flags, a.offset, a.size):
        return
    n = s.dops.write(a.fh & DATA_FH_MASK, r.data, a.size, a.offset)
    if n < 0:
        _reply_err(r, <int>-n)
        return
    za_add(&s.st.bytes_written, n)
    memset(&o, 0, sizeof(o))
    o.size = <uint32_t>n
    _reply(r, 0, &o, sizeof(o))


cdef void _data_fallocate(fuse_req_t* r, const fuse_fallocate_in* f) noexcept nogil:
    cdef session_t* s = r.s
    cdef int mode = f.mode
    _note_gil(s)
    za_add(&s.st.data_fallocates, 1)
    if 0 <= mode < 64:
        za_or(&s.st.falloc_mode_mask, (<size_t>1) << mode)
    # As blkdev_fallocate: whole logical blocks only, and write-zeroes with or without
    # KEEP_SIZE (a device's size never changes anyway). The data engine decides which modes
    # it supports (EOPNOTSUPP otherwise).
    if (f.offset | f.length) & (LOGICAL_BLOCK - 1):
        _reply_err(r, EINVAL)
        return
    if mode == FALLOC_FL_ZERO_RANGE:
        mode |= FALLOC_FL_KEEP_SIZE
    _reply_err(r, -s.dops.fallocate(f.fh & DATA_FH_MASK, mode, f.offset, f.length))


# --- dispatch --------------------------------------------------------------------------------

cdef bint _serve(fuse_req_t* r) noexcept nogil:
    """One request of either transport, answered through r.reply (or not, for those that
    take no answer). True: it needs the GIL and r.no_gil forbids waiting for it here; it is
    left unanswered, for the transport to hand to a thread that may take the GIL."""
    cdef session_t* s = r.s
    cdef uint32_t op = r.h.opcode
    cdef char* arg = r.arg
    cdef fuse_open_out oo
    cdef fuse_statfs_out so
    if op == FUSE_READ and s.dops != NULL and (<fuse_read_in*>arg).fh & DATA_FH_FLAG:
        _data_read(r, <fuse_read_in*>arg)
    elif op == FUSE_WRITE and s.dops != NULL and (<fuse_write_in*>arg).fh & DATA_FH_FLAG:
        _data_write(r, <fuse_write_in*>arg)
    elif op == FUSE_FALLOCATE and s.dops != NULL and (<fuse_fallocate_in*>arg).fh & DATA_FH_FLAG:
        _data_fallocate(r, <fuse_fallocate_in*>arg)
    elif op == FUSE_FALLOCATE:
        _reply_err(r, EOPNOTSUPP)
    elif op == FUSE_INIT:
        _init(r)
    elif op == FUSE_FORGET or op == FUSE_BATCH_FORGET:
        pass                                       # no reply is wanted (or needed)
    elif op == FUSE_INTERRUPT:
        if r.no_gil:
            return True
        _py_interrupt(r)                           # no reply either
    elif (op == FUSE_MKDIR or op == FUSE_UNLINK or op == FUSE_RMDIR or op == FUSE_RENAME
          or op == FUSE_RENAME2 or op == FUSE_SYMLINK or op == FUSE_LINK or op == FUSE_MKNOD
          or op == FUSE_CREATE):
        _reply_err(r, EPERM)                       # the tree's shape is fixed, as sysfs's
    elif op == FUSE_FLUSH or op == FUSE_FSYNC or op == FUSE_FSYNCDIR or \
            op == FUSE_RELEASEDIR or op == FUSE_DESTROY:
        _reply_err(r, 0)                           # nothing is cached, nothing to keep
    elif op == FUSE_OPENDIR:
        memset(&oo, 0, sizeof(oo))
        _reply(r, 0, &oo, sizeof(oo))
    elif op == FUSE_STATFS:
        memset(&so, 0, sizeof(so))
        so.st.bsize = PAGE_SIZE
        so.st.frsize = PAGE_SIZE
        so.st.namelen = 255
        _reply(r, 0, &so, sizeof(so))
    elif (op == FUSE_LOOKUP or op == FUSE_GETATTR or op == FUSE_SETATTR or op == FUSE_OPEN
          or op == FUSE_RELEASE or op == FUSE_READDIR or op == FUSE_READ or op == FUSE_WRITE):
        if r.no_gil:
            return True
        _py_request(r)
    else:
        _reply_err(r, ENOSYS)
    return False


cdef void _account(session_t* s, uint32_t op, uint64_t ns) noexcept nogil:
    """One request of opcode `op` served in `ns`: its count, time and latency bucket."""
    cdef uint64_t us = ns // 1000
    cdef int b = 0
    if op >= NR_OPS:
        return
    while us and b < NR_BUCKETS - 1:
        us >>= 1
        b += 1
    za_add(&s.st.op_ns[op], ns)
    za_add(&s.st.op_hist[op][b], 1)


# The requests the tree is asked, by the kernel's names for them (lower case).
OPCODE_NAMES = {FUSE_LOOKUP: "lookup", FUSE_FORGET: "forget", FUSE_GETATTR: "getattr",
                FUSE_SETATTR: "setattr", FUSE_OPEN: "open", FUSE_READ: "read",
                FUSE_WRITE: "write", FUSE_STATFS: "statfs", FUSE_RELEASE: "release",
                FUSE_FSYNC: "fsync", FUSE_FLUSH: "flush", FUSE_INIT: "init",
                FUSE_OPENDIR: "opendir", FUSE_READDIR: "readdir", FUSE_RELEASEDIR: "releasedir",
                FUSE_INTERRUPT: "interrupt", FUSE_BATCH_FORGET: "batch_forget",
                FUSE_FALLOCATE: "fallocate"}
LATENCY_BUCKETS = [2 ** b / 1e6 for b in range(NR_BUCKETS - 1)]   # seconds; then +Inf


# --- the Python face -------------------------------------------------------------------------

TRANSPORTS = ("classic", "io_uring")


cdef class Session:
    """One mounted FUSE file system, served by its transports' threads (dev.pxi, and
    dev_uring.pxi once INIT agrees it). Its methods take the GIL, from any Python thread.

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
    cdef dict _writing                   # unique -> ident of the thread serving that WRITE
    cdef dict _interrupted               # uniques interrupted before their WRITE was seen

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
        self._writing = {}
        self._interrupted = {}
        self.s.owner = <void*>self
        self.s.max_io = max_io
        self.s.max_background = max_background
        self.s.attr_timeout = attr_timeout
        self.s.entry_timeout = entry_timeout
        # A request: its header, a WRITE's own header, and up to max_write of data.
        self.s.request_size = max_io + PAGE_SIZE
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
        cdef int rc
        cdef timespec deadline
        if s.fd < 0:
            raise RuntimeError("session closed")
        s.workers = <worker_t*>calloc(s.nr_workers, sizeof(worker_t))
        if s.workers == NULL:
            raise MemoryError()
        with nogil:
            rc = _workers_start(s)
            if rc != 0:
                za_store(&s.stopping, 1)
            # Until every thread of both transports has ended (the connection is gone), or
            # exit() was asked and a grace period passed: workers still waiting in read(2)
            # are then cancelled. After stop() there is no unmount to wait for: they are
            # cancelled at once.
            pthread_mutex_lock(&s.lock)
            while s.running and not za_load(&s.stopping):
                fe_timedwait(&s.done, &s.lock, _after(&deadline, 1000))
            if s.running and za_load(&s.stopping) != STOP_HANDOVER:
                _after(&deadline, EXIT_GRACE_MS)
                while s.running and fe_timedwait(&s.done, &s.lock, &deadline) == 0:
                    pass
            pthread_mutex_unlock(&s.lock)
            _workers_end(s)
            _uring_stop(s)
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
        histogram's bucket b counting requests up to 2**b microseconds (the last: any). The
        count is the histogram's sum, so the two agree in every snapshot."""
        cdef stats_t* st = &self.s.st
        out = {}
        for op, name in OPCODE_NAMES.items():
            hist = [za_load(&st.op_hist[op][b]) for b in range(NR_BUCKETS)]
            if any(hist):
                out[name] = (sum(hist), za_load(&st.op_ns[op]) / 1e9, hist)
        return out

    def __dealloc__(self) -> None:
        if self.s.fd >= 0:
            close(self.s.fd)
        pthread_cond_destroy(&self.s.done)
        pthread_mutex_destroy(&self.s.lock)


cdef timespec* _after(timespec* t, long ms) noexcept nogil:
    """`t` set to `ms` milliseconds from now, on CLOCK_REALTIME."""
    clock_gettime(CLOCK_REALTIME, t)
    t.tv_sec += ms // 1000
    t.tv_nsec += (ms % 1000) * 1000000
    if t.tv_nsec >= 1000000000:
        t.tv_sec += 1
        t.tv_nsec -= 1000000000
    return t
