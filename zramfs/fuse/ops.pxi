# The requests the Python ops object answers (LOOKUP, GETATTR, SETATTR, OPEN, RELEASE, READDIR,
# READ/WRITE of files that are not data handles, and the INTERRUPT of such a WRITE), included
# by _fuse.pyx: the arguments unpacked into Python, the ops method of the request's name
# called, its result packed into the reply. Everything here holds the GIL; a request's reply
# goes out without it, through the path its transport gave it (fuse_req_t.reply).

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
    fa.blksize = PAGE_SIZE
    fa.blocks = (fa.size + 511) // 512          # st_blocks counts 512-byte units


cdef inline void _split(double t, uint64_t* sec, uint32_t* nsec) noexcept:
    sec[0] = <uint64_t>t
    nsec[0] = <uint32_t>((t - <double>sec[0]) * 1e9)


cdef str _name(const char* p, size_t room):
    """A NUL-terminated name from a request, no further than the request itself."""
    cdef size_t n = 0
    while n < room and p[n] != 0:
        n += 1
    return PyBytes_FromStringAndSize(p, n).decode("utf-8", "surrogateescape")


cdef void _py_init(session_t* s, const fuse_init_in* i, uint64_t offered,
                   uint64_t agreed) noexcept with gil:
    cdef Session owner = <Session>s.owner
    # What a later server of this connection must know, as the kernel never sends INIT again.
    owner._init_params = {"version": INIT_PARAMS_VERSION, "major": i.major, "minor": i.minor,
                          "offered": offered, "flags": agreed, "max_write": s.max_io,
                          "max_pages": s.max_io // PAGE_SIZE, "max_background": s.max_background}
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


cdef void _py_request(fuse_req_t* r) noexcept with gil:
    """A request for the ops object (_serve decided which), answered through r.reply."""
    cdef session_t* s = r.s
    cdef fuse_in_header* h = r.h
    cdef char* arg = r.arg
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
            a = fn(h.nodeid, _name(arg, r.arglen))
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
            o = fn(h.nodeid, (<const fuse_open_in*>arg).flags)
            fh = int(o.fh)
            if not 0 <= fh <= DATA_FH_MASK or (o.data and s.dops == NULL):
                raise OSError(EINVAL, "bad open reply")
            # No write cache, so nothing to flush at close: without NOFLUSH every close(2)
            # would wait for a FLUSH round trip.
            oo.open_flags = FOPEN_NOFLUSH
            if o.data:
                oo.fh = DATA_FH_FLAG | fh
                # No page-cache copy of a device's data; direct writes may run side by side.
                oo.open_flags |= FOPEN_DIRECT_IO | FOPEN_PARALLEL_DIRECT_WRITES
            else:
                oo.fh = fh
                if o.direct_io:
                    oo.open_flags |= FOPEN_DIRECT_IO
                if o.keep_cache:
                    oo.open_flags |= FOPEN_KEEP_CACHE
            if o.nonseekable:
                oo.open_flags |= FOPEN_NONSEEKABLE
            out, outlen = <const char*>&oo, sizeof(oo)
        elif op == FUSE_RELEASE:
            fn(h.nodeid, (<const fuse_release_in*>arg).fh & DATA_FH_MASK)
        elif op == FUSE_READDIR:
            ri = <const fuse_read_in*>arg
            outlen = _dirents(fn(h.nodeid), ri.offset, min(ri.size, s.max_io), r.scratch)
            out = r.scratch
        elif op == FUSE_READ:
            ri = <const fuse_read_in*>arg
            keep = bytes(fn(h.nodeid, ri.fh, ri.size, ri.offset))[:ri.size]
            out = keep
            outlen = len(keep)
        elif op == FUSE_WRITE:
            wi = <const fuse_write_in*>arg
            memset(&wo, 0, sizeof(wo))
            data = PyBytes_FromStringAndSize(r.data, wi.size)
            _writing(<Session>s.owner, h.unique, True)
            try:
                wo.size = int(fn(h.nodeid, wi.fh, data, wi.offset))
            finally:
                _writing(<Session>s.owner, h.unique, False)
            out, outlen = <const char*>&wo, sizeof(wo)
    except BaseException as e:
        err = _errno_of(opname, e)
        outlen = 0
    with nogil:
        _reply(r, err, out, outlen)


# --- INTERRUPT ------------------------------------------------------------------------------
# The kernel sends one when the process waiting for a request gets a signal (Ctrl-C on an
# `echo type=idle > recompress`). Only the ops object's WRITEs can be told: their thread's
# ident goes to ops.interrupt(), which stops what that thread waits for, if it can. An
# INTERRUPT may overtake its WRITE (two workers read them): it is kept, a few at most, for
# the WRITE to find.

cdef enum:
    INTERRUPTS_KEPT = 64


cdef void _interrupt(Session owner, uint64_t unique) except *:
    """Tells the ops object that the WRITE `unique` was interrupted (GIL held)."""
    fn = getattr(owner.ops, "interrupt", None)
    if fn is not None:
        fn(owner._writing[unique])


cdef void _writing(Session owner, uint64_t unique, bint start) except *:
    """A WRITE for the ops object starts (or ends) on this thread (GIL held)."""
    if not start:
        owner._writing.pop(unique, None)
        return
    owner._writing[unique] = threading.get_ident()
    if owner._interrupted.pop(unique, None) is not None:
        _interrupt(owner, unique)


cdef void _py_interrupt(fuse_req_t* r) noexcept with gil:
    cdef Session owner = <Session>r.s.owner
    cdef uint64_t unique = (<const fuse_interrupt_in*>r.arg).unique
    try:
        if unique in owner._writing:
            _interrupt(owner, unique)
        else:
            owner._interrupted[unique] = True
            while len(owner._interrupted) > INTERRUPTS_KEPT:
                del owner._interrupted[next(iter(owner._interrupted))]
    except BaseException as e:
        _errno_of("interrupt", e)


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
