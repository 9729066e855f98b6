# The io_uring transport, the server's side of the kernel's fs/fuse/dev_uring.c (FUSE over
# io_uring, 6.14+), included by _fuse.pyx: its rings and threads, and its own reply path.
# Everything here runs without the GIL; a ring is used by its own queue thread only, the
# helpers' work list under uring_t.lock, a queue's done list under its lock.
#
# The kernel sends ordinary requests through ring entries instead of /dev/fuse: each entry is
# a header buffer (struct fuse_uring_req_header) and a payload buffer registered with
# FUSE_IO_URING_CMD_REGISTER; a request completes the entry's command (CQE res 0), and
# COMMIT_AND_FETCH both answers it and hands the entry back. INIT, FORGET, INTERRUPT and
# notifications stay on /dev/fuse, so the classic workers (dev.pxi) keep reading it.
#
# Threads:
# * one queue thread per possible CPU (the kernel makes a request wait until every CPU's queue
#   has an entry; a request goes to the queue of the CPU its caller runs on), pinned to that
#   CPU. It owns its ring: only it submits, so the kernel copies requests in its context.
#   It serves the C-answered requests and the GIL-free data path (the same _serve the classic
#   workers run) and never takes the GIL: its requests go out with no_gil set.
# * NR_HELPERS helper threads take the requests that need Python (those _serve leaves
#   unanswered) from the queue threads and hand the answered entry back through the queue's
#   done list and eventfd, so a queue thread never waits for the GIL. They also serve large
#   device I/O, so the pieces of one large request run side by side.
#
# Where the answer goes: each entry's request carries _ring_reply and the entry itself, so
# whichever thread serves it answers in the entry's buffers; the queue thread commits it.

cdef extern from "<sys/eventfd.h>" nogil:
    int eventfd(unsigned initval, int flags)
    int EFD_CLOEXEC

cdef extern from "fuse/fuse_uring.h" nogil:
    struct io_uring:
        pass
    struct io_uring_cqe:
        uint64_t user_data
        int32_t res
    int fu_ring_init(io_uring* r, unsigned entries)
    int fu_prep_cmd(io_uring* r, int fd, uint32_t cmd_op, uint16_t qid, uint64_t commit_id,
                    iovec* iov, void* ud)
    int fu_prep_read(io_uring* r, int fd, void* buf, unsigned n, void* ud)
    int fu_pin(int cpu)
    void io_uring_queue_exit(io_uring* r)
    int io_uring_submit(io_uring* r)
    int io_uring_submit_and_wait(io_uring* r, unsigned n)
    int io_uring_peek_cqe(io_uring* r, io_uring_cqe** c)
    void io_uring_cqe_seen(io_uring* r, io_uring_cqe* c)
    unsigned io_uring_cq_ready(const io_uring* r)
    unsigned io_uring_sq_ready(const io_uring* r)

cdef enum:
    RING_DEPTH = 16          # entries per queue: requests the kernel can hand one CPU at once
    NR_HELPERS = 4           # threads answering the Python-bound and large requests
    LARGE_IO = 128 << 10     # a device READ/WRITE this large goes to the helpers


cdef struct ring_queue_t


cdef struct ring_ent_t:
    fuse_req_t req               # its request; answered here by _ring_reply (ctx: the entry)
    fuse_uring_req_header* hdr   # the kernel's while registered: the header buffer
    char* payload                # and the payload buffer (at least max_write)
    iovec iov[2]
    ring_queue_t* queue
    uint64_t started             # when the request was taken (ns), for its latency
    bint committed               # its command in flight is a COMMIT_AND_FETCH
    ring_ent_t* next             # the helpers' list or the queue's done list


cdef struct ring_queue_t:
    uring_t* uring
    io_uring ring
    bint ring_ok
    int qid                      # = the CPU it serves
    int efd                      # eventfd: a helper answered one of our entries
    uint64_t efd_buf
    ring_ent_t* ents
    int live                     # entries the kernel may still complete (queue thread only)
    size_t ndone                 # atomic: entries in `done`
    pthread_mutex_t lock         # guards done
    ring_ent_t* done             # entries answered by helpers, to commit
    pthread_t thread
    bint started


cdef struct uring_t:
    session_t* s
    int nr_queues
    ring_queue_t* queues
    size_t stop                  # atomic: queue threads and helpers end
    pthread_mutex_t lock         # guards work, helpers' waits
    pthread_cond_t wake
    ring_ent_t* work             # entries for the helpers (LIFO is fine: all independent)
    pthread_t helpers[NR_HELPERS]
    bint helper_started[NR_HELPERS]


