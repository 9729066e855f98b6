# The classic transport, the server's side of the kernel's fs/fuse/dev.c: worker threads that
# read requests from the one /dev/fuse descriptor and write each answer back to it. Included
# by _fuse.pyx. Everything here runs without the GIL; a worker's buffers are its own, and
# s.lock guards only the count of running threads.
#
# `max_threads` workers block in read(2); the kernel hands each request to one of them. They
# run no Python but through the `with gil` handlers (ops.pxi), start with every signal blocked
# (zram_thread_start_stack), and can be cancelled only while they wait in read(2), so a cancel
# never catches one holding the GIL or a lock. INIT, FORGET, INTERRUPT and the notifications
# always come this way, even once the io_uring transport (dev_uring.pxi) serves the rest.

cdef extern from "<sys/uio.h>" nogil:
    struct iovec:
        void* iov_base
        size_t iov_len
    ssize_t writev(int fd, const iovec* iov, int iovcnt)

cdef extern from "<pthread.h>" nogil:
    int pthread_cancel(pthread_t t)
    int pthread_setcancelstate(int state, int* old)
    int PTHREAD_CANCEL_ENABLE, PTHREAD_CANCEL_DISABLE


cdef struct worker_t:
    session_t* s
    char* request                 # what read(2) fills: the header, its argument, data
    char* scratch                 # a READ's data or a READDIR's entries, for the reply
    pthread_t thread
    bint started


cdef void _dev_reply(void* ctx, uint64_t unique, int err, const void* data,
                     size_t size) noexcept nogil:
    """The reply_fn of a request read from /dev/fuse (ctx: its session_t): the header and
    `size` bytes of `data`, in one writev. A write that fails (the request was interrupted
    and is gone: ENOENT; the connection ended) changes nothing here: the kernel has already
    finished with the request."""
    cdef fuse_out_header h
    cdef iovec iov[2]
    h.len = <uint32_t>(sizeof(fuse_out_header) + size)
    h.error = -err
    h.unique = unique
    iov[0].iov_base = &h
    iov[0].iov_len = sizeof(fuse_out_header)
    iov[1].iov_base = <void*>data
    iov[1].iov_len = size
    writev((<session_t*>ctx).fd, iov, 2 if size else 1)


cdef void* _worker_main(void* arg) noexcept nogil:
    cdef worker_t* w = <worker_t*>arg
    cdef session_t* s = w.s
    cdef fuse_req_t r
    cdef ssize_t n
    cdef int old, err
    cdef uint64_t started
    # Every request lands at the same place in the worker's buffer: all but its length is set
    # once. A worker may take the GIL, so it answers every request itself (no_gil False).
    memset(&r, 0, sizeof(r))
    r.s = s
    r.h = <fuse_in_header*>w.request
    r.arg = w.request + sizeof(fuse_in_header)
    r.data = r.arg + sizeof(fuse_write_in)
    r.scratch = w.scratch
    r.reply = _dev_reply
    r.ctx = s
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
        if <size_t>n >= sizeof(fuse_in_header) and r.h.len == n:   # else nothing to answer
            r.arglen = n - sizeof(fuse_in_header)
            _serve(&r)
        _account(s, r.h.opcode, zram_now_ns() - started)
    pthread_mutex_lock(&s.lock)
    s.running -= 1
    pthread_cond_broadcast(&s.done)
    pthread_mutex_unlock(&s.lock)
    return NULL


cdef int _workers_start(session_t* s) noexcept nogil:
    """run()'s thread: s.nr_workers workers (s.workers allocated, zeroed), each with its
    buffers. 0, or -ENOMEM with the ones started so far running (_workers_end ends them)."""
    cdef worker_t* w
    cdef int i
    for i in range(s.nr_workers):
        w = &s.workers[i]
        w.s = s
        w.request = <char*>malloc(s.request_size)
        w.scratch = <char*>malloc(s.max_io)
        if w.request == NULL or w.scratch == NULL:
            return -ENOMEM
        # Resident before the first read(2): the kernel ends with EIO a request whose copy
        # into this buffer faults while the process is being killed (a crash during a live
        # restart), instead of leaving it for the next daemon.
        memset(w.request, 0, s.request_size)
        pthread_mutex_lock(&s.lock)
        s.running += 1
        pthread_mutex_unlock(&s.lock)
        if zram_thread_start_stack(&w.thread, _worker_main, w, WORKER_STACK) != 0:
            pthread_mutex_lock(&s.lock)
            s.running -= 1
            pthread_mutex_unlock(&s.lock)
            return -ENOMEM
        w.started = True
    return 0


cdef void _workers_end(session_t* s) noexcept nogil:
    """run()'s thread, once the workers were told to stop: cancels those still waiting in
    read(2) (a no-op for one that ended), joins them and frees their buffers and s.workers."""
    cdef int i
    for i in range(s.nr_workers):
        if s.workers[i].started:
            pthread_cancel(s.workers[i].thread)
            pthread_join(s.workers[i].thread, NULL)
        free(s.workers[i].request)
        free(s.workers[i].scratch)
    free(s.workers)
    s.workers = NULL


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
