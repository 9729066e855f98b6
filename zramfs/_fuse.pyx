# cython: language_level=3, boundscheck=False, wraparound=False
"""Thin libfuse3 low-level binding for zramfs.

Request routing (decided in C, per request):

* READ / WRITE / FALLOCATE on a *data handle* (fh has DATA_FH_FLAG set) are
  served entirely in the libfuse worker thread by the C `zramfs_data_ops`
  function pointers, without ever touching the GIL.
* Everything else acquires the GIL and calls a method of the Python `ops`
  object (same name as the FUSE op).  The method returns a result or raises
  OSError(errno) -> fuse_reply_err(errno).  Any other exception is logged and
  answered with EIO; the mount keeps running.  A missing method -> ENOSYS.

Python ops protocol (all optional; called from libfuse worker threads):
    init(info: dict) -> None                    # what the kernel offered
    lookup(parent: int, name: str) -> Attr
    getattr(ino: int) -> Attr
    setattr(ino: int, changes: dict, fh: int | None) -> Attr
    readdir(ino: int) -> list[tuple[str, Attr]]
    open(ino: int, flags: int) -> OpenReply
    release(ino: int, fh: int) -> None
    read(ino: int, fh: int, size: int, off: int) -> bytes
    write(ino: int, fh: int, data: bytes, off: int) -> int
"Attr" is anything with st_ino/st_mode/st_size (os.stat_result works too).
"""

import errno as _errno
import logging
import threading

from cpython.pycapsule cimport PyCapsule_GetPointer
from libc.errno cimport EIO, ENOSYS, EOPNOTSUPP, EINVAL, ENOMEM, EPERM
from posix.fcntl cimport O_DIRECT
from posix.types cimport mode_t, dev_t
from libc.stdint cimport uint64_t
from libc.stdlib cimport malloc, free
from libc.string cimport memset
from posix.types cimport off_t
from posix.stat cimport struct_stat

from zramfs cimport fuse_lowlevel as ll

cdef extern from "Python.h":
    # Safe without the GIL: only inspects the thread state.
    int PyGILState_Check() nogil
from zramfs.data_ops cimport zramfs_data_ops, ZRAMFS_DATA_OPS_CAPSULE
from zramfs.zram cimport za_add, za_load, za_max, za_or

log = logging.getLogger("zramfs.fuse")

cdef extern from *:
    """
    /* A READ reply buffer per worker thread, kept for the thread's life and grown to the
       largest read it served (max_read at most). A malloc per request costs more than the
       data path itself: glibc serves 1 MiB by mmap, so every read faulted in 256 fresh
       pages and unmapped them again. Freed when the worker thread exits. */
    #include <pthread.h>
    #include <stdlib.h>
    static pthread_key_t reply_buf_key;
    static pthread_once_t reply_buf_once = PTHREAD_ONCE_INIT;
    static __thread char *reply_buf;
    static __thread size_t reply_buf_cap;
    static void reply_buf_key_init(void) { pthread_key_create(&reply_buf_key, free); }
    static char *reply_buffer(size_t size) {
        char *p;
        if (size <= reply_buf_cap)
            return reply_buf;
        if (size < 4096)
            size = 4096;
        pthread_once(&reply_buf_once, reply_buf_key_init);
        p = malloc(size);
        if (p == NULL)
            return NULL;
        free(reply_buf);
        reply_buf = p;
        reply_buf_cap = size;
        pthread_setspecific(reply_buf_key, p);
        return p;
    }
    """
    char* reply_buffer(size_t size) nogil

# Handle encoding: top bit marks a data handle; the low 63 bits are the
# engine's own handle, passed verbatim to the data ops.
cdef extern from *:
    """
    #define DATA_FH_FLAG ((uint64_t)1 << 63)
    #define DATA_FH_MASK (DATA_FH_FLAG - 1)
    """
    const uint64_t DATA_FH_FLAG "DATA_FH_FLAG"
    const uint64_t DATA_FH_MASK "DATA_FH_MASK"

cdef extern from "<linux/falloc.h>":
    int FALLOC_FL_KEEP_SIZE, FALLOC_FL_ZERO_RANGE

cdef enum:
    LOGICAL_BLOCK = 512          # a device file's logical block size, as a block device's

cdef struct stats_t:
    size_t data_reads
    size_t data_writes
    size_t data_fallocates
    size_t bytes_read
    size_t bytes_written
    size_t max_read_size
    size_t max_write_size
    size_t falloc_mode_mask      # bit m set <=> fallocate mode m (<64) seen
    size_t data_ops_with_gil     # must stay 0: proof the data path is GIL-free
    size_t py_calls

