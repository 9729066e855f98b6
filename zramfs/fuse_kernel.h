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
/* The protocol minor this engine speaks: what it asks for is defined up to here. */
#define ZRAMFS_FUSE_MINOR 40
#endif
