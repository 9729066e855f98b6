/* The kernel's FUSE protocol: Debian 12's <linux/fuse.h> (protocol 7.38) and the few later
   bits the engine asks for where the running kernel offers them. */
#ifndef ZRAMFS_FUSE_KERNEL_H
#define ZRAMFS_FUSE_KERNEL_H
#include <linux/fuse.h>

/* 7.39: shared mmap of a file opened with FOPEN_DIRECT_IO (flags2 bit 4). */
#ifndef FUSE_DIRECT_IO_ALLOW_MMAP
#define FUSE_DIRECT_IO_ALLOW_MMAP (1ULL << 36)
#endif
/* 7.40: the server may ask for every request it read but did not answer to be sent again. */
#ifndef FUSE_HAS_RESEND
#define FUSE_HAS_RESEND (1ULL << 39)
#endif
#ifndef FUSE_NOTIFY_RESEND
#define FUSE_NOTIFY_RESEND 7
#endif
/* 7.42 (6.14+): FUSE over io_uring. The server sets the bit in init_out to say it will register
   a ring queue per possible CPU; the kernel offers it only while enable_uring is Y. */
#ifndef FUSE_OVER_IO_URING
#define FUSE_OVER_IO_URING (1ULL << 41)
#define FUSE_IO_URING_CMD_REGISTER 1
#define FUSE_IO_URING_CMD_COMMIT_AND_FETCH 2
/* One ring entry's header buffer: the request's (or reply's) header, the opcode's first
   argument, and the entry's own bookkeeping; everything else is in the payload buffer. */
struct fuse_uring_ent_in_out {
    uint64_t flags;
    uint64_t commit_id;          /* the request's unique, echoed in COMMIT_AND_FETCH */
    uint32_t payload_sz;         /* bytes used in the payload buffer, both ways */
    uint32_t padding;
    uint64_t reserved;
};
struct fuse_uring_req_header {
    char in_out[128];            /* fuse_in_header in, fuse_out_header out */
    char op_in[128];             /* the opcode's first argument (in only) */
    struct fuse_uring_ent_in_out ring_ent_in_out;
};
/* In the 128-byte SQE's command area. */
struct fuse_uring_cmd_req {
    uint64_t flags;
    uint64_t commit_id;
    uint16_t qid;
    uint8_t padding[6];
};
#endif
/* The protocol minor this engine speaks: what it asks for is defined up to here. */
#define ZRAMFS_FUSE_MINOR 40
#endif