cdef struct session_ctx:
    void* owner                     # borrowed Session*, valid while mounted
    const zramfs_data_ops* dops     # NULL if no data engine
    unsigned max_io                 # max_write == max_read requested in init
    unsigned max_background         # async (libaio) requests the kernel may queue to us
    double attr_timeout
    double entry_timeout
    stats_t st

CAP_NAMES = {
    "ASYNC_READ": ll.FUSE_CAP_ASYNC_READ, "POSIX_LOCKS": ll.FUSE_CAP_POSIX_LOCKS,
    "ATOMIC_O_TRUNC": ll.FUSE_CAP_ATOMIC_O_TRUNC,
    "EXPORT_SUPPORT": ll.FUSE_CAP_EXPORT_SUPPORT, "DONT_MASK": ll.FUSE_CAP_DONT_MASK,
    "SPLICE_WRITE": ll.FUSE_CAP_SPLICE_WRITE, "SPLICE_MOVE": ll.FUSE_CAP_SPLICE_MOVE,
    "SPLICE_READ": ll.FUSE_CAP_SPLICE_READ, "FLOCK_LOCKS": ll.FUSE_CAP_FLOCK_LOCKS,
    "IOCTL_DIR": ll.FUSE_CAP_IOCTL_DIR, "AUTO_INVAL_DATA": ll.FUSE_CAP_AUTO_INVAL_DATA,
    "READDIRPLUS": ll.FUSE_CAP_READDIRPLUS,
    "READDIRPLUS_AUTO": ll.FUSE_CAP_READDIRPLUS_AUTO,
    "ASYNC_DIO": ll.FUSE_CAP_ASYNC_DIO, "WRITEBACK_CACHE": ll.FUSE_CAP_WRITEBACK_CACHE,
    "NO_OPEN_SUPPORT": ll.FUSE_CAP_NO_OPEN_SUPPORT,
    "PARALLEL_DIROPS": ll.FUSE_CAP_PARALLEL_DIROPS, "POSIX_ACL": ll.FUSE_CAP_POSIX_ACL,
    "HANDLE_KILLPRIV": ll.FUSE_CAP_HANDLE_KILLPRIV,
    "CACHE_SYMLINKS": ll.FUSE_CAP_CACHE_SYMLINKS,
    "NO_OPENDIR_SUPPORT": ll.FUSE_CAP_NO_OPENDIR_SUPPORT,
    "EXPLICIT_INVAL_DATA": ll.FUSE_CAP_EXPLICIT_INVAL_DATA,
    "EXPIRE_ONLY": ll.FUSE_CAP_EXPIRE_ONLY,
}


def cap_names(unsigned bits) -> list:
    """Decode FUSE_CAP_* bits into names."""
    return [n for n, v in CAP_NAMES.items() if bits & v]


# --------------------------------------------------------------------------
# Python-visible result types
# --------------------------------------------------------------------------
class Attr:
    """Inode attributes returned by lookup/getattr/setattr."""
    __slots__ = ("st_ino", "st_mode", "st_nlink", "st_size", "st_uid",
                 "st_gid", "st_mtime")

    def __init__(self, st_ino: int, st_mode: int, st_size: int = 0, *,
                 st_nlink: int = 1, st_uid: int = 0, st_gid: int = 0,
                 st_mtime: float = 0.0) -> None:
        self.st_ino = st_ino
        self.st_mode = st_mode
        self.st_size = st_size
        self.st_nlink = st_nlink
        self.st_uid = st_uid
        self.st_gid = st_gid
        self.st_mtime = st_mtime


class OpenReply:
    """Result of ops.open().  data=True routes READ/WRITE/FALLOCATE of this
    handle to the C data ops (fh is then the engine handle, < 2**63)."""
    __slots__ = ("fh", "data", "direct_io", "keep_cache", "nonseekable")

    def __init__(self, fh: int = 0, *, data: bool = False, direct_io: bool = True,
                 keep_cache: bool = False, nonseekable: bool = False) -> None:
        self.fh = fh
        self.data = data
        self.direct_io = direct_io
        self.keep_cache = keep_cache
        self.nonseekable = nonseekable


# --------------------------------------------------------------------------
# Helpers for the Python path (all called with the GIL held)
# --------------------------------------------------------------------------
cdef inline session_ctx* _ctx(ll.fuse_req_t req) noexcept nogil:
    return <session_ctx*> ll.fuse_req_userdata(req)


