# The kernel's FUSE protocol, as the engine uses it (cimport zramfs.fuse.fuse_kernel): the structs
# of <linux/fuse.h> with the fields the engine reads or writes (the C compiler sees the whole
# structs, so their layout is the kernel's), the opcodes and the flag bits. See
# docs/fuse-protocol.md for what each means.
from libc.stdint cimport int32_t, uint16_t, uint32_t, uint64_t

cdef extern from "fuse/fuse_kernel.h" nogil:
    enum:
        FUSE_KERNEL_VERSION
        ZRAMFS_FUSE_MINOR
        FUSE_NOTIFY_RESEND
        FUSE_NAME_OFFSET
    enum fuse_opcode:
        FUSE_LOOKUP, FUSE_FORGET, FUSE_GETATTR, FUSE_SETATTR, FUSE_READLINK, FUSE_SYMLINK,
        FUSE_MKNOD, FUSE_MKDIR, FUSE_UNLINK, FUSE_RMDIR, FUSE_RENAME, FUSE_LINK, FUSE_OPEN,
        FUSE_READ, FUSE_WRITE, FUSE_STATFS, FUSE_RELEASE, FUSE_FSYNC, FUSE_FLUSH, FUSE_INIT,
        FUSE_OPENDIR, FUSE_READDIR, FUSE_RELEASEDIR, FUSE_FSYNCDIR, FUSE_INTERRUPT,
        FUSE_DESTROY, FUSE_CREATE, FUSE_BATCH_FORGET, FUSE_FALLOCATE, FUSE_RENAME2
    uint64_t FUSE_ASYNC_READ, FUSE_ATOMIC_O_TRUNC, FUSE_BIG_WRITES, FUSE_ASYNC_DIO
    uint64_t FUSE_PARALLEL_DIROPS, FUSE_MAX_PAGES, FUSE_INIT_EXT
    uint64_t FUSE_DIRECT_IO_ALLOW_MMAP, FUSE_HAS_RESEND
    uint32_t FOPEN_DIRECT_IO, FOPEN_KEEP_CACHE, FOPEN_NONSEEKABLE, FOPEN_NOFLUSH
    uint32_t FOPEN_PARALLEL_DIRECT_WRITES
    uint32_t FATTR_MODE, FATTR_UID, FATTR_GID, FATTR_SIZE, FATTR_ATIME, FATTR_MTIME, FATTR_FH
    uint32_t FATTR_ATIME_NOW, FATTR_MTIME_NOW

    struct fuse_in_header:
        uint32_t len
        uint32_t opcode
        uint64_t unique
        uint64_t nodeid
        uint32_t uid
        uint32_t gid
        uint32_t pid
    struct fuse_out_header:
        uint32_t len
        int32_t error
        uint64_t unique
    struct fuse_interrupt_in:
        uint64_t unique
    struct fuse_init_in:
        uint32_t major
        uint32_t minor
        uint32_t max_readahead
        uint32_t flags
        uint32_t flags2
    struct fuse_init_out:
        uint32_t major
        uint32_t minor
        uint32_t max_readahead
        uint32_t flags
        uint16_t max_background
        uint16_t congestion_threshold
        uint32_t max_write
        uint32_t time_gran
        uint16_t max_pages
        uint16_t map_alignment
        uint32_t flags2
    struct fuse_attr:
        uint64_t ino
        uint64_t size
        uint64_t blocks
        uint64_t atime
        uint64_t mtime
        uint64_t ctime
        uint32_t mode
        uint32_t nlink
        uint32_t uid
        uint32_t gid
        uint32_t blksize
    struct fuse_entry_out:
        uint64_t nodeid
        uint64_t generation
        uint64_t entry_valid
        uint64_t attr_valid
        uint32_t entry_valid_nsec
        uint32_t attr_valid_nsec
        fuse_attr attr
    struct fuse_attr_out:
        uint64_t attr_valid
        uint32_t attr_valid_nsec
        fuse_attr attr
    struct fuse_setattr_in:
        uint32_t valid
        uint64_t fh
        uint64_t size
        uint64_t atime
        uint64_t mtime
        uint32_t mode
        uint32_t uid
        uint32_t gid
    struct fuse_open_in:
        uint32_t flags
    struct fuse_open_out:
        uint64_t fh
        uint32_t open_flags
    struct fuse_release_in:
        uint64_t fh
    struct fuse_read_in:
        uint64_t fh
        uint64_t offset
        uint32_t size
        uint32_t flags
    struct fuse_write_in:
        uint64_t fh
        uint64_t offset
        uint32_t size
        uint32_t flags
    struct fuse_write_out:
        uint32_t size
    struct fuse_fallocate_in:
        uint64_t fh
        uint64_t offset
        uint64_t length
        uint32_t mode
    struct fuse_kstatfs:
        uint32_t bsize
        uint32_t namelen
        uint32_t frsize
    struct fuse_statfs_out:
        fuse_kstatfs st
    struct fuse_dirent:
        uint64_t ino
        uint64_t off
        uint32_t namelen
        uint32_t type
    size_t FUSE_DIRENT_ALIGN(size_t x)

    # FUSE over io_uring (7.42): the flag, the two commands and an entry's header buffer.
    uint64_t FUSE_OVER_IO_URING
    enum:
        FUSE_IO_URING_CMD_REGISTER
        FUSE_IO_URING_CMD_COMMIT_AND_FETCH
    struct fuse_uring_ent_in_out:
        uint64_t flags
        uint64_t commit_id
        uint32_t payload_sz
    struct fuse_uring_req_header:
        char in_out[128]
        char op_in[128]
        fuse_uring_ent_in_out ring_ent_in_out
