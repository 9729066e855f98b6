/*
 * zramfs "data ops": the C-level interface between the FUSE session and the
 * block storage engine.  READ/WRITE/FALLOCATE on data-file handles are served
 * by these function pointers directly in the FUSE engine's worker threads, without the
 * Python GIL.  All functions must be thread-safe.
 *
 * Shared between extension modules through a PyCapsule named
 * ZRAMFS_DATA_OPS_CAPSULE whose pointer is a `const zramfs_data_ops *`.
 */
#ifndef ZRAMFS_DATA_OPS_H
#define ZRAMFS_DATA_OPS_H

#include <stdint.h>
#include <sys/types.h>

#define ZRAMFS_DATA_OPS_CAPSULE "zramfs.zram.data_ops"

/* `fh` names the device (zramfs.zram._zram: Disk.handle), so the ops need no context. */
typedef struct zramfs_data_ops {
    /* returns bytes read (short at end of device) or -errno */
    ssize_t (*read)(uint64_t fh, char *buf, size_t size, uint64_t off);
    /* returns bytes written or -errno */
    ssize_t (*write)(uint64_t fh, const char *buf, size_t size, uint64_t off);
    /* mode is the fallocate(2) mode; returns 0 or -errno */
    int (*fallocate)(uint64_t fh, int mode, uint64_t off, uint64_t length);
} zramfs_data_ops;

#endif