cdef inline object _ops(session_ctx* c):
    return (<Session> c.owner).ops


cdef int _errno_of(str op, BaseException exc) noexcept:
    """Map a handler exception to an errno; log anything unexpected."""
    if isinstance(exc, OSError) and (<object> exc).errno:
        return (<object> exc).errno
    try:
        log.error("FUSE %s handler failed", op, exc_info=exc)
    except BaseException:
        pass
    return EIO


cdef object _handler(session_ctx* c, str op):
    """Bound ops method, or None if the ops object does not implement it."""
    c.st.py_calls += 1           # under the GIL: no atomics needed
    return getattr(_ops(c), op, None)


cdef int _fill_stat(struct_stat* st, object a) except -1:
    memset(st, 0, sizeof(struct_stat))
    st.st_ino = a.st_ino
    st.st_mode = a.st_mode
    st.st_nlink = getattr(a, "st_nlink", 1)
    st.st_size = getattr(a, "st_size", 0)
    st.st_uid = getattr(a, "st_uid", 0)
    st.st_gid = getattr(a, "st_gid", 0)
    st.st_mtime = int(getattr(a, "st_mtime", 0))
    st.st_blksize = 4096
    st.st_blocks = (st.st_size + 511) // 512
    return 0


# --------------------------------------------------------------------------
# init: runs once, in a worker thread, before any other request
# --------------------------------------------------------------------------
cdef void _ll_init(void* userdata, ll.fuse_conn_info* conn) noexcept nogil:
    cdef session_ctx* c = <session_ctx*> userdata
    cdef ll.fuse_conn_info offered = conn[0]     # snapshot for reporting
    # The kernel splits larger O_DIRECT requests into pieces of this size (libfuse also
    # derives max_pages, the read limit, from max_write) and, for libaio, sends the pieces all
    # at once: a 1 MiB request at QD1 reaches us as four 256 KiB requests served side by side,
    # one's copy through /dev/fuse overlapping another's compression. fio 1M QD1 here, with
    # 1 MiB requests then 256 KiB: fresh writes 0.9-1.1 -> 1.2-1.5 GB/s, reads 2.5 -> 3.2 GB/s.
    conn.max_write = c.max_io
    # Must equal the max_read= mount option or libfuse fails INIT (EPROTO).
    conn.max_read = c.max_io
    conn.max_readahead = 0       # data files are direct_io; no page cache
    # O_DIRECT libaio requests are FUSE background requests: beyond max_background (default
    # 12) the kernel parks them in its own queue and sends the next only when one completes,
    # from our reply's writev. So QD64 reached us as QD12, and most requests cost a sleep and
    # a wakeup. 128 lets two QD32 streams queue all at once (fio 4K QD32x2: context switches
    # per op 1.3-1.4 -> 0.7, random write IOPS +25 %, random read +20 %).
    conn.max_background = c.max_background
    conn.congestion_threshold = c.max_background * 3 // 4
    # We consume WRITE payloads from libfuse's buffer; splice buys nothing.
    conn.want &= ~(ll.FUSE_CAP_SPLICE_READ | ll.FUSE_CAP_SPLICE_WRITE |
                   ll.FUSE_CAP_SPLICE_MOVE | ll.FUSE_CAP_WRITEBACK_CACHE)
    if conn.capable & ll.FUSE_CAP_ASYNC_DIO:
        conn.want |= ll.FUSE_CAP_ASYNC_DIO   # lets libaio keep QD>1 per file
    # O_TRUNC comes with OPEN (and is ignored there, as a block device and sysfs ignore it)
    # instead of as a SETATTR of size 0: so a SETATTR of a size is always a real truncate,
    # which a device file refuses.
    if conn.capable & ll.FUSE_CAP_ATOMIC_O_TRUNC:
        conn.want |= ll.FUSE_CAP_ATOMIC_O_TRUNC
    _py_init(c, &offered, conn)