# --- the reply path --------------------------------------------------------------------------

cdef void _ring_reply(void* ctx, uint64_t unique, int err, const void* data,
                      size_t size) noexcept nogil:
    """The reply_fn of a request from a ring entry (ctx: the ring_ent_t): the reply in the
    entry's buffers, for COMMIT_AND_FETCH: the out header in in_out (where the request's
    header was), the out args at the start of the payload (data may already be there: a
    READ's). Called by the thread serving the entry, queue thread or helper."""
    cdef ring_ent_t* e = <ring_ent_t*>ctx
    cdef fuse_out_header* o = <fuse_out_header*>e.hdr.in_out
    if size > e.req.s.max_io:
        err, size = EIO, 0                 # cannot happen: replies are capped at max_io
    if size and <const char*>data != e.payload:
        memmove(e.payload, data, size)
    o.len = <uint32_t>(sizeof(fuse_out_header) + size)
    o.error = -err
    o.unique = unique
    e.hdr.ring_ent_in_out.payload_sz = <uint32_t>size


# --- helpers: the requests that need the GIL, and large ones --------------------------------

cdef void* _helper_main(void* arg) noexcept nogil:
    cdef uring_t* u = <uring_t*>arg
    cdef ring_ent_t* e
    cdef ring_queue_t* q
    cdef uint64_t one = 1
    cdef uint32_t op
    while True:
        pthread_mutex_lock(&u.lock)
        while u.work == NULL and not za_load(&u.stop):
            pthread_cond_wait(&u.wake, &u.lock)
        e = u.work
        if e == NULL:                      # stopping, nothing left
            pthread_mutex_unlock(&u.lock)
            break
        u.work = e.next
        pthread_mutex_unlock(&u.lock)
        op = e.req.h.opcode                # the reply's header takes the request's place
        e.req.no_gil = False               # a helper may wait for the GIL: it answers all
        _serve(&e.req)
        _account(u.s, op, zram_now_ns() - e.started)
        q = e.queue
        pthread_mutex_lock(&q.lock)
        e.next = q.done
        q.done = e
        za_add(&q.ndone, 1)
        pthread_mutex_unlock(&q.lock)
        write(q.efd, &one, sizeof(one))    # wakes the queue thread if it sleeps
    return NULL


# --- queue threads ---------------------------------------------------------------------------

cdef inline int _ring_commit(ring_queue_t* q, ring_ent_t* e) noexcept nogil:
    e.committed = True
    return fu_prep_cmd(&q.ring, q.uring.s.fd, FUSE_IO_URING_CMD_COMMIT_AND_FETCH,
                       <uint16_t>q.qid, e.hdr.ring_ent_in_out.commit_id, NULL, e)


cdef inline bint _large_io(session_t* s, uint32_t op, const char* arg) noexcept nogil:
    """A device READ or WRITE of LARGE_IO or more: the kernel sends a large O_DIRECT
    request's 256 KiB pieces all at once, to one CPU's queue; served by the helpers, they
    run side by side (as on the classic workers) instead of one after another."""
    if s.dops == NULL or (op != FUSE_READ and op != FUSE_WRITE):
        return False
    # fuse_read_in and fuse_write_in both start with fh, offset, size.
    return ((<const fuse_read_in*>arg).fh & DATA_FH_FLAG
            and (<const fuse_read_in*>arg).size >= LARGE_IO)


cdef void _ring_request(ring_queue_t* q, ring_ent_t* e) noexcept nogil:
    """A request arrived in `e`: served here, or handed to a helper (large device I/O, and
    what _serve leaves for a thread that may take the GIL)."""
    cdef uring_t* u = q.uring
    cdef fuse_req_t* r = &e.req
    cdef uint32_t op = r.h.opcode          # the reply's header takes the request's place
    e.started = zram_now_ns()
    # The first argument is in op_in, the rest in the payload; LOOKUP's first argument is
    # its name, which the kernel sends as the payload after an empty op_in.
    if op == FUSE_LOOKUP:
        r.arg, r.arglen = e.payload, e.hdr.ring_ent_in_out.payload_sz
    else:
        r.arg, r.arglen = e.hdr.op_in, sizeof(e.hdr.op_in)
    r.no_gil = True
    if _large_io(u.s, op, r.arg) or _serve(r):
        pthread_mutex_lock(&u.lock)
        e.next = u.work
        u.work = e
        pthread_cond_signal(&u.wake)
        pthread_mutex_unlock(&u.lock)
        return
    _account(u.s, op, zram_now_ns() - e.started)
    _ring_commit(q, e)


