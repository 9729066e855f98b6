/* liburing glue for the engine's io_uring transport (dev_uring.pxi): the few steps whose
   shape Cython cannot write (the 128-byte SQE's command area, a thread's CPU affinity).
   Every function here runs without the GIL; a ring is used by its own queue thread only. */
#ifndef ZRAMFS_FUSE_URING_H
#define ZRAMFS_FUSE_URING_H
#include <errno.h>
#include <liburing.h>
#include <pthread.h>
#include <sched.h>
#include <string.h>
#include <sys/uio.h>
#include "fuse/fuse_kernel.h"

/* A ring with 128-byte SQEs, which the FUSE commands need (the kernel refuses 64-byte ones).
   0 or -errno. */
static inline int fu_ring_init(struct io_uring* r, unsigned entries) {
    struct io_uring_params p;
    memset(&p, 0, sizeof(p));
    p.flags = IORING_SETUP_SQE128;
    return io_uring_queue_init_params(entries, r, &p);
}

static inline struct io_uring_sqe* fu_sqe(struct io_uring* r) {
    struct io_uring_sqe* sqe = io_uring_get_sqe(r);
    if (sqe == NULL) {               /* the SQ is full: hand it to the kernel, then retry */
        io_uring_submit(r);
        sqe = io_uring_get_sqe(r);
    }
    return sqe;
}

/* A FUSE_IO_URING_CMD_* for queue `qid`: REGISTER with the entry's two buffers, or
   COMMIT_AND_FETCH of the reply to `commit_id`. 0 or -EBUSY (no SQE). */
static inline int fu_prep_cmd(struct io_uring* r, int fd, uint32_t cmd_op, uint16_t qid,
                              uint64_t commit_id, struct iovec* iov, void* ud) {
    struct io_uring_sqe* sqe = fu_sqe(r);
    struct fuse_uring_cmd_req* req;
    if (sqe == NULL)
        return -EBUSY;
    memset(sqe, 0, 2 * sizeof(*sqe));
    sqe->opcode = IORING_OP_URING_CMD;
    sqe->fd = fd;
    sqe->cmd_op = cmd_op;
    if (iov != NULL) {
        sqe->addr = (uint64_t)(uintptr_t)iov;
        sqe->len = 2;
    }
    req = (struct fuse_uring_cmd_req*)sqe->cmd;
    req->commit_id = commit_id;
    req->qid = qid;
    io_uring_sqe_set_data(sqe, ud);
    return 0;
}

/* A read of `n` bytes from `fd` (the queue's eventfd). 0 or -EBUSY. */
static inline int fu_prep_read(struct io_uring* r, int fd, void* buf, unsigned n, void* ud) {
    struct io_uring_sqe* sqe = fu_sqe(r);
    if (sqe == NULL)
        return -EBUSY;
    io_uring_prep_read(sqe, fd, buf, n, 0);
    io_uring_sqe_set_data(sqe, ud);
    return 0;
}

/* Runs the calling thread on `cpu` only: its queue's requests come from that CPU. */
static inline int fu_pin(int cpu) {
    cpu_set_t set;
    CPU_ZERO(&set);
    CPU_SET(cpu, &set);
    return pthread_setaffinity_np(pthread_self(), sizeof(set), &set);
}
#endif