cdef void _py_init(session_ctx* c, ll.fuse_conn_info* offered,
                   ll.fuse_conn_info* conn) noexcept with gil:
    # `offered` = kernel/libfuse values before our changes; `conn` = final.
    info = {
        "proto": (conn.proto_major, conn.proto_minor),
        "capable": conn.capable, "capable_names": cap_names(conn.capable),
        "want_default_names": cap_names(offered.want),
        "want": conn.want, "want_names": cap_names(conn.want),
        "offered_max_write": offered.max_write,
        "offered_max_read": offered.max_read,
        "offered_max_readahead": offered.max_readahead,
        "max_write": conn.max_write, "max_read": conn.max_read,
        "max_readahead": conn.max_readahead,
        "max_background": conn.max_background,
        "congestion_threshold": conn.congestion_threshold,
        "time_gran": conn.time_gran,
    }
    log.debug("FUSE init: %s", info)
    try:
        fn = _handler(c, "init")
        if fn is not None:
            fn(info)
    except BaseException as e:
        _errno_of("init", e)


# --------------------------------------------------------------------------
# Metadata ops: always Python
# --------------------------------------------------------------------------
cdef void _reply_entry(ll.fuse_req_t req, session_ctx* c, object a) noexcept with gil:
    cdef ll.fuse_entry_param e
    memset(&e, 0, sizeof(e))
    try:
        _fill_stat(&e.attr, a)
    except BaseException as exc:
        ll.fuse_reply_err(req, _errno_of("lookup", exc))
        return
    e.ino = e.attr.st_ino
    e.attr_timeout = c.attr_timeout
    e.entry_timeout = c.entry_timeout
    with nogil:
        ll.fuse_reply_entry(req, &e)


cdef void _ll_lookup(ll.fuse_req_t req, ll.fuse_ino_t parent,
                     const char* name) noexcept with gil:
    cdef session_ctx* c = _ctx(req)
    try:
        fn = _handler(c, "lookup")
        if fn is None:
            ll.fuse_reply_err(req, ENOSYS)
            return
        a = fn(parent, name.decode("utf-8", "surrogateescape"))
    except BaseException as e:
        ll.fuse_reply_err(req, _errno_of("lookup", e))
        return
    _reply_entry(req, c, a)


cdef void _reply_attr(ll.fuse_req_t req, session_ctx* c, str op, object fn,
                      tuple args) noexcept with gil:
    cdef struct_stat st
    try:
        if fn is None:
            ll.fuse_reply_err(req, ENOSYS)
            return
        _fill_stat(&st, fn(*args))
    except BaseException as e:
        ll.fuse_reply_err(req, _errno_of(op, e))
        return
    with nogil:
        ll.fuse_reply_attr(req, &st, c.attr_timeout)


cdef void _ll_getattr(ll.fuse_req_t req, ll.fuse_ino_t ino,
                      ll.fuse_file_info* fi) noexcept with gil:
    cdef session_ctx* c = _ctx(req)
    _reply_attr(req, c, "getattr", _handler(c, "getattr"), (ino,))


cdef void _ll_setattr(ll.fuse_req_t req, ll.fuse_ino_t ino, struct_stat* attr,
                      int to_set, ll.fuse_file_info* fi) noexcept with gil:
    cdef session_ctx* c = _ctx(req)
    changes = {}
    if to_set & ll.FUSE_SET_ATTR_SIZE:
        changes["size"] = attr.st_size
    if to_set & ll.FUSE_SET_ATTR_MODE:
        changes["mode"] = attr.st_mode
    if to_set & ll.FUSE_SET_ATTR_UID:
        changes["uid"] = attr.st_uid
    if to_set & ll.FUSE_SET_ATTR_GID:
        changes["gid"] = attr.st_gid
    if to_set & (ll.FUSE_SET_ATTR_MTIME | ll.FUSE_SET_ATTR_MTIME_NOW):
        changes["mtime"] = None if to_set & ll.FUSE_SET_ATTR_MTIME_NOW else attr.st_mtime
    if to_set & (ll.FUSE_SET_ATTR_ATIME | ll.FUSE_SET_ATTR_ATIME_NOW):
        changes["atime"] = None if to_set & ll.FUSE_SET_ATTR_ATIME_NOW else attr.st_atime
    fh = None if fi == NULL else (fi.fh & DATA_FH_MASK)
    _reply_attr(req, c, "setattr", _handler(c, "setattr"), (ino, changes, fh))