cdef void _ring_take_done(ring_queue_t* q) noexcept nogil:
    """Commits the entries the helpers answered."""
    cdef ring_ent_t* e
    cdef ring_ent_t* nxt
    if not za_load(&q.ndone):
        return
    pthread_mutex_lock(&q.lock)
    e = q.done
    q.done = NULL
    za_store(&q.ndone, 0)
    pthread_mutex_unlock(&q.lock)
    while e != NULL:
        nxt = e.next
        _ring_commit(q, e)
        e = nxt


cdef inline bint _ring_stopping(uring_t* u) noexcept nogil:
    return za_load(&u.stop) or za_load(&u.s.stopping)


cdef bint _ring_wait(ring_queue_t* q, uring_t* u) noexcept nogil:
    """Until a completion is ready (True) or stop: sleeps in io_uring_enter unless one is
    ready or helpers answered entries. No spin first: measured on this 2-vCPU VM (4K random
    I/O, 2026-11-24), 10 and 50 us spins were worse than none (QD1 p99 33-121 us against
    14-37, QD32x2 writes 70-108k IOPS against 90-161k): a queue thread is pinned to the CPU
    its requests come from, so a spin only competes with the requester."""
    if io_uring_cq_ready(&q.ring):
        return True
    if not za_load(&q.ndone) and not _ring_stopping(u):
        io_uring_submit_and_wait(&q.ring, 1)         # -EINTR and such: look again
    return not _ring_stopping(u)


cdef void* _queue_main(void* arg) noexcept nogil:
    cdef ring_queue_t* q = <ring_queue_t*>arg
    cdef uring_t* u = q.uring
    cdef session_t* s = u.s
    cdef io_uring_cqe* cqe
    cdef ring_ent_t* e
    cdef int i, res
    fu_pin(q.qid)
    for i in range(RING_DEPTH):
        e = &q.ents[i]
        if fu_prep_cmd(&q.ring, s.fd, FUSE_IO_URING_CMD_REGISTER, <uint16_t>q.qid, 0,
                       e.iov, e) == 0:
            q.live += 1
    fu_prep_read(&q.ring, q.efd, &q.efd_buf, sizeof(q.efd_buf), NULL)
    io_uring_submit(&q.ring)
    while q.live and not _ring_stopping(u):
        if io_uring_sq_ready(&q.ring):
            io_uring_submit(&q.ring)
        if not _ring_wait(q, u):
            break
        while io_uring_peek_cqe(&q.ring, &cqe) == 0:
            e = <ring_ent_t*><size_t>cqe.user_data
            res = cqe.res
            io_uring_cqe_seen(&q.ring, cqe)
            if e == NULL:                              # the eventfd: a helper answered
                fu_prep_read(&q.ring, q.efd, &q.efd_buf, sizeof(q.efd_buf), NULL)
            elif res == 0:
                _ring_request(q, e)
            elif (e.committed and res != -ENOTCONN and res != -ECONNABORTED
                  and not za_load(&s.stopping)):
                # A refused commit (the request is gone: -ENOENT) leaves the kernel's entry
                # stranded; the buffers are registered again as a new entry, so a queue
                # never runs out of entries while the connection lives.
                e.committed = False
                fu_prep_cmd(&q.ring, s.fd, FUSE_IO_URING_CMD_REGISTER, <uint16_t>q.qid, 0,
                            e.iov, e)
            else:
                # -ENOTCONN: unmounted or the connection aborted; the kernel is done with
                # the entry, as with a refused REGISTER.
                q.live -= 1
        _ring_take_done(q)
    pthread_mutex_lock(&s.lock)
    s.running -= 1
    pthread_cond_broadcast(&s.done)
    pthread_mutex_unlock(&s.lock)
    return NULL


# --- start and stop --------------------------------------------------------------------------