cdef void _ll_readdir(ll.fuse_req_t req, ll.fuse_ino_t ino, size_t size,
                      off_t off, ll.fuse_file_info* fi) noexcept with gil:
    """Entries come from ops.readdir(ino) each call; offset i+1 = after entry i."""
    cdef session_ctx* c = _ctx(req)
    cdef struct_stat st
    cdef size_t pos = 0, need
    cdef char* buf = <char*> malloc(size)
    if buf == NULL:
        ll.fuse_reply_err(req, ENOMEM)
        return
    try:
        fn = _handler(c, "readdir")
        if fn is None:
            ll.fuse_reply_err(req, ENOSYS)
            return
        entries = fn(ino)
        for i in range(off, len(entries)):
            name, a = entries[i]
            _fill_stat(&st, a)
            bname = name.encode("utf-8", "surrogateescape")
            need = ll.fuse_add_direntry(req, buf + pos, size - pos, bname, &st, i + 1)
            if need > size - pos:
                break                  # buffer full; kernel asks again from i
            pos += need
        with nogil:
            ll.fuse_reply_buf(req, buf, pos)
    except BaseException as e:
        ll.fuse_reply_err(req, _errno_of("readdir", e))
    finally:
        free(buf)


cdef void _ll_open(ll.fuse_req_t req, ll.fuse_ino_t ino,
                   ll.fuse_file_info* fi) noexcept with gil:
    cdef session_ctx* c = _ctx(req)
    try:
        fn = _handler(c, "open")
        if fn is None:
            ll.fuse_reply_err(req, ENOSYS)
            return
        r = fn(ino, fi.flags)
        fh = int(r.fh)
        if not 0 <= fh <= DATA_FH_MASK or (r.data and c.dops == NULL):
            raise OSError(EINVAL, "bad open reply")
    except BaseException as e:
        ll.fuse_reply_err(req, _errno_of("open", e))
        return
    if r.data:
        fi.fh = DATA_FH_FLAG | fh
        fi.direct_io = 1        # no page-cache copy of device data
        fi.keep_cache = 0
    else:
        fi.fh = fh
        fi.direct_io = 1 if r.direct_io else 0
        fi.keep_cache = 1 if r.keep_cache else 0
    fi.nonseekable = 1 if r.nonseekable else 0
    # No write cache => FLUSH is pointless; without this every close(2) waits
    # for a FLUSH round trip (and fails with ECONNABORTED during shutdown).
    fi.noflush = 1
    cdef int rc
    with nogil:
        rc = ll.fuse_reply_open(req, fi)
    if rc != 0:
        # The opener was interrupted: the kernel will never send RELEASE for
        # this handle, so release it ourselves.
        _call_release(c, ino, fh)


cdef void _call_release(session_ctx* c, ll.fuse_ino_t ino, uint64_t fh) noexcept with gil:
    try:
        fn = _handler(c, "release")
        if fn is not None:
            fn(ino, fh)
    except BaseException as e:
        _errno_of("release", e)


cdef void _ll_release(ll.fuse_req_t req, ll.fuse_ino_t ino,
                      ll.fuse_file_info* fi) noexcept with gil:
    _call_release(_ctx(req), ino, fi.fh & DATA_FH_MASK)
    ll.fuse_reply_err(req, 0)


# --------------------------------------------------------------------------
# I/O ops: routed in C.  Data handles never take the GIL.
# --------------------------------------------------------------------------
cdef inline void _note_gil(session_ctx* c) noexcept nogil:
    if PyGILState_Check():
        za_add(&c.st.data_ops_with_gil, 1)


cdef inline bint _misaligned(int flags, uint64_t off, uint64_t size) noexcept nogil:
    """O_DIRECT I/O on a block device must be aligned to its logical block (512 bytes)."""
    return flags & O_DIRECT and (off | size) & (LOGICAL_BLOCK - 1)


cdef void _ll_read(ll.fuse_req_t req, ll.fuse_ino_t ino, size_t size, off_t off,
                   ll.fuse_file_info* fi) noexcept nogil:
    cdef session_ctx* c = _ctx(req)
    if fi.fh & DATA_FH_FLAG and _misaligned(fi.flags, off, size):
        ll.fuse_reply_err(req, EINVAL)
    elif fi.fh & DATA_FH_FLAG:
        _data_read(req, c, fi.fh & DATA_FH_MASK, size, off)
    else:
        _py_read(req, c, ino, fi.fh, size, off)


cdef void _data_read(ll.fuse_req_t req, session_ctx* c, uint64_t fh, size_t size,
                     off_t off) noexcept nogil:
    _note_gil(c)
    za_add(&c.st.data_reads, 1)
    za_max(&c.st.max_read_size, size)
    # The engine decompresses into this buffer and libfuse copies it to /dev/fuse: one copy.
    cdef char* buf = reply_buffer(size)
    if buf == NULL:
        ll.fuse_reply_err(req, ENOMEM)
        return
    cdef ssize_t n = c.dops.read(c.dops.ctx, fh, buf, size, off)
    if n < 0:
        ll.fuse_reply_err(req, -n)
    else:
        za_add(&c.st.bytes_read, n)
        ll.fuse_reply_buf(req, buf, n)


cdef void _py_read(ll.fuse_req_t req, session_ctx* c, ll.fuse_ino_t ino,
                   uint64_t fh, size_t size, off_t off) noexcept with gil:
    cdef const char* p
    cdef Py_ssize_t n
    cdef bytes data
    try:
        fn = _handler(c, "read")
        if fn is None:
            ll.fuse_reply_err(req, ENOSYS)
            return
        data = bytes(fn(ino, fh, size, off))[:size]
    except BaseException as e:
        ll.fuse_reply_err(req, _errno_of("read", e))
        return
    p = data
    n = len(data)
    with nogil:
        ll.fuse_reply_buf(req, p, n)


cdef void _ll_write(ll.fuse_req_t req, ll.fuse_ino_t ino, const char* buf,
                    size_t size, off_t off, ll.fuse_file_info* fi) noexcept nogil:
    cdef session_ctx* c = _ctx(req)
    cdef ssize_t n
    if fi.fh & DATA_FH_FLAG and _misaligned(fi.flags, off, size):
        ll.fuse_reply_err(req, EINVAL)
    elif fi.fh & DATA_FH_FLAG:
        _note_gil(c)
        za_add(&c.st.data_writes, 1)
        za_max(&c.st.max_write_size, size)
        n = c.dops.write(c.dops.ctx, fi.fh & DATA_FH_MASK, buf, size, off)
        if n < 0:
            ll.fuse_reply_err(req, -n)
        else:
            za_add(&c.st.bytes_written, n)
            ll.fuse_reply_write(req, n)
    else:
        _py_write(req, c, ino, fi.fh, buf, size, off)


cdef void _py_write(ll.fuse_req_t req, session_ctx* c, ll.fuse_ino_t ino,
                    uint64_t fh, const char* buf, size_t size,
                    off_t off) noexcept with gil:
    try:
        fn = _handler(c, "write")
        if fn is None:
            ll.fuse_reply_err(req, ENOSYS)
            return
        n = int(fn(ino, fh, buf[:size], off))
    except BaseException as e:
        ll.fuse_reply_err(req, _errno_of("write", e))
        return
    ll.fuse_reply_write(req, n)


cdef void _ll_fallocate(ll.fuse_req_t req, ll.fuse_ino_t ino, int mode,
                        off_t offset, off_t length,
                        ll.fuse_file_info* fi) noexcept nogil:
    cdef session_ctx* c = _ctx(req)
    if not (fi.fh & DATA_FH_FLAG):
        ll.fuse_reply_err(req, EOPNOTSUPP)
        return
    _note_gil(c)
    za_add(&c.st.data_fallocates, 1)
    if 0 <= mode < 64:
        za_or(&c.st.falloc_mode_mask, (<size_t> 1) << mode)
    # As blkdev_fallocate: whole logical blocks only, and write-zeroes with or without
    # KEEP_SIZE (a device's size never changes anyway).
    if (offset | length) & (LOGICAL_BLOCK - 1):
        ll.fuse_reply_err(req, EINVAL)
        return
    if mode == FALLOC_FL_ZERO_RANGE:
        mode |= FALLOC_FL_KEEP_SIZE
    # The engine decides which modes it supports (EOPNOTSUPP otherwise).
    ll.fuse_reply_err(req, -c.dops.fallocate(c.dops.ctx, fi.fh & DATA_FH_MASK,
                                             mode, offset, length))


# The tree's shape never changes by a request: EPERM, as sysfs answers.
cdef void _ll_mknod(ll.fuse_req_t req, ll.fuse_ino_t parent, const char* name, mode_t mode,
                    dev_t rdev) noexcept nogil:
    ll.fuse_reply_err(req, EPERM)


cdef void _ll_mkdir(ll.fuse_req_t req, ll.fuse_ino_t parent, const char* name,
                    mode_t mode) noexcept nogil:
    ll.fuse_reply_err(req, EPERM)


cdef void _ll_unlink(ll.fuse_req_t req, ll.fuse_ino_t parent, const char* name) noexcept nogil:
    ll.fuse_reply_err(req, EPERM)


cdef void _ll_symlink(ll.fuse_req_t req, const char* link, ll.fuse_ino_t parent,
                      const char* name) noexcept nogil:
    ll.fuse_reply_err(req, EPERM)