cdef int _uring_prepare(session_t* s) noexcept nogil:
    """Before INIT's reply (in the worker that answers it): every queue's ring and entries,
    and the helpers. 0, or -errno and nothing kept: INIT then does not ask for the ring, so
    the kernel never waits for one that cannot come."""
    cdef uring_t* u = <uring_t*>calloc(1, sizeof(uring_t))
    cdef ring_queue_t* q
    cdef ring_ent_t* e
    cdef int i, j, rc = 0
    if u == NULL:
        return -ENOMEM
    u.s = s
    u.nr_queues = s.nr_queues
    pthread_mutex_init(&u.lock, NULL)
    pthread_cond_init(&u.wake, NULL)
    u.queues = <ring_queue_t*>calloc(u.nr_queues, sizeof(ring_queue_t))
    if u.queues == NULL:
        free(u)
        return -ENOMEM
    for i in range(u.nr_queues):
        u.queues[i].efd = -1
        pthread_mutex_init(&u.queues[i].lock, NULL)
    pthread_mutex_lock(&s.lock)
    s.uring = u                            # from here run() stops and frees it
    pthread_mutex_unlock(&s.lock)
    for i in range(u.nr_queues):
        q = &u.queues[i]
        q.uring = u
        q.qid = i
        q.efd = eventfd(0, EFD_CLOEXEC)
        q.ents = <ring_ent_t*>calloc(RING_DEPTH, sizeof(ring_ent_t))
        if q.efd < 0 or q.ents == NULL:
            rc = -ENOMEM
            break
        rc = fu_ring_init(&q.ring, 2 * RING_DEPTH + 4)
        if rc != 0:
            break
        q.ring_ok = True
        for j in range(RING_DEPTH):
            e = &q.ents[j]
            e.queue = q
            if (posix_memalign(<void**>&e.hdr, 64, sizeof(fuse_uring_req_header)) != 0
                    or posix_memalign(<void**>&e.payload, PAGE_SIZE, s.max_io) != 0):
                rc = -ENOMEM
                break
            e.iov[0].iov_base = e.hdr
            e.iov[0].iov_len = sizeof(fuse_uring_req_header)
            e.iov[1].iov_base = e.payload
            e.iov[1].iov_len = s.max_io
            # The request as _serve sees it: the header, a WRITE's data and the reply's data
            # all stay in the entry's buffers, and the answer goes back through the entry.
            e.req.s = s
            e.req.h = <fuse_in_header*>e.hdr.in_out
            e.req.data = e.req.scratch = e.payload
            e.req.reply = _ring_reply
            e.req.ctx = e
        if rc != 0:
            break
    if rc == 0:
        for i in range(NR_HELPERS):
            if zram_thread_start_stack(&u.helpers[i], _helper_main, u, WORKER_STACK) != 0:
                rc = -ENOMEM
                break
            u.helper_started[i] = True
    if rc != 0:
        s.uring_error = rc
        _uring_stop(s)
    return rc


cdef void _uring_go(session_t* s) noexcept nogil:
    """After INIT's reply: the queue threads, which register their entries (the kernel
    refuses REGISTER before it has INIT's reply)."""
    cdef uring_t* u = s.uring
    cdef ring_queue_t* q
    cdef int i
    pthread_mutex_lock(&s.lock)
    for i in range(u.nr_queues):
        q = &u.queues[i]
        s.running += 1
        if zram_thread_start_stack(&q.thread, _queue_main, q, WORKER_STACK) != 0:
            s.running -= 1
            s.uring_error = -ENOMEM
        else:
            q.started = True
    pthread_mutex_unlock(&s.lock)


cdef void _uring_stop(session_t* s) noexcept nogil:
    """Ends the queue threads and helpers, then the rings (the kernel then drops the entries)
    and frees it all. run()'s thread, after the workers were told to stop."""
    cdef uring_t* u
    cdef ring_queue_t* q
    cdef uint64_t one = 1
    cdef int i, j
    pthread_mutex_lock(&s.lock)
    u = s.uring
    s.uring = NULL
    pthread_mutex_unlock(&s.lock)
    if u == NULL:
        return
    za_store(&u.stop, 1)
    pthread_mutex_lock(&u.lock)
    pthread_cond_broadcast(&u.wake)
    pthread_mutex_unlock(&u.lock)
    for i in range(NR_HELPERS):
        if u.helper_started[i]:
            pthread_join(u.helpers[i], NULL)
    for i in range(u.nr_queues if u.queues != NULL else 0):
        q = &u.queues[i]
        if q.efd >= 0:
            write(q.efd, &one, sizeof(one))
        if q.started:
            pthread_join(q.thread, NULL)
        if q.ring_ok:
            io_uring_queue_exit(&q.ring)
        if q.efd >= 0:
            close(q.efd)
        if q.ents != NULL:
            for j in range(RING_DEPTH):
                free(q.ents[j].hdr)
                free(q.ents[j].payload)
            free(q.ents)
        pthread_mutex_destroy(&q.lock)
    free(u.queues)
    pthread_cond_destroy(&u.wake)
    pthread_mutex_destroy(&u.lock)
    free(u)


# --- for the Python face ---------------------------------------------------------------------

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