cdef void _ll_rename(ll.fuse_req_t req, ll.fuse_ino_t parent, const char* name,
                     ll.fuse_ino_t newparent, const char* newname,
                     unsigned int flags) noexcept nogil:
    ll.fuse_reply_err(req, EPERM)


cdef void _ll_link(ll.fuse_req_t req, ll.fuse_ino_t ino, ll.fuse_ino_t newparent,
                   const char* newname) noexcept nogil:
    ll.fuse_reply_err(req, EPERM)


cdef void _ll_create(ll.fuse_req_t req, ll.fuse_ino_t parent, const char* name, mode_t mode,
                     ll.fuse_file_info* fi) noexcept nogil:
    ll.fuse_reply_err(req, EPERM)


cdef ll.fuse_lowlevel_ops _make_ops() noexcept:
    cdef ll.fuse_lowlevel_ops o
    memset(&o, 0, sizeof(o))
    o.init = _ll_init
    o.lookup = _ll_lookup
    o.getattr = _ll_getattr
    o.setattr = _ll_setattr
    o.readdir = _ll_readdir
    o.open = _ll_open
    o.release = _ll_release
    o.read = _ll_read
    o.write = _ll_write
    o.fallocate = _ll_fallocate
    o.mknod = _ll_mknod
    o.mkdir = _ll_mkdir
    o.unlink = _ll_unlink
    o.rmdir = _ll_unlink
    o.symlink = _ll_symlink
    o.rename = _ll_rename
    o.link = _ll_link
    o.create = _ll_create
    # forget/flush/fsync/opendir/statfs left NULL: libfuse's defaults
    # (no-op / ENOSYS which the kernel then remembers as "not needed").
    return o

cdef ll.fuse_lowlevel_ops LL_OPS = _make_ops()


# --------------------------------------------------------------------------
# Session
# --------------------------------------------------------------------------
cdef class Session:
    """One mounted FUSE filesystem.

    Session(mountpoint, ops, data_ops=capsule or None, fsname=..., options=(), ...)
    mounts immediately.  run() serves requests in the calling thread (GIL
    released) until unmounted; exit() makes run() return; close() frees.
    """
    cdef ll.fuse_session* se
    cdef session_ctx c
    cdef readonly object ops
    cdef readonly object data_ops        # the data ops' capsule, kept while mounted
    cdef readonly str mountpoint
    cdef unsigned max_threads
    cdef int max_idle_threads            # -1: libfuse default (never reap)
    cdef object _lock                    # serialises unmount/destroy

    def __cinit__(self) -> None:
        self.se = NULL
        memset(&self.c, 0, sizeof(self.c))

    def __init__(self, mountpoint: str, ops: object, *, data_ops: object = None,
                 fsname: str = "zramfs", options: tuple = (),
                 allow_other: bool = False, max_io: int = 256 << 10,
                 max_threads: int = 8, max_idle_threads: int | None = None,
                 max_background: int = 128,
                 attr_timeout: float = 1.0, entry_timeout: float = 1.0,
                 debug: bool = False) -> None:
        self.ops = ops
        self.data_ops = data_ops
        self.mountpoint = mountpoint
        self.max_threads = max_threads
        # Reaping idle workers is discouraged by libfuse, and costs us more:
        # every new thread needs a fresh PyThreadState on its first `with gil`.
        self.max_idle_threads = -1 if max_idle_threads is None else max_idle_threads
        self._lock = threading.Lock()
        self.c.owner = <void*> self
        self.c.max_io = max_io
        self.c.max_background = max_background
        self.c.attr_timeout = attr_timeout
        self.c.entry_timeout = entry_timeout
        if data_ops is not None:
            self.c.dops = <const zramfs_data_ops*> PyCapsule_GetPointer(
                data_ops, ZRAMFS_DATA_OPS_CAPSULE)
        opts = ["default_permissions", f"fsname={fsname}", "subtype=zramfs",
                # must match conn->max_read set in init (libfuse checks)
                f"max_read={max_io}"]
        if allow_other:
            opts.append("allow_other")
        opts.extend(options)
        argv = ["zramfs", "-o", ",".join(opts)] + (["-d"] if debug else [])
        self._new_session([a.encode() for a in argv])
        if ll.fuse_session_mount(self.se, mountpoint.encode()) != 0:
            ll.fuse_session_destroy(self.se)
            self.se = NULL
            raise OSError(_errno.EIO, f"fuse_session_mount({mountpoint!r}) failed")

    cdef _new_session(self, list bargv):
        cdef ll.fuse_args args
        cdef char** argv = <char**> malloc((len(bargv) + 1) * sizeof(char*))
        if argv == NULL:
            raise MemoryError()
        for i, a in enumerate(bargv):
            argv[i] = a                      # bargv keeps the bytes alive
        argv[len(bargv)] = NULL
        args.argc = len(bargv)
        args.argv = argv
        args.allocated = 0
        self.se = ll.fuse_session_new(&args, &LL_OPS, sizeof(LL_OPS), &self.c)
        ll.fuse_opt_free_args(&args)         # frees only libfuse's copy
        free(argv)
        if self.se == NULL:
            raise OSError(_errno.EINVAL, "fuse_session_new failed (see stderr)")

    def run(self) -> int:
        """Serve requests until unmounted/exit(); GIL released meanwhile.

        Returns libfuse's result (0 on normal unmount, -errno on error).
        Call from a non-main thread if you need Python signal handlers."""
        if self.se == NULL:
            raise RuntimeError("session closed")
        cdef ll.fuse_loop_config* cfg = ll.fuse_loop_cfg_create()
        cdef int rc
        if cfg == NULL:
            raise MemoryError()
        # max_threads: on 2 cores, 16 workers mostly woke to find the request taken or waited
        # for a CPU; 4 cost fewer context switches per op (0.5 against 0.7 with 16, fio 4K
        # QD32x2), at the same IOPS. 8: a long attribute write (writeback, recompress, a
        # reset draining) holds its worker until done, and a few at once must not leave
        # device I/O, swap among it, without workers.
        # clone_fd: each worker reads its own /dev/fuse fd (no thundering
        # herd, and the session fd may be closed by unmount while running).
        ll.fuse_loop_cfg_set_clone_fd(cfg, 1)
        ll.fuse_loop_cfg_set_max_threads(cfg, self.max_threads)
        if self.max_idle_threads >= 0:
            ll.fuse_loop_cfg_set_idle_threads(cfg, self.max_idle_threads)
        with nogil:
            rc = ll.fuse_session_loop_mt(self.se, cfg)
        ll.fuse_loop_cfg_destroy(cfg)
        return rc

    def exit(self, unmount: bool = True) -> None:
        """Make run() return: flag exit, then lazily unmount.

        fuse_session_exit() alone (unmount=False) only sets a flag: idle
        workers sit in read() on /dev/fuse and notice it only after the next
        request arrives.  The detach unmount makes the kernel destroy the
        connection (once no file is open), which fails those reads with
        ENODEV.  Safe from any thread (even a FUSE handler): nothing here
        waits for requests to finish."""
        cdef bint do_unmount = unmount
        with self._lock:
            if self.se == NULL:
                return
            with nogil:
                ll.fuse_session_exit(self.se)
                if do_unmount:
                    ll.fuse_session_unmount(self.se)

    def unmount(self) -> None:
        """Lazy unmount without setting the exit flag (run() returns when the
        kernel closes the connection, i.e. after the last open file closes)."""
        with self._lock:
            if self.se != NULL:
                with nogil:
                    ll.fuse_session_unmount(self.se)

    def close(self) -> None:
        """Unmount (if still mounted) and free the session.  run() must have
        returned; after this no callback can reference this object."""
        with self._lock:
            if self.se != NULL:
                with nogil:
                    ll.fuse_session_unmount(self.se)
                    ll.fuse_session_destroy(self.se)
                self.se = NULL

    def stats(self) -> dict:
        """Snapshot of data-path counters (relaxed atomics)."""
        cdef stats_t* s = &self.c.st
        return {
            "data_reads": za_load(&s.data_reads),
            "data_writes": za_load(&s.data_writes),
            "data_fallocates": za_load(&s.data_fallocates),
            "bytes_read": za_load(&s.bytes_read),
            "bytes_written": za_load(&s.bytes_written),
            "max_read_size": za_load(&s.max_read_size),
            "max_write_size": za_load(&s.max_write_size),
            "falloc_modes": [m for m in range(64)
                             if za_load(&s.falloc_mode_mask) >> m & 1],
            "data_ops_with_gil": za_load(&s.data_ops_with_gil),
            "py_calls": s.py_calls,
        }

    def __dealloc__(self) -> None:
        if self.se != NULL:
            ll.fuse_session_unmount(self.se)
            ll.fuse_session_destroy(self.se)
